"""Sharpness diagnostics: top Hessian eigenvalue and loss landscapes.

>>> from sam_optax import diagnostics
>>> sorted(diagnostics.__all__)[:2]
['HessianEigenpair', 'Landscape1D']
"""

from sam_optax._diagnostics import (
    HessianEigenpair,
    Landscape1D,
    Landscape2D,
    filter_normalized_direction,
    hessian_vector_product,
    loss_landscape_1d,
    loss_landscape_2d,
    top_hessian_eigenvalue,
)

__all__ = (
    "HessianEigenpair",
    "Landscape1D",
    "Landscape2D",
    "filter_normalized_direction",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "top_hessian_eigenvalue",
)
