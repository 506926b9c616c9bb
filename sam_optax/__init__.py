"""sam_optax: Sharpness-Aware Minimization as Optax gradient transformations.

>>> import optax, sam_optax
>>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
"""

from sam_optax import diagnostics
from sam_optax._esam import ESAMState, esam
from sam_optax._eval_params import eval_params
from sam_optax._friendly_sam import FriendlySAMState, friendly_sam
from sam_optax._gradient import SAMInfo, sam_gradient, split_microbatches
from sam_optax._gsam import gsam, gsam_rho_schedule
from sam_optax._looksam import LookSAMState, looksam
from sam_optax._masks import (
    PathMask,
    exclude_biases,
    ndim_mask,
    path_mask,
)
from sam_optax._perturbation import Perturbation, ascent_direction
from sam_optax._saf import (
    MESAState,
    SAFState,
    mesa,
    saf,
    saf_targets,
    teacher_params,
    trajectory_loss,
    trajectory_weight,
)
from sam_optax._sam import sam
from sam_optax._sharding import mark_varying
from sam_optax._skeleton import SAMState

__version__ = "0.1.0"

__all__ = (
    "ESAMState",
    "FriendlySAMState",
    "MESAState",
    "LookSAMState",
    "PathMask",
    "Perturbation",
    "SAFState",
    "SAMInfo",
    "SAMState",
    "ascent_direction",
    "diagnostics",
    "esam",
    "eval_params",
    "exclude_biases",
    "friendly_sam",
    "gsam",
    "gsam_rho_schedule",
    "looksam",
    "mesa",
    "mark_varying",
    "ndim_mask",
    "path_mask",
    "saf",
    "saf_targets",
    "sam",
    "sam_gradient",
    "split_microbatches",
    "teacher_params",
    "trajectory_loss",
    "trajectory_weight",
)
