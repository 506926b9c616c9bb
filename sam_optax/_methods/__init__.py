"""One file per method, each a rule on :mod:`sam_optax._core.skeleton`.

A method imports only from :mod:`sam_optax._core`; see
``docs/contributing.md`` for the steps to add one.
"""
