"""What the cached benchmark runs share (frontier.py, language_model.py):
hyperparameter names, the JSON cache, the progress line and the paired,
interleaved step timing."""

from __future__ import annotations

import json
import os
import time

import jax


def fmt_h(h) -> str:
  return " ".join(f"{k}={v:g}" for k, v in sorted(h.items())) or "-"


def h_key(h) -> str:
  return "_".join(f"{k}={v:g}" for k, v in sorted(h.items())) or "default"


def load_json(path):
  """The cached JSON at ``path``, or ``None`` (missing or half-written)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def save_json(path, data):
  """Writes atomically (a killed run leaves no half-written file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


class Progress:
  """A line per run with the time left, weighted by each run's cost."""

  def __init__(self, todo):
    self.todo, self.done, self.seconds = todo, 0.0, 0.0

  def update(self, weight, seconds):
    self.todo -= weight
    self.done += weight
    self.seconds += seconds

  def left(self):
    if not self.done:
      return "?"
    s = self.todo * self.seconds / self.done
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def interleaved_ratios(runners, carries, batches, names, base, rounds,
                       repeats):
  """Step time / ``base``'s, one ratio per round: the runners run in a
  rotated order each round, each the fastest of ``repeats``. Returns the
  ratios per name and the updated carries."""
  ratios = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    seconds = {}
    for name in order:
      best = float("inf")
      for _ in range(repeats):
        t0 = time.perf_counter()
        carries[name] = jax.block_until_ready(
            runners[name](carries[name], batches))
        best = min(best, time.perf_counter() - t0)
      seconds[name] = best
    for name in names:
      ratios[name].append(seconds[name] / seconds[base])
  return ratios, carries
