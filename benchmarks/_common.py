"""What the benchmark scripts share: machine info, timing, quantiles, output.

* :func:`machine` describes the machine and the library versions;
* :func:`time_interleaved` is the timing loop: every variant is warmed up,
  then timed in rounds, round-robin, with the order rotated each round and
  ``block_until_ready`` inside the timed region; :func:`paired` turns the
  samples into per-round paired ratios against a reference;
* :func:`quantiles` gives the median, the interquartile range and the
  extremes of a sample;
* :func:`add_output_args`, :func:`output_stem` and :func:`write_report`
  decide where a report goes and write it as JSON and Markdown. By default a
  report goes to the git-ignored ``benchmarks/results/local/``, so that a user
  trying the package does not rewrite tracked files; ``--write`` writes the
  tracked ``benchmarks/results/`` and ``--out STEM`` any path;
* :func:`looksam` adapts the one constructor argument whose name differs
  between versions of the package (LookSAM's period).

Nothing here depends on the device.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import optax

import sam_optax

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LOCAL_RESULTS = os.path.join(RESULTS, "local")  # Git-ignored.


def log(msg: str = "") -> None:
  """Prints a progress line at once (no buffering behind a pipe)."""
  print(msg, flush=True)


# ----------------------------------------------------------------------------
# Adapters for the package's API.
# ----------------------------------------------------------------------------


def looksam(base: optax.GradientTransformation, period: int, **kwargs):
  """``sam_optax.looksam`` with a SAM gradient every ``period`` updates.

  The period's keyword is ``every_k`` from the core refactor on and ``k``
  before it; once both branches are merged this is
  ``sam_optax.looksam(base, every_k=period, **kwargs)``.
  """
  params = inspect.signature(sam_optax.looksam).parameters
  key = "every_k" if "every_k" in params else "k"
  return sam_optax.looksam(base, **{key: period}, **kwargs)


# ----------------------------------------------------------------------------
# Machine description.
# ----------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
    if names:
      return names[0]
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def machine() -> dict[str, Any]:
  """Device, versions, CPU model, git commit and the current load average."""
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "optax": optax.__version__, "sam_optax": sam_optax.__version__,
          "python": platform.python_version(), "cpu_cores": os.cpu_count(),
          "cpu_model": cpu_model()}
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    info["git_commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, check=True, cwd=HERE).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  info["load_average_start"] = load_average()
  return info


def machine_markdown(info: Mapping[str, Any]) -> list[str]:
  """Markdown lines: the machine, the versions and the load average."""
  lines = [
      f"Machine: {info.get('cpu_model')} ({info.get('cpu_cores')} cores), "
      f"device {info['platform']}/{info['device_kind']} "
      f"x{info.get('device_count', 1)}; jax {info['jax']}, optax "
      f"{info['optax']}, flax {info.get('flax', '-')}, sam_optax "
      f"{info.get('sam_optax')}"
      + (f" (commit {info['git_commit']})" if info.get("git_commit") else "")
      + f", Python {info.get('python')}."]
  start, end = info.get("load_average_start"), info.get("load_average_end")
  if start:
    lines.append(
        "Load average (1/5/15 min) " + "/".join(f"{v:.2f}" for v in start)
        + " at the start"
        + (", " + "/".join(f"{v:.2f}" for v in end) + " at the end"
           if end else "")
        + ": on a shared machine timings are noisy; ratios are paired per "
        "round.")
  return lines


def device_slug() -> str:
  """``cpu``, or e.g. ``gpu-nvidia-h100-80gb-hbm3``: for file names."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return "cpu"
  kind = re.sub(r"[^a-z0-9]+", "-", dev.device_kind.lower()).strip("-")
  return f"{dev.platform}-{kind}"


# ----------------------------------------------------------------------------
# Statistics and timing.
# ----------------------------------------------------------------------------


def quantiles(xs: Iterable[float]) -> dict[str, float]:
  """Median, quartiles and extremes of a sample."""
  xs = np.asarray(list(xs), dtype=np.float64)
  q25, q50, q75 = np.percentile(xs, [25, 50, 75])
  return {"median": float(q50), "q25": float(q25), "q75": float(q75),
          "min": float(xs.min()), "max": float(xs.max())}


def fmt_quantiles(q: Mapping[str, float], digits: int = 2) -> str:
  """``median [q25, q75]``."""
  return (f"{q['median']:.{digits}f} [{q['q25']:.{digits}f}, "
          f"{q['q75']:.{digits}f}]")


def paired(samples: Mapping[str, list[float]], name: str,
           reference: str) -> dict[str, float]:
  """Quantiles of the per-round ratios ``samples[name] / samples[ref]``."""
  return quantiles(a / b for a, b in zip(samples[name], samples[reference]))


# A runner runs ``n`` steps of one variant (carrying its own state) and
# returns once the results are ready: ``runner(n) -> None``.
Runner = Callable[[int], None]


def loop_runner(fn: Callable[..., tuple], carry: tuple,
                *inputs: Any) -> Runner:
  """A runner for ``fn(*carry, *inputs) -> carry + extra outputs``.

  The first ``len(carry)`` outputs of ``fn`` are fed back; everything ``fn``
  returns is waited for with ``block_until_ready`` before returning.
  """
  state = {"carry": tuple(carry)}
  k = len(carry)

  def run(n: int) -> None:
    carry = state["carry"]
    out = carry
    for _ in range(n):
      out = fn(*carry, *inputs)
      carry = tuple(out[:k])
    jax.block_until_ready(out)
    state["carry"] = carry

  return run


def time_interleaved(
    runners: Mapping[str, Runner], rounds: int, sample_seconds: float,
    step_multiple: int = 1, min_steps: int = 1,
    progress: Callable[[str], None] | None = log,
) -> tuple[dict[str, list[float]], int]:
  """Times the runners round-robin; returns seconds per step and steps.

  Every runner is warmed up (two calls of one step, the second one timed);
  the number of steps per sample is chosen so that one sample of the slowest
  runner takes about ``sample_seconds`` (rounded up to a multiple of
  ``step_multiple``, at least ``min_steps``). Then, for ``rounds`` rounds,
  every runner runs one sample, in an order rotated by one each round, so a
  change of the machine's load hits all runners alike.

  Returns:
    ``({name: [seconds per step, one per round]}, steps per sample)``.
  """
  names = list(runners)
  slowest = 0.0
  for name in names:
    runners[name](1)
    start = time.perf_counter()
    runners[name](1)
    slowest = max(slowest, time.perf_counter() - start)
  n = max(min_steps, int(round(sample_seconds / max(slowest, 1e-6))))
  n = step_multiple * max(1, -(-n // step_multiple))
  if progress:
    progress(f"  timing: {rounds} rounds x {len(names)} variants x {n} "
             "steps")
  samples = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start = time.perf_counter()
      runners[name](n)
      samples[name].append((time.perf_counter() - start) / n)
    if progress:
      progress(f"  round {r + 1}/{rounds}: " + "  ".join(
          f"{name} {samples[name][-1] * 1e3:.2f}" for name in names)
          + " ms")
  return samples, n


# ----------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------


def add_output_args(parser, name: str) -> None:
  """``--write`` and ``--out``; ``name`` is the report's file stem."""
  parser.add_argument(
      "--write", action="store_true",
      help=f"write the tracked benchmarks/results/{name}.* (default: the "
      f"git-ignored benchmarks/results/local/{name}.*)")
  parser.add_argument("--out", metavar="STEM",
                      help="write STEM.* instead")


def output_stem(args, name: str) -> str:
  """Where the report goes: ``--out``, ``--write`` or the local folder."""
  if getattr(args, "out", None):
    return args.out
  folder = RESULTS if getattr(args, "write", False) else LOCAL_RESULTS
  return os.path.join(folder, name)


def write_report(stem: str, data: Any, markdown: str | None) -> list[str]:
  """Writes ``stem.json`` (if ``data`` is not None) and ``stem.md``."""
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  written = []
  if data is not None:
    with open(stem + ".json", "w") as f:
      json.dump(data, f, indent=1)
    written.append(stem + ".json")
  if markdown is not None:
    with open(stem + ".md", "w") as f:
      f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    written.append(stem + ".md")
  return written


def publish(stem: str, data: Any, markdown: str,
            also: Iterable[str] = ()) -> list[str]:
  """Writes the report, prints it, and says which files were written.

  ``also``: other files the caller wrote next to it (e.g. a plot).
  """
  written = write_report(stem, data, markdown) + list(also)
  log()
  log(markdown)
  log("wrote " + ", ".join(written))
  return written
