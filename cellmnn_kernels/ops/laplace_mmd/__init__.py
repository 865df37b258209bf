"""``laplace_mmd``: biased MMD^2 under the Laplace (L1 / D) kernel, and its grouped form.

    k(u, v) = exp(-max(||u - v||_1 / D, 1e-8) / sigma)
    MMD^2(X, Y) = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y)      (weighted means, diagonal included)
"""
from __future__ import annotations

import torch

from ..utils import resolve_backend as _resolve
from .common import (check_offsets, check_points, check_sigma, check_term_weights, check_terms, check_values,
                     check_weights, check_x_rows, check_y_self, grouped_mmd, host_ints)
from .naive import laplace_mmd_grouped_reference, laplace_mmd_reference
from .torch_impl import DENSE_MAX_ELEMS, reduce_rows_torch

__all__ = ["laplace_mmd", "laplace_mmd_grouped", "laplace_mmd_reference", "laplace_mmd_grouped_reference"]


def resolve_backend(backend: str, device: torch.device, D: int) -> str:
    """The backend a call on points of dimension D on ``device`` runs (``ops.utils.resolve_backend``)."""
    from .triton_impl import MAX_D

    return _resolve(backend, device, D, MAX_D, "x")


def _reducer(backend):
    if backend == "torch":
        return reduce_rows_torch
    from .triton_impl import reduce_rows_triton

    return reduce_rows_triton


def laplace_mmd_grouped(x, x_offsets, y, y_offsets, terms_x, terms_y, term_weights=None, sigma=1.0,
                        x_weights=None, y_weights=None, backend="auto", check_finite=None, y_self=None, x_rows=None,
                        group=None):
    """Every MMD^2 term of a training step in one call.

    Args:
        x: (Nx, D) packed prediction points; ``x_offsets`` (Px + 1 host integers, like
            cu_seqlens) cut it into segments: segment s is x[x_offsets[s]:x_offsets[s + 1]].
        y, y_offsets: the same for the target points.
        terms_x, terms_y: (n_terms,) host integers: term t compares x segment terms_x[t]
            with y segment terms_y[t].
        term_weights: (n_terms,) weights of the sum (tensor or sequence); default all 1.
        sigma: kernel bandwidth (> 0).
        x_weights, y_weights: optional non-negative per-point weights (weighted means within
            each segment); differentiable.
        backend: "auto" (triton for CUDA tensors, torch otherwise), "triton", "torch", "reference".
        check_finite: reject NaN/Inf, negative weights and zero-weight segments (one host
            synchronisation); default: on for CPU tensors, off for CUDA tensors.
        y_self: optional (Py,) tensor (y's dtype): for every y segment, the weighted mean kernel
            value mean k(Y, Y), used in each term instead of being computed (the largest block of a
            training step whose observed cells are drawn afresh each step: pass its expectation
            over the draw).  No gradient flows through it, so y and y_weights must not require
            gradients; the gradients in x and x_weights are unchanged.
        x_rows, group: the data-parallel form of a training step.  ``x_rows`` gives, per x
            segment, the (start, end) rows whose sums this call computes (its queries; keys are
            the whole segment): the values are then the contributions of those rows, and the
            gradient in x is the full gradient on those rows and zero elsewhere.  ``group`` (a
            ``torch.distributed`` process group) adds the sums up over its processes, so that when
            their x_rows split every segment, each gets the full values, and the sum of their
            gradients is the full gradient.  Needs y_self, y without gradient, and the torch or
            triton backend.

    Returns:
        (total, per_term): sum_t term_weights[t] * MMD^2_t (scalar) and the (n_terms,) values, in the
        dtype of x; differentiable in x, y and the point weights.  The triton backend runs a fixed
        number of launches (at most four) whatever the number of terms, with no host
        synchronisation.
    """
    check_points(x, y)
    sigma = check_sigma(sigma)
    x_off = check_offsets("x_offsets", x_offsets, x.shape[0])
    y_off = check_offsets("y_offsets", y_offsets, y.shape[0])
    tx, ty = host_ints("terms_x", terms_x), host_ints("terms_y", terms_y)
    if len(tx) != len(ty) or not tx:
        raise ValueError(f"terms_x and terms_y must have the same non-zero length; got {len(tx)} and {len(ty)}")
    check_terms("terms_x", tx, x_off)
    check_terms("terms_y", ty, y_off)
    term_weights = check_term_weights(term_weights, len(tx), x.device)
    x_weights = check_weights("x_weights", x_weights, x.shape[0], x)
    y_weights = check_weights("y_weights", y_weights, y.shape[0], y)
    y_self = check_y_self(y_self, len(y_off) - 1, y, y_weights)
    x_rows = check_x_rows(x_rows, x_off, x_weights, y_self, group)
    if x.device.type == "meta":  # shape inference: no values to compute or check
        tie = (x.sum() + y.sum()) * 0
        return tie, tie.expand(len(tx)).clone()
    backend = resolve_backend(backend, x.device, x.shape[1])
    if check_finite is None:
        check_finite = x.device.type != "cuda"
    if check_finite:
        check_values(x, y, x_weights, y_weights, ((x_off, sorted(set(tx))), (y_off, sorted(set(ty)))), term_weights,
                     y_self)
    if backend == "reference":
        if x_rows is not None:
            raise ValueError("x_rows needs the torch or triton backend (the reference computes whole segments)")
        return laplace_mmd_grouped_reference(x, x_off, y, y_off, tx, ty, term_weights, sigma, x_weights, y_weights,
                                             y_self)
    return grouped_mmd(x, x_off, y, y_off, tx, ty, term_weights, sigma, x_weights, y_weights, _reducer(backend),
                       y_self, x_rows, group)


def laplace_mmd(x, y, sigma=1.0, x_weights=None, y_weights=None, backend="auto", check_finite=None):
    """Biased MMD^2 between x (N, D) and y (M, D) under the Laplace kernel on L1 / D.

    Optional non-negative per-point weights give weighted means.  Returns a scalar tensor in the
    dtype of x (float32 or float64), differentiable in x, y and the weights.  Backends and
    ``check_finite`` as in ``laplace_mmd_grouped``; "torch" and "triton" never form the N x M
    kernel matrix (memory O(N + M)); "auto" evaluates the dense form instead where it would pick
    "torch" and the input is small (max(N, M)^2 <= 2^18, where the dense form is faster).  A named
    backend always runs.
    """
    check_points(x, y)
    n = max(x.shape[0], y.shape[0])
    if backend == "auto" and n * n <= DENSE_MAX_ELEMS and resolve_backend(backend, x.device, x.shape[1]) == "torch":
        # Small enough that the dense form is cheaper (fewer operations, a few MB at most).
        backend = "reference"
    total, _ = laplace_mmd_grouped(x, [0, x.shape[0]], y, [0, y.shape[0]], [0], [0], None, sigma,
                                   x_weights, y_weights, backend, check_finite)
    return total
