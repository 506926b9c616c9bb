"""Speed and memory of a SAM step: sam_optax against its physical limit.

Exact SAM needs two gradient evaluations per step, so a SAM step costs about
twice a plain step: that is the physical limit. This script measures, for an
MLP, a small CNN with BatchNorm and a small transformer block (Flax linen,
two sizes each, synthetic data), the step time and the compiled memory of

* ``base``:         the base optimizer (SGD with momentum), one gradient;
* ``hand_sam``:     a hand-written two-gradient SAM step (the reference);
* ``sam_optax``:    ``sam_optax.sam(base, rho)``;
* ``hand_asam``:    a hand-written ASAM step (the second reference);
* ``sam_optax_asam``: ``sam_optax.sam(base, rho, adaptive=True)``;
* ``optax_contrib``: ``optax.contrib.sam`` in opaque mode with the canonical
  adversary ``chain(contrib.normalize(), sgd(rho))`` and ``sync_period=2``.

All steps keep the BatchNorm statistics of the clean pass and drop those of
the perturbed pass. Each step is compiled once (``jit(...).lower(...)
.compile()``, which also gives ``memory_analysis()``); after a warm-up the
variants are timed in one process, round-robin over several rounds (the
order is rotated each round), each sample timing a loop of steps with
``block_until_ready`` inside the timed region. Ratios are paired: a variant's
sample is divided by the reference's sample of the same round, so a change in
machine load hits both.

Reported per model and variant: ms/step (median and interquartile range over
rounds), the ratio to the base step and to the hand-written reference
(``sam_optax`` and ``optax_contrib`` against ``hand_sam``, ``sam_optax_asam``
against ``hand_asam``), the compiled temp and peak memory, the persistent
optimizer-state bytes and the number of parameter-sized buffers in the state
beyond the base optimizer's. Targets: ``sam_optax`` / hand-written <= 1.02 in
step time and <= 1.00 in temp memory, and no extra parameter-sized buffer.

Run (from the repository root; needs flax)::

  python benchmarks/speed.py --quick      # 3 models, ~2 min on 2 CPU cores
  python benchmarks/speed.py              # all models, more rounds
  python benchmarks/speed.py --models mlp-l cnn-s --rounds 20

Results go to ``benchmarks/results/speed_<device>.json`` and ``.md`` (``cpu``
or e.g. ``gpu-nvidia-h100-80gb-hbm3``); ``--quick`` writes
``speed_<device>_quick.*``. Nothing is CPU-specific: the same command runs on
a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _models  # noqa: E402

import sam_optax  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
RHO_SAM, RHO_ASAM, ETA = 0.05, 0.5, 0.01
EPS = 1e-12

VARIANTS = ("base", "hand_sam", "sam_optax", "optax_contrib", "hand_asam",
            "sam_optax_asam")
REFERENCE = {"sam_optax": "hand_sam", "optax_contrib": "hand_sam",
             "sam_optax_asam": "hand_asam"}
QUICK_MODELS = ("mlp-l", "cnn-s", "transformer-s")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
  }


# ----------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------


def tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def param_sized_leaves(state: Any, params: Any) -> int:
  """Number of state leaves with the shape and dtype of some parameter."""
  shapes = {(x.shape, x.dtype) for x in jax.tree.leaves(params) if x.size > 1}
  return sum((x.shape, x.dtype) in shapes for x in jax.tree.leaves(state))


def quantiles(xs):
  q = np.percentile(np.asarray(xs), [25, 50, 75])
  return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
          "min": float(np.min(xs)), "max": float(np.max(xs))}


def run_loop(fn, carry, x, y, n):
  """Runs ``n`` steps; returns (seconds, carry). Blocks inside the timing."""
  params, stats, state = carry
  jax.block_until_ready((params, stats, state))
  start = time.perf_counter()
  for _ in range(n):
    params, stats, state, loss = fn(params, stats, state, x, y)
  jax.block_until_ready((params, stats, state, loss))
  return time.perf_counter() - start, (params, stats, state)


def bench_model(spec, rounds, min_sample_s, log, compile_workers=2,
                only=None):
  """Compiles, measures memory and times the variants for one model.

  ``only``: variant names to run (with ``base`` and their references);
  default all.
  """
  params, stats = spec.init()
  x, y = spec.make_batch()
  variants = make_variants(spec.loss_fn())
  if only:
    keep = {"base", *only, *(REFERENCE[n] for n in only if n in REFERENCE)}
    variants = {n: v for n, v in variants.items() if n in keep}
  n_params = _models.num_params(params)
  param_bytes = tree_bytes(params)
  base_state = variants["base"][0].init(params)
  log(f"[{spec.name}] {spec.description}: {n_params:,} params "
      f"({param_bytes / 2**20:.1f} MiB)")

  # Trace and lower in this thread; compile in a small pool (XLA compiles
  # release the GIL, and compilation dominates the quick mode's time).
  def timed_compile(lowered):
    start = time.perf_counter()
    fn = lowered.compile()
    return fn, time.perf_counter() - start

  futures, carries = {}, {}
  with ThreadPoolExecutor(max(1, compile_workers)) as pool:
    for name, (tx, step) in variants.items():
      state = tx.init(params)
      carries[name] = (params, stats, state)
      futures[name] = pool.submit(
          timed_compile, jax.jit(step).lower(params, stats, state, x, y))

  compiled, rows = {}, {}
  for name, future in futures.items():
    fn, compile_s = future.result()
    state = carries[name][2]
    mem = fn.memory_analysis()
    cost = fn.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    compiled[name] = fn
    rows[name] = {
        "compile_s": compile_s,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "state_bytes": tree_bytes(state),
        "extra_state_bytes": tree_bytes(state) - tree_bytes(base_state),
        "extra_param_sized_buffers": (param_sized_leaves(state, params)
                                      - param_sized_leaves(base_state,
                                                           params)),
    }
    log(f"  compiled {name:15s} {compile_s:5.1f}s  temp "
        f"{mem.temp_size_in_bytes / 2**20:8.2f} MiB")

  # Warm-up (two calls each) and the loop length: one sample of the slowest
  # variant should take about min_sample_s.
  slowest = 0.0
  for name, fn in compiled.items():
    _, carries[name] = run_loop(fn, carries[name], x, y, 1)
    seconds, carries[name] = run_loop(fn, carries[name], x, y, 1)
    slowest = max(slowest, seconds)
  n_steps = max(1, int(round(min_sample_s / max(slowest, 1e-6))))
  log(f"  timing: {rounds} rounds x {len(compiled)} variants x "
      f"{n_steps} steps")

  samples = {name: [] for name in compiled}
  names = list(compiled)
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      seconds, carries[name] = run_loop(compiled[name], carries[name], x, y,
                                        n_steps)
      samples[name].append(seconds / n_steps)
    log(f"  round {r + 1}/{rounds}: " + "  ".join(
        f"{n} {samples[n][-1] * 1e3:.2f}" for n in names) + " ms")

  for name in names:
    ms = [s * 1e3 for s in samples[name]]
    row = rows[name]
    row["ms"] = quantiles(ms)
    row["samples_ms"] = ms
    row["vs_base"] = quantiles(
        [a / b for a, b in zip(samples[name], samples["base"])])
    ref = REFERENCE.get(name)
    if ref is not None:
      row["reference"] = ref
      row["vs_reference"] = quantiles(
          [a / b for a, b in zip(samples[name], samples[ref])])
      row["temp_vs_reference"] = (row["temp_bytes"]
                                  / max(rows[ref]["temp_bytes"], 1))
      row["bytes_accessed_vs_reference"] = (
          row["bytes_accessed"] / max(rows[ref]["bytes_accessed"], 1))
      row["extra_bytes_accessed_in_params"] = (
          (row["bytes_accessed"] - rows[ref]["bytes_accessed"]) / param_bytes)
      row["min_vs_reference"] = min(samples[name]) / min(samples[ref])
  return {"name": spec.name, "description": spec.description,
          "num_params": n_params, "param_bytes": param_bytes,
          "steps_per_sample": n_steps, "rounds": rounds, "variants": rows}


# ----------------------------------------------------------------------------
# Machine description, targets and output.
# ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(),
          "jax": jax.__version__, "optax": optax.__version__,
          "sam_optax": sam_optax.__version__,
          "python": platform.python_version(),
          "cpu_cores": os.cpu_count()}
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
    info["cpu_model"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu_model"] = platform.processor() or platform.machine()
  try:
    info["git_commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, check=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  try:
    info["load_average_start"] = list(os.getloadavg())
  except OSError:
    pass
  return info


def device_slug() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return "cpu"
  kind = re.sub(r"[^a-z0-9]+", "-", dev.device_kind.lower()).strip("-")
  return f"{dev.platform}-{kind}"


TIME_TARGET, TEMP_TARGET = 1.02, 1.00


def check_targets(results) -> list[str]:
  """One line per model and sam_optax variant: targets met or missed."""
  lines = []
  for res in results:
    for name in ("sam_optax", "sam_optax_asam"):
      if name not in res["variants"]:
        continue
      row = res["variants"][name]
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
  out = ["| model | params | base ms | hand_sam x base | sam_optax x hand_sam "
         "| optax_contrib x hand_sam | sam_optax_asam x hand_asam | SAM temp x "
         "base temp | sam_optax bytes x ref (SAM / ASAM) |",
         "|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    v = res["variants"]

    def ratio(name):
      if name not in v:
        return "—"
      r = v[name]["vs_reference"]
      return f"{r['median']:.2f} [{r['q25']:.2f}, {r['q75']:.2f}]"

    def get(name, fmt, fn):
      return fmt.format(fn(v[name])) if name in v else "—"

    base_temp = max(v["base"]["temp_bytes"], 1)
    out.append(
        f"| {res['name']} | {res['num_params']:,} | "
        f"{v['base']['ms']['median']:.1f} | "
        + get("hand_sam", "{:.2f}", lambda r: r["vs_base"]["median"]) +
        f" | {ratio('sam_optax')} | {ratio('optax_contrib')} | "
        f"{ratio('sam_optax_asam')} | "
        + get("hand_sam", "{:.2f}", lambda r: r["temp_bytes"] / base_temp) +
        " | "
        + get("sam_optax", "{:.3f}",
              lambda r: r["bytes_accessed_vs_reference"]) + " / "
        + get("sam_optax_asam", "{:.3f}",
              lambda r: r["bytes_accessed_vs_reference"]) + " |")
  return out


def markdown(results, info, args, elapsed) -> str:
  """The Markdown report: machine, one table per model, target checks."""
  out = [f"# SAM step speed and memory ({device_slug()})", ""]
  out.append(
      f"Machine: {info.get('cpu_model')} ({info['cpu_cores']} cores), device "
      f"{info['platform']}/{info['device_kind']} x{info['device_count']}; "
      f"jax {info['jax']}, optax {info['optax']}, flax {info.get('flax')}, "
      f"sam_optax {info['sam_optax']}"
      + (f" (commit {info['git_commit']})" if "git_commit" in info else "")
      + f", Python {info['python']}.")
  if "load_average_start" in info:
    start = "/".join(f"{v:.2f}" for v in info["load_average_start"])
    end = "/".join(f"{v:.2f}" for v in info.get("load_average_end", []))
    out.append(
        f"Load average (1/5/15 min) {start} at the start, {end} at the end: "
        "the machine is shared, so timings are noisy; ratios are paired per "
        "round.")
  cmd = " ".join(["python benchmarks/speed.py"] + list(args))
  out.append(
      f"Command: `{cmd}` ({elapsed / 60:.1f} min). SGD momentum (lr {LR}, "
      f"momentum {MOMENTUM}); SAM rho {RHO_SAM}; ASAM rho {RHO_ASAM}, eta "
      f"{ETA}.")
  out += [
      "", "Columns: ms/step, median [interquartile range] over rounds; "
      "x base and x ref, median of the per-round paired ratios (ref = "
      "hand_sam for sam_optax and optax_contrib, hand_asam for "
      "sam_optax_asam); temp and peak MiB from "
      "`compile().memory_analysis()`; bytes: XLA's `cost_analysis()` bytes "
      "accessed, relative to ref; state: optimizer-state bytes; +buf: "
      "parameter-sized buffers in the state beyond SGD momentum's.", ""]
  out += ["## Summary", "", "Median [IQR] of per-round paired ratios.", ""]
  out += summary_table(results)
  out += ["", "## Per model", ""]
  for res in results:
    out.append(f"### {res['name']}: {res['description']}, "
               f"{res['num_params']:,} params ({mib(res['param_bytes'])} MiB)"
               f"; {res['rounds']} rounds x {res['steps_per_sample']} steps")
    out.append("")
    out.append("| variant | ms/step | x base | x ref | temp MiB | temp x ref "
               "| peak MiB | bytes x ref | state bytes | +buf |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in res["variants"].items():
      ms, vb = row["ms"], row["vs_base"]
      if "vs_reference" in row:
        vr = row["vs_reference"]
        ref = f"{vr['median']:.3f} [{vr['q25']:.3f}, {vr['q75']:.3f}]"
        tref = f"{row['temp_vs_reference']:.3f}"
        bref = f"{row['bytes_accessed_vs_reference']:.3f}"
      else:
        ref = tref = bref = "—"
      out.append(
          f"| {name} | {ms['median']:.2f} [{ms['q25']:.2f}, {ms['q75']:.2f}]"
          f" | {vb['median']:.2f} | {ref} | {mib(row['temp_bytes'])} | "
          f"{tref} | {mib(row['peak_bytes'])} | {bref} | "
          f"{row['state_bytes']:,} | {row['extra_param_sized_buffers']} |")
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
                      "~0.05 s samples (about 2 min on 2 CPU cores)")
  parser.add_argument("--models", nargs="+", choices=list(_models.MODELS),
                      help="models to run (default: all, or the quick set)")
  parser.add_argument("--variants", nargs="+",
                      choices=[v for v in VARIANTS if v != "base"],
                      help="variants to time (base and the references are "
                      "added); default all")
  parser.add_argument("--rounds", type=int, help="timing rounds "
                      "(default: 8 quick, 20 full)")
  parser.add_argument("--sample-seconds", type=float,
                      help="approximate length of one timed sample "
                      "(default: 0.05 quick, 0.1 full)")
  parser.add_argument("--compile-workers", type=int, default=2,
                      help="threads compiling the variants (default: 2)")
  parser.add_argument("--render", metavar="JSON",
                      help="only rewrite the Markdown report of a saved "
                      "results file")
  parser.add_argument("--out", help="output stem (default: "
                      "benchmarks/results/speed_<device>[_quick])")
  args = parser.parse_args(argv)
  argv_used = sys.argv[1:] if argv is None else list(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    md = markdown(saved["results"], saved["machine"], saved["argv"],
                  saved["elapsed_s"])
    with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
      f.write(md)
    print(md)
    return saved["results"]

  models = args.models or (QUICK_MODELS if args.quick else
                           list(_models.MODELS))
  rounds = args.rounds or (8 if args.quick else 20)
  sample_s = args.sample_seconds or (0.05 if args.quick else 0.1)
  stem = args.out or os.path.join(
      RESULTS, f"speed_{device_slug()}{'_quick' if args.quick else ''}")

  def log(msg):
    print(msg, flush=True)

  info = machine()
  log(f"device {info['platform']}/{info['device_kind']}, "
      f"{info.get('cpu_model')}, {info['cpu_cores']} cores; jax "
      f"{info['jax']}, optax {info['optax']}")
  start = time.perf_counter()
  results = [bench_model(_models.MODELS[m], rounds, sample_s, log,
                         args.compile_workers, args.variants)
             for m in models]
  elapsed = time.perf_counter() - start
  try:
    info["load_average_end"] = list(os.getloadavg())
  except OSError:
    pass

  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump({"machine": info, "argv": argv_used, "elapsed_s": elapsed,
               "settings": {"lr": LR, "momentum": MOMENTUM,
                            "rho_sam": RHO_SAM, "rho_asam": RHO_ASAM,
                            "eta": ETA, "rounds": rounds,
                            "sample_seconds": sample_s},
               "results": results}, f, indent=1)
  md = markdown(results, info, argv_used, elapsed)
  with open(stem + ".md", "w") as f:
    f.write(md)
  log("")
  log(md)
  log(f"wrote {stem}.json and {stem}.md ({elapsed:.0f} s)")
  return results


if __name__ == "__main__":
  main()
