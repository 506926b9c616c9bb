"""The machinery every method stands on (never imports a method).

* ``skeleton``: the shared transformation (checks, ``init``, ρ at the step,
  ``grad_fn`` unpacking, the base update, the logged scalars);
* ``gradient``: ∇L(w + ε) through ``grad_fn``, micro-batches, the axis;
* ``perturbation``: ε for SAM and ASAM; ``masks``: which leaves ε touches;
* ``tree``: tree maths in float32; ``validation``: argument checks;
* ``sharding``: collectives and axis checks; ``eval_params``: the clean
  params of methods that hold perturbed ones; ``trajectory``: the
  trajectory loss of SAF and MESA.
"""
