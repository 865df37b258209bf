from .local_linear_step import local_linear_step

__all__ = ["local_linear_step"]
