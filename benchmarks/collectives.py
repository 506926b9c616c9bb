"""Counts the collectives in the compiled data-parallel SAM step.

Compiles one training step of a small MLP on 8 fake CPU devices, under
``jax.pmap``, under ``jax.shard_map`` inside ``jax.jit``, under plain
``jax.jit`` with sharded inputs, and on a 2-D ('data', 'model') mesh, for
the base optimizer alone (one ``pmean`` of the gradients) and wrapped in
``sam_optax.sam``. Reads the all-reduces out of the optimised HLO
(``jitted.lower(...).compile().as_text()``): XLA's all-reduce combiner may
fuse several reductions into one instruction, so the table counts the
reduced operands, split into tensors (gradient leaves; activations on the
model axis) and scalars (SAM's logged norms).

Run: ``python benchmarks/collectives.py``; it prints the table and writes it
to the git-ignored ``benchmarks/results/local/collectives.{md,json}``
(``--write``: the tracked ``benchmarks/results/collectives.*``; ``--out
STEM``: any path).
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)  # Before any backend starts.

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import sam_optax  # noqa: E402

N_DEV = 8
PER_DEV = 4
D_IN, HIDDEN, D_OUT = 16, 32, 2  # No 1-element leaf: scalars = logging.

# ------------------------------------------------------------ HLO parsing

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_INSTR = re.compile(
    r"=\s*(?P<type>.*?)\s(?P<op>" + "|".join(_COLLECTIVES)
    + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[[0-9]+,([0-9]+)\]<=")


def _group_size(line):
  m = _GROUPS_LIST.search(line)
  if m:
    return len(m.group(1).split(","))
  m = _GROUPS_IOTA.search(line)
  return int(m.group(1)) if m else N_DEV


def collectives(hlo_text):
  """The collectives of an optimised HLO module.

  Returns:
    A list with one dict per collective instruction: ``op`` (e.g.
    ``'all-reduce'``), ``shapes`` (one tuple per reduced operand) and
    ``group_size`` (devices per replica group).
  """
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    shapes = [tuple(int(d) for d in s.split(",") if d)
              for s in _SHAPE.findall(m.group("type"))]
    found.append({"op": m.group("op"), "shapes": shapes,
                  "group_size": _group_size(line)})
  return found


def summarize(found, n_params, group_size=N_DEV):
  """Counts over the collectives whose replica groups have ``group_size``."""
  mine = [c for c in found if c["group_size"] == group_size]
  reduces = [c for c in mine if c["op"] == "all-reduce"]
  shapes = [s for c in reduces for s in c["shapes"]]
  tensors = [s for s in shapes if s]
  elements = sum(math.prod(s) for s in tensors)
  return {
      "all-reduce ops": len(reduces),
      "tensor operands": len(tensors),
      "tensor elements": elements,
      "gradient trees": elements / n_params,
      "scalar operands": len(shapes) - len(tensors),
      "other collectives": len(mine) - len(reduces),
  }


# ----------------------------------------------------------------- problem


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.standard_normal((D_IN, HIDDEN)) / 4).astype(np.float32),
      "b1": np.zeros(HIDDEN, np.float32),
      "w2": (rng.standard_normal((HIDDEN, D_OUT)) / 6).astype(np.float32),
      "b2": np.zeros(D_OUT, np.float32),
  }


def make_batch(seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_DEV * PER_DEV, D_IN)).astype(np.float32)
  y = rng.standard_normal((N_DEV * PER_DEV, D_OUT)).astype(np.float32)
  return x, y


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  # A sum of products rather than h @ w2: with Explicit mesh axes, a matmul
  # contracting a dimension sharded over 'model' would need out_sharding=.
  pred = jnp.sum(h[..., None] * params["w2"], axis=-2) + params["b2"]
  return jnp.mean((pred - y) ** 2)


def base_tx():
  return optax.sgd(0.1, momentum=0.9)


def sam_tx(**kwargs):
  return sam_optax.sam(base_tx(), rho=0.05, axis_name="data", **kwargs)


def base_body(tx, params, state, x, y):
  """Plain data parallelism: local gradient, one pmean, base update."""
  local = sam_optax.mark_varying(params, "data")
  grads = jax.lax.pmean(jax.grad(loss_fn)(local, x, y), "data")
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def sam_body(tx, params, state, x, y):
  """Per-device SAM: local gradient, ``sam`` pmeans the SAM gradient."""
  local = sam_optax.mark_varying(params, "data")
  grads = jax.grad(loss_fn)(local, x, y)
  grad_fn = functools.partial(jax.grad(loss_fn), x=x, y=y)
  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state


# ------------------------------------------------------------------ steps


def hlo_pmap(body, tx):
  params = init_params()
  x, y = make_batch()

  def stack(tree):
    return jax.tree.map(lambda a: np.stack([a] * N_DEV), tree)

  step = jax.pmap(functools.partial(body, tx), axis_name="data")
  return step.lower(stack(params), stack(tx.init(params)),
                    x.reshape(N_DEV, PER_DEV, D_IN),
                    y.reshape(N_DEV, PER_DEV, D_OUT)).compile().as_text()


def hlo_shard_map(body, tx):
  mesh = jax.make_mesh((N_DEV,), ("data",))
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  step = jax.jit(jax.shard_map(
      functools.partial(body, tx), mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
  return step.lower(params, state, x, y).compile().as_text()


def hlo_plain_jit(use_sam):
  """No shard_map: XLA partitions the step; gradients are global (m = B)."""
  mesh = jax.make_mesh((N_DEV,), ("data",))
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  if use_sam:
    tx = sam_optax.sam(base_tx(), rho=0.05)
  else:
    tx = base_tx()
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    extra = {}
    if use_sam:
      extra["grad_fn"] = functools.partial(jax.grad(loss_fn), x=x, y=y)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return jax.jit(step).lower(params, state, x, y).compile().as_text()


MODEL = 2
DATA = N_DEV // MODEL
MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"),
               "w2": P("model", None), "b2": P(None)}


def hlo_data_model(body, tx):
  """2-D mesh: hidden units sharded over 'model', manual over 'data' only."""
  mesh = jax.make_mesh((DATA, MODEL), ("data", "model"))
  params = {k: jax.device_put(v, NamedSharding(mesh, MODEL_SPECS[k]))
            for k, v in init_params().items()}
  x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  step = jax.jit(jax.shard_map(
      functools.partial(body, tx), mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()),
      axis_names={"data"}))
  return step.lower(params, state, x, y).compile().as_text()


def rows(log=_common.log):
  """``(label, per-device params, collectives)`` for every step compiled."""
  n = sum(a.size for a in jax.tree.leaves(init_params()))
  # On the 2-D mesh each device holds 1/MODEL of the model-sharded leaves.
  n_local = sum(a.size // (MODEL if "model" in MODEL_SPECS[k] else 1)
                for k, a in init_params().items())
  plan = []  # (label, params per device, () -> optimised HLO text)
  for name, hlo in (("pmap", hlo_pmap), ("shard_map", hlo_shard_map)):
    plan += [
        (f"{name}: base (pmean of grads)", n,
         functools.partial(hlo, base_body, base_tx())),
        (f"{name}: SAM", n, functools.partial(hlo, sam_body, sam_tx())),
        (f"{name}: ASAM", n,
         functools.partial(hlo, sam_body, sam_tx(adaptive=True))),
        (f"{name}: SAM, sync_ascent", n,
         functools.partial(hlo, sam_body, sam_tx(sync_ascent=True))),
    ]
  plan += [
      ("jit, no shard_map: base", n, functools.partial(hlo_plain_jit, False)),
      ("jit, no shard_map: SAM (m = global batch)", n,
       functools.partial(hlo_plain_jit, True)),
      ("2-D mesh: base", n_local,
       functools.partial(hlo_data_model, base_body, base_tx())),
      ("2-D mesh: SAM", n_local,
       functools.partial(hlo_data_model, sam_body, sam_tx())),
  ]
  out = []
  for i, (label, n_dev, compile_hlo) in enumerate(plan):
    log(f"compiling {i + 1}/{len(plan)}: {label}")
    out.append((label, n_dev, collectives(compile_hlo())))
  return out


COLUMNS = ["all-reduce ops", "tensor operands", "tensor elements",
           "gradient trees", "scalar operands", "other collectives"]


def render(table):
  n = sum(a.size for a in jax.tree.leaves(init_params()))
  lines = [
      f"One compiled training step of an MLP {D_IN}-{HIDDEN}-{D_OUT} ({n} "
      f"params), SGD + momentum, on {N_DEV} fake CPU devices (jax "
      f"{jax.__version__}, optax {optax.__version__}). Counted over the "
      "data axis's replica groups: all-reduce instructions (XLA combines "
      "reductions), the tensor and scalar operands they reduce, and "
      "'gradient trees' = tensor elements / params per device. The 2-D mesh "
      f"is ({DATA} data x {MODEL} model) with the hidden units sharded over "
      "'model'; its last column lists the all-reduces over 'model'.",
      "",
      "| step | " + " | ".join(COLUMNS) + " | over 'model' |",
      "|---" * (len(COLUMNS) + 2) + "|",
  ]
  for label, n_local, found in table:
    data = summarize(found, n_local, DATA if "2-D" in label else N_DEV)
    cells = [f"{data[c]:g}" for c in COLUMNS]
    model = ""
    if "2-D" in label:
      m = summarize(found, n_local, MODEL)
      model = (f"{m['all-reduce ops']} ops: {m['tensor operands']} tensors, "
               f"{m['scalar operands']} scalars")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {model} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_output_args(parser, "collectives")
  args = parser.parse_args(argv)
  assert jax.device_count() == N_DEV, jax.devices()
  table = rows()
  data = {"machine": _common.machine(),
          "rows": [{"step": label, "params_per_device": n,
                    "collectives": found} for label, n, found in table]}
  _common.publish(
      _common.output_stem(args, "collectives"), data,
      "# Collectives per SAM step\n\n"
      "Written by `python benchmarks/collectives.py`.\n\n" + render(table))


if __name__ == "__main__":
  main()
