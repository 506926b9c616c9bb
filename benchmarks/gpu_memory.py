"""Memory of a SAM step against the base step, one fresh process each.

For the models of ``benchmarks/speed.py`` (optionally with a larger batch)
and the steps

* ``base``: SGD with momentum, one gradient;
* ``hand_sam``: the hand-written SAM step; ``sam_optax``: ``sam_optax.sam``;
* ``hand_sam_cond``, ``hand_sam_loop``: the hand-written step with the
  second pass in its own computation (a ``lax.cond``, a one-trip
  ``while_loop``),

each under every XLA schedule the backend has (GPU: the default; CPU: also
the memory-optimised one), this script starts one subprocess per
measurement, so that no allocator cache or earlier peak carries over, and
records there:

* ``memory_analysis()`` of the compiled step: temp bytes and peak (XLA's
  ``peak_memory_in_bytes`` or arguments + outputs - aliased + temp,
  whichever is larger);
* on GPU/TPU: ``device.memory_stats()`` ``bytes_in_use`` before compiling
  and ``peak_bytes_in_use`` after compiling and after running the steps.
  The peak after the run is the step's real peak only where it exceeds the
  peak after compiling (autotuning also allocates; ``--no-autotune`` turns
  it off at the price of other kernels);
* on CPU: the growth of the resident set while the steps run, warm-up
  included (the high-water mark is reset after compiling through
  ``/proc/self/clear_refs``; the workers run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that large buffers are fresh pages,
  not reused heap). It includes a few MiB of runtime overhead;
* the median time per step.

The table reports each step against the base step of the same model (same
schedule, and the base step's default schedule).

Run::

  python benchmarks/gpu_memory.py                       # all models
  python benchmarks/gpu_memory.py --batch-scale 16      # bigger batches
  python benchmarks/gpu_memory.py --dry-run             # CPU smoke test

Reports go to the git-ignored ``benchmarks/results/local/
gpu_memory_<device>.{json,md}`` (``--write``: the tracked
``benchmarks/results/``; ``--out STEM``: any path). ``--dry-run``: ``cnn-s``
with base, sam_optax and hand_sam_cond only, 3 steps (about 1.5 min on 2 CPU
cores); the report is named ``..._dry_run``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _models  # noqa: E402
import speed  # noqa: E402

from sam_optax._compilation.memory import SCHEDULE_PLATFORMS, SCHEDULES  # noqa: E402

VARIANTS = ("base", "hand_sam", "sam_optax", "hand_sam_cond",
            "hand_sam_loop")
DRY_RUN_MODELS = ("cnn-s",)
DRY_RUN_VARIANTS = ("base", "sam_optax", "hand_sam_cond")


# ----------------------------------------------------------------------------
# The worker: one measurement, in its own process.
# ----------------------------------------------------------------------------


def _read_status(field: str) -> int | None:
  """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux only)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_rss_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(model: str, variant: str, schedule: str, steps: int,
            batch_scale: int) -> dict:
  """Compiles and runs one step; returns its memory and time."""
  spec = _models.scale_batch(_models.MODELS[model], batch_scale)
  dev = jax.devices()[0]

  def device_stats():
    try:
      return dev.memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
      return {}

  params, stats = spec.init()
  x, y = spec.make_batch()
  tx, step = speed.make_variants(spec.loss_fn())[variant]
  state = tx.init(params)
  jax.block_until_ready((params, stats, state, x, y))
  before = device_stats()
  lowered = jax.jit(step).lower(params, stats, state, x, y)
  options = dict(SCHEDULES[schedule])
  start = time.perf_counter()
  compiled = (lowered.compile(compiler_options=options) if options
              else lowered.compile())
  compile_s = time.perf_counter() - start
  after_compile = device_stats()
  mem = speed.memory_stats(compiled)

  carry = (params, stats, state)
  reset = _reset_rss_peak()  # CPU: the high-water mark of the runs only.
  rss_before = _read_status("VmRSS")
  out = compiled(*carry, x, y)  # Warm-up.
  jax.block_until_ready(out)
  carry = out[:3]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    out = compiled(*carry, x, y)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
    carry = out[:3]
  after_run = device_stats()
  hwm = _read_status("VmHWM")

  result = {"model": model, "variant": variant, "schedule": schedule,
            "platform": dev.platform, "device_kind": dev.device_kind,
            "batch_size": spec.batch_size, "compile_s": compile_s,
            "ms": float(np.median(times) * 1e3), "memory_analysis": mem,
            "loss": float(out[3])}
  if after_run:
    result["device"] = {
        "bytes_in_use_before": int(before.get("bytes_in_use", 0)),
        "peak_after_compile": int(after_compile.get("peak_bytes_in_use", 0)),
        "peak_after_run": int(after_run.get("peak_bytes_in_use", 0))}
    d = result["device"]
    d["run_sets_peak"] = d["peak_after_run"] > d["peak_after_compile"]
    d["run_peak_above_start"] = d["peak_after_run"] - d["bytes_in_use_before"]
  if reset and rss_before is not None and hwm is not None:
    result["rss_growth"] = hwm - rss_before
  return result


# ----------------------------------------------------------------------------
# The parent: one subprocess per measurement, then the table.
# ----------------------------------------------------------------------------


def schedules_for(platform: str) -> list[str]:
  return [s for s in SCHEDULES
          if platform in SCHEDULE_PLATFORMS.get(s, (platform,))]


def run_worker(model, variant, schedule, steps, batch_scale, env, timeout):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker",
         json.dumps([model, variant, schedule, steps, batch_scale])]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"model": model, "variant": variant, "schedule": schedule,
          "error": " | ".join(tail) or f"exit {proc.returncode}"}


def mib(n) -> str:
  return "—" if n is None else f"{n / 2**20:.2f}"


def ratio(a, b) -> str:
  return "—" if a is None or not b else f"{a / b:.2f}"


def markdown(results, info, argv, elapsed) -> str:
  out = [f"# SAM step memory, one process per measurement "
         f"({_common.device_slug()})", ""]
  out += _common.machine_markdown(info)
  out += [f"Command: `python benchmarks/gpu_memory.py {' '.join(argv)}` "
          f"({elapsed / 60:.1f} min).", "",
          "temp, peak: `compile().memory_analysis()` (peak = arguments + "
          "outputs + temp, or XLA's own peak if larger). dev peak: "
          "`memory_stats()['peak_bytes_in_use']` after the run minus "
          "`bytes_in_use` before compiling (GPU/TPU; `*`: the peak was "
          "already reached while compiling). RSS growth (CPU): growth of the "
          "resident set while the steps run (a few MiB of it runtime "
          "overhead). Ratios: against the base step of the same model under "
          "the same schedule, and against the base step under the default "
          "schedule.", "",
          "| model | batch | variant | schedule | ms/step | temp MiB | temp x "
          "base | temp x base(def) | peak MiB | peak x base | dev peak MiB "
          "| dev peak x base | RSS growth MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  index = {(r["model"], r["variant"], r["schedule"]): r for r in results}
  for r in results:
    if "error" in r:
      out.append(f"| {r['model']} | | {r['variant']} | {r['schedule']} | "
                 f"error: {r['error'][:120]} |" + " |" * 8)
      continue
    base = index.get((r["model"], "base", r["schedule"]), {})
    base_def = index.get((r["model"], "base", "default"), {})
    m, bm = r["memory_analysis"], base.get("memory_analysis", {})
    dev, bdev = r.get("device"), base.get("device")
    dev_peak = dev["run_peak_above_start"] if dev else None
    mark = "" if not dev or dev["run_sets_peak"] else "*"
    out.append(
        f"| {r['model']} | {r['batch_size']} | {r['variant']} | "
        f"{r['schedule']} | {r['ms']:.2f} | {mib(m['temp'])} | "
        f"{ratio(m['temp'], bm.get('temp'))} | "
        f"{ratio(m['temp'], base_def.get('memory_analysis', {}).get('temp'))}"
        f" | {mib(m['peak'])} | {ratio(m['peak'], bm.get('peak'))} | "
        f"{mib(dev_peak)}{mark} | "
        f"{ratio(dev_peak, bdev['run_peak_above_start'] if bdev else None)}"
        f" | {mib(r.get('rss_growth'))} |")
  return "\n".join(out) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--models", nargs="+",
                      help="models of benchmarks/_models.py (default all)")
  parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                      help="steps to measure (default all; base is always "
                      "added)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per measurement (default 10)")
  parser.add_argument("--batch-scale", type=int, default=1,
                      help="multiply every model's batch size")
  parser.add_argument("--no-autotune", action="store_true",
                      help="XLA_FLAGS=--xla_gpu_autotune_level=0 in the "
                      "workers (GPU)")
  parser.add_argument("--timeout", type=float, default=300,
                      help="seconds per measurement")
  parser.add_argument("--dry-run", action="store_true",
                      help=f"model {' '.join(DRY_RUN_MODELS)}, steps "
                      f"{' '.join(DRY_RUN_VARIANTS)}, 3 steps each: a smoke "
                      "test that runs on CPU")
  _common.add_output_args(parser, "gpu_memory_<device>[_dry_run]")
  args = parser.parse_args(argv)

  if args.worker:
    model, variant, schedule, steps, scale = json.loads(args.worker)
    print("RESULT " + json.dumps(measure(model, variant, schedule, steps,
                                         scale)), flush=True)
    return None

  argv_used = sys.argv[1:] if argv is None else list(argv)
  models = args.models or (DRY_RUN_MODELS if args.dry_run
                           else list(_models.MODELS))
  variants = args.variants or list(DRY_RUN_VARIANTS if args.dry_run
                                   else VARIANTS)
  steps = 3 if args.dry_run else args.steps
  platform = jax.devices()[0].platform
  schedules = schedules_for(platform)
  env = dict(os.environ)
  if args.no_autotune:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_gpu_autotune_level=0").strip()
  if platform == "cpu":
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
  plan = [(m, v, s) for m in models for v in variants
          for s in schedules]
  if "base" not in variants:
    plan = [(m, "base", s) for m in models for s in schedules] + plan
  info = _common.machine()
  stem = _common.output_stem(
      args, f"gpu_memory_{_common.device_slug()}"
      + ("_dry_run" if args.dry_run else ""))
  _common.log(f"{platform}: {len(plan)} measurements ({len(models)} models "
              f"x {len(variants)} steps x schedules "
              f"{', '.join(schedules)}), one process each; report -> "
              f"{stem}.md")
  start = time.perf_counter()
  results = []
  for i, (m, v, s) in enumerate(plan):
    t0 = time.perf_counter()
    r = run_worker(m, v, s, steps, args.batch_scale, env, args.timeout)
    results.append(r)
    what = (f"error {r['error']}" if "error" in r else
            f"temp {mib(r['memory_analysis']['temp'])} MiB, "
            f"{r['ms']:.2f} ms/step")
    _common.log(f"[{i + 1}/{len(plan)}] {m} {v} {s}: {what} "
                f"({time.perf_counter() - t0:.0f} s)")
  elapsed = time.perf_counter() - start
  info["load_average_end"] = _common.load_average()
  _common.publish(
      stem, {"machine": info, "argv": argv_used, "elapsed_s": elapsed,
             "steps": steps, "batch_scale": args.batch_scale,
             "results": results},
      markdown(results, info, argv_used, elapsed))
  return results


if __name__ == "__main__":
  main()
