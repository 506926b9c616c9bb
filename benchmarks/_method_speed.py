"""Every method's step against the base step (``speed.py --methods``).

For each model and batch size, every method of the package is compiled on
the same Flax model as the base optimizer (SGD with momentum) and timed
with it in one process, round-robin (``_common.time_interleaved``); the
ratio to the base step is the median of the per-round paired ratios. Each
method has a target, its gradients per step + 0.05 (issue 22): MSAM, RWP,
SAF and late-phase SAM before the switch 1.05, LookSAM (every_k=5) 1.25,
RST (p=0.5) 1.55, SAM, ASAM, GSAM and Friendly-SAM 2.05. AE-SAM (its SAM
fraction depends on the data), ESAM (a sub-batch backward pass) and MESA
(an extra forward pass of the EMA teacher) have none. Also per method:
compiled temp memory and XLA's "bytes accessed" against the base step's,
which show extra passes over the parameters that the clock may hide.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import _common
import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import sam_optax

LR, MOMENTUM = 0.01, 0.9
RHO = 0.05

# name -> (gradients per step for the target or None, description).
METHODS = {
    "base": (1.0, "optax.sgd(lr, momentum=0.9)"),
    "sam": (2.0, "sam(rho=0.05)"),
    "asam": (2.0, "sam(rho=0.5, adaptive=True)"),
    "gsam": (2.0, "gsam(rho=0.05, alpha=0.3)"),
    "friendly_sam": (2.0, "friendly_sam(rho=0.05)"),
    "looksam": (1.2, "looksam(rho=0.05, every_k=5)"),
    "rst": (1.5, "rst(rho=0.05, probability=0.5)"),
    "ae_sam": (None, "ae_sam(rho=0.05, threshold=0)"),
    "esam": (None, "esam(rho=0.05, beta=0.5, gamma=0.5)"),
    "sam_late": (1.0, "sam(rho=late_phase(0.05, 10**9)): rho = 0 here"),
    "sam_late_on": (2.0, "sam(rho=late_phase(0.05, 0)): after the switch, "
                    "SAM inside the zero-radius cond"),
    "msam": (1.0, "msam(rho=0.3)"),
    "rwp": (1.0, "rwp(std=0.01)"),
    "rwp_hash": (1.0, "rwp(std=0.01, generator='hash')"),
    "rwp_hash_stored": (1.0, "rwp(std=0.01, generator='hash', "
                        "store_noise=True)"),
    "saf": (1.0, "saf(lam=0.3): trajectory loss every step"),
    "mesa": (None, "mesa(lam=0.3): + the EMA teacher's forward pass"),
    # References, not methods: one draw of param-sized normal noise alone
    # (summed, so that XLA keeps it), what RWP adds to a step per draw.
    "noise_threefry": (None, "one param-sized N(0, 1) draw alone, threefry "
                       "(jax.random.normal)"),
    "noise_hash": (None, "one param-sized N(0, 1) draw alone, "
                   "sam_optax.hash_normal"),
}
TOLERANCE = 0.05
QUICK = {"mlp-1m": (32, 128)}
FULL = {"mlp-1m": (32, 128, 512), "cnn-s": (32, 128),
        "transformer-s": (32, 128)}


def target(name: str) -> float | None:
  grads = METHODS[name][0]
  return None if grads is None or name == "base" else grads + TOLERANCE


def make_steps(spec: _models.Spec, names):
  """``{name: (tx, step)}``; ``step(params, stats, opt_state, x, y, ids) ->
  (params, stats, opt_state, loss)``."""
  module = spec.module

  def forward(params, stats, x):
    """``(logits, new_stats)``; BatchNorm statistics updated when present."""
    variables = {"params": params}
    if stats:
      variables["batch_stats"] = stats
      logits, upd = module.apply(variables, x, train=True,
                                 mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    return module.apply(variables, x, train=True), {}

  def example_losses(params, stats, x, y):
    logits, new_stats = forward(params, stats, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), \
        new_stats

  def loss_fn(params, stats, x, y):
    losses, new_stats = example_losses(params, stats, x, y)
    return losses.mean(), new_stats

  vg = jax.value_and_grad(loss_fn, has_aux=True)
  grad = jax.grad(loss_fn, has_aux=True)

  def base():
    return optax.sgd(LR, momentum=MOMENTUM)

  def plain(tx):
    def step(params, stats, state, x, y, ids):
      (loss, new_stats), g = vg(params, stats, x, y)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), new_stats, state, loss
    return step

  def with_grad_fn(tx):
    def step(params, stats, state, x, y, ids):
      (loss, new_stats), g = vg(params, stats, x, y)
      updates, state = tx.update(g, state, params,
                                 grad_fn=lambda p: grad(p, stats, x, y))
      return optax.apply_updates(params, updates), new_stats, state, loss
    return step

  def esam_step(tx):
    def step(params, stats, state, x, y, ids):
      def mean_loss(p):
        losses, new_stats = example_losses(p, stats, x, y)
        return losses.mean(), (losses, new_stats)

      (loss, (losses, new_stats)), g = jax.value_and_grad(
          mean_loss, has_aux=True)(params)
      updates, state = tx.update(
          g, state, params, batch=(x, y), example_losses=losses,
          example_loss_fn=lambda p, b: example_losses(p, stats, *b)[0])
      return optax.apply_updates(params, updates), new_stats, state, loss
    return step

  def saf_step(tx):
    def step(params, stats, state, x, y, ids):
      lam = sam_optax.trajectory_weight(state)
      targets = sam_optax.saf_targets(state, ids)

      def total(p):
        logits, new_stats = forward(p, stats, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.mean() + lam * sam_optax.trajectory_loss(
            logits, targets), (ce.mean(), logits, new_stats)

      (_, (loss, logits, new_stats)), g = jax.value_and_grad(
          total, has_aux=True)(params)
      updates, state = tx.update(g, state, params, example_ids=ids,
                                 outputs=logits)
      return optax.apply_updates(params, updates), new_stats, state, loss
    return step

  def mesa_step(tx):
    def step(params, stats, state, x, y, ids):
      lam = sam_optax.trajectory_weight(state)
      teacher = lax.cond(
          lam > 0, lambda: forward(sam_optax.teacher_params(state), stats,
                                   x)[0],
          lambda: jnp.zeros((x.shape[0], _models.NUM_CLASSES), jnp.float32))

      def total(p):
        logits, new_stats = forward(p, stats, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.mean() + lam * sam_optax.trajectory_loss(
            logits, teacher), (ce.mean(), new_stats)

      (_, (loss, new_stats)), g = jax.value_and_grad(
          total, has_aux=True)(params)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), new_stats, state, loss
    return step

  factories = {
      "base": lambda: (base(), plain(base())),
      "sam": lambda: sam_optax.sam(base(), rho=RHO, has_aux=True),
      "asam": lambda: sam_optax.sam(base(), rho=0.5, adaptive=True,
                                    has_aux=True),
      "gsam": lambda: sam_optax.gsam(base(), rho=RHO, alpha=0.3,
                                     has_aux=True),
      "friendly_sam": lambda: sam_optax.friendly_sam(base(), rho=RHO,
                                                     has_aux=True),
      "looksam": lambda: sam_optax.looksam(base(), rho=RHO, every_k=5,
                                           has_aux=True),
      "rst": lambda: sam_optax.rst(base(), rho=RHO, probability=0.5,
                                   has_aux=True),
      "ae_sam": lambda: sam_optax.ae_sam(base(), rho=RHO, threshold=0.0,
                                         has_aux=True),
      "sam_late": lambda: sam_optax.sam(
          base(), rho=sam_optax.late_phase(RHO, 10**9), has_aux=True),
      "sam_late_on": lambda: sam_optax.sam(
          base(), rho=sam_optax.late_phase(RHO, 0), has_aux=True),
      "msam": lambda: sam_optax.msam(base(), rho=0.3),
      "rwp": lambda: sam_optax.rwp(base(), std=0.01),
      "rwp_hash": lambda: sam_optax.rwp(base(), std=0.01, generator="hash"),
      "rwp_hash_stored": lambda: sam_optax.rwp(
          base(), std=0.01, generator="hash", store_noise=True),
  }
  def noise_step(generator):
    from sam_optax._methods import rwp as _rwp

    def step(params, stats, count, x, y, ids):
      key = jax.random.key_data(jax.random.key(0))
      ones = jax.tree.map(lambda w: jnp.ones([], jnp.float32), params)
      eps = _rwp.noise(key, count, ones, params, generator)
      total = sum(jnp.sum(e) for e in jax.tree.leaves(eps))
      return params, stats, count + 1, total
    return step

  class Counter:
    def init(self, params):
      del params
      return jnp.zeros([], jnp.int32)

  out = {}
  for name in names:
    if name.startswith("noise_"):
      out[name] = (Counter(), noise_step(name[len("noise_"):]))
    elif name == "base":
      out[name] = factories[name]()
    elif name == "esam":
      tx = sam_optax.esam(base(), rho=RHO, beta=0.5, gamma=0.5)
      out[name] = (tx, esam_step(tx))
    elif name == "saf":
      tx = sam_optax.saf(base(), num_examples=spec.batch_size,
                         num_outputs=_models.NUM_CLASSES, steps_per_epoch=1,
                         lam=0.3, start_epoch=3, minus_epoch=3)
      out[name] = (tx, saf_step(tx))
    elif name == "mesa":
      tx = sam_optax.mesa(base(), decay=0.99, lam=0.3, start_step=0)
      out[name] = (tx, mesa_step(tx))
    elif name in ("msam", "rwp", "rwp_hash", "rwp_hash_stored"):
      tx = factories[name]()
      out[name] = (tx, plain(tx))
    else:
      tx = factories[name]()
      out[name] = (tx, with_grad_fn(tx))
  return out


def with_batch(spec: _models.Spec, batch: int) -> _models.Spec:
  return dataclasses.replace(spec, batch_size=batch)


def bench(spec, batch, names, rounds, sample_s, workers=2, log=_common.log):
  """Compiles and times every method on ``spec`` at ``batch``."""
  spec = with_batch(spec, batch)
  params, stats = spec.init()
  x, y = spec.make_batch()
  ids = jnp.arange(batch, dtype=jnp.int32)
  steps = make_steps(spec, names)
  log(f"[{spec.name} batch {batch}] {_models.num_params(params):,} params; "
      f"compiling {len(names)} steps")
  carries, futures, compiled, rows = {}, {}, {}, {}
  start = time.perf_counter()
  with ThreadPoolExecutor(max(1, workers)) as pool:
    for name in names:
      tx, step = steps[name]
      carries[name] = (params, stats, tx.init(params))
      lowered = jax.jit(step).lower(*carries[name], x, y, ids)
      futures[pool.submit(lowered.compile)] = name
    for future in as_completed(futures):
      compiled[futures[future]] = future.result()
  log(f"  compiled in {time.perf_counter() - start:.0f} s")
  for name in names:
    mem = compiled[name].memory_analysis()
    cost = compiled[name].cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    rows[name] = {"temp_bytes": int(mem.temp_size_in_bytes),
                  "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                  "state_bytes": int(sum(np.asarray(v).nbytes for v in
                                         jax.tree.leaves(carries[name][2])))}
  runners = {n: _common.loop_runner(compiled[n], carries[n], x, y, ids)
             for n in names}
  samples, n_steps = _common.time_interleaved(runners, rounds, sample_s,
                                              min_steps=3, progress=log)
  base = rows["base"]
  for name, row in rows.items():
    row["ms"] = _common.quantiles(s * 1e3 for s in samples[name])
    row["vs_base"] = _common.paired(samples, name, "base")
    # The least disturbed samples: robust where other jobs load the machine.
    row["min_vs_base"] = min(samples[name]) / min(samples["base"])
    row["temp_vs_base"] = row["temp_bytes"] / max(base["temp_bytes"], 1)
    row["bytes_vs_base"] = row["bytes_accessed"] / max(
        base["bytes_accessed"], 1)
    row["target"] = target(name)
    if row["target"] is not None:
      row["met"] = row["vs_base"]["median"] <= row["target"]
  return {"model": spec.name, "batch": batch,
          "num_params": _models.num_params(params),
          "steps_per_sample": n_steps, "rounds": rounds, "variants": rows}


def run(quick: bool, models=None, rounds=None, sample_s=None, names=None,
        workers=2, log=_common.log, batches=None):
  plan = QUICK if quick else FULL
  if models:
    plan = {m: FULL.get(m, (32, 128)) for m in models}
  if batches:
    plan = {m: tuple(batches) for m in plan}
  rounds = rounds or (5 if quick else 11)
  sample_s = sample_s or (0.1 if quick else 0.25)
  names = ["base"] + [n for n in (names or METHODS) if n != "base"]
  results = []
  for model, batches in plan.items():
    for batch in batches:
      results.append(bench(_models.MODELS[model], batch, names, rounds,
                           sample_s, workers, log))
      log(_table_line_summary(results[-1]))
  return results


def _table_line_summary(res) -> str:
  v = res["variants"]
  return (f"  {res['model']} b{res['batch']}: " + "  ".join(
      f"{n} {r['vs_base']['median']:.2f}" for n, r in v.items()))


def markdown(results, info, argv, elapsed) -> str:
  out = ["# Every method's step against the base step "
         f"({_common.device_slug()})", ""]
  out += _common.machine_markdown(info)
  out.append(f"Command: `python benchmarks/speed.py {' '.join(argv)}` "
             f"({elapsed / 60:.1f} min). Base: SGD with momentum 0.9; "
             "float32; synthetic batches.")
  out += ["", "Cells: step time / base step time, median of the per-round "
          "paired ratios [interquartile range] (fastest sample / fastest "
          "base sample, the least disturbed by other jobs); **bold**: the "
          "target "
          "(gradients per step + 0.05) missed. Target column: the bound. "
          "Temp and bytes: compiled temp memory and XLA bytes accessed "
          "relative to the base step (at the largest batch).", ""]
  names = list(results[0]["variants"])
  cols = [f"{r['model']} b{r['batch']}" for r in results]
  out.append("| method | target | " + " | ".join(cols)
             + " | temp x base | bytes x base |")
  out.append("|---|---|" + "---|" * len(cols) + "---|---|")
  for name in names:
    if name == "base":
      cells = [f"{r['variants']['base']['ms']['median']:.2f} ms"
               for r in results]
    else:
      cells = []
      for r in results:
        row = r["variants"][name]
        q = row["vs_base"]
        cell = (f"{q['median']:.2f} [{q['q25']:.2f}, {q['q75']:.2f}] "
                f"({row['min_vs_base']:.2f})")
        if row.get("met") is False:
          cell = f"**{cell}**"
        cells.append(cell)
    tgt = target(name)
    per_model = {}
    for r in results:
      per_model[r["model"]] = r["variants"][name]  # the largest batch last
    temp = " / ".join(f"{v['temp_vs_base']:.2f}" for v in per_model.values())
    nbytes = " / ".join(f"{v['bytes_vs_base']:.2f}"
                        for v in per_model.values())
    out.append(f"| `{name}` | {'—' if tgt is None else f'{tgt:.2f}'} | "
               + " | ".join(cells) + f" | {temp} | {nbytes} |")
  out += ["", "Temp and bytes columns: one value per model ("
          + ", ".join(dict.fromkeys(r["model"] for r in results)) + "), "
          "at its largest batch.", "", "Methods:", ""]
  out += [f"- `{n}`: {d}" for n, (_, d) in METHODS.items() if n in names]
  missed = [(r["model"], r["batch"], n, v["vs_base"]["median"], v["target"])
            for r in results for n, v in r["variants"].items()
            if v.get("met") is False]
  out += ["", "## Targets missed", ""]
  out += ([f"- {m} batch {b}: `{n}` {x:.2f} > {t:.2f}"
           for m, b, n, x, t in missed] or ["None."])
  return "\n".join(out) + "\n"
