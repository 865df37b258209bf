"""Fast ops for Cell-MNN: Triton kernels with a pure-PyTorch fallback and a dense reference."""
from .ops.local_linear_step import local_linear_step

__all__ = ["local_linear_step"]
__version__ = "0.1.0"
