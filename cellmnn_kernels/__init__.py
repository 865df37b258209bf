"""Fast ops for Cell-MNN: Triton kernels with a pure-PyTorch fallback and a dense reference."""
from .modules import LocalLinearStep
from .ops.fused_mlp import fused_mlp
from .ops.laplace_mmd import laplace_mmd, laplace_mmd_grouped
from .ops.local_linear_sde import local_linear_sde_step, sde_covariance, sde_noise
from .ops.local_linear_step import local_linear_step
from .ops.piecewise_decode import piecewise_decode

__all__ = ["local_linear_step", "LocalLinearStep", "laplace_mmd", "laplace_mmd_grouped", "local_linear_sde_step",
           "sde_covariance", "sde_noise", "piecewise_decode", "fused_mlp"]
__version__ = "0.1.0"
