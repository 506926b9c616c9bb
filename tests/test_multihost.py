"""Multi-host data-parallel SAM: 2 processes on localhost, 4 CPU devices each.

The test starts two ``tests/multihost_worker.py`` processes that join one
``jax.distributed`` cluster (gloo CPU collectives) and train over a global
mesh of 8 devices spanning both processes, with ``jax.shard_map`` under
``jax.jit`` and with ``jax.pmap``, each process feeding only its own rows of
the global batch. This process only launches them and computes the
reference on its single device: per device ``i``, ``ε_i`` from the local
gradient ``g_i``, ``g_sam = mean_i ∇L_i(w + ε_i)``, then SGD with momentum.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import multihost_worker as worker

NUM_PROCESSES = 2
NUM_DEVICES = NUM_PROCESSES * worker.LOCAL_DEVICES
TIMEOUT_S = 120
WORKER = Path(worker.__file__).resolve()
REPO = WORKER.parent.parent


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path, n=3000):
  try:
    return Path(path).read_text(errors="replace")[-n:]
  except OSError:
    return "<no log>"


def _launch(out_dir):
  """Runs the workers to completion; kills them all on failure or timeout."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = out_dir / f"worker{i}.log"
      with open(log, "wb") as f:
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i),
             str(NUM_PROCESSES), str(out_dir)],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO))
      logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        break
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed or time.monotonic() > deadline:
        why = (f"worker {failed[0]} exited with {procs[failed[0]].returncode}"
               if failed else f"timed out after {TIMEOUT_S} s")
        pytest.fail(f"multi-host run failed: {why}.\n" + "\n".join(
            f"--- log of worker {i}:\n{_tail(log)}"
            for i, log in enumerate(logs)))
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [dict(np.load(out_dir / f"process{i}.npz"))
          for i in range(NUM_PROCESSES)]


# ---------------------------------------------------------------- reference


@jax.jit
def _reference_step(params, state, xs, ys, is_global):
  """One step; ``xs``, ``ys`` are stacked per device ``(NUM_DEVICES, ...)``.

  ``is_global`` (a traced bool): ascend along the mean of the g_i.
  """
  grad = jax.grad(worker.loss_fn)
  per_device = jax.vmap(grad, in_axes=(0, 0, 0))
  grads = jax.vmap(grad, in_axes=(None, 0, 0))(params, xs, ys)  # g_i
  grads = jax.tree.map(
      lambda g: jnp.where(is_global, jnp.mean(g, axis=0, keepdims=True), g),
      grads)
  norms = jax.vmap(optax.tree.norm)(grads)
  perturbed = jax.tree.map(  # w + ρ g_i / ‖g_i‖
      lambda w, g: w + worker.RHO * g / norms.reshape((-1,) + (1,) * w.ndim),
      params, grads)
  g_sam = jax.tree.map(lambda g: jnp.mean(g, axis=0),
                       per_device(perturbed, xs, ys))
  updates, state = _BASE.update(g_sam, state, params)
  return optax.apply_updates(params, updates), state, jnp.mean(norms)


_BASE = optax.sgd(worker.LR, momentum=worker.MOMENTUM)


def reference(ascent):
  """Data-parallel SAM by hand on one device; ``ascent``: local or global."""
  x, y = worker.global_batch(NUM_DEVICES)
  xs, ys = (a.reshape((NUM_DEVICES, -1) + a.shape[1:]) for a in (x, y))
  params = jax.tree.map(jnp.asarray, worker.init_params())
  state = _BASE.init(params)
  for _ in range(worker.STEPS):
    params, state, grad_norm = _reference_step(params, state, xs, ys,
                                               ascent == "global")
  out = jax.tree.map(np.asarray, params)
  out["grad_norm"] = np.asarray(grad_norm)
  return out


def _max_diff(a, b):
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in worker.init_params())


# -------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _launch(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def refs():
  return {"local": reference("local"), "global": reference("global")}


def test_reference_separates_local_from_global_ascent(refs):
  # Guards the test below: on this problem a run that perturbs every shard
  # with the global gradient ends clearly elsewhere.
  assert _max_diff(refs["local"], refs["global"]) > 1e-3


# The worker's configurations and the ascent each must reproduce.
EXPECTED_ASCENT = {"shard_map": "local", "shard_map_sync": "global",
                   "pmap": "local"}


def test_worker_runs_every_configuration():
  assert set(worker.CONFIGS) == set(EXPECTED_ASCENT)


@pytest.mark.parametrize("config", sorted(EXPECTED_ASCENT))
def test_every_process_ends_with_the_reference_params(results, refs, config):
  expected = refs[EXPECTED_ASCENT[config]]
  other = refs["global" if EXPECTED_ASCENT[config] == "local" else "local"]
  keys = list(worker.init_params()) + ["grad_norm"]
  # Every device of every process holds bit-identical params (no drift
  # between processes), ...
  copies = {k: np.concatenate([r[f"{config}/{k}"] for r in results])
            for k in keys}
  for k in keys:
    assert copies[k].shape[0] == NUM_DEVICES
    for i in range(1, NUM_DEVICES):
      np.testing.assert_array_equal(
          copies[k][i], copies[k][0],
          err_msg=f"{config}: {k} differs between device 0 and device {i}")
  # ... equal to the single-process reference over the same global batch
  # (per-device ascent, or the global one with sync_ascent) ...
  got = {k: v[0] for k, v in copies.items()}
  for k in keys:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6,
                               err_msg=f"{config}: {k}")
  # ... and not to the other one.
  assert _max_diff(got, other) > 1e-3
