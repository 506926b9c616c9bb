"""Quality vs cost: every method of sam_optax on every problem, one protocol.

A user with a fixed compute budget picks, from one table and one plot per
problem, the method that keeps the most of SAM's gain for that budget.

Problems come from the registry ``benchmarks/problems/`` (``--list``): each
owns its data (fixed train / validation / test splits), model, loss, metric,
base optimizer with schedule, batch and epochs. The protocol is the same for
all of them:

* every method of the package that applies (SAF only where examples have
  stable indices), around the problem's base optimizer, plus the base
  optimizer for twice the steps (``sgd_2x``: a SAM-matched budget; "sgd"
  names the base optimizer whatever it is, AdamW on ``text-lm``);
* late-phase entries: SAM and LookSAM (the cheap method that kept all of
  SAM's gain on digits) with ``sam_optax.late_phase``, ρ switched on for the
  last 10 / 20 / 50% of the steps, at the radius their full-time version
  chose on validation in the same setting;
* per problem and setting (e.g. label noise level), each method's small grid
  is trained with every seed (3; the seed sets the initialisation, the
  batches and the label noise) and the value with the best mean validation
  metric is kept; its test metric (mean ± std over seeds) is reported: the
  test split is used once, never to choose;
* cost at the problem's real batch: each method's step (at its chosen
  hyperparameters in the first setting) against the base optimizer's step,
  as the median of per-round paired ratios over interleaved rounds in one
  process (every timed call a jitted ``lax.scan`` of steps with
  ``block_until_ready``, the order rotated every round, each time the
  fastest of 2 calls); a late-phase entry costs (1 - f) x its zero-radius
  step + f x its full step;
* gradients per step as evaluated: 1 + the ``grad_fn`` calls per step,
  counted in the training runs by a host callback inside ``grad_fn`` (a
  step that skips ``grad_fn`` through a ``lax.cond`` is not counted);
  ESAM's and MESA's are nominal (ESAM: 1 + γ = 1.5 with γ = 0.5; MESA: 1 and
  a teacher forward). ``grads_per_step_scheduled`` is 1 + the fraction of
  steps whose radius was non-zero, what a method that skips zero-radius
  steps would pay.

Runs are cached, one JSON per (problem, method, setting, hyperparameters,
seed), in the git-ignored ``benchmarks/results/local/frontier_cache/``: an
interrupted run resumes, and a new method adds only its own runs. A progress
line per run gives the time left (from the runs of this process, weighted by
each method's gradients per step).

Run from the repository root::

  python benchmarks/frontier.py --list
  python benchmarks/frontier.py --problem digits-mlp --quick   # minutes
  python benchmarks/frontier.py --problem images-cnn --write   # hours
  python benchmarks/frontier.py --problem text-lm --from-cache --write
  python benchmarks/frontier.py --problem images-cnn --device gpu

``--write`` writes ``benchmarks/results/frontier/<problem>.{json,md,png}``;
without it results go to ``benchmarks/results/local/frontier/``.
``--from-cache`` trains nothing: it reports what the cache holds (methods
with every run of a setting done) and times only if asked (``--retime``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NamedTuple

if __name__ == "__main__" and "--device" in sys.argv:  # Before JAX starts.
  _dev = sys.argv[sys.argv.index("--device") + 1]
  os.environ.setdefault(
      "JAX_PLATFORMS", {"gpu": "cuda", "cpu": "cpu"}.get(_dev, _dev))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sam_optax  # noqa: E402
from benchmarks import _runs, problems  # noqa: E402
from benchmarks.problems import train as T  # noqa: E402

CACHE = os.path.join(HERE, "results", "local", "frontier_cache")
TRACKED = os.path.join(HERE, "results", "frontier")
LOCAL = os.path.join(HERE, "results", "local", "frontier")
LATE_FRACTIONS = (0.1, 0.2, 0.5)


class Method(NamedTuple):
  """``make(base, h, total_steps)`` builds the transformation from the
  hyperparameters ``h`` (traced scalars: one compilation per method);
  ``grid`` lists the ``h`` tried (a problem may override it); ``kind`` is
  how the step calls it (:func:`benchmarks.problems.train.make_step`);
  ``epochs`` multiplies the budget; ``grads``: a nominal gradient count
  where calls are not counted; ``late``: ``(method, fraction)`` for a
  late-phase entry (ρ from that method's choice); ``weight``: the expected
  cost of a run relative to the base (for the time-left estimate)."""

  make: Any
  grid: tuple = ({},)
  kind: str = "grad_fn"
  epochs: int = 1
  grads: float | None = None
  late: tuple | None = None
  needs_example_ids: bool = False
  weight: float = 2.0


def _rhos(*values):
  return tuple({"rho": v} for v in values)


def _plain(b, h, n):
  return optax.with_extra_args_support(b)


def _late(source, fraction):
  make = METHODS_CORE[source].make

  def build(b, h, n):
    start = int(round((1 - fraction) * n))
    return make(b, {**h, "rho": sam_optax.late_phase(h["rho"], start)}, n)

  return Method(build, (), late=(source, fraction),
                weight=1 + fraction + 1)  # Zero-ρ steps still pay today.


def _zero(source):
  """``source`` with ρ = 0 on every step: a late-phase entry's early step."""
  make = METHODS_CORE[source].make
  return lambda b, h, n: make(
      b, {**h, "rho": sam_optax.late_phase(h["rho"], 10**9)}, n)


SAM_RHOS = _rhos(0.1, 0.3, 0.5, 0.8)
METHODS_CORE = {
    "sgd": Method(_plain, weight=1.0),
    "sgd_2x": Method(_plain, epochs=2, weight=2.0),
    "sam": Method(lambda b, h, n: sam_optax.sam(b, rho=h["rho"]), SAM_RHOS),
    "asam": Method(lambda b, h, n: sam_optax.sam(
        b, rho=h["rho"], adaptive=True, eta=0.01), _rhos(1.0, 3.0, 6.0)),
    "gsam": Method(lambda b, h, n: sam_optax.gsam(b, rho=h["rho"]),
                   SAM_RHOS),
    "looksam": Method(lambda b, h, n: sam_optax.looksam(
        b, rho=h["rho"], every_k=5, alpha=0.7), SAM_RHOS, weight=1.3),
    "friendly_sam": Method(
        lambda b, h, n: sam_optax.friendly_sam(b, rho=h["rho"]), SAM_RHOS),
    "msam": Method(lambda b, h, n: sam_optax.msam(b, rho=h["rho"]),
                   _rhos(1.0, 3.0, 6.0, 10.0), weight=1.1),
    "rwp": Method(lambda b, h, n: sam_optax.rwp(b, std=h["rho"]),
                  _rhos(0.02, 0.05, 0.1, 0.2), weight=1.3),
    "rst": Method(lambda b, h, n: sam_optax.rst(
        b, rho=h["rho"], probability=h["p"]),
        tuple({"rho": r, "p": p} for r in (0.3, 0.5, 0.8)
              for p in (0.25, 0.5)), weight=1.5),
    # ESAM with both parts (SWP β = 0.5, SDS γ = 0.5; γ must be static).
    "esam": Method(lambda b, h, n: sam_optax.esam(
        b, rho=h["rho"], beta=0.5, gamma=0.5), SAM_RHOS, kind="esam",
        grads=1.5, weight=1.8),
}
METHODS = dict(METHODS_CORE)
for _src in ("sam", "looksam"):
  for _f in LATE_FRACTIONS:
    METHODS[f"{_src}_late{int(100 * _f)}"] = _late(_src, _f)
METHODS.update({
    "ae_sam": Method(lambda b, h, n: sam_optax.ae_sam(
        b, rho=h["rho"], threshold=optax.linear_schedule(1.0, -1.0, n)),
        _rhos(0.3, 0.5, 0.8), weight=1.5),
    # MESA/SAF: λ chosen on validation (τ = 1), start after 1/8 of the run.
    "mesa": Method(lambda b, h, n: sam_optax.mesa(
        b, decay=0.99, lam=h["lam"], start_step=n // 8),
        tuple({"lam": v} for v in (0.3, 1.0, 3.0)), kind="mesa", grads=1.0,
        weight=1.3),
    "saf": Method(None, tuple({"lam": v} for v in (0.3, 1.0, 3.0)),
                  kind="saf", grads=1.0, needs_example_ids=True, weight=1.1),
})
TIMED_EXTRA = {f"{s}_zero": s for s in ("sam", "looksam")}


def make_of(problem, name, n_train, quick):
  """The ``make(base, h, total)`` of ``name`` on ``problem``."""
  if name == "saf":
    steps_per_epoch = n_train // problem.batch_size
    epochs = problem.epochs_for(quick)
    return lambda b, h, n: sam_optax.saf(
        b, num_examples=n_train, num_outputs=problem.num_outputs,
        steps_per_epoch=steps_per_epoch, lam=h["lam"],
        start_epoch=max(1, (5 * epochs) // 40 + 1),
        minus_epoch=max(1, (3 * epochs) // 40))
  if name in TIMED_EXTRA:
    return _zero(TIMED_EXTRA[name])
  return METHODS[name].make


def applies(problem, name) -> bool:
  return not METHODS[name].needs_example_ids or problem.example_ids


def grid_of(problem, name):
  return tuple(problem.grids.get(name, METHODS[name].grid))


# ----------------------------------------------------------------------------
# The cache.
# ----------------------------------------------------------------------------


def cache_dir(problem_name, quick):
  return os.path.join(CACHE, problem_name + ("-quick" if quick else ""))


def run_path(problem_name, quick, method, setting, h, seed):
  return os.path.join(cache_dir(problem_name, quick), method, setting,
                      h_key(h), f"seed{seed}.json")


# ----------------------------------------------------------------------------
# Training and selection.
# ----------------------------------------------------------------------------


def select(problem, quick, name, setting, seeds):
  """``(h, runs)`` of the grid value with the best mean validation metric
  among those with every seed done; ``None`` when none is complete."""
  sign = 1 if problem.higher_is_better else -1
  best = None
  for h in grid_for(problem, quick, name, setting, seeds):
    runs = [load_run(run_path(problem.name, quick, name, setting, h, s))
            for s in seeds]
    if any(r is None for r in runs):
      continue
    score = sign * np.mean([r["val"] for r in runs])
    if best is None or score > best[0]:
      best = (score, h, runs)
  return None if best is None else (best[1], best[2])


def grid_for(problem, quick, name, setting, seeds):
  """The grid; a late-phase entry's is its source's chosen radius."""
  method = METHODS[name]
  if method.late is None:
    grid = grid_of(problem, name)
    return grid[len(grid) // 2:len(grid) // 2 + 1] if quick else grid
  chosen = select(problem, quick, method.late[0], setting, seeds)
  return () if chosen is None else ({"rho": chosen[0]["rho"]},)


Progress = _runs.Progress
fmt_h, h_key, save_json = _runs.fmt_h, _runs.h_key, _runs.save_json
load_run = _runs.load_json


def planned(problem, quick, names, settings, seeds):
  """Weight of the runs not yet cached (late entries: an estimate)."""
  total = 0.0
  for name in names:
    m = METHODS[name]
    for setting in settings:
      grid = (grid_for(problem, quick, name, setting, seeds) if not m.late
              else ({"rho": None},))
      for h in grid:
        for s in seeds:
          if m.late or load_run(run_path(problem.name, quick, name, setting,
                                         h, s)) is None:
            total += m.weight * m.epochs
  return total


def train_all(problem, quick, names, settings, seeds, log):
  data = problem.load(quick)
  arrays = T.device_arrays(data)
  progress = Progress(planned(problem, quick, names, settings, seeds))
  log(f"{problem.name}{' (quick)' if quick else ''}: {data.sizes()}; "
      f"settings {list(settings)}, seeds {seeds}, methods {names}")
  trains = {}
  # Setting by setting (the first setting complete first), method by method.
  for setting in settings:
    for i, name in enumerate(names):
      method = METHODS[name]
      for h in grid_for(problem, quick, name, setting, seeds):
        for seed in seeds:
          path = run_path(problem.name, quick, name, setting, h, seed)
          if load_run(path) is not None:
            continue
          if name not in trains:
            trains[name] = T.make_train(
                problem, make_of(problem, name, len(data.x_train), quick),
                method.kind, problem.epochs_for(quick) * method.epochs,
                quick)
          start = time.perf_counter()
          out = T.run_seed(trains[name], problem, data, setting, seed, h,
                           quick, arrays)
          seconds = time.perf_counter() - start
          out.update({"seconds": seconds, "h": h, "seed": seed,
                      "device": jax.devices()[0].platform})
          save_json(path, out)
          progress.update(method.weight * method.epochs, seconds)
          log(f"[{i + 1}/{len(names)}] {name:14s} {setting:10s} "
              f"{fmt_h(h):14s} seed {seed}: val {out['val']:.4f} test "
              f"{out['test']:.4f} ({seconds:5.1f} s; about "
              f"{progress.left()} left)")
      if method.late and not grid_for(problem, quick, name, setting,
                                      seeds):
        log(f"  {name}: {setting}: {method.late[0]} has no complete "
            "selection yet, skipped")


# ----------------------------------------------------------------------------
# Step cost, interleaved.
# ----------------------------------------------------------------------------


def time_steps(problem, quick, chosen, rounds, log, repeats=2,
               target_seconds=0.2):
  """``{name: {"median", "q25", "q75", "ratios"}}``: step time / base's."""
  data = problem.load(quick)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  n, b = x.shape[0], problem.batch_size
  names = ["sgd"] + [k for k in chosen if k != "sgd"]
  horizon = 10**6  # Schedules far from their end: a mid-run step.
  runners, carries = {}, {}
  for name in names:
    m = METHODS.get(name, METHODS.get(TIMED_EXTRA.get(name, ""), None))
    tx = make_of(problem, name, n, quick)(
        problem.base(horizon, quick), T.traced(chosen.get(name, {})),
        horizon)
    runners[name], carries[name] = T.scan_runner(
        problem, tx, x, y, m.kind if m else "grad_fn", quick)
  rng = np.random.default_rng(0)

  def idx(steps):
    return jnp.asarray(rng.integers(0, n, (steps, b)))

  probe = idx(2)
  for name in names:  # Compile.
    carries[name] = jax.block_until_ready(runners[name](carries[name],
                                                        probe))
  start = time.perf_counter()
  carries["sgd"] = jax.block_until_ready(runners["sgd"](carries["sgd"],
                                                        probe))
  per_step = (time.perf_counter() - start) / 2
  steps = int(max(2, min(50, round(target_seconds / max(per_step, 1e-6)))))
  batches = idx(steps)
  for name in names:  # Warm up at the timed shape.
    carries[name] = jax.block_until_ready(runners[name](carries[name],
                                                        batches))
  log(f"  timing {len(names)} steps at batch {b}: {rounds} rounds x "
      f"{steps} steps, fastest of {repeats}")
  ratios, carries = _runs.interleaved_ratios(
      runners, carries, batches, names, "sgd", rounds, repeats)
  out = {}
  for name in names:
    q = np.percentile(ratios[name], [25, 50, 75])
    out[name] = {"median": float(q[1]), "q25": float(q[0]),
                 "q75": float(q[2]), "ratios": ratios[name],
                 "h": chosen.get(name, {}),
                 "sgd_step_ms": per_step * 1e3}
  log("  step / base step (median): " + ", ".join(
      f"{k} {v['median']:.2f}" for k, v in out.items()))
  return out


def timing_path(problem_name, quick):
  return os.path.join(cache_dir(problem_name, quick),
                      f"timing_{jax.devices()[0].platform}.json")


def cached_timing(problem, quick, chosen, rounds, log, retime):
  """The timing of the chosen configurations, measured where missing."""
  path = timing_path(problem.name, quick)
  old = {} if retime else (load_run(path) or {})
  missing = {k: h for k, h in chosen.items()
             if k not in old or old[k]["h"] != h}
  if missing:
    fresh = time_steps(problem, quick, {**missing, "sgd": {}}, rounds, log)
    old.update(fresh)
    save_json(path, old)
  return old


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def summarize(problem, quick, names, settings, seeds, timing):
  """The rows: one per (method, setting) with a complete selection."""
  rows = []
  base_mean, sam_mean = {}, {}
  for name in names:
    m = METHODS[name]
    for setting in settings:
      sel = select(problem, quick, name, setting, seeds)
      if sel is None:
        continue
      h, runs = sel
      test = np.array([r["test"] for r in runs])
      calls = np.mean([r.get("grad_fn_calls_per_step", 0.0) for r in runs])
      perturbed = np.mean([r["perturbed_fraction"] for r in runs])
      if m.grads is not None:
        grads = m.grads
      else:
        grads = 1.0 + calls
      # One-gradient methods built on the SAM skeleton (MSAM, RWP) have a
      # radius but never call grad_fn: the schedule does not apply.
      scheduled = (1.0 + perturbed if m.kind == "grad_fn" and calls > 0
                   else grads)
      row = {"method": name, "setting": setting, "metric": problem.metric,
             "higher_is_better": problem.higher_is_better,
             "mean": float(test.mean()), "std": float(test.std()),
             "seeds": list(seeds), "per_seed": test.tolist(),
             "val_mean": float(np.mean([r["val"] for r in runs])),
             "hyperparameters": h, "grads_per_step": float(grads),
             "grads_per_step_scheduled": float(scheduled),
             "grads_counted": m.grads is None,
             "epochs_multiplier": m.epochs,
             "grid": list(grid_for(problem, quick, name, setting, seeds)),
             "step_vs_base": None, "step_vs_base_iqr": None,
             "cost": None, "kept": None}
      extras = sorted(k for k in runs[0] if k.startswith("bpb_")
                      or k == "forgetting")
      if extras:
        row["extra"] = {k: {"mean": float(np.mean([r[k] for r in runs])),
                            "std": float(np.std([r[k] for r in runs]))}
                        for k in extras}
      row["step_vs_base"], row["step_vs_base_iqr"] = step_cost(name, timing)
      if row["step_vs_base"] is not None:
        row["cost"] = row["step_vs_base"] * m.epochs
      rows.append(row)
      if name == "sgd":
        base_mean[setting] = row["mean"]
      if name == "sam":
        sam_mean[setting] = row["mean"]
  sign = 1 if problem.higher_is_better else -1
  for row in rows:
    s = row["setting"]
    if s in base_mean and s in sam_mean:
      gain = sign * (sam_mean[s] - base_mean[s])
      if gain > 0:
        row["kept"] = sign * (row["mean"] - base_mean[s]) / gain
  return rows


def step_cost(name, timing):
  """``(median ratio, [q25, q75])`` for a method, ``(None, None)`` if
  untimed; a late-phase entry mixes its zero-ρ and full steps."""
  m = METHODS[name]
  if name == "sgd_2x":
    return 1.0, None
  if m.late:
    src, f = m.late
    zero = timing.get(f"{src}_zero")
    full = timing.get(src)
    if zero is None or full is None:
      return None, None
    return ((1 - f) * zero["median"] + f * full["median"],
            [(1 - f) * zero["q25"] + f * full["q25"],
             (1 - f) * zero["q75"] + f * full["q75"]])
  t = timing.get(name)
  if t is None:
    return None, None
  return t["median"], [t["q25"], t["q75"]]


def fmt_metric(problem, v):
  return f"{100 * v:.1f}" if problem.metric == "accuracy" else f"{v:.3f}"


def markdown(problem, rows, settings, meta):
  unit = " (%)" if problem.metric == "accuracy" else ""
  lines = [f"# Frontier: {problem.name}", "",
           f"{problem.description}.", "",
           f"Command: `{meta['command']}`. Device: {meta['device']}; "
           f"{meta['machine']}. Seeds {meta['seeds']}; each method's "
           "hyperparameters chosen per setting on the validation split "
           "(mean over seeds), the test split used once. "
           f"Metric: test {problem.metric}{unit}, mean ± std over seeds "
           f"({'higher' if problem.higher_is_better else 'lower'} is "
           "better). Kept: the fraction of SAM's gain over the base "
           "optimizer (`sgd`), where SAM gained. Step: step time / base "
           "step time at batch "
           f"{problem.batch_size} (median of paired interleaved rounds "
           "[IQR]); cost: step x budget multiplier. Grads: gradient "
           "evaluations per step as counted (ESAM, MESA: nominal); "
           "sched.: what the radius schedule asks for (1 + the fraction of "
           "steps with ρ > 0).", ""]
  by_setting = {s: [r for r in rows if r["setting"] == s] for s in settings}
  missing = meta.get("missing", {})
  for setting in settings:
    rs = by_setting[setting]
    if not rs:
      continue
    lines += [f"## {setting}", ""]
    extra_keys = sorted({k for r in rs for k in r.get("extra", {})})
    head = ("| method | test | kept | step [IQR] | cost | grads | sched. | "
            "chosen |")
    sep = "|---|---|---|---|---|---|---|---|"
    for k in extra_keys:
      head += f" {k} |"
      sep += "---|"
    lines += [head, sep]
    for r in sorted(rs, key=lambda r: (r["cost"] is None, r["cost"] or 0)):
      iqr = r["step_vs_base_iqr"]
      step = ("-" if r["step_vs_base"] is None else
              f"{r['step_vs_base']:.2f}" + (
                  f" [{iqr[0]:.2f}, {iqr[1]:.2f}]" if iqr else ""))
      cost = "-" if r["cost"] is None else f"{r['cost']:.2f}"
      kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
      line = (f"| {r['method']} | {fmt_metric(problem, r['mean'])} ± "
              f"{fmt_metric(problem, r['std'])} | {kept} | {step} | {cost} "
              f"| {r['grads_per_step']:.2f} | "
              f"{r['grads_per_step_scheduled']:.2f} | "
              f"{fmt_h(r['hyperparameters'])} |")
      for k in extra_keys:
        e = r.get("extra", {}).get(k)
        line += (f" {e['mean']:.3f} ± {e['std']:.3f} |" if e else " - |")
      lines.append(line)
    lines.append("")
    if missing.get(setting):
      lines += ["Not yet complete in this setting (no row): "
                + ", ".join(missing[setting]) + ".", ""]
  if any(r["method"].endswith(tuple(f"_late{int(100 * f)}"
                                    for f in LATE_FRACTIONS)) for r in rows):
    lines += ["Late-phase entries: the source method's validation-chosen "
              "ρ, switched on for the last 10/20/50% of the steps "
              "(`sam_optax.late_phase`). Grads counts the second gradients "
              "actually evaluated: where it exceeds sched., zero-radius "
              "steps still computed the second gradient in this version of "
              "the package; their step cost is (1 - f) x the measured "
              "zero-ρ step + f x the full step.", ""]
  return "\n".join(lines)


def plot(problem, rows, settings, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings = [s for s in settings if any(r["setting"] == s for r in rows)]
  if not settings:
    return False
  fig, axes = plt.subplots(1, len(settings),
                           figsize=(5.2 * len(settings), 4.4), squeeze=False)
  scale = 100 if problem.metric == "accuracy" else 1
  for ax, setting in zip(axes[0], settings):
    for r in rows:
      if r["setting"] != setting or r["cost"] is None:
        continue
      style = {"sgd": "ks", "sam": "r*", "sgd_2x": "kD"}.get(
          r["method"], "^" if "_late" in r["method"] else "o")
      ax.errorbar(r["cost"], scale * r["mean"], yerr=scale * r["std"],
                  fmt=style, capsize=3,
                  markersize=9 if r["method"] in ("sgd", "sam") else 6)
      ax.annotate(r["method"], (r["cost"], scale * r["mean"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks([1, 1.5, 2, 3, 5])
    ax.set_xticklabels(["1", "1.5", "2", "3", "5"])
    ax.set_title(f"{problem.name}: {setting}")
    ax.set_xlabel("training cost (base optimizer = 1, log scale)")
    ax.set_ylabel(f"test {problem.metric}"
                  + (" (%)" if problem.metric == "accuracy" else ""))
    ax.grid(alpha=0.3)
  fig.suptitle("Quality vs cost (cost: step vs base x budget multiplier)")
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
  return "unknown CPU"


def report(problem, quick, names, settings, seeds, timing, argv, write,
           log):
  rows = summarize(problem, quick, names, settings, seeds, timing)
  missing = {s: [n for n in names if applies(problem, n) and not any(
      r["method"] == n and r["setting"] == s for r in rows)]
             for s in settings}
  dev = jax.devices()[0]
  meta = {"command": "python benchmarks/frontier.py " + " ".join(argv),
          "device": f"{dev.platform} ({dev.device_kind})",
          "machine": f"{cpu_model()}, {os.cpu_count()} cores",
          "seeds": list(seeds), "missing": missing}
  folder = TRACKED if write else LOCAL
  os.makedirs(folder, exist_ok=True)
  stem = os.path.join(folder, problem.name + ("_quick" if quick else ""))
  md = markdown(problem, rows, settings, meta)
  with open(stem + ".md", "w") as f:
    f.write(md + "\n")
  save_json(stem + ".json", {
      "problem": problem.name, "description": problem.description,
      "quick": quick, "settings": list(settings), **meta,
      "jax": jax.__version__, "optax": optax.__version__,
      "sam_optax": sam_optax.__version__,
      "timing": {k: {kk: vv for kk, vv in v.items()}
                 for k, v in timing.items()},
      "rows": rows})
  plotted = plot(problem, rows, settings, stem + ".png")
  log(md)
  log(f"wrote {stem}.md, {stem}.json" + (f", {stem}.png" if plotted else ""))
  return rows


def summary_table(folder=TRACKED) -> str:
  """Markdown: per method, per problem and setting, the test metric, the
  fraction of SAM's gain kept and the cost, from the written results."""
  cols, cells, methods = [], {}, []
  for name in problems.names():
    path = os.path.join(folder, name + ".json")
    data = load_run(path)
    if data is None:
      continue
    problem = problems.get(name)
    for setting in data["settings"]:
      col = f"{name} {setting}"
      rows = [r for r in data["rows"] if r["setting"] == setting]
      if not rows:
        continue
      cols.append(col)
      for r in rows:
        if r["method"] not in methods:
          methods.append(r["method"])
        kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        cost = "-" if r["cost"] is None else f"{r['cost']:.2f}x"
        cells[r["method"], col] = (
            f"{fmt_metric(problem, r['mean'])}, {kept}, {cost}")
  order = [m for m in METHODS if m in methods]
  lines = ["| method | " + " | ".join(cols) + " |",
           "|---|" + "---|" * len(cols)]
  for m in order:
    lines.append(f"| {m} | " + " | ".join(
        cells.get((m, c), "not run") for c in cols) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--problem", default="digits-mlp",
                      help="a registered problem (--list)")
  parser.add_argument("--list", action="store_true",
                      help="list the problems and exit")
  parser.add_argument("--summary", action="store_true",
                      help="print the cross-problem table of the written "
                      "results (benchmarks/results/frontier/) and exit")
  parser.add_argument("--quick", action="store_true",
                      help="the problem's quick variant: one setting, one "
                      "seed, the middle value of each grid")
  parser.add_argument("--seeds", type=int, help="default 3 (quick 1)")
  parser.add_argument("--methods", help="comma-separated subset (default "
                      "all that apply; sgd and sam are always included)")
  parser.add_argument("--rounds", type=int,
                      help="timing rounds (default 10; quick 4)")
  parser.add_argument("--from-cache", action="store_true",
                      help="train nothing: report what the cache holds")
  parser.add_argument("--no-timing", action="store_true",
                      help="skip the step timing (cost columns empty unless "
                      "cached)")
  parser.add_argument("--retime", action="store_true",
                      help="measure the step times again")
  parser.add_argument("--device", choices=("cpu", "gpu", "tpu"),
                      help="JAX platform (default: JAX's choice)")
  parser.add_argument("--write", action="store_true",
                      help="write benchmarks/results/frontier/<problem>.*")
  args = parser.parse_args(argv)
  argv_used = list(sys.argv[1:] if argv is None else argv)

  def log(msg):
    print(msg, flush=True)

  if args.summary:
    log(summary_table())
    return
  if args.list:
    for name in problems.names():
      p = problems.get(name)
      log(f"{name:12s} {p.description}; settings {list(p.settings)}")
    return
  problem = problems.get(args.problem)
  quick = args.quick
  seeds = list(range(args.seeds or (1 if quick else 3)))
  settings = problem.quick_settings if quick else problem.settings
  names = [n for n in METHODS if applies(problem, n)]
  if args.methods:
    wanted = set(args.methods.split(",")) | {"sgd", "sam"}
    unknown = wanted - set(METHODS)
    if unknown:
      raise SystemExit(f"unknown methods: {sorted(unknown)}")
    names = [n for n in names if n in wanted]
    for n in list(names):  # A late-phase entry needs its source.
      if METHODS[n].late and METHODS[n].late[0] not in names:
        names.insert(names.index(n), METHODS[n].late[0])
  if not args.from_cache:
    train_all(problem, quick, names, settings, seeds, log)
  timing = load_run(timing_path(problem.name, quick)) or {}
  if not args.no_timing and (not args.from_cache or args.retime):
    chosen = {}
    first = settings[0]
    for n in names:
      m = METHODS[n]
      if m.late or m.epochs != 1:
        continue
      sel = select(problem, quick, n, first, seeds)
      if sel is not None:
        chosen[n] = sel[0]
    for zero, src in TIMED_EXTRA.items():
      if src in chosen:
        chosen[zero] = chosen[src]
    timing = cached_timing(problem, quick, chosen,
                           args.rounds or (4 if quick else 10), log,
                           args.retime)
  report(problem, quick, names, settings, seeds, timing, argv_used,
         args.write, log)


if __name__ == "__main__":
  main()
