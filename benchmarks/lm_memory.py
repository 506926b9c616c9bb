"""Compiled memory of the SAM-family steps on a transformer, against AdamW.

For the decoder-only transformer of ``tests/transformer.py`` (float32
master params, bf16 compute) at a language-model-like shape (by default
dim 256, 4 layers, vocabulary 8192, sequence 256, batch 16: 7.4M params,
logits 4.5x the params' bytes), this script compiles one train step of

* ``adamw``: ``jax.value_and_grad`` and ``optax.adamw``;
* ``sam``: ``sam_optax.sam(adamw)`` called with ``obj_fn=``;
* ``preconditioned``: ``sam_optax.preconditioned_sam(adamw)``;
* ``functional``: ``sam_optax.functional_sam(adamw)`` with
  ``functional_value_and_grad`` and ``output_grads=``;
* ``preconditioned_functional``: the same with ``preconditioned=True``;

unsharded (one device) and sharded on 8 fake CPU devices (a 4 x 2
``('fsdp', 'tp')`` mesh, ``tests/transformer.param_specs``; the batch over
``fsdp``), params and state donated, under XLA:CPU's default and
memory-optimised schedules, and reports ``compile().memory_analysis()``:
temp bytes and peak (arguments + outputs - aliased + temp; per device when
sharded). The goal: each SAM-family step's peak ≤ the AdamW step's + one
param-sized float32 buffer (per device: the params' bytes / 8 when sharded).
Nothing is run: compiled memory only, so it works on CPU.

Run::

  python benchmarks/lm_memory.py            # git-ignored results/local/
  python benchmarks/lm_memory.py --write    # benchmarks/results/lm_memory.*
  python benchmarks/lm_memory.py --quick    # the tiny test config
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _common  # noqa: E402
import speed  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax._compilation.memory import SCHEDULES  # noqa: E402
from tests import transformer as T  # noqa: E402

VARIANTS = ("adamw", "sam", "preconditioned", "functional",
            "preconditioned_functional")
# Not in the default run: Functional-SAM with the logit gradient kept in
# bf16 between the passes (--variants adamw functional_bf16_grads).
EXTRA_VARIANTS = ("functional_bf16_grads",)
RHO = 0.05


def make_tx(variant):
  base = optax.adamw(1e-3, weight_decay=0.1)
  if variant == "adamw":
    return base
  if variant == "sam":
    return sam_optax.sam(base, rho=RHO)
  if variant == "preconditioned":
    return sam_optax.preconditioned_sam(base, rho=RHO)
  return sam_optax.functional_sam(
      base, rho=RHO, preconditioned=variant == "preconditioned_functional")


def make_step(variant, tx, config):
  def step(params, state, batch):
    obj_fn = lambda p: T.loss_fn(config, p, batch)  # noqa: E731
    if variant in ("functional", "preconditioned_functional",
                   "functional_bf16_grads"):
      outputs_fn = lambda p: T.logits_fn(config, p, batch["tokens"])  # noqa: E731
      loss_fn = lambda z: T.loss_from_logits(z, batch["targets"])  # noqa: E731
      loss, grads, dlogits = sam_optax.functional_value_and_grad(
          outputs_fn, loss_fn, params)
      if variant == "functional_bf16_grads":
        dlogits = dlogits.astype("bfloat16")
      updates, state = tx.update(grads, state, params,
                                 outputs_fn=outputs_fn, output_grads=dlogits)
    else:
      loss, grads = jax.value_and_grad(obj_fn)(params)
      extra = {} if variant == "adamw" else {"obj_fn": obj_fn}
      updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  return step


def measure(variant, config, batch_size, sharded, schedule):
  tx = make_tx(variant)
  params = T.init_params(config)
  batch = T.make_batches(config, 1, batch_size)[0]
  step = make_step(variant, tx, config)
  if sharded:
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"),
                         axis_types=(AxisType.Auto, AxisType.Auto))
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s),
                            T.param_specs(config),
                            is_leaf=lambda x: isinstance(x, P))
    replicated = NamedSharding(mesh, P())
    state_sh = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    batch_sh = NamedSharding(mesh, P("fsdp", None))
    shapes = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=s), params, param_sh),
              jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
                  x.shape, x.dtype, sharding=s),
                           jax.eval_shape(tx.init, params), state_sh),
              jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                  x.shape, x.dtype, sharding=batch_sh), batch))
    jitted = jax.jit(step, out_shardings=(param_sh, state_sh, replicated),
                     donate_argnums=(0, 1))
  else:
    shapes = (jax.eval_shape(lambda: params),
              jax.eval_shape(tx.init, params), jax.eval_shape(lambda: batch))
    jitted = jax.jit(step, donate_argnums=(0, 1))
  start = time.perf_counter()
  lowered = jitted.lower(*shapes)
  options = dict(SCHEDULES[schedule])
  compiled = (lowered.compile(compiler_options=options) if options
              else lowered.compile())
  mem = speed.memory_stats(compiled)
  mem["compile_s"] = time.perf_counter() - start
  mem["flops"] = speed.cost_stats(compiled)["flops"]
  return mem


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="the tiny test config (a smoke run)")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=VARIANTS + EXTRA_VARIANTS,
                      help="the steps (adamw, the baseline, must be one)")
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 8],
                      choices=[1, 8])
  parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                      choices=list(SCHEDULES))
  _common.add_output_args(parser, "lm_memory")
  args = parser.parse_args()
  if args.quick:
    config, batch_size = T.Config(), 8
  else:
    config = T.Config(vocab=args.vocab, seq=args.seq, dim=args.dim,
                      heads=4, hidden=4 * args.dim, layers=args.layers)
    batch_size = args.batch
  params = T.init_params(config)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  info = _common.machine()
  rows = []
  start = time.time()
  if "adamw" not in args.variants:
    parser.error("--variants must include adamw (the baseline)")
  for sharded in [d == 8 for d in args.devices]:
    for schedule in args.schedules:
      for variant in args.variants:
        mem = measure(variant, config, batch_size, sharded, schedule)
        row = {"variant": variant, "sharded": sharded, "schedule": schedule,
               **mem}
        rows.append(row)
        _common.log(f"{'8 devices' if sharded else '1 device'} {schedule} "
                    f"{variant}: temp {mem['temp'] / 2**20:.2f} MiB, peak "
                    f"{mem['peak'] / 2**20:.2f} MiB ({mem['compile_s']:.1f} s)")
  elapsed = time.time() - start

  def mib(b):
    return f"{b / 2**20:.2f}"

  lines = [
      "# Compiled memory of the SAM-family steps on a transformer (cpu)", "",
      *_common.machine_markdown(info), "",
      f"Model: `tests/transformer.py`, dim {config.dim}, {config.layers} "
      f"layers, {config.heads} heads, MLP {config.hidden}, vocabulary "
      f"{config.vocab}, sequence {config.seq}, batch {batch_size}: "
      f"{num_params:,} params ({mib(param_bytes)} MiB float32), logits "
      f"{mib(batch_size * config.seq * config.vocab * 4)} MiB float32; bf16 "
      "compute, float32 master params, AdamW base, params and state "
      "donated.",
      f"Command: `python benchmarks/lm_memory.py "
      f"{' '.join(sys.argv[1:])}` ({elapsed / 60:.1f} min).", "",
      "temp, peak: `compile().memory_analysis()`, per device (peak = "
      "arguments + outputs - aliased + temp). Budget: the AdamW step's peak "
      "+ one param-sized float32 buffer (per device: / 8 when sharded; the "
      "FSDP x TP layout shards every matrix 8 ways, the norms' scales and "
      "positions are replicated). 'extra' = peak - AdamW's peak, in param "
      "buffers.", "",
      "| devices | schedule | step | temp MiB | peak MiB | peak - AdamW "
      "MiB | extra (param buffers) | within budget |",
      "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    base = next(r for r in rows if r["variant"] == "adamw"
                and r["sharded"] == row["sharded"]
                and r["schedule"] == row["schedule"])
    buffer = param_bytes / (8 if row["sharded"] else 1)
    extra = row["peak"] - base["peak"]
    row["extra_param_buffers"] = extra / buffer
    row["within_budget"] = extra <= buffer
    lines.append(
        f"| {8 if row['sharded'] else 1} | {row['schedule']} | "
        f"{row['variant']} | {mib(row['temp'])} | {mib(row['peak'])} | "
        f"{mib(extra)} | {extra / buffer:.2f} | "
        f"{'yes' if row['within_budget'] else '**no**'} |")
  data = {"machine": info, "config": vars(config) if hasattr(
      config, "__dict__") else str(config), "batch": batch_size,
          "num_params": num_params, "param_bytes": param_bytes,
          "rows": rows}
  _common.publish(_common.output_stem(args, "lm_memory"), data,
                  "\n".join(lines))


if __name__ == "__main__":
  main()
