"""The overflow-safe norm's cost on the normal path (issue 21).

``sam_optax._core.tree.norm`` sums the squares of the leaves scaled by 2^-80
next to the plain sum of squares (in the same pass) and reads the norm from
it where the plain sum overflows. This times SAM's ascent
(``ascent_direction``) with it against the plain sum-of-squares norm it
replaced, on a 1.3M-param float32 MLP-shaped tree, in interleaved rounds in
one process, and compares the compiled temp memory of whole SAM and ASAM
steps on that MLP (batch 256). An earlier ``lax.cond`` version of the
rescaling tripled that memory (1.57 MB against 0.54 MB).

  nice -n 10 python benchmarks/norm_overflow.py  # results/norm_overflow.md
"""

import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax._core import tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"w1": (784, 1024), "b1": (1024,), "w2": (1024, 512), "b2": (512,),
          "w3": (512, 10), "b3": (10,)}
ROUNDS, CALLS = 41, 20


def plain_norm(t):  # The norm before issue 21: the sum of squares only.
  dtype = tree.accumulation_dtype(t)
  squared = jnp.asarray(optax.tree.norm(
      tree.to_compute(tree.float_leaves(t)), squared=True), dtype)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)


def step_temp_memory(adaptive):
  """Temp bytes of a jitted SAM (or ASAM) step, plain norm and safe norm."""
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
            for k, s in SHAPES.items()}
  x = jnp.asarray(rng.standard_normal((256, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 256))

  def loss(p):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["w3"] + p["b3"], y).mean()

  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05,
                     adaptive=adaptive)
  out = []
  for plain in (True, False):
    def step(p, s):  # A new function each time: a new trace.
      u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
      return optax.apply_updates(p, u), s

    original = tree.norm
    if plain:
      tree.norm = plain_norm
    try:
      compiled = jax.jit(step).lower(params, tx.init(params)).compile()
    finally:
      tree.norm = original
    out.append(compiled.memory_analysis().temp_size_in_bytes)
  return out


def main():
  rng = np.random.default_rng(0)
  g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
       for k, s in SHAPES.items()}

  def ascent_safe(g):
    return sam_optax.ascent_direction(g, g, 0.05).epsilon

  def ascent_plain(g):  # Its own function: jit caches traces per function.
    return sam_optax.ascent_direction(g, g, 0.05).epsilon

  original = tree.norm
  tree.norm = plain_norm
  try:
    plain = jax.jit(ascent_plain).lower(g).compile()
  finally:
    tree.norm = original
  safe = jax.jit(ascent_safe).lower(g).compile()
  plain_hlo, safe_hlo = plain.as_text(), safe.as_text()
  jax.block_until_ready((safe(g), plain(g)))
  times = {"plain": [], "safe": []}
  for _ in range(ROUNDS):
    for name, fn in (("plain", plain), ("safe", safe)):
      start = time.perf_counter()
      for _ in range(CALLS):
        out = fn(g)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / CALLS)
  ratios = np.array(times["safe"]) / np.array(times["plain"])
  memory = {adaptive: step_temp_memory(adaptive) for adaptive in (False, True)}
  count = {name: {op: len(re.findall(rf"\s{op}\(", hlo))
                 for op in ("reduce", "conditional")}
           for name, hlo in (("plain", plain_hlo), ("safe", safe_hlo))}
  lines = [
      "# The overflow-safe norm on the normal path",
      "",
      "Produced by `benchmarks/norm_overflow.py`: SAM's ascent "
      "(`ascent_direction`, float32, 1.33M params in 6 leaves) with the "
      "plain sum-of-squares norm and with the overflow-safe one, "
      f"{ROUNDS} interleaved rounds of {CALLS} calls, CPU "
      f"({jax.devices()[0].device_kind}).",
      "",
      "Reduce and conditional ops are counted in the compiled HLO (the "
      "safe norm's two sums share one pass: XLA fuses them). The machine "
      f"is shared: load average {os.getloadavg()[0]:.1f} at the end.",
      "",
      "| norm | median ms | min ms | reduce ops | conditional ops |",
      "|---|---|---|---|---|",
  ]
  for name in ("plain", "safe"):
    t = np.array(times[name]) * 1e3
    lines.append(f"| {name} | {np.median(t):.3f} | {t.min():.3f} | "
                 f"{count[name]['reduce']} | {count[name]['conditional']} |")
  lines += ["", f"safe / plain per round: median {np.median(ratios):.3f}, "
            f"[min {ratios.min():.3f}, max {ratios.max():.3f}].", "",
            "Compiled temp memory of a whole train step (MLP 784-1024-512-10,"
            " batch 256, SGD with momentum):", "",
            "| step | plain norm | safe norm |", "|---|---|---|"]
  for adaptive, (plain_bytes, safe_bytes) in memory.items():
    lines.append(f"| {'ASAM' if adaptive else 'SAM'} | {plain_bytes} B | "
                 f"{safe_bytes} B |")
  text = "\n".join(lines) + "\n"
  print(text)
  (ROOT / "benchmarks" / "results" / "norm_overflow.md").write_text(text)


if __name__ == "__main__":
  main()
