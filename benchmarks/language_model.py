"""SAM for a language model: the ``text-lm`` problem, six optimizers.

Issue 24, item 7. On the problem registry's ``text-lm`` (a byte-level
2-layer transformer on ``pydoc_data.topics``, AdamW with warm-up and cosine
decay, 400 steps; :mod:`benchmarks.problems.text_lm`), with the registry's
one training loop (:mod:`benchmarks.problems.train`), this trains

* ``adamw``: the base optimizer alone;
* ``adamw_2x``: AdamW for twice the steps (its schedule stretched), the
  equal-compute baseline of the two-gradient methods;
* ``sam``: ``sam_optax.sam(adamw, rho)``;
* ``psam``: ``sam_optax.preconditioned_sam(adamw, rho)``, the ascent in
  Adam's geometry;
* ``fsam``: ``sam_optax.functional_sam(adamw, rho)`` (the step of
  ``kind="functional"``: clean loss, gradient and logit gradient from one
  ``functional_value_and_grad``);
* ``pfsam``: ``functional_sam(adamw, rho, preconditioned=True)``.

Protocol: every seed sets the initialisation and the batches. The radius of
each SAM variant is chosen on the *validation* split: its grid is run with
seed 0 and the value with the best seed-0 validation bits per byte runs
the other seeds first (so that a short budget gives a 3-seed result; the
machine is a shared 2-core CPU, a two-gradient run takes 20 to 50 s on
it), then the grid's largest value, then the rest of the grid; once a
method's whole grid has every seed, the choice is the best *mean*
validation over the seeds (:func:`selection_seeds`). The
test split is reported, mean ± std over the seeds, with the paired
per-seed difference to AdamW (equal steps) and to AdamW 2x (equal
compute). Robustness, on the test split: bits per byte after int8 and int4
round-to-nearest weight quantization (and their increase over the float
model) and the increase after the registry's fine-tune on Python source
(forgetting). Step time: each method's jitted step against AdamW's, in one
process, interleaved rounds, median ratio.

Runs are cached, one JSON per (method, hyperparameters, seed), in the
git-ignored ``benchmarks/results/local/language_model_cache/``: a killed
run resumes where it stopped. Usage (from the repository root)::

  python -m benchmarks.language_model --quick      # 40 steps, 1 seed
  nice -n 10 python -m benchmarks.language_model --write
  python -m benchmarks.language_model --from-cache --write  # report only
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, NamedTuple

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from benchmarks import _output, _runs
from benchmarks import problems as P
from benchmarks.problems import train as T

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "results", "local", "language_model_cache")
NAME = "language_model"


class Method(NamedTuple):
  """``make(base, h, total_steps)``, its radius grid, step kind, budget."""

  label: str
  make: Any
  grid: tuple = ({},)
  kind: str = "grad_fn"
  epochs: int = 1  # Multiplies the problem's steps (AdamW 2x).
  weight: float = 2.0  # Cost of a run relative to AdamW's (time left).


def _rhos(*values):
  return tuple({"rho": v} for v in values)


# The grids: the frontier's first text-lm runs (seed 0) had SAM at ρ = 0.01
# and 0.05 both behind AdamW on validation, so SAM's grid reaches below
# 0.01. Preconditioned SAM normalises ‖ε‖₂ = ρ as SAM does, but spreads ε
# over every coordinate (Adam's direction is sign-like), so the same radii.
# Functional-SAM keeps the clean loss derivative and is expected to stand
# larger radii (Singh et al. 2025), so its grid reaches higher. The first
# full run chose the smallest value of every 3-value grid, so each grid was
# extended by one value below (the cached runs are kept).
SMALL = _rhos(0.001, 0.003, 0.01, 0.03)
LARGE = _rhos(0.003, 0.01, 0.03, 0.1)
METHODS = {
    "adamw": Method("AdamW", lambda b, h, n: optax.with_extra_args_support(
        b), weight=1.0),
    "adamw_2x": Method("AdamW 2x steps", lambda b, h, n:
                       optax.with_extra_args_support(b), epochs=2,
                       weight=1.0),  # Times epochs: twice AdamW's run.
    "sam": Method("SAM", lambda b, h, n: sam_optax.sam(b, rho=h["rho"]),
                  SMALL),
    "psam": Method("preconditioned SAM", lambda b, h, n:
                   sam_optax.preconditioned_sam(b, rho=h["rho"]), SMALL),
    "fsam": Method("Functional-SAM", lambda b, h, n:
                   sam_optax.functional_sam(b, rho=h["rho"]), LARGE,
                   kind="functional"),
    "pfsam": Method("preconditioned Functional-SAM", lambda b, h, n:
                    sam_optax.functional_sam(b, rho=h["rho"],
                                             preconditioned=True), LARGE,
                    kind="functional"),
}
SAM_METHODS = ("sam", "psam", "fsam", "pfsam")


def grid_of(name, quick):
  grid = METHODS[name].grid
  mid = len(grid) // 2
  return grid[mid:mid + 1] if quick else grid


def cache_dir(quick):
  return os.path.join(CACHE, "text-lm" + ("-quick" if quick else ""))


def run_path(quick, name, h, seed):
  return os.path.join(cache_dir(quick), name, h_key(h), f"seed{seed}.json")


def selection_seeds(quick, name, max_seeds=10):
  """The seeds that every grid value with a seed-0 run has (``[0]`` until
  the whole grid has run the other seeds too; ``[]`` before any run)."""
  common = None
  for h in grid_of(name, quick):
    if load_json(run_path(quick, name, h, 0)) is None:
      continue
    have = {s for s in range(max_seeds)
            if load_json(run_path(quick, name, h, s)) is not None}
    common = have if common is None else common & have
  return sorted(common or ())


def choose(quick, name):
  """``(h, val)`` of the grid value with the best validation bpb, the mean
  over :func:`selection_seeds`; ``None`` before any run is done."""
  seeds = selection_seeds(quick, name)
  done = [(float(np.mean([load_json(run_path(quick, name, h, s))["val"]
                          for s in seeds])), h)
          for h in grid_of(name, quick)
          if seeds and load_json(run_path(quick, name, h, 0)) is not None]
  if not done:
    return None
  val, h = min(done, key=lambda t: t[0])
  return h, val


def plan(quick, seeds):
  """The runs in order: seed 0 of every grid value, then the other seeds
  of the chosen values (``None`` where the choice is not made yet), then
  the other seeds of each SAM variant's largest radius (the robustness
  measures where the perturbation is strong; not a selected value)."""
  first = [(name, h, 0) for name in METHODS for h in grid_of(name, quick)]
  rest = []
  for seed in seeds[1:]:
    for name in METHODS:
      rest.append((name, None, seed))
  if not quick:
    rest += [(name, grid_of(name, quick)[-1], seed) for seed in seeds[1:]
             for name in SAM_METHODS]
    # Then the rest of every grid on the other seeds: the choice becomes the
    # mean validation over all seeds once a method's grid is complete.
    rest += [(name, h, seed) for seed in seeds[1:] for name in SAM_METHODS
             for h in grid_of(name, quick)]
  return first, rest


Progress = _runs.Progress
fmt_h, h_key, save_json = _runs.fmt_h, _runs.h_key, _runs.save_json
load_json = _runs.load_json


def train_all(quick, seeds, log):
  problem = P.get("text-lm")
  data = problem.load(quick)
  arrays = T.device_arrays(data)
  first, rest = plan(quick, seeds)

  def pending(n, h, s):
    if h is None:  # A chosen value: pending unless the choice is cached.
      c = choose(quick, n)
      return c is None or load_json(run_path(quick, n, c[0], s)) is None
    return load_json(run_path(quick, n, h, s)) is None

  todo = sum(METHODS[n].weight * METHODS[n].epochs
             for n, h, s in first + rest if pending(n, h, s))
  progress = Progress(todo)
  log(f"text-lm{' (quick)' if quick else ''}: {data.sizes()}; seeds "
      f"{seeds}, methods {list(METHODS)}")
  trains = {}
  for name, h, seed in first + rest:
    method = METHODS[name]
    if h is None:
      chosen = choose(quick, name)
      if chosen is None:
        log(f"  {name}: no seed-0 run to choose from, skipped")
        continue
      h = chosen[0]
    path = run_path(quick, name, h, seed)
    if load_json(path) is not None:
      continue
    if name not in trains:
      trains[name] = T.make_train(
          problem, method.make, method.kind,
          problem.epochs_for(quick) * method.epochs, quick)
    start = time.perf_counter()
    out = T.run_seed(trains[name], problem, data, "clean", seed, h, quick,
                     arrays)
    seconds = time.perf_counter() - start
    out.update({"seconds": seconds, "h": h, "seed": seed,
                "steps": trains[name].total_steps(len(data.x_train)),
                "device": jax.devices()[0].platform})
    save_json(path, out)
    progress.update(method.weight * method.epochs, seconds)
    log(f"{name:9s} {fmt_h(h):9s} seed {seed}: val {out['val']:.4f} test "
        f"{out['test']:.4f} int4 {out['bpb_int4']:.4f} forgetting "
        f"{out['forgetting']:.4f} ({seconds:5.1f} s; about "
        f"{progress.left()} left)")


def time_steps(quick, chosen, rounds, log, repeats=2, target_seconds=0.3):
  """``{name: {"median", "q25", "q75", "ratios"}}``: step time / AdamW's,
  every method's jitted ``lax.scan`` of steps in one process, the order
  rotated every round, the fastest of ``repeats`` per round."""
  problem = P.get("text-lm")
  data = problem.load(quick)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  n, b = x.shape[0], problem.batch_size
  names = ["adamw"] + [k for k in chosen if k != "adamw"]
  horizon = 10**6  # Schedules far from their end: a mid-run step.
  runners, carries = {}, {}
  for name in names:
    m = METHODS[name]
    tx = m.make(problem.base(horizon, quick), T.traced(chosen.get(name, {})),
                horizon)
    runners[name], carries[name] = T.scan_runner(problem, tx, x, y, m.kind,
                                                 quick)
  rng = np.random.default_rng(0)

  def idx(steps):
    return jnp.asarray(rng.integers(0, n, (steps, b)))

  probe = idx(2)
  for name in names:  # Compile.
    carries[name] = jax.block_until_ready(runners[name](carries[name],
                                                        probe))
  start = time.perf_counter()
  carries["adamw"] = jax.block_until_ready(runners["adamw"](
      carries["adamw"], probe))
  per_step = (time.perf_counter() - start) / 2
  steps = int(max(2, min(40, round(target_seconds / max(per_step, 1e-6)))))
  batches = idx(steps)
  for name in names:  # Warm up at the timed shape.
    carries[name] = jax.block_until_ready(runners[name](carries[name],
                                                        batches))
  log(f"  timing {len(names)} steps: {rounds} rounds x {steps} steps, "
      f"fastest of {repeats}")
  ratios, carries = _runs.interleaved_ratios(
      runners, carries, batches, names, "adamw", rounds, repeats)
  out = {}
  for name in names:
    q = np.percentile(ratios[name], [25, 50, 75])
    out[name] = {"median": float(q[1]), "q25": float(q[0]),
                 "q75": float(q[2]), "ratios": ratios[name],
                 "h": chosen.get(name, {}), "adamw_step_ms": per_step * 1e3}
  log("  step / AdamW step (median): " + ", ".join(
      f"{k} {v['median']:.2f}" for k, v in out.items()))
  return out


def cached_timing(quick, rounds, log, retime=False):
  """The timing of the chosen configurations, measured where missing."""
  chosen = {name: c[0] for name in SAM_METHODS
            if (c := choose(quick, name)) is not None}
  chosen["adamw"] = {}
  path = os.path.join(cache_dir(quick),
                      f"timing_{jax.devices()[0].platform}.json")
  old = {} if retime else (load_json(path) or {})
  if any(k not in old or old[k]["h"] != h for k, h in chosen.items()):
    old = time_steps(quick, chosen, rounds, log)
    save_json(path, old)
  return old


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------

METRICS = ("test", "bpb_int8", "bpb_int4", "bpb_after_finetune",
           "forgetting")


def collect(quick, seeds):
  """Per method: the chosen ``h``, the grid's seed-0 validation, and the
  completed seeds' runs at ``h``."""
  rows = {}
  for name in METHODS:
    c = choose(quick, name)
    if c is None:
      continue
    h = c[0]
    runs = [r for s in seeds
            if (r := load_json(run_path(quick, name, h, s))) is not None]
    grid = {}
    sel = selection_seeds(quick, name) or [0]
    for g in grid_of(name, quick):
      rs = [load_json(run_path(quick, name, g, s)) for s in sel]
      grid[fmt_h(g)] = None if any(r is None for r in rs) else {
          "seeds": sel,
          "val": float(np.mean([r["val"] for r in rs])),
          "test": float(np.mean([r["test"] for r in rs])),
          "int4_degradation": float(np.mean(
              [r["bpb_int4"] - r["test"] for r in rs])),
          "forgetting": float(np.mean([r["forgetting"] for r in rs]))}
    largest = grid_of(name, quick)[-1]
    strong = [r for s in seeds if (r := load_json(run_path(
        quick, name, largest, s))) is not None]
    rows[name] = {"h": h, "runs": runs, "grid_seed0": grid,
                  "largest": (largest, strong)}
  return rows


def mean_std(values):
  a = np.asarray(values, float)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired(runs, base_runs, key="test", base_key="test"):
  """Mean ± std over the seeds both have of ``run[key] - base[base_key]``."""
  by_seed = {r["seed"]: r[base_key] for r in base_runs}
  d = [r[key] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
  return (*mean_std(d), len(d)) if d else None


def summarize(quick, seeds, timing):
  rows = collect(quick, seeds)
  out = {}
  base = rows.get("adamw", {}).get("runs", [])
  base2 = rows.get("adamw_2x", {}).get("runs", [])
  for name, row in rows.items():
    runs = row["runs"]
    if not runs:
      continue
    entry = {"label": METHODS[name].label, "h": row["h"],
             "seeds": [r["seed"] for r in runs],
             "steps": runs[0].get("steps"),
             "grid_seed0": row["grid_seed0"],
             "val": mean_std([r["val"] for r in runs])}
    for k in METRICS:
      entry[k] = mean_std([r[k] for r in runs])
      entry[k + "_per_seed"] = [r[k] for r in runs]
    for q in ("int8", "int4"):
      entry[f"{q}_degradation"] = mean_std(
          [r[f"bpb_{q}"] - r["test"] for r in runs])
    entry["vs_adamw"] = paired(runs, base)
    entry["vs_adamw_2x"] = paired(runs, base2)
    entry["forgetting_vs_adamw"] = paired(runs, base, "forgetting",
                                          "forgetting")
    entry["int4_degradation_vs_adamw"] = paired(
        [{**r, "d": r["bpb_int4"] - r["test"]} for r in runs],
        [{**r, "d": r["bpb_int4"] - r["test"]} for r in base], "d", "d")
    if (name in SAM_METHODS and row["largest"][1]
        and len(grid_of(name, quick)) > 1):
      h_big, strong = row["largest"]
      entry["largest_radius"] = {
          "h": h_big, "seeds": [r["seed"] for r in strong],
          "test": mean_std([r["test"] for r in strong]),
          "vs_adamw": paired(strong, base),
          "int4_degradation": mean_std(
              [r["bpb_int4"] - r["test"] for r in strong]),
          "int4_vs_adamw": paired(strong, base, "bpb_int4", "bpb_int4"),
          "int4_degradation_vs_adamw": paired(
              [{**r, "d": r["bpb_int4"] - r["test"]} for r in strong],
              [{**r, "d": r["bpb_int4"] - r["test"]} for r in base], "d",
              "d"),
          "forgetting_vs_adamw": paired(strong, base, "forgetting",
                                        "forgetting")}
    entry["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
    t = timing.get(name) if timing else None
    entry["step_time_vs_adamw"] = (
        None if t is None else {k: t[k] for k in ("median", "q25", "q75")})
    out[name] = entry
  return out


def _ms(v, digits=3):
  return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _delta(v, digits=3):
  return ("-" if v is None else
          f"{v[0]:+.{digits}f} ± {v[1]:.{digits}f} (n={v[2]})")


def markdown(rows, meta):
  lines = [
      "# SAM on a language model: text-lm", "",
      f"Written by `python -m benchmarks.language_model` on "
      f"{meta['machine']} ({meta['date']}). Problem `text-lm` of the "
      "registry: byte-level 2-layer transformer (d 48, about 85k "
      "parameters) on `pydoc_data.topics`, batch 16 x 64 bytes, AdamW "
      f"(warm-up + cosine), {meta['steps']} steps (AdamW 2x: twice). "
      "Radius chosen on the validation split (mean over the seeds every "
      "grid value has, see below); test "
      "bits per byte (lower is better), mean ± std over the seeds listed; "
      "Δ: paired per-seed difference (negative = better than the "
      "baseline). int8/int4: round-to-nearest per-column weight "
      "quantization; forgetting: test bpb increase after the registry's "
      "40-step fine-tune on Python source. Step: median step time / "
      "AdamW's (interleaved, one process, CPU).", "",
      "| method | ρ | seeds | test bpb | Δ vs AdamW (equal steps) | "
      "Δ vs AdamW 2x (equal compute) | int8 − float | int4 − float | "
      "forgetting | step / AdamW |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    step = r["step_time_vs_adamw"]
    lines.append(
        f"| {r['label']} | {fmt_h(r['h'])} | {len(r['seeds'])} | "
        f"{_ms(r['test'])} | "
        f"{'' if name == 'adamw' else _delta(r['vs_adamw'])} | "
        f"{'' if name == 'adamw_2x' else _delta(r['vs_adamw_2x'])} | "
        f"{_ms(r['int8_degradation'], 4)} | {_ms(r['int4_degradation'])} | "
        f"{_ms(r['forgetting'])} | "
        f"{'-' if step is None else format(step['median'], '.2f')} |")
  base0 = rows.get("adamw", {}).get("grid_seed0", {}).get("-")
  lines += ["", "Radius selection over each grid, means over the seeds "
            "every value of the grid has (the chosen value in bold): "
            "validation bpb (what chose), and for information the test "
            "bpb, int4 − float and forgetting of the same runs"
            + ("" if base0 is None else
               f" (AdamW, seeds {base0['seeds']}: val {base0['val']:.4f}, "
               "test "
               f"{base0['test']:.4f}, int4 − float "
               f"{base0['int4_degradation']:.4f}, forgetting "
               f"{base0['forgetting']:.4f})") + ".", "",
            "| method | ρ | seeds | val bpb | test bpb | int4 − float | "
            "forgetting |", "|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    if name in SAM_METHODS:
      for g, v in r["grid_seed0"].items():
        cell = (["-"] * 5 if v is None else
                [",".join(map(str, v["seeds"]))]
                + [f"{v[k]:.4f}" for k in ("val", "test", "int4_degradation",
                                           "forgetting")])
        if g == fmt_h(r["h"]):
          cell[1] = f"**{cell[1]}**"
        lines.append(f"| {r['label']} | {g} | {' | '.join(cell)} |")
  lines += ["", "Robustness against AdamW's, paired per seed: forgetting "
            "Δ and (int4 − float) Δ.", "",
            "| method | forgetting Δ vs AdamW | int4 degradation Δ vs AdamW "
            "|", "|---|---|---|"]
  for name, r in rows.items():
    if name != "adamw":
      lines.append(f"| {r['label']} | {_delta(r['forgetting_vs_adamw'])} "
                   f"| {_delta(r['int4_degradation_vs_adamw'])} |")
  strong = {n: r["largest_radius"] for n, r in rows.items()
            if "largest_radius" in r}
  if strong:
    lines += ["", "At each grid's largest radius (not selected: the "
              "robustness measures where the perturbation is strong), "
              "paired per seed against AdamW.", "",
              "| method | ρ | seeds | test Δ | int4 bpb Δ | (int4 − float) Δ "
              "| forgetting Δ |", "|---|---|---|---|---|---|---|"]
    for n, r in strong.items():
      lines.append(
          f"| {rows[n]['label']} | {fmt_h(r['h'])} | {len(r['seeds'])} | "
          f"{_delta(r['vs_adamw'])} | {_delta(r['int4_vs_adamw'])} | "
          f"{_delta(r['int4_degradation_vs_adamw'])} | "
          f"{_delta(r['forgetting_vs_adamw'])} |")
  if meta.get("missing"):
    lines += ["", f"Not yet run: {', '.join(meta['missing'])}."]
  return "\n".join(lines) + "\n"


def plot(rows, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  names = list(rows)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, (key, title) in zip(axes, (
      ("test", "test bits per byte"),
      ("int4_degradation", "int4 − float (bpb)"),
      ("forgetting", "forgetting after fine-tune (bpb)"))):
    for i, name in enumerate(names):
      per_seed = (rows[name][key + "_per_seed"] if key in METRICS else
                  [a - b for a, b in zip(rows[name]["bpb_int4_per_seed"],
                                         rows[name]["test_per_seed"])])
      ax.scatter([i] * len(per_seed), per_seed, s=14, color="C0")
      ax.errorbar(i, rows[name][key][0], rows[name][key][1], fmt="_",
                  color="k", ms=16, capsize=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30)
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def report(quick, seeds, timing, args, log):
  rows = summarize(quick, seeds, timing)
  problem = P.get("text-lm")
  first, rest = plan(quick, seeds)
  missing = [f"{n} {fmt_h(h)} seed {s}" for n, h, s in first
             if load_json(run_path(quick, n, h, s)) is None]
  for name in METHODS:
    done = len(rows.get(name, {}).get("seeds", []))
    if done < len(seeds):
      missing.append(f"{name}: {len(seeds) - done} seed(s) at the chosen ρ")
  meta = {"machine": f"{cpu_model()}, {os.cpu_count()} cores (shared)",
          "date": time.strftime("%Y-%m-%d"),
          "steps": problem.steps_for(quick), "quick": quick,
          "seeds": seeds, "missing": missing,
          "argv": sys.argv[1:], "jax": jax.__version__}
  folder = _output.directory(args)
  suffix = "_quick" if quick else ""
  with open(os.path.join(folder, f"{NAME}{suffix}.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows, "timing": timing}, f, indent=1)
  md = markdown(rows, meta)
  with open(os.path.join(folder, f"{NAME}{suffix}.md"), "w") as f:
    f.write(md)
  if rows and plot(rows, os.path.join(folder, f"{NAME}{suffix}.png")):
    log(f"  plot: {folder}/{NAME}{suffix}.png")
  log(md)


def main(argv=None):
  parser = _output.make_parser(__doc__, "40 steps, 1 seed, one radius per "
                               "method (a smoke run, under 5 minutes)")
  parser.add_argument("--from-cache", action="store_true",
                      help="train nothing: report what the cache holds")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timing rounds (default 7; quick 2)")
  parser.add_argument("--no-timing", action="store_true")
  parser.add_argument("--retime", action="store_true")
  args = parser.parse_args(argv)
  quick = args.quick
  seeds = _output.seeds(args)

  def log(msg):
    print(msg, flush=True)

  if not args.from_cache:
    train_all(quick, seeds, log)
  timing = None
  if not args.no_timing:
    path = os.path.join(cache_dir(quick),
                        f"timing_{jax.devices()[0].platform}.json")
    timing = (load_json(path) if args.from_cache and not args.retime else
              cached_timing(quick, args.rounds or (2 if quick else 7), log,
                            args.retime))
  report(quick, seeds, timing, args, log)


if __name__ == "__main__":
  main()
