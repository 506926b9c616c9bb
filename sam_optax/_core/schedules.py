"""Radius schedules shared by every method: late-phase SAM."""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import optax

from sam_optax._core import validation as _validation


def late_phase(rho: optax.ScalarOrSchedule, start_step: int) -> optax.Schedule:
  r"""Late-phase SAM: ρ = 0 before ``start_step``, then ``rho``.

  .. math::

    \rho_t = \begin{cases} 0 & t < t_0 \\ \rho(t) & t \ge t_0 \end{cases}

  SAM only for the last part of training: Zhou et al. (2025) found SAM for
  the last 12.5% of epochs of a WRN-16-8 on CIFAR-10 nearly as good (test
  error, sharpness) as SAM throughout, at about 1.1x SGD's cost. It is a
  schedule rather than an argument of each method so that it composes like
  any other: ``optax.inject_hyperparams`` evaluates it, ``optax.MultiSteps``
  sees it on outer steps, a checkpoint of the state resumes it (the step
  count is in the state), and a warm-up or decay of ρ can be passed as
  ``rho``. A step whose ρ is exactly 0 is the base optimizer's step.

  Args:
    rho: the radius from ``start_step`` on: a number ≥ 0 or a schedule,
      evaluated at the absolute step ``t`` (not ``t - start_step``).
    start_step: the first step with ρ > 0, an int ≥ 0 (the number of
      base-optimizer steps, as every ρ schedule of this package: outer
      steps under ``optax.MultiSteps``). For the last fraction ``f`` of
      ``total`` steps use ``int(round((1 - f) * total))``.

  Returns:
    An Optax schedule for the ``rho`` argument of any method.

  References:
    Zhou, Wang, Li, Lin and Zhou, "Sharpness-Aware Minimization Efficiently
    Selects Flatter Minima Late in Training", ICLR 2025
    (https://arxiv.org/abs/2410.10373).

  Examples:
    >>> import optax, sam_optax
    >>> rho = sam_optax.late_phase(0.05, start_step=90)
    >>> [round(float(rho(t)), 4) for t in (0, 89, 90, 99)]
    [0.0, 0.0, 0.05, 0.05]
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=rho)
  """
  if isinstance(start_step, bool) or not isinstance(start_step,
                                                    numbers.Integral):
    raise TypeError(
        f"late_phase: start_step must be an int, got {start_step!r}.")
  if start_step < 0:
    raise ValueError(
        f"late_phase: start_step must be >= 0, got {start_step}.")
  _validation.check_non_negative("rho", rho, schedule=True)

  def schedule(count):
    value = rho(count) if callable(rho) else rho
    return jnp.where(count >= start_step,
                     jnp.asarray(value, jnp.float32), 0.0)

  return schedule
