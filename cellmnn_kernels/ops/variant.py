"""The one interface every family of Triton kernels exposes: ``KernelVariant``.

A variant is a family of kernels of one op (for ``local_linear_step``: register, lane-group and
tiled; for ``laplace_mmd``: register and tiled row kernels).  It says which inputs it serves
(a range of D per dtype), the configuration its launcher chooses for an input, and how a launch
is made: ``forward_launch`` / ``backward_launch`` return (kernel, grid, keyword arguments), so
that a caller (the op's dispatch, a test, a benchmark) runs ``kernel[grid](**kwargs)``.

A configuration is a dict holding the kernel's compile-time parameters under the kernel's own
parameter names, plus ``num_warps``; ``launch_kwargs`` picks from it exactly the kernel's
``tl.constexpr`` parameters, and the ahead-of-time tools (``compile_check``, ``sass_cost``) use
the same function, so what they compile is what the launchers run.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch


def constexpr_names(kernel) -> list[str]:
    """The ``tl.constexpr`` parameters of a Triton kernel (compiled or interpreted), in order."""
    fn = getattr(kernel, "fn", kernel)
    return [p.name for p in inspect.signature(fn).parameters.values() if "constexpr" in str(p.annotation)]


def launch_kwargs(kernel, cfg: dict) -> dict:
    """The compile-time keyword arguments of a launch of ``kernel`` in configuration ``cfg``:
    its constexpr parameters, taken from ``cfg`` by name, ``num_warps``, and ``num_stages`` where
    the configuration sets one."""
    extra = {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}
    return {**{name: cfg[name] for name in constexpr_names(kernel)}, "num_warps": cfg["num_warps"], **extra}


@dataclass(frozen=True, eq=False)
class KernelVariant:
    """A family of Triton kernels of one op.

    Attributes:
        name: the family, e.g. "llstep_reg"; the ahead-of-time tools name kernels after it.
        dims: dtype -> the range of D whose inputs the op's dispatch sends to this family.
        kernels: kind -> the ``@triton.jit`` kernel; kinds "fwd" and "bwd" (local_linear_step),
            "rows" and "grad" (laplace_mmd's row reduction without and with the gradient).
        config: ``config(kind, D, dtype, T)`` -> the configuration the launcher chooses (T, the
            number of target times, matters to the tiled step kernels only).
        representative: (kind, D, dtype) of the configurations that stand for the family in
            the default compile test (``compile_check --representative``); (kind, D, dtype,
            arch) for an entry of one architecture only.
        forward_launch: (inputs, outputs) -> (kernel, grid, keyword arguments); the arguments
            are the op's (see its dispatch module).
        backward_launch: the same for the backward kernel, or None (the row reductions compute
            values and gradients in one launch).
        scratch: ``scratch(D, LS)`` -> (cells per program, scratch elements per program) of the
            backward for LS anchor slots, or None when the backward needs no scratch (and no LS).
        backward_parts: ``backward_parts(D, T, dtype)`` -> how many partial sums of dA and dx0
            the backward writes (the caller adds them up), or None for one.
        pointer_types: Triton types of pointer arguments that do not point to the op's dtype.
        times: values of T that together reach every configuration (``configs``).
        arch_dependent: ``config`` takes ``arch`` (the sm_<arch> the kernel runs on) and chooses by it.
    """

    name: str
    dims: dict
    kernels: dict
    config: Callable
    representative: tuple
    forward_launch: Callable
    backward_launch: Callable | None = None
    scratch: Callable | None = None
    backward_parts: Callable | None = None
    pointer_types: dict = field(default_factory=dict)
    times: tuple = (16,)
    arch_dependent: bool = False

    def serves(self, D: int, dtype: torch.dtype) -> bool:
        """Whether the op's dispatch sends inputs of dimension D and this dtype here."""
        return D in self.dims.get(dtype, ())

    def config_for(self, kind: str, D: int, dtype: torch.dtype, T: int = 16, arch: int | None = None) -> dict:
        """``config``, given sm_<arch> (default 90) where the family chooses by it."""
        if self.arch_dependent:
            return self.config(kind, D, dtype, T, arch=90 if arch is None else arch)
        return self.config(kind, D, dtype, T)

    def configs(self, kind: str, dtype: torch.dtype, arch: int | None = None) -> list[dict]:
        """Every distinct configuration of kernel ``kind`` the launcher can choose for ``dtype`` (on
        sm_<arch>, default 90, for an arch-dependent family)."""
        seen = {}
        for D in self.dims.get(dtype, ()):
            for T in self.times:
                cfg = self.config_for(kind, D, dtype, T, arch)
                seen.setdefault(tuple(launch_kwargs(self.kernels[kind], cfg).items()), cfg)
        return list(seen.values())

    def scratch_size(self, B: int, D: int, LS: int) -> int:
        """Elements of the backward's scratch for B cells and LS anchor slots (0 without one)."""
        if self.scratch is None:
            return 0
        cells, per_program = self.scratch(D, LS)
        return -(-B // cells) * per_program

    def parts(self, D: int, T: int, dtype: torch.dtype) -> int:
        """Partial sums of dA and dx0 the backward writes (``backward_parts``)."""
        return 1 if self.backward_parts is None else self.backward_parts(D, T, dtype)
