"""sam_optax: Sharpness-Aware Minimization as Optax gradient transformations.

>>> import optax, sam_optax
>>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
"""

from sam_optax import diagnostics
from sam_optax._ae_sam import AESAMState, ae_sam
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
from sam_optax._memory import CompileReport, compile_low_memory
from sam_optax._mesa import MESAState, mesa, teacher_params
from sam_optax._msam import MSAMState, msam
from sam_optax._perturbation import Perturbation, ascent_direction
from sam_optax._rst import RSTState, rst
from sam_optax._rwp import RWPState, rwp
from sam_optax._saf import SAFState, saf, saf_targets
from sam_optax._sam import sam
from sam_optax._sharding import mark_varying
from sam_optax._skeleton import SAMState
from sam_optax._trajectory import trajectory_loss, trajectory_weight

__version__ = "0.1.0"

__all__ = (
    "AESAMState",
    "CompileReport",
    "ESAMState",
    "FriendlySAMState",
    "LookSAMState",
    "MESAState",
    "MSAMState",
    "PathMask",
    "Perturbation",
    "RSTState",
    "RWPState",
    "SAFState",
    "SAMInfo",
    "SAMState",
    "ae_sam",
    "ascent_direction",
    "compile_low_memory",
    "diagnostics",
    "esam",
    "eval_params",
    "exclude_biases",
    "friendly_sam",
    "gsam",
    "gsam_rho_schedule",
    "looksam",
    "mark_varying",
    "mesa",
    "msam",
    "ndim_mask",
    "path_mask",
    "rst",
    "rwp",
    "saf",
    "saf_targets",
    "sam",
    "sam_gradient",
    "split_microbatches",
    "teacher_params",
    "trajectory_loss",
    "trajectory_weight",
)
