"""sam_optax: Sharpness-Aware Minimization as Optax gradient transformations.

>>> import optax, sam_optax
>>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
"""

from sam_optax import diagnostics
from sam_optax._compilation.memory import CompileReport, compile_low_memory
from sam_optax._core.eval_params import eval_params
from sam_optax._core.gradient import SAMInfo, sam_gradient, split_microbatches
from sam_optax._core.masks import (
    PathMask,
    exclude_biases,
    ndim_mask,
    path_mask,
)
from sam_optax._core.perturbation import Perturbation, ascent_direction
from sam_optax._core.schedules import late_phase
from sam_optax._core.sharding import mark_varying
from sam_optax._core.skeleton import SAMState
from sam_optax._core.trajectory import trajectory_loss, trajectory_weight
from sam_optax._methods.ae_sam import AESAMState, ae_sam
from sam_optax._methods.esam import ESAMState, esam
from sam_optax._methods.friendly_sam import FriendlySAMState, friendly_sam
from sam_optax._methods.functional_sam import (
    functional_sam,
    functional_value_and_grad,
)
from sam_optax._methods.gsam import gsam, gsam_rho_schedule
from sam_optax._methods.looksam import LookSAMState, looksam
from sam_optax._methods.mesa import MESAState, mesa, teacher_params
from sam_optax._methods.msam import MSAMState, msam
from sam_optax._methods.preconditioned_sam import preconditioned_sam
from sam_optax._methods.rst import RSTState, rst
from sam_optax._methods.rwp import RWPState, hash_normal, rwp
from sam_optax._methods.saf import SAFState, saf, saf_targets
from sam_optax._methods.sam import sam

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
    "functional_sam",
    "functional_value_and_grad",
    "gsam",
    "gsam_rho_schedule",
    "hash_normal",
    "late_phase",
    "looksam",
    "mark_varying",
    "mesa",
    "msam",
    "ndim_mask",
    "path_mask",
    "preconditioned_sam",
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
