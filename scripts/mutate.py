"""Mutation check of the method files: apply one mutation, run that
method's tests, restore; print killed/total per file.

Each mutation flips a sign, drops a term or swaps an axis in one line of a
method's rule. A mutation is *killed* when a test fails. Run from the repo
root (nice it: the machine is shared):

  nice -n 10 python scripts/mutate.py [method ...] > mutate.log

Not part of the test suite (it runs the method tests once per mutation).
"""

import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHEAP = "tests/test_cheap_methods.py"
# file -> (tests to run, [(description, old, new), ...])
MUTATIONS = {
    "msam": ([CHEAP, "-k", "msam or MSAM"], [
        ("sign of c_old in the held-param move",
         "(u + c_old * a - c_new * b)", "(u - c_old * a - c_new * b)"),
        ("drop the new perturbation", "(u + c_old * a - c_new * b)",
         "(u + c_old * a)"),
        ("c = rho / ||v||: drop eps... use ||v||^2",
         "v_norm + jnp.asarray(eps, jnp.float32))",
         "v_norm * v_norm + jnp.asarray(eps, jnp.float32))"),
        ("weight decay on w + u: drop u", "u - decay * (w + u)",
         "u - decay * w"),
        ("unperturb sign", "_tree.to_compute(p) + sam_state.method_state",
         "_tree.to_compute(p) - sam_state.method_state"),
        ("old momentum for the new", "v_new = _momentum(base_state)",
         "v_new = _momentum(step.base_state)"),
    ]),
    "rwp": ([CHEAP, "-k", "rwp or RWP"], [
        ("filter axis: first instead of last",
         "axis=tuple(range(w.ndim - 1))", "axis=tuple(range(1, w.ndim))"),
        ("drop the old noise", "(u - a + b).astype(ref.dtype)",
         "(u + b).astype(ref.dtype)"),
        ("sign of the new noise", "(u - a + b).astype(ref.dtype)",
         "(u - a - b).astype(ref.dtype)"),
        ("std from the current, not the next, clean params",
         "filter_norms(next_clean)", "filter_norms(clean)"),
        ("noise of the same step twice",
         "new = noise(key, optax.safe_increment(count), new_std",
         "new = noise(key, count, new_std"),
        ("unperturb sign", "(p - e).astype(p.dtype)",
         "(p + e).astype(p.dtype)"),
    ]),
    "rst": ([CHEAP, "-k", "rst or RST"], [
        ("SAM and base branches swapped",
         "sam_step, base_step)", "base_step, sam_step)"),
        ("probability ignored (always 0.5)",
         "jnp.asarray(probability, jnp.float32))",
         "jnp.asarray(0.5, jnp.float32))"),
        ("same draw every step", "jax.random.fold_in(key, step)", "key"),
    ]),
    "ae_sam": ([CHEAP, "-k", "ae_sam or AE"], [
        ("threshold sign", "mean + jnp.asarray(c, jnp.float32)",
         "mean - jnp.asarray(c, jnp.float32)"),
        ("EMA weights swapped",
         "mean = d * method_state.sq_norm_mean + (1 - d) * sq_norm",
         "mean = (1 - d) * method_state.sq_norm_mean + d * sq_norm"),
        ("variance around the old mean",
         "jnp.square(sq_norm - mean)",
         "jnp.square(sq_norm - method_state.sq_norm_mean)"),
        ("norm instead of squared norm",
         "sq_norm = jnp.square(_tree.norm(step.grads))",
         "sq_norm = (_tree.norm(step.grads))"),
        ("comparison flipped", "use_sam = sq_norm >= mean",
         "use_sam = sq_norm <= mean"),
    ]),
    "esam": (["tests/test_esam.py"], [
        ("SWP: no 1/beta", "e * inv_beta.astype(e.dtype)", "e"),
        ("SDS: smallest increases", "_, index = lax.top_k(increase, k)",
         "_, index = lax.top_k(-increase, k)"),
        ("SDS: loss, not increase", "increase = lax.stop_gradient(after - "
         "clean_losses)", "increase = lax.stop_gradient(after)"),
        ("SDS: gather on the wrong axis",
         "jnp.take(x, index, axis=0)", "jnp.take(x, index, axis=-1)"),
        ("radius from the unmasked epsilon",
         "radius = _tree.norm(epsilon)", "radius = _tree.norm(p.epsilon)"),
        ("SWP keeps where the draw is false",
         "jnp.where(k, e * inv_beta", "jnp.where(~k, e * inv_beta"),
    ]),
    "saf": (["tests/test_saf.py"], [
        ("targets from this epoch's slot",
         "(s.epoch + 1) % slots]", "s.epoch % slots]"),
        ("lambda from start_epoch on (>=)", "weight_from(epoch > start_epoch",
         "weight_from(epoch >= start_epoch"),
        ("store in the next slot",
         ".at[ids, state.epoch % slots]",
         ".at[ids, (state.epoch + 1) % slots]"),
    ]),
    "mesa": (["tests/test_saf.py"], [
        ("teacher from the old params",
         "new_params = _tree.to_compute(optax.apply_updates(params, updates))",
         "new_params = _tree.to_compute(params)"),
        ("EMA weights swapped",
         "new_params, state.teacher, jnp.asarray(decay, jnp.float32), 1)",
         "new_params, state.teacher, 1 - jnp.asarray(decay, jnp.float32), 1)"),
        ("lambda one step early",
         "teacher,\n                              _trajectory.weight_from("
         "count >= start_step",
         "teacher,\n                              _trajectory.weight_from("
         "count + 1 >= start_step"),
    ]),
}


def run(tests):
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p",
         "no:cacheprovider", *tests]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=900, check=False)
  return done.returncode, (done.stdout.strip().splitlines() or [""])[-1]


def main(names):
  scores = {}
  for name in names:
    tests, mutations = MUTATIONS[name]
    path = ROOT / "sam_optax" / "_methods" / f"{name}.py"
    source = path.read_text()
    killed = total = 0
    for description, old, new in mutations:
      if source.count(old) != 1:
        print(f"{name}: SKIPPED ({source.count(old)} matches): "
              f"{description}", flush=True)
        continue
      total += 1
      path.write_text(source.replace(old, new))
      start = time.time()
      try:
        code, last = run(tests)
      finally:
        path.write_text(source)
      dead = code != 0
      killed += dead
      print(f"{name}: {'killed  ' if dead else 'SURVIVED'} {description} "
            f"({time.time() - start:.0f}s; {last})", flush=True)
    scores[name] = (killed, total)
  for name, (killed, total) in scores.items():
    print(f"{name}: {killed}/{total} killed")


if __name__ == "__main__":
  main(sys.argv[1:] or list(MUTATIONS))
