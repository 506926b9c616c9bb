"""Sharpness diagnostics: the Hessian spectrum and loss landscapes.

* :func:`top_hessian_eigenvalue` (power iteration),
  :func:`top_hessian_eigenvalues` (Lanczos) and
  :func:`hessian_spectral_density` (stochastic Lanczos quadrature), all on
  :func:`hessian_vector_product`;
* :func:`loss_landscape_1d` and :func:`loss_landscape_2d` along
  :func:`filter_normalized_direction`.

>>> from sam_optax import diagnostics
>>> sorted(diagnostics.__all__)[:2]
['HessianEigenpair', 'HessianSpectrum']
"""

from sam_optax.diagnostics._hessian import (
    HessianEigenpair,
    hessian_vector_product,
    top_hessian_eigenvalue,
)
from sam_optax.diagnostics._landscape import (
    Landscape1D,
    Landscape2D,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
)
from sam_optax.diagnostics._spectrum import (
    HessianSpectrum,
    SpectralDensity,
    hessian_spectral_density,
    top_hessian_eigenvalues,
)

__all__ = (
    "HessianEigenpair",
    "HessianSpectrum",
    "Landscape1D",
    "Landscape2D",
    "SpectralDensity",
    "filter_normalized_direction",
    "hessian_spectral_density",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "top_hessian_eigenvalue",
    "top_hessian_eigenvalues",
)
