"""ESAM, SAF and MESA: what they cost and what they keep of SAM's gain.

Three measurements, in one process:

1. **Step time and XLA flops** of SGD, SAM, ESAM (SDS only, SWP only, both;
   SDS with and without the clean per-example losses handed over), MESA and
   SAF on the same plain-JAX MLP (and a small CNN unless ``--quick``), with
   synthetic data. Every step is jitted and warmed up; the variants are timed
   round-robin in a rotated order, ``block_until_ready`` inside the timed
   region, and the ratios to SGD and to SAM are the medians of the per-round
   paired ratios. Flops are XLA's ``cost_analysis()`` of the compiled step.
2. **Can SWP save anything in JAX?** The flops and time of the clean gradient
   of the same model with every tensor differentiated, with a random half
   excluded by ``jnp.where(keep, w, stop_gradient(w))``, by a per-tensor
   ``lax.cond``, and with a *static* half excluded (``jax.grad`` w.r.t. the
   other half only: the upper bound, not what SWP does).
3. **Accuracy under 40% symmetric label noise** on scikit-learn's digits
   (the MLP and data of the ``digits-mlp`` problem): hyper-parameters
   (ρ; MESA/SAF's λ and τ) are chosen on a validation split carved from the
   training set (its labels as noisy as the training labels), never on the
   test set; then 3 fresh seeds are trained and tested. Reported: test
   accuracy (mean ± std) and the fraction of SAM's gain over SGD each method
   keeps, ``(acc - acc_sgd) / (acc_sam - acc_sgd)``.

Run from the repository root::

  python benchmarks/esam_saf.py --quick   # about 5 min on 2 shared cores
  python benchmarks/esam_saf.py           # about 25 min
  python benchmarks/esam_saf.py --write   # also the tracked results

Results go to ``benchmarks/results/local/esam_saf[_quick].{json,md}``
(git-ignored); with ``--write`` also to ``benchmarks/results/esam_saf.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import _common  # noqa: E402
from flax import nnx  # noqa: E402

import sam_optax  # noqa: E402
from benchmarks.problems import Functional, digits_mlp  # noqa: E402
from benchmarks.problems import noisy_labels as _noisy  # noqa: E402

# The digits data, noise and MLP: the registry's digits-mlp problem.
_MLP = Functional(digits_mlp.model(0))


def predict(params, x):
  return _MLP.apply(params, _MLP.rest, x, False)[0]


def init_mlp(key):
  """The problem's MLP initialised from a (possibly traced) key."""
  module = digits_mlp.MLP((64, *digits_mlp.HIDDEN, digits_mlp.NUM_CLASSES),
                          rngs=nnx.Rngs(key))
  return nnx.split(module, nnx.Param, ...)[1]


def load_data():
  """(x_train, y_train, x_test, y_test): digits-mlp's train and test."""
  d = digits_mlp.load()
  return d.x_train, d.y_train, d.x_test, d.y_test


def noisy_labels(y, noise, seed):
  return _noisy(y, noise, seed, digits_mlp.NUM_CLASSES)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LOCAL = os.path.join(RESULTS, "local")
NUM_CLASSES = 10
TAU = 5.0


# ----------------------------------------------------------------------------
# Models (plain JAX): per-example losses are what ESAM needs.
# ----------------------------------------------------------------------------


def mlp_init(key, sizes):
  params = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (n_in, n_out))
                   * jnp.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)})
  return params


def mlp_apply(params, x):
  x = x.reshape((x.shape[0], -1))
  for p in params[:-1]:
    x = jax.nn.relu(x @ p["w"] + p["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def cnn_init(key, channels=(16, 32, 64)):
  params, c_in = [], 3
  for c in channels:
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (3, 3, c_in, c))
                   * jnp.sqrt(2.0 / (9 * c_in)), "b": jnp.zeros(c)})
    c_in = c
  key, sub = jax.random.split(key)
  params.append({"w": jax.random.normal(sub, (c_in, NUM_CLASSES))
                 * jnp.sqrt(1.0 / c_in), "b": jnp.zeros(NUM_CLASSES)})
  return params


def cnn_apply(params, x):
  for p in params[:-1]:
    x = lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + p["b"])
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                          "VALID")
  x = jnp.mean(x, axis=(1, 2))
  return x @ params[-1]["w"] + params[-1]["b"]


def example_losses_of(apply):
  def example_loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        apply(params, x), y)
  return example_loss


# ----------------------------------------------------------------------------
# One train step per method. ``make_step(apply, method, hp, n, spe)`` returns
# ``(tx, step)`` with ``step(params, state, x, y, ids) -> (params, state,
# loss)``; ``ids`` are the examples' indices (SAF's store needs them).
# ----------------------------------------------------------------------------

ESAM_VARIANTS = {  # name -> (beta, gamma, hand over the clean losses?)
    "esam_sds": (1.0, 0.5, True),
    "esam_sds_noloss": (1.0, 0.5, False),
    "esam_swp": (0.5, 1.0, True),
    "esam": (0.5, 0.5, True),
}


def make_step(apply, method, hp, num_examples, steps_per_epoch, base):
  example_loss = example_losses_of(apply)

  def mean_loss(params, x, y):
    return jnp.mean(example_loss(params, (x, y)))

  if method == "sgd":
    tx = optax.with_extra_args_support(base)

    def step(params, state, x, y, ids):
      loss, grads = jax.value_and_grad(mean_loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

  elif method == "sam":
    tx = sam_optax.sam(base, rho=hp["rho"])

    def step(params, state, x, y, ids):
      loss, grads = jax.value_and_grad(mean_loss)(params, x, y)
      updates, state = tx.update(
          grads, state, params,
          grad_fn=lambda p: jax.grad(mean_loss)(p, x, y))
      return optax.apply_updates(params, updates), state, loss

  elif method in ESAM_VARIANTS:
    beta, gamma, hand_over = ESAM_VARIANTS[method]
    tx = sam_optax.esam(base, rho=hp["rho"], beta=beta, gamma=gamma,
                        seed=hp.get("seed", 0))

    def step(params, state, x, y, ids):
      (loss, losses), grads = jax.value_and_grad(
          lambda p: (lambda ls: (ls.mean(), ls))(example_loss(p, (x, y))),
          has_aux=True)(params)
      updates, state = tx.update(
          grads, state, params, example_loss_fn=example_loss, batch=(x, y),
          example_losses=losses if hand_over else None)
      return optax.apply_updates(params, updates), state, loss

  elif method == "mesa":
    tx = sam_optax.mesa(base, decay=hp["decay"], lam=hp["lam"],
                        start_step=hp["start_epoch"] * steps_per_epoch)

    def step(params, state, x, y, ids):
      lam = sam_optax.trajectory_weight(state)
      teacher = lax.cond(
          lam > 0, lambda: apply(sam_optax.teacher_params(state), x),
          lambda: jnp.zeros((x.shape[0], NUM_CLASSES), jnp.float32))

      def loss_fn(p):
        logits = apply(p, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.mean() + lam * sam_optax.trajectory_loss(
            logits, teacher, hp.get("tau", TAU)), ce.mean()

      (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

  elif method == "saf":
    tx = sam_optax.saf(base, num_examples=num_examples,
                       num_outputs=NUM_CLASSES,
                       steps_per_epoch=steps_per_epoch, lam=hp["lam"],
                       start_epoch=hp["start_epoch"], minus_epoch=3)

    def step(params, state, x, y, ids):
      lam = sam_optax.trajectory_weight(state)
      targets = sam_optax.saf_targets(state, ids)

      def loss_fn(p):
        logits = apply(p, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.mean() + lam * sam_optax.trajectory_loss(
            logits, targets, hp.get("tau", TAU)), (ce.mean(), logits)

      (_, (loss, logits)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
      updates, state = tx.update(grads, state, params, example_ids=ids,
                                 outputs=logits)
      return optax.apply_updates(params, updates), state, loss

  else:
    raise ValueError(method)
  return tx, step


# ----------------------------------------------------------------------------
# 1. Step time and flops.
# ----------------------------------------------------------------------------

SPEED_METHODS = ("sgd", "sam", "esam_sds", "esam_sds_noloss", "esam_swp",
                 "esam", "mesa", "saf")
# MESA on from step 0 (its teacher pass runs under lax.cond(λ > 0)); SAF's
# loss term is computed at every step whatever λ, so its start does not
# matter here (but it must be >= minus_epoch).
SPEED_HP = {"rho": 0.05, "lam": 0.3, "decay": 0.99, "start_epoch": 0}
SAF_SPEED_START = 3


def flops_of(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def speed_models(quick):
  models = {"mlp 784-1024-1024-10, batch 256": (
      lambda k: mlp_init(k, (784, 1024, 1024, 10)), mlp_apply, (256, 784))}
  if not quick:
    models["cnn 16-32-64 on 32x32x3, batch 128"] = (
        cnn_init, cnn_apply, (128, 32, 32, 3))
  return models


def time_steps(models, rounds, calls, log):
  out = {}
  for name, (init, apply, shape) in models.items():
    key = jax.random.PRNGKey(0)
    params = init(key)
    x = jax.random.normal(key, shape)
    y = jax.random.randint(key, (shape[0],), 0, NUM_CLASSES)
    ids = jnp.arange(shape[0])
    steps, flops = {}, {}
    for method in SPEED_METHODS:
      hp = SPEED_HP if method != "saf" else {
          **SPEED_HP, "start_epoch": SAF_SPEED_START}
      tx, step = make_step(apply, method, hp, shape[0], 1,
                           optax.sgd(0.01, momentum=0.9))
      state = tx.init(params)
      compiled = jax.jit(step).lower(params, state, x, y, ids).compile()
      flops[method] = flops_of(compiled)
      steps[method] = (compiled, state)
      jax.block_until_ready(compiled(params, state, x, y, ids))  # warm-up
    times = {m: [] for m in SPEED_METHODS}
    for r in range(rounds):
      order = SPEED_METHODS[r % len(SPEED_METHODS):] + SPEED_METHODS[
          :r % len(SPEED_METHODS)]
      for method in order:
        compiled, state = steps[method]
        start = time.perf_counter()
        for _ in range(calls):
          jax.block_until_ready(compiled(params, state, x, y, ids))
        times[method].append((time.perf_counter() - start) / calls)
    t = {m: np.asarray(v) for m, v in times.items()}
    rows = {}
    for m in SPEED_METHODS:
      rows[m] = {
          "median_ms": 1e3 * float(np.median(t[m])),
          "iqr_ms": [1e3 * float(q) for q in np.percentile(t[m], [25, 75])],
          "ratio_to_sgd": float(np.median(t[m] / t["sgd"])),
          "ratio_to_sam": float(np.median(t[m] / t["sam"])),
          "ratio_to_sam_iqr": [float(q) for q in np.percentile(
              t[m] / t["sam"], [25, 75])],
          "flops": flops[m],
          "flops_ratio_to_sgd": flops[m] / flops["sgd"],
          "flops_ratio_to_sam": flops[m] / flops["sam"],
      }
      log(f"  {name[:3]} {m:16s} {rows[m]['median_ms']:8.2f} ms  "
          f"x{rows[m]['ratio_to_sgd']:.2f} SGD  x{rows[m]['ratio_to_sam']:.2f}"
          f" SAM  flops x{rows[m]['flops_ratio_to_sam']:.2f} SAM")
    out[name] = rows
  return out


# ----------------------------------------------------------------------------
# 2. SWP: does a random per-tensor stop_gradient save work?
# ----------------------------------------------------------------------------


def swp_probe(rounds, calls, log):
  params = mlp_init(jax.random.PRNGKey(0), (784, 1024, 1024, 1024, 10))
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (256, 784))
  y = jax.random.randint(key, (256,), 0, NUM_CLASSES)
  loss = example_losses_of(mlp_apply)

  def mean_loss(p):
    return jnp.mean(loss(p, (x, y)))

  leaves, treedef = jax.tree.flatten(params)
  keep = jnp.array([i % 2 == 0 for i in range(len(leaves))])  # half

  def full(p, keep):
    return jax.grad(mean_loss)(p)

  def where(p, keep):
    def masked(p):
      ls = jax.tree.leaves(p)
      ls = [jnp.where(keep[i], w, lax.stop_gradient(w))
            for i, w in enumerate(ls)]
      return mean_loss(treedef.unflatten(ls))
    return jax.grad(masked)(p)

  def cond(p, keep):
    def masked(p):
      ls = jax.tree.leaves(p)
      ls = [lax.cond(keep[i], lambda w: w, lax.stop_gradient, w)
            for i, w in enumerate(ls)]
      return mean_loss(treedef.unflatten(ls))
    return jax.grad(masked)(p)

  def static(p, keep):  # Python-chosen half: what SWP cannot do.
    chosen = [i for i in range(len(leaves)) if i % 2 == 0]
    ls = jax.tree.leaves(p)

    def partial(sel):
      full_ls = list(ls)
      for i, w in zip(chosen, sel):
        full_ls[i] = w
      return mean_loss(treedef.unflatten(full_ls))
    return jax.grad(partial)([ls[i] for i in chosen])

  variants = {"all tensors": full, "random half, jnp.where": where,
              "random half, lax.cond": cond, "static half": static}
  compiled = {k: jax.jit(f).lower(params, keep).compile()
              for k, f in variants.items()}
  for c in compiled.values():
    jax.block_until_ready(c(params, keep))
  times = {k: [] for k in variants}
  names = list(variants)
  for r in range(rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(compiled[k](params, keep))
      times[k].append((time.perf_counter() - start) / calls)
  base = np.asarray(times["all tensors"])
  out = {}
  for k in names:
    t = np.asarray(times[k])
    out[k] = {"median_ms": 1e3 * float(np.median(t)),
              "ratio": float(np.median(t / base)),
              "flops": flops_of(compiled[k]),
              "flops_ratio": flops_of(compiled[k])
              / flops_of(compiled["all tensors"])}
    log(f"  swp {k:24s} {out[k]['median_ms']:8.2f} ms  x{out[k]['ratio']:.2f}"
        f"  flops x{out[k]['flops_ratio']:.2f}")
  return out


# ----------------------------------------------------------------------------
# 3. Accuracy under 40% label noise, hyper-parameters on a validation split.
# ----------------------------------------------------------------------------

NOISE = 0.4
BATCH = 32
LR, MOMENTUM = 0.05, 0.9
GRIDS = {  # method -> list of hyper-parameter dicts
    "sgd": [{}],
    "sam": [{"rho": r} for r in (0.1, 0.3, 0.5)],
    "esam_sds": [{"rho": r} for r in (0.1, 0.3, 0.5)],
    "esam_swp": [{"rho": r} for r in (0.1, 0.3, 0.5)],
    "esam": [{"rho": r} for r in (0.1, 0.3, 0.5)],
    # τ = 5 is the paper's; with it the term's logit gradient λτ(q - p) is
    # 5λ times cross-entropy's scale, so τ = 1 is tried too, with larger λ.
    "mesa": [{"lam": lam, "tau": tau, "decay": 0.99, "start_epoch": 5}
             for tau, lams in ((5.0, (0.3, 1.0, 3.0)),
                               (1.0, (0.3, 1.0, 3.0, 10.0)))
             for lam in lams],
    "saf": [{"lam": lam, "tau": tau, "start_epoch": 5}
            for tau, lams in ((5.0, (0.3, 1.0, 3.0)),
                              (1.0, (0.3, 1.0, 3.0, 10.0)))
            for lam in lams],
}
QUICK_GRIDS = {
    "sgd": [{}], "sam": [{"rho": 0.3}, {"rho": 0.5}],
    "esam_sds": [{"rho": 0.3}, {"rho": 0.5}],
    "esam_swp": [{"rho": 0.3}, {"rho": 0.5}],
    "esam": [{"rho": 0.3}, {"rho": 0.5}],
    "mesa": [{"lam": 1.0, "tau": 5.0, "decay": 0.99, "start_epoch": 5},
             {"lam": 3.0, "tau": 1.0, "decay": 0.99, "start_epoch": 5}],
    "saf": [{"lam": 0.3, "tau": 5.0, "start_epoch": 5},
            {"lam": 3.0, "tau": 1.0, "start_epoch": 5}],
}


def make_train(method, hp, epochs, x_train, x_eval, y_eval):
  """``train(key, y_noisy) -> (eval accuracy, final train loss)``, jitted."""
  n = x_train.shape[0]
  spe = n // BATCH
  schedule = optax.cosine_decay_schedule(LR, epochs * spe)
  tx, step = make_step(predict, method, hp, n, spe,
                       optax.sgd(schedule, momentum=MOMENTUM))

  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(predict(params, x), -1) == y)

  def train(key, y_noisy):
    init_key, data_key = jax.random.split(key)
    params = init_mlp(init_key)

    def one(carry, idx):
      params, state = carry
      params, state, loss = step(params, state, x_train[idx], y_noisy[idx],
                                 idx)
      return (params, state), loss

    def epoch(carry, key):
      order = jax.random.permutation(key, n)[:spe * BATCH]
      return lax.scan(one, carry, order.reshape(spe, BATCH))

    (params, _), losses = lax.scan(
        epoch, (params, tx.init(params)), jax.random.split(data_key, epochs))
    return accuracy(params, x_eval, y_eval), losses[-1].mean()

  return jax.jit(train)


def split_validation(x, y, fraction=0.2, seed=0):
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(y))
  n_val = int(round(fraction * len(y)))
  return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


def accuracy_study(epochs, tune_seeds, test_seeds, quick, log):
  x_train, y_train, x_test, y_test = load_data()
  x_fit, y_fit, x_val, y_val = split_validation(x_train, y_train)
  grids = QUICK_GRIDS if quick else GRIDS
  out = {"tuning": {}, "chosen": {}, "test": {}}
  # Tuning: train on the fit split, score on the (noisy) validation split.
  for method, grid in grids.items():
    scores = []
    for hp in grid:
      accs = []
      for s in tune_seeds:
        y_noisy = noisy_labels(
            np.concatenate([y_fit, y_val]), NOISE, 100 + s)
        y_fit_noisy, y_val_noisy = y_noisy[:len(y_fit)], y_noisy[len(y_fit):]
        train = make_train(method, {**hp, "seed": s}, epochs,
                           jnp.asarray(x_fit), jnp.asarray(x_val),
                           jnp.asarray(y_val_noisy))
        acc, _ = train(jax.random.key(100 + s), jnp.asarray(y_fit_noisy))
        accs.append(float(acc))
      scores.append(float(np.mean(accs)))
      log(f"  tune {method:10s} {hp} val acc (noisy labels) "
          f"{100 * scores[-1]:.1f}")
    out["tuning"][method] = [{"hp": hp, "val_acc": a}
                             for hp, a in zip(grid, scores)]
    out["chosen"][method] = grid[int(np.argmax(scores))]
  # Test: the chosen hyper-parameters, fresh seeds, the whole training set.
  for method in grids:
    hp = out["chosen"][method]
    accs, times = [], []
    train = make_train(method, {**hp, "seed": 0}, epochs,
                       jnp.asarray(x_train), jnp.asarray(x_test),
                       jnp.asarray(y_test))
    for s in test_seeds:
      y_noisy = jnp.asarray(noisy_labels(y_train, NOISE, s))
      start = time.perf_counter()
      acc, _ = train(jax.random.key(s), y_noisy)
      accs.append(float(acc))
      times.append(time.perf_counter() - start)
    out["test"][method] = {"hp": hp, "accs": accs,
                           "mean": float(np.mean(accs)),
                           "std": float(np.std(accs))}
    log(f"  test {method:10s} {hp} {100 * np.mean(accs):.1f} ± "
        f"{100 * np.std(accs):.1f}")
  sgd, sam = out["test"]["sgd"]["mean"], out["test"]["sam"]["mean"]
  for method, r in out["test"].items():
    r["gain_kept"] = ((r["mean"] - sgd) / (sam - sgd) if sam != sgd
                      else float("nan"))
  return out


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def markdown(res):
  lines = ["# ESAM, SAF and MESA: cost and accuracy", "",
           f"Machine: {res['machine']}; jax {jax.__version__}, optax "
           f"{optax.__version__}. Command: `{res['command']}` "
           f"({res['seconds']:.0f} s).", ""]
  lines += ["## Step time and XLA flops", "",
            "Median over rounds (round-robin, rotated order, warmed up, "
            "`block_until_ready` inside the timing); ratios are medians of "
            "per-round paired ratios. ESAM: β = 0.5 for SWP, γ = 0.5 for "
            "SDS; `esam_sds_noloss` does not hand over the clean "
            "per-example losses (one more forward pass). MESA and SAF with "
            "the trajectory loss on (λ = 0.3).", ""]
  for model, rows in res["speed"].items():
    lines += [f"**{model}**", "",
              "| method | ms/step | × SGD | × SAM (IQR) | flops × SGD | "
              "flops × SAM |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
      lo, hi = r["ratio_to_sam_iqr"]
      lines.append(
          f"| {m} | {r['median_ms']:.2f} | {r['ratio_to_sgd']:.2f} | "
          f"{r['ratio_to_sam']:.2f} ({lo:.2f}-{hi:.2f}) | "
          f"{r['flops_ratio_to_sgd']:.2f} | {r['flops_ratio_to_sam']:.2f} |")
    lines.append("")
  lines += ["## SWP: the clean gradient with half the tensors excluded", "",
            "MLP 784-1024-1024-1024-10, batch 256; ratios to differentiating "
            "every tensor.", "", "| variant | ms | × all | flops × all |",
            "|---|---|---|---|"]
  for k, r in res["swp"].items():
    lines.append(f"| {k} | {r['median_ms']:.2f} | {r['ratio']:.2f} | "
                 f"{r['flops_ratio']:.2f} |")
  acc = res["accuracy"]
  lines += ["", "## Digits, 40% symmetric label noise", "",
            f"MLP 64-128-128-10 (the `digits-mlp` problem), batch {BATCH}, SGD "
            f"momentum {MOMENTUM}, lr {LR} cosine, {res['epochs']} epochs. "
            "Hyper-parameters chosen on a validation split (20% of the "
            "training set, labels as noisy) with seeds "
            f"{res['tune_seeds']}; test accuracy with seeds "
            f"{res['test_seeds']} trained on the whole training set. Gain "
            "kept = (acc − SGD) / (SAM − SGD).", "",
            "| method | chosen | test acc % | gain kept |", "|---|---|---|---|"]
  for m, r in acc["test"].items():
    hp = ", ".join(f"{k}={v}" for k, v in r["hp"].items()) or "-"
    lines.append(f"| {m} | {hp} | {100 * r['mean']:.1f} ± "
                 f"{100 * r['std']:.1f} | {r['gain_kept']:.2f} |")
  lines += ["", "Validation accuracy (noisy labels) of every candidate:", ""]
  for m, rows in acc["tuning"].items():
    cells = "; ".join(
        f"{', '.join(f'{k}={v}' for k, v in r['hp'].items()) or '-'}: "
        f"{100 * r['val_acc']:.1f}" for r in rows)
    lines.append(f"- {m}: {cells}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="MLP only, fewer rounds, 20 epochs (else 40), "
                      "small grids, 1 tuning seed (else 2)")
  parser.add_argument("--write", action="store_true",
                      help="also write benchmarks/results/esam_saf.{json,md}")
  parser.add_argument("--skip-accuracy", action="store_true")
  args = parser.parse_args(argv)
  argv_used = list(sys.argv[1:] if argv is None else argv)
  quick = args.quick

  def log(msg):
    print(msg, flush=True)

  start = time.perf_counter()
  machine = (f"{_common.cpu_model()} ({os.cpu_count()} cores), "
             f"{jax.devices()[0].platform}")
  rounds, calls = (10, 3) if quick else (20, 5)
  log(f"1. step time and flops ({rounds} rounds x {calls} calls)")
  speed = time_steps(speed_models(quick), rounds, calls, log)
  log("2. SWP probe")
  swp = swp_probe(rounds, calls, log)
  epochs = 20 if quick else 40
  tune_seeds = [0] if quick else [0, 1]
  test_seeds = [0, 1, 2]
  accuracy = None
  if not args.skip_accuracy:
    log(f"3. digits, {int(100 * NOISE)}% label noise, {epochs} epochs")
    accuracy = accuracy_study(epochs, tune_seeds, test_seeds, quick, log)
  res = {"machine": machine, "command": "python benchmarks/esam_saf.py "
         + " ".join(argv_used), "seconds": time.perf_counter() - start,
         "speed": speed, "swp": swp, "accuracy": accuracy, "epochs": epochs,
         "tune_seeds": tune_seeds, "test_seeds": test_seeds}
  stems = [os.path.join(LOCAL, "esam_saf" + ("_quick" if quick else ""))]
  if args.write:
    stems.append(os.path.join(RESULTS, "esam_saf"))
  for stem in stems:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
      json.dump(res, f, indent=1)
    if accuracy is not None:
      with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    log(f"wrote {stem}.json" + (" and .md" if accuracy is not None else ""))


if __name__ == "__main__":
  main()
