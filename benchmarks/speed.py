"""Speed and memory of a SAM step: sam_optax against its physical limit.

Exact SAM needs two gradient evaluations per step, so a SAM step costs about
twice a plain step: that is the physical limit. This script measures, for an
MLP, a small CNN with BatchNorm and a small transformer block (Flax linen,
two sizes each, synthetic data), the step time and the compiled memory of

* ``base``:         the base optimizer (SGD with momentum), one gradient;
* ``hand_sam``:     a hand-written two-gradient SAM step (the reference);
* ``sam_optax``:    ``sam_optax.sam(base, rho)``;
* ``sam_optax_lowmem``: the same step compiled by
  ``sam_optax.compile_low_memory`` (the default or XLA:CPU's
  memory-optimised schedule, whichever needs less temp memory);
* ``hand_asam``:    a hand-written ASAM step (the second reference);
* ``sam_optax_asam``: ``sam_optax.sam(base, rho, adaptive=True)``;
* ``optax_contrib``: ``optax.contrib.sam`` in opaque mode with the canonical
  adversary ``chain(contrib.normalize(), sgd(rho))`` and ``sync_period=2``;
* on request only (``--variants``): ``hand_sam_cond`` and ``hand_sam_loop``,
  the hand-written step with the second pass in its own computation (a
  ``lax.cond`` or a one-trip ``while_loop``), which XLA cannot interleave
  with the first pass.

All steps keep the BatchNorm statistics of the clean pass and drop those of
the perturbed pass. Each step is compiled once (``jit(...).lower(...)
.compile()``, which also gives ``memory_analysis()`` and
``cost_analysis()``); ``base`` and ``sam_optax`` are compiled under both
schedules for the memory table. After a warm-up the variants are
timed in one process, round-robin over several rounds (order rotated each
round), each sample timing a loop of steps with ``block_until_ready`` inside
the timed region (``benchmarks/_common.py``). Ratios are paired: a variant's
sample is divided by the reference's sample of the same round.

Reported per model and variant: ms/step (median and interquartile range over
rounds), the ratio to the base step and to the reference (``sam_optax`` and
``optax_contrib`` against ``hand_sam``, ``sam_optax_asam`` against
``hand_asam``, ``sam_optax_lowmem`` against ``sam_optax``), compiled temp and
peak memory, XLA's "bytes accessed", optimizer-state bytes and parameter-sized
buffers in the state beyond the base optimizer's; and per model the temp and
peak of the base and SAM steps under the default and the memory-optimised
schedules with the ratio SAM/base for each. Peak is arguments + outputs -
aliased + temp (XLA:CPU's own ``peak_memory_in_bytes`` leaves out temp).

Run (from the repository root; needs flax)::

  python benchmarks/speed.py --quick      # 3 models, 2-6 min on 2 CPU cores
  python benchmarks/speed.py              # all models, more rounds
  python benchmarks/speed.py --models mlp-s mlp-l \\
      --variants hand_asam sam_optax_asam --default-schedule-only  # ASAM only

``--methods`` times every method of the package against the base step
instead (``_method_speed.py``: the ~1M-param MLP at batch 32/128/512 and
``cnn-s``/``transformer-s`` at 32/128; ``--quick``: the MLP at 32 and 128;
``--methods rwp msam`` only those; ``--batches 64 256`` other sizes), with
each method's target (gradients per step + 0.05), compiled temp memory and
bytes accessed against the base step's; reports
``speed_methods_<device>[_quick].{json,md}``::

  python benchmarks/speed.py --methods --quick

Reports go to the git-ignored ``benchmarks/results/local/speed_<device>
[_quick].{json,md}`` (``<device>``: ``cpu`` or e.g.
``gpu-nvidia-h100-80gb-hbm3``); ``--write`` writes the tracked
``benchmarks/results/`` instead, ``--out STEM`` any path. Nothing is
CPU-specific: the same command runs on a GPU (where only the default
schedule exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _method_speed  # noqa: E402
import _models  # noqa: E402

import sam_optax  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
RHO_SAM, RHO_ASAM, ETA = 0.05, 0.5, 0.01
EPS = 1e-12

# Timed by default, in this order.
VARIANTS = ("base", "hand_sam", "sam_optax", "sam_optax_lowmem",
            "optax_contrib", "hand_asam", "sam_optax_asam")
# Only on request: the second pass in its own computation (slow on CPU).
EXTRA_VARIANTS = ("hand_sam_cond", "hand_sam_loop")
REFERENCE = {"sam_optax": "hand_sam", "optax_contrib": "hand_sam",
             "sam_optax_asam": "hand_asam", "sam_optax_lowmem": "sam_optax",
             "hand_sam_cond": "hand_sam", "hand_sam_loop": "hand_sam"}
# Compiled under both schedules for the memory table (hand_sam's default
# temp is reported too; its memory-optimised compile would repeat
# sam_optax's).
MEMORY_VARIANTS = ("base", "sam_optax", "hand_sam_cond", "hand_sam_loop")
SCHEDULES = ("default", "memory_optimized")
QUICK_MODELS = ("mlp-l", "cnn-s", "transformer-s")


# ----------------------------------------------------------------------------
# The steps. Signature: step(params, batch_stats, opt_state, x, y)
#   -> (params, batch_stats, opt_state, loss).
# ----------------------------------------------------------------------------


def make_variants(loss_fn: Callable[..., Any]):
  """``{name: (optimizer, step)}`` for every variant, all on ``loss_fn``.

  ``loss_fn(params, batch_stats, x, y) -> (loss, new_batch_stats)``.
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  grad = jax.grad(loss_fn, has_aux=True)  # -> (grads, new_batch_stats)

  def base_tx():
    return optax.sgd(LR, momentum=MOMENTUM)

  def finish(tx, params, opt_state, g):
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # (1) The base optimizer: one gradient.
  base = base_tx()

  def base_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
    params, opt_state = finish(base, params, opt_state, g)
    return params, new_stats, opt_state, loss

  # (2) Hand-written SAM: grad, normalise, perturb, grad, base update.
  def hand_sam_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
    scale = RHO_SAM / (optax.tree.norm(g) + EPS)
    perturbed = jax.tree.map(lambda w, gi: w + scale * gi, params, g)
    g_sam, _ = grad(perturbed, batch_stats, x, y)  # Drop perturbed stats.
    params, opt_state = finish(base, params, opt_state, g_sam)
    return params, new_stats, opt_state, loss

  # (5) Hand-written ASAM: T = |w| + eta, eps = rho T^2 g / ||T g||.
  def hand_asam_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
    t = jax.tree.map(lambda w: jnp.abs(w) + ETA, params)
    tg = jax.tree.map(jnp.multiply, t, g)
    scale = RHO_ASAM / (optax.tree.norm(tg) + EPS)
    perturbed = jax.tree.map(lambda w, ti, tgi: w + scale * ti * tgi,
                             params, t, tg)
    g_sam, _ = grad(perturbed, batch_stats, x, y)
    params, opt_state = finish(base, params, opt_state, g_sam)
    return params, new_stats, opt_state, loss

  # (7), (8) The second pass in its own computation: a lax.cond whose
  # predicate is true at run time, or a while_loop with one trip that XLA
  # cannot see at compile time (it removes a loop of known trip count 1).
  def second_pass(kind):
    def step(params, batch_stats, opt_state, x, y):
      (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
      scale = RHO_SAM / (optax.tree.norm(g) + EPS)
      perturbed = jax.tree.map(lambda w, gi: w + scale * gi, params, g)

      def g_at(p):
        return grad(p, batch_stats, x, y)[0]

      if kind == "cond":
        g_sam = jax.lax.cond(jnp.isfinite(loss), g_at, optax.tree.zeros_like,
                             perturbed)
      else:
        # The barrier ties the perturbed params to the loop counter, so that
        # loop-invariant code motion cannot hoist the pass out of the loop.
        def body(c):
          i, p = jax.lax.optimization_barrier((c[0], perturbed))
          return i + 1, g_at(p)

        trips = 1 + jnp.isnan(loss).astype(jnp.int32)
        _, g_sam = jax.lax.while_loop(
            lambda c: c[0] < trips, body,
            (jnp.int32(0), optax.tree.zeros_like(params)))
      params, opt_state = finish(base, params, opt_state, g_sam)
      return params, new_stats, opt_state, loss
    return step

  # (3), (4) sam_optax: the perturbed pass's statistics dropped by has_aux.
  def library_step(tx):
    def step(params, batch_stats, opt_state, x, y):
      (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
      updates, opt_state = tx.update(
          g, opt_state, params,
          grad_fn=lambda p: grad(p, batch_stats, x, y))
      return optax.apply_updates(params, updates), new_stats, opt_state, loss
    return step

  sam_tx = sam_optax.sam(base_tx(), rho=RHO_SAM, has_aux=True)
  asam_tx = sam_optax.sam(base_tx(), rho=RHO_ASAM, adaptive=True, eta=ETA,
                          has_aux=True)

  # (6) optax.contrib.sam, opaque mode: grad_fn(params, i).
  contrib_tx = optax.contrib.sam(
      base_tx(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO_SAM)),
      sync_period=2, opaque_mode=True)

  def contrib_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), g = value_and_grad(params, batch_stats, x, y)
    updates, opt_state = contrib_tx.update(
        g, opt_state, params,
        grad_fn=lambda p, i: grad(p, batch_stats, x, y)[0])
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return {
      "base": (base, base_step),
      "hand_sam": (base, hand_sam_step),
      "sam_optax": (sam_tx, library_step(sam_tx)),
      "optax_contrib": (contrib_tx, contrib_step),
      "hand_asam": (base, hand_asam_step),
      "sam_optax_asam": (asam_tx, library_step(asam_tx)),
      "hand_sam_cond": (base, second_pass("cond")),
      "hand_sam_loop": (base, second_pass("loop")),
  }


# ----------------------------------------------------------------------------
# Compile: memory and cost of every variant.
# ----------------------------------------------------------------------------


def tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def param_sized_leaves(state: Any, params: Any) -> int:
  """Number of state leaves with the shape and dtype of some parameter."""
  shapes = {(x.shape, x.dtype) for x in jax.tree.leaves(params) if x.size > 1}
  return sum((x.shape, x.dtype) in shapes for x in jax.tree.leaves(state))


def memory_stats(compiled) -> dict[str, int]:
  """Temp, arguments, outputs, aliased and peak bytes of a compiled step.

  ``peak`` is arguments + outputs - aliased + temp, or XLA's own
  ``peak_memory_in_bytes`` where that is larger (XLA:CPU's leaves out temp;
  on GPU it is the buffer assignment's peak).
  """
  mem = compiled.memory_analysis()
  out = {"temp": int(mem.temp_size_in_bytes),
         "arguments": int(mem.argument_size_in_bytes),
         "outputs": int(mem.output_size_in_bytes),
         "aliased": int(mem.alias_size_in_bytes)}
  xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  out["xla_peak"] = xla_peak
  out["peak"] = max(xla_peak, out["arguments"] + out["outputs"]
                    - out["aliased"] + out["temp"])
  return out


def cost_stats(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def select_variants(names=None) -> list[str]:
  """The variants to run: ``base``, ``names`` and their references."""
  if not names:
    return list(VARIANTS)
  keep = {"base", *names}
  for n in names:  # References, and theirs (sam_optax_lowmem -> hand_sam).
    while n in REFERENCE:
      n = REFERENCE[n]
      keep.add(n)
  return [n for n in VARIANTS + EXTRA_VARIANTS if n in keep]


def compile_model(spec, names, workers=2, both_schedules=True,
                  log=_common.log):
  """Lowers and compiles the variants of one model.

  Returns ``(compiled, rows, carries, inputs)``: ``{name: Compiled}``;
  ``{name: row}`` with the memory, cost and state size of each variant (and
  ``schedules``, the memory under each schedule, for the variants in
  :data:`MEMORY_VARIANTS`); ``{name: (params, batch_stats, opt_state)}``;
  and the batch ``(x, y)``.
  """
  params, stats = spec.init()
  x, y = spec.make_batch()
  variants = make_variants(spec.loss_fn())
  base_state = variants["base"][0].init(params)

  def job(name, lowered):
    start = time.perf_counter()
    both = both_schedules and name in MEMORY_VARIANTS
    log(f"  compiling {name}" + (" (default and memory-optimised schedules)"
                                 if both else ""))
    if both:
      chosen, report = sam_optax.compile_low_memory(lowered)
      out = {"schedules": report.compiled, "chosen": chosen,
             "kept": report.chosen}
    else:
      fn = lowered.compile()
      out = {"schedules": {"default": fn}, "chosen": fn, "kept": "default"}
    out["compile_s"] = time.perf_counter() - start
    return out

  # Trace and lower here; compile in a small pool (XLA compiles release the
  # GIL, and compiling dominates the quick mode's time).
  carries, futures = {}, {}
  lowered_names = [n for n in names if n != "sam_optax_lowmem"]
  if "sam_optax_lowmem" in names and "sam_optax" not in lowered_names:
    lowered_names.append("sam_optax")
  with ThreadPoolExecutor(max(1, workers)) as pool:
    for name in lowered_names:
      tx, step = variants[name]
      state = tx.init(params)
      carries[name] = (params, stats, state)
      log(f"  lowering {name}")
      futures[pool.submit(
          job, name, jax.jit(step).lower(params, stats, state, x, y))] = name
    done = {}
    for future in as_completed(futures):
      name = futures[future]
      done[name] = future.result()
      log(f"  compiled {name:15s} {done[name]['compile_s']:5.1f}s")

  compiled, rows = {}, {}
  for name in lowered_names:
    out, state = done[name], carries[name][2]
    compiled[name] = out["schedules"]["default"]
    row = {"compile_s": out["compile_s"],
           **{f"{k}_bytes": v for k, v in memory_stats(compiled[name]).items()},
           **cost_stats(compiled[name]),
           "state_bytes": tree_bytes(state),
           "extra_state_bytes": tree_bytes(state) - tree_bytes(base_state),
           "extra_param_sized_buffers": (param_sized_leaves(state, params)
                                         - param_sized_leaves(base_state,
                                                              params))}
    row["schedules"] = {s: memory_stats(c)
                        for s, c in out["schedules"].items()}
    row["kept_schedule"] = out["kept"]
    rows[name] = row
    log(f"  {name:15s} temp " + " / ".join(
        f"{s} {mib(m['temp'])}" for s, m in row.get(
            "schedules", {"default": memory_stats(compiled[name])}).items())
        + " MiB")
    if name == "sam_optax" and "sam_optax_lowmem" in names:
      compiled["sam_optax_lowmem"] = out["chosen"]
      carries["sam_optax_lowmem"] = carries[name]
      rows["sam_optax_lowmem"] = {
          **row, **{f"{k}_bytes": v for k, v in memory_stats(
              out["chosen"]).items()}, **cost_stats(out["chosen"])}
  order = [n for n in names if n in compiled]
  return ({n: compiled[n] for n in order}, {n: rows[n] for n in order},
          carries, (x, y))


# ----------------------------------------------------------------------------
# Time and compare.
# ----------------------------------------------------------------------------


def time_model(compiled, carries, inputs, rounds, sample_seconds,
               log=_common.log):
  """Interleaved timing; returns ``({name: [s/step per round]}, steps)``."""
  runners = {name: _common.loop_runner(fn, carries[name], *inputs)
             for name, fn in compiled.items()}
  return _common.time_interleaved(runners, rounds, sample_seconds,
                                  progress=log)


def compare(rows, samples, param_bytes):
  """Adds times, paired ratios and memory/bytes ratios to ``rows``."""
  q = _common.quantiles
  base_temp = max(rows["base"]["temp_bytes"], 1)
  for name, row in rows.items():
    row["ms"] = q(s * 1e3 for s in samples[name])
    row["samples_ms"] = [s * 1e3 for s in samples[name]]
    row["vs_base"] = _common.paired(samples, name, "base")
    row["temp_vs_base"] = row["temp_bytes"] / base_temp
    ref = REFERENCE.get(name)
    if ref is None or ref not in rows:
      continue
    r = rows[ref]
    row["reference"] = ref
    row["vs_reference"] = _common.paired(samples, name, ref)
    row["min_vs_reference"] = min(samples[name]) / min(samples[ref])
    row["temp_vs_reference"] = row["temp_bytes"] / max(r["temp_bytes"], 1)
    row["bytes_accessed_vs_reference"] = (row["bytes_accessed"]
                                          / max(r["bytes_accessed"], 1))
    row["extra_bytes_accessed_in_params"] = (
        (row["bytes_accessed"] - r["bytes_accessed"]) / param_bytes)
  return rows


def memory_summary(rows) -> dict[str, Any]:
  """Temp and peak of base and SAM steps per schedule, and SAM / base."""
  base = rows["base"].get("schedules")
  if not base:
    return {}
  out = {"base": base}
  for name in ("hand_sam", "sam_optax", "hand_sam_cond", "hand_sam_loop"):
    sched = rows.get(name, {}).get("schedules")
    if not sched:
      continue
    out[name] = {
        s: {**m,
            "temp_vs_base": m["temp"] / max(base[s]["temp"], 1),
            "peak_vs_base": m["peak"] / max(base[s]["peak"], 1),
            "temp_vs_base_default": m["temp"] / max(
                base["default"]["temp"], 1),
            "peak_vs_base_default": m["peak"] / max(
                base["default"]["peak"], 1)}
        for s, m in sched.items() if s in base}
    out[name]["kept"] = rows[name].get("kept_schedule")
  return out


def bench_model(spec, rounds, sample_seconds, names=None, workers=2,
                both_schedules=True, log=_common.log, batch_scale=1):
  """Compiles, times and compares the variants of one model."""
  spec = _models.scale_batch(spec, batch_scale)
  params, _ = spec.init()
  n_params = _models.num_params(params)
  param_bytes = tree_bytes(params)
  log(f"[{spec.name}] {spec.description}: {n_params:,} params "
      f"({param_bytes / 2**20:.1f} MiB)")
  compiled, rows, carries, inputs = compile_model(
      spec, select_variants(names), workers, both_schedules, log)
  samples, n_steps = time_model(compiled, carries, inputs, rounds,
                                sample_seconds, log)
  compare(rows, samples, param_bytes)
  return {"name": spec.name, "description": spec.description,
          "num_params": n_params, "param_bytes": param_bytes,
          "steps_per_sample": n_steps, "rounds": rounds, "variants": rows,
          "memory": memory_summary(rows)}


# ----------------------------------------------------------------------------
# Targets and the report.
# ----------------------------------------------------------------------------


TIME_TARGET, TEMP_TARGET = 1.02, 1.00


def check_targets(results) -> list[str]:
  """One line per model and sam_optax variant: targets met or missed."""
  lines = []
  for res in results:
    for name in ("sam_optax", "sam_optax_asam"):
      row = res["variants"].get(name)
      if row is None or "vs_reference" not in row:
        continue
      ratio, temp = row["vs_reference"], row["temp_vs_reference"]
      t_ok = ratio["median"] <= TIME_TARGET
      noise = ""
      if not t_ok and ratio["q25"] <= TIME_TARGET:
        noise = ", IQR reaches the target: within noise"
      buf = row["extra_param_sized_buffers"]
      lines.append(
          f"{res['name']} {name} vs {row['reference']}: time "
          f"{ratio['median']:.3f} [IQR {ratio['q25']:.3f}-{ratio['q75']:.3f}"
          f"; min/min {row['min_vs_reference']:.3f}] "
          f"{'met' if t_ok else 'MISSED'}{noise}; temp {temp:.3f} "
          f"{'met' if temp <= TEMP_TARGET else 'MISSED'}; extra "
          f"param-sized buffers {buf} {'met' if buf == 0 else 'MISSED'}; "
          f"bytes accessed {row['bytes_accessed_vs_reference']:.3f} "
          f"({row['extra_bytes_accessed_in_params']:+.2f} x param bytes)")
  return lines


def mib(n: float) -> str:
  return f"{n / 2**20:.2f}"


def summary_table(results) -> list[str]:
  """One row per model: the ratios that matter, medians of paired ratios."""
  cols = [("hand_sam", "vs_base", "hand_sam x base"),
          ("sam_optax", "vs_reference", "sam_optax x hand_sam"),
          ("sam_optax_lowmem", "vs_reference", "sam_optax_lowmem x sam_optax"),
          ("optax_contrib", "vs_reference", "optax_contrib x hand_sam"),
          ("sam_optax_asam", "vs_reference", "sam_optax_asam x hand_asam")]
  present = [c for c in cols
             if any(c[0] in r["variants"] for r in results)]
  out = ["| model | params | base ms | " + " | ".join(c[2] for c in present)
         + " | sam_optax bytes x ref (SAM / ASAM) |",
         "|---|---|---|" + "---|" * len(present) + "---|"]
  for res in results:
    v = res["variants"]
    cells = []
    for name, key, _ in present:
      cells.append(_common.fmt_quantiles(v[name][key])
                   if name in v and key in v[name] else "—")

    def nbytes(name):
      row = v.get(name, {})
      return (f"{row['bytes_accessed_vs_reference']:.3f}"
              if "bytes_accessed_vs_reference" in row else "—")

    out.append(f"| {res['name']} | {res['num_params']:,} | "
               f"{v['base']['ms']['median']:.1f} | " + " | ".join(cells)
               + f" | {nbytes('sam_optax')} / {nbytes('sam_optax_asam')} |")
  return out


def memory_table(results) -> list[str]:
  """Temp and peak of base and SAM, default and memory-optimised schedule."""
  rows = [r for r in results if r.get("memory", {}).get("base")]
  if not rows:
    return []
  sam = "sam_optax" if any("sam_optax" in r["memory"] for r in rows) \
      else "hand_sam"
  diffs = [abs(r["variants"]["hand_sam"]["temp_bytes"]
               / max(r["variants"][sam]["temp_bytes"], 1) - 1)
           for r in rows if "hand_sam" in r["variants"]]
  same = (f" (hand_sam's temp differs from it by at most "
          f"{100 * max(diffs):.1f}% on these models)"
          if diffs and sam != "hand_sam" else "")
  out = [
      f"SAM = `{sam}`{same}. `def`: XLA's default schedule; "
      "`mem`: XLA:CPU's memory-optimised schedule "
      "(`xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`). "
      "Temp and peak in MiB; peak = arguments + outputs + temp (nothing "
      "donated). SAM(mem) / base(def): the SAM step compiled for low "
      "memory against the base step as users compile it. Kept: the schedule "
      "`sam_optax.compile_low_memory` keeps for the SAM step.", "",
      "| model | base temp def / mem | SAM temp def / mem | SAM/base temp "
      "def | SAM/base temp mem | SAM(mem) / base(def) temp | base peak def / "
      "mem | SAM peak def / mem | SAM/base peak def / mem | SAM(mem) / "
      "base(def) peak | kept |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for res in rows:
    m = res["memory"]
    base, s = m["base"], m.get(sam)
    if not s or "memory_optimized" not in s:
      out.append(f"| {res['name']} | {mib(base['default']['temp'])} | "
                 + (f"{mib(s['default']['temp'])} | "
                    f"{s['default']['temp_vs_base']:.2f}" if s else "—")
                 + " | — (one schedule) |" + " — |" * 6)
      continue
    d, o = s["default"], s["memory_optimized"]
    out.append(
        f"| {res['name']} | {mib(base['default']['temp'])} / "
        f"{mib(base['memory_optimized']['temp'])} | {mib(d['temp'])} / "
        f"{mib(o['temp'])} | {d['temp_vs_base']:.2f} | "
        f"{o['temp_vs_base']:.2f} | {o['temp_vs_base_default']:.2f} | "
        f"{mib(base['default']['peak'])} / "
        f"{mib(base['memory_optimized']['peak'])} | {mib(d['peak'])} / "
        f"{mib(o['peak'])} | {d['peak_vs_base']:.2f} / "
        f"{o['peak_vs_base']:.2f} | {o['peak_vs_base_default']:.2f} | "
        f"{s.get('kept')} |")
  extra = [(res["name"], n, res["memory"][n]) for res in rows
           for n in ("hand_sam_cond", "hand_sam_loop") if n in res["memory"]]
  if extra:
    out += ["", "The second pass in its own computation (temp MiB, default "
            "schedule; time from the per-model tables):", "",
            "| model | variant | temp def | temp / base def | time x hand_sam "
            "|", "|---|---|---|---|---|"]
    for model, name, m in extra:
      res = next(r for r in rows if r["name"] == model)
      vr = res["variants"][name].get("vs_reference")
      out.append(f"| {model} | {name} | {mib(m['default']['temp'])} | "
                 f"{m['default']['temp_vs_base']:.2f} | "
                 + (_common.fmt_quantiles(vr) if vr else "—") + " |")
  return out


def markdown(results, info, args, elapsed) -> str:
  """The Markdown report: machine, summary, memory, per model, targets."""
  out = [f"# SAM step speed and memory ({_common.device_slug()})", ""]
  out += _common.machine_markdown(info)
  cmd = " ".join(["python benchmarks/speed.py"] + list(args))
  out.append(
      f"Command: `{cmd}` ({elapsed / 60:.1f} min). SGD momentum (lr {LR}, "
      f"momentum {MOMENTUM}); SAM rho {RHO_SAM}; ASAM rho {RHO_ASAM}, eta "
      f"{ETA}.")
  out += [
      "", "Columns: ms/step, median [interquartile range] over rounds; "
      "x base and x ref, median of the per-round paired ratios (ref = "
      "hand_sam for sam_optax and optax_contrib, hand_asam for "
      "sam_optax_asam, sam_optax for sam_optax_lowmem); temp and peak MiB "
      "from `compile().memory_analysis()` (peak = arguments + outputs - "
      "aliased + temp); bytes: XLA's `cost_analysis()` bytes accessed, "
      "relative to ref; state: optimizer-state bytes; +buf: "
      "parameter-sized buffers in the state beyond SGD momentum's.", ""]
  out += ["## Summary", "", "Median [IQR] of per-round paired ratios.", ""]
  out += summary_table(results)
  mem = memory_table(results)
  if mem:
    out += ["", "## Memory: SAM against the base step, per schedule", ""]
    out += mem
  out += ["", "## Per model", ""]
  for res in results:
    out.append(f"### {res['name']}: {res['description']}, "
               f"{res['num_params']:,} params ({mib(res['param_bytes'])} MiB)"
               f"; {res['rounds']} rounds x {res['steps_per_sample']} steps")
    out.append("")
    out.append("| variant | ms/step | x base | x ref | temp MiB | temp x ref "
               "| peak MiB | bytes accessed MiB | bytes x ref | state bytes "
               "| +buf |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in res["variants"].items():
      ms, vb = row["ms"], row["vs_base"]
      if "vs_reference" in row:
        ref = _common.fmt_quantiles(row["vs_reference"], 3)
        tref = f"{row['temp_vs_reference']:.3f}"
        bref = f"{row['bytes_accessed_vs_reference']:.3f}"
      else:
        ref = tref = bref = "—"
      out.append(
          f"| {name} | {_common.fmt_quantiles(ms)} | {vb['median']:.2f} | "
          f"{ref} | {mib(row['temp_bytes'])} | {tref} | "
          f"{mib(row['peak_bytes'])} | {mib(row['bytes_accessed'])} | "
          f"{bref} | {row['state_bytes']:,} | "
          f"{row['extra_param_sized_buffers']} |")
    out.append("")
  out += ["## Targets", "", "sam_optax / hand-written: step time <= "
          f"{TIME_TARGET} (median paired ratio), temp memory <= "
          f"{TEMP_TARGET:.2f}, zero extra parameter-sized buffers. Bytes "
          "accessed (deterministic, from the compiled program) shows extra "
          "passes over the parameters that the timings may hide in noise.",
          "", "```"]
  out += check_targets(results)
  out += ["```", ""]
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help=f"models {', '.join(QUICK_MODELS)}, 8 rounds of "
                      "~0.05 s samples (2-6 min on 2 shared CPU cores, "
                      "mostly compiling)")
  parser.add_argument("--models", nargs="+", choices=list(_models.MODELS),
                      help="models to run (default: all, or the quick set)")
  parser.add_argument("--variants", nargs="+",
                      choices=[v for v in VARIANTS + EXTRA_VARIANTS
                               if v != "base"],
                      help="variants to time (base and the references are "
                      "added); default: " + " ".join(VARIANTS[1:]))
  parser.add_argument("--rounds", type=int, help="timing rounds "
                      "(default: 8 quick, 20 full)")
  parser.add_argument("--sample-seconds", type=float,
                      help="approximate length of one timed sample "
                      "(default: 0.05 quick, 0.1 full)")
  parser.add_argument("--compile-workers", type=int, default=2,
                      help="threads compiling the variants (default: 2)")
  parser.add_argument("--batch-scale", type=int, default=1,
                      help="multiply every model's batch size (default 1)")
  parser.add_argument("--default-schedule-only", action="store_true",
                      help="compile every step once, with XLA's default "
                      "schedule (faster; no memory-schedule table)")
  parser.add_argument("--methods", nargs="*", metavar="METHOD",
                      help="time every method of the package (or the "
                      "ones named) against the base step instead: "
                      "the ~1M-param MLP at batch 32/128/512 and cnn-s and "
                      "transformer-s at 32/128 (--quick: the MLP at 32/128); "
                      "see _method_speed.py")
  parser.add_argument("--batches", nargs="+", type=int,
                      help="with --methods: these batch sizes for every "
                      "model")
  parser.add_argument("--render", metavar="JSON",
                      help="only rewrite the Markdown report of a saved "
                      "results file")
  _common.add_output_args(parser, "speed_<device>[_quick]")
  args = parser.parse_args(argv)
  argv_used = sys.argv[1:] if argv is None else list(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    md = markdown(saved["results"], saved["machine"], saved["argv"],
                  saved["elapsed_s"])
    _common.write_report(os.path.splitext(args.render)[0], None, md)
    print(md)
    return saved["results"]

  if args.methods is not None:
    return main_methods(args, argv_used)
  models = args.models or (QUICK_MODELS if args.quick else
                           list(_models.MODELS))
  rounds = args.rounds or (8 if args.quick else 20)
  sample_s = args.sample_seconds or (0.05 if args.quick else 0.1)
  stem = _common.output_stem(
      args, f"speed_{_common.device_slug()}{'_quick' if args.quick else ''}")
  if "lowmem" in " ".join(args.variants or ()) and args.default_schedule_only:
    parser.error("sam_optax_lowmem needs both schedules")

  info = _common.machine()
  _common.log(f"device {info['platform']}/{info['device_kind']}, "
              f"{info.get('cpu_model')}, {info['cpu_cores']} cores; jax "
              f"{info['jax']}, optax {info['optax']}; models "
              f"{' '.join(models)}; report -> {stem}.md")
  start = time.perf_counter()
  results = [bench_model(_models.MODELS[m], rounds, sample_s, args.variants,
                         args.compile_workers,
                         not args.default_schedule_only,
                         batch_scale=args.batch_scale)
             for m in models]
  elapsed = time.perf_counter() - start
  info["load_average_end"] = _common.load_average()

  data = {"machine": info, "argv": argv_used, "elapsed_s": elapsed,
          "settings": {"lr": LR, "momentum": MOMENTUM, "rho_sam": RHO_SAM,
                       "rho_asam": RHO_ASAM, "eta": ETA, "rounds": rounds,
                       "sample_seconds": sample_s},
          "results": results}
  _common.publish(stem, data, markdown(results, info, argv_used, elapsed))
  return results


def main_methods(args, argv_used):
  """``--methods``: every method against the base step (_method_speed)."""
  stem = _common.output_stem(
      args, f"speed_methods_{_common.device_slug()}"
      + ("_quick" if args.quick else ""))
  info = _common.machine()
  _common.log(f"device {info['platform']}/{info['device_kind']}, "
              f"{info.get('cpu_model')}, {info['cpu_cores']} cores; "
              f"report -> {stem}.md")
  start = time.perf_counter()
  results = _method_speed.run(args.quick, args.models, args.rounds,
                              args.sample_seconds, args.methods or None,
                              args.compile_workers,
                              batches=args.batches)
  elapsed = time.perf_counter() - start
  info["load_average_end"] = _common.load_average()
  data = {"machine": info, "argv": argv_used, "elapsed_s": elapsed,
          "results": results}
  _common.publish(stem, data, _method_speed.markdown(
      results, info, argv_used, elapsed))
  return results


if __name__ == "__main__":
  main()
