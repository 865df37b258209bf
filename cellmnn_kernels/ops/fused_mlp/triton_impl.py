"""Triton backend of ``fused_mlp``: every layer of E stacked LeakyReLU MLPs for a block of cells in
one program, forward and backward, float32.

Layout (after the fully fused MLP of tiny-cuda-nn, Mueller et al., "Real-time Neural Radiance
Caching for Path Tracing", ACM TOG 40(4), 2021): a program owns BM cells of one model and keeps
their activations on chip from the input to the output; nothing between layers goes to global
memory.  A hidden activation is up to four (BM, 32) tiles (the width in 32-column chunks, NC of
them: width 96 is three tiles, no padding), so a layer is NC x NC tile products
(BM, 32) @ (32, 32), each weight tile streamed from global memory (L2-resident: every program of
a model reads the same weights) and used once; only one weight tile is live at a time.

Products: three tensor-core products in tf32 per tile (the "3xTF32" split, Ootomo and Yokota,
"Recovering single precision accuracy from Tensor Cores while surpassing the FP32 theoretical
peak performance", IJHPCA 2022): a = a_hi + a_lo with a_hi the top 10 mantissa bits of a (what
tf32 keeps), likewise w, and a w ~ a_hi w_hi + a_hi w_lo + a_lo w_hi; the dropped a_lo w_lo is
below 2^-20 of |a w|, so the result keeps about fp32 accuracy (the default network emulated with
tf32 truncation: 3.7e-7 relative to float64; tests/test_fused_mlp.py holds the kernels to 5e-5 of
the result's scale).
The split is done in the kernel by masking the mantissa, not by Triton's
"tf32x3" mode, whose products need several times the registers (measured: one (32 x 128) @
(128 x 32) product alone takes 255 registers at 4 warps on sm_90).

Backward: per row block, the chain rule from the output layer down, each layer's input recomputed
from x; the block's weight gradient is added into the program's own partial sum (host-summed).
Registers, spills and the estimated time per cell: docs/cost-model.md.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, first_order_only, next_power_of_2, tl, triton
from ..variant import KernelVariant, launch_kwargs

MAX_WIDTH = 128  # hidden widths the kernels serve: up to four 32-column tiles
MAX_IN = 32  # inputs the kernels serve: one tile of 16 or 32 columns
TILE = 32
BACKWARD_PROGRAMS = 264  # backward programs over all models (two per SM of an H100), at least one per model


def config(kind: str, D: int, dtype: torch.dtype = torch.float32, T: int = 16, width: int = 96,
           n_in: int | None = None, arch: int = 90) -> dict:
    """Compile-time configuration for the network on (x, t) of a D-dimensional model (``n_in``
    inputs, default D + 1) with hidden ``width``, on sm_<arch>: KI = the inputs padded to 16 or 32
    (tl.dot's least K is 16), NC = the 32-column tiles of the width, BM cells a program, 8 warps,
    one pipeline stage (no prefetch buffers: they spill).  Chosen by the compiled code (registers
    and spills, sm_90 and sm_80, triton 3.8; ``tests/test_fused_mlp.py`` checks them):
    sm_90 forward 128 cells with every tile product unrolled (64 when the width needs four tiles
    or the inputs 32 columns, which spill at 128), backward 64 cells with the products in
    run-time loops; sm_80 (register-operand products) 32 cells, forward loops too."""
    n_in = D + 1 if n_in is None else n_in
    KI, NC = max(16, next_power_of_2(n_in)), -(-width // TILE)
    cfg = dict(KI=KI, NC=NC, num_warps=8, num_stages=1)
    if kind == "fwd":
        if arch >= 90:
            return dict(cfg, BM=128 if NC <= 3 and KI == 16 else 64, UNROLL=True)
        return dict(cfg, BM=32, UNROLL=False)
    return dict(cfg, BM=64 if arch >= 90 else 32, NEED_GX=True)


def device_arch(device: torch.device) -> int:
    """sm_<arch> of a CUDA device as an integer (90 for an H100); 90 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


if HAS_TRITON:
    SLOPE = tl.constexpr(0.01)

    @triton.jit
    def _hi(v):
        """v with its mantissa cut to tf32's 10 bits: v = _hi(v) + (v - _hi(v)) exactly."""
        return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _mma3(a, w, acc, UNROLL: tl.constexpr = False):
        """acc + a w in three tf32 tensor-core products: a_lo w_hi + a_hi w_lo + a_hi w_hi.  Unless
        UNROLL, a run-time loop, so that the machine code holds one product site (each site keeps its
        own shared-memory descriptors live: in the backward, unrolled sites spill)."""
        ah = _hi(a)
        wh = _hi(w)
        if UNROLL:
            acc = tl.dot(a - ah, wh, acc, input_precision="tf32")
            acc = tl.dot(ah, w - wh, acc, input_precision="tf32")
            acc = tl.dot(ah, wh, acc, input_precision="tf32")
        else:
            for k in range(3):
                p = ah
                q = wh
                if k == 0:
                    p = a - ah
                elif k == 1:
                    q = w - wh
                acc = tl.dot(p, q, acc, input_precision="tf32")
        return acc

    @triton.jit
    def _zero_tiles(BM: tl.constexpr, C: tl.constexpr):
        """Four (BM, C) zero tiles (an activation or delta before its tiles are written)."""
        z = tl.zeros((BM, C), dtype=tl.float32)
        return z, z, z, z

    @triton.jit
    def _pick(j, t0, t1, t2, t3, NT: tl.constexpr):
        """t_j for a run-time j < NT (NT <= 4 a compile-time bound, so that no unused tile is live)."""
        t = t0
        if NT > 1:
            if j == 1:
                t = t1
        if NT > 2:
            if j == 2:
                t = t2
        if NT > 3:
            if j == 3:
                t = t3
        return t

    @triton.jit
    def _put(j, z, z0, z1, z2, z3, NT: tl.constexpr):
        """(z0, z1, z2, z3) with z_j replaced by z, for a run-time j < NT (as ``_pick``)."""
        if j == 0:
            z0 = z
        if NT > 1:
            if j == 1:
                z1 = z
        if NT > 2:
            if j == 2:
                z2 = z
        if NT > 3:
            if j == 3:
                z3 = z
        return z0, z1, z2, z3

    @triton.jit
    def _wtile(wp, K, N, k0, n0, KT: tl.constexpr, NT: tl.constexpr, TRANS: tl.constexpr):
        """W[k0:k0+KT, n0:n0+NT] of W (K, N) row-major at wp, zero outside W; its transpose
        (NT, KT) if TRANS."""
        if TRANS:
            rk = k0 + tl.arange(0, KT)[None, :]
            rn = n0 + tl.arange(0, NT)[:, None]
        else:
            rk = k0 + tl.arange(0, KT)[:, None]
            rn = n0 + tl.arange(0, NT)[None, :]
        return tl.load(wp + rk * N + rn, mask=(rk < K) & (rn < N), other=0.0)

    @triton.jit
    def _col(h0, h1, h2, h3, wp, K, N, n0, NCI: tl.constexpr, LEAKY: tl.constexpr, UNROLL: tl.constexpr = False):
        """Columns n0..n0+31 of h W + b (LeakyReLU if LEAKY) for h = [h0 | h1 | ...] (its first NCI
        (BM, KT) tiles), W (K, N) at wp, b (N,) right after it."""
        BM: tl.constexpr = h0.shape[0]
        KT: tl.constexpr = h0.shape[1]
        rn = n0 + tl.arange(0, 32)
        acc = tl.zeros((BM, 32), dtype=tl.float32) + tl.load(wp + K * N + rn, mask=rn < N, other=0.0)[None, :]
        if UNROLL:
            for i in tl.static_range(NCI):
                acc = _mma3(_pick(i, h0, h1, h2, h3, NCI), _wtile(wp, K, N, i * KT, n0, KT, 32, False), acc, True)
        else:
            for i in range(NCI):
                acc = _mma3(_pick(i, h0, h1, h2, h3, NCI), _wtile(wp, K, N, i * KT, n0, KT, 32, False), acc)
        if LEAKY:
            acc = tl.where(acc > 0, acc, acc * SLOPE)
        return acc

    @triton.jit
    def _layer(h0, h1, h2, h3, wp, K, N, NCI: tl.constexpr, NCO: tl.constexpr, UNROLL: tl.constexpr = False):
        """LeakyReLU(h W + b) as NCO (BM, 32) tiles (unused ones zero) from the NCI tiles of h;
        W (K, N) at wp, b (N,) right after it."""
        z0, z1, z2, z3 = _zero_tiles(h0.shape[0], 32)
        for j in range(NCO):  # a run-time loop: one output tile's weights live at a time
            z0, z1, z2, z3 = _put(j, _col(h0, h1, h2, h3, wp, K, N, j * 32, NCI, True, UNROLL), z0, z1, z2, z3, NCO)
        return z0, z1, z2, z3

    @triton.jit
    def _hidden(x, wp, n_in, width, n_layers, NC: tl.constexpr, UNROLL: tl.constexpr = False):
        """The activation after the first layer and ``n_layers`` hidden-to-hidden layers, as tiles."""
        h0, h1, h2, h3 = _layer(x, x, x, x, wp, n_in, width, 1, NC, UNROLL)
        off = n_in * width + width
        for _ in range(n_layers):
            h0, h1, h2, h3 = _layer(h0, h1, h2, h3, wp + off, width, width, NC, NC, UNROLL)
            off += width * width + width
        return h0, h1, h2, h3

    @triton.jit
    def _fused_mlp_fwd_kernel(x_ptr, w_ptr, y_ptr, n, n_in, width, n_out, n_mid, P,
                              BM: tl.constexpr, KI: tl.constexpr, NC: tl.constexpr, UNROLL: tl.constexpr):
        """y[e] = MLP_e(x[e]) for the BM cells of program (block, e): x (E, n, n_in), y (E, n, n_out),
        weights (E, P) contiguous; n_mid hidden-to-hidden layers."""
        e = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rm = rows < n
        grow = e * n + rows
        ci = tl.arange(0, KI)
        x = tl.load(x_ptr + grow[:, None] * n_in + ci[None, :], mask=rm[:, None] & (ci[None, :] < n_in), other=0.0)
        wp = w_ptr + e * P
        h0, h1, h2, h3 = _hidden(x, wp, n_in, width, n_mid, NC, UNROLL)
        off = n_in * width + width + n_mid * (width * width + width)
        for c in range(0, n_out, 32):
            o = _col(h0, h1, h2, h3, wp + off, width, n_out, c, NC, False, UNROLL)
            rn = c + tl.arange(0, 32)
            tl.store(y_ptr + grow[:, None] * n_out + rn[None, :], o, mask=rm[:, None] & (rn[None, :] < n_out))

    @triton.jit
    def _grad_w_cols(gp, a0, a1, a2, a3, d, K, N, n0, NCI: tl.constexpr):
        """Columns n0..n0+31 of a layer's partial gradient at gp (W (K, N), b right after it):
        W += a^T d, b += the sum of d over the block, for the layer's input a (its first NCI
        (BM, KT) tiles) and the delta d (BM, 32) of those outputs."""
        KT: tl.constexpr = a0.shape[1]
        rn = n0 + tl.arange(0, 32)
        bp = gp + K * N + rn
        tl.store(bp, tl.load(bp, mask=rn < N, other=0.0) + tl.sum(d, axis=0), mask=rn < N)
        for i in range(NCI):
            rk = i * KT + tl.arange(0, KT)
            p = gp + rk[:, None] * N + rn[None, :]
            m = (rk[:, None] < K) & (rn[None, :] < N)
            tl.store(p, _mma3(tl.trans(_pick(i, a0, a1, a2, a3, NCI)), d, tl.load(p, mask=m, other=0.0)), mask=m)

    @triton.jit
    def _add_t(z0, z1, z2, z3, d, wp, K, N, n0, NCO: tl.constexpr):
        """z_i += d W[i KT:(i+1) KT, n0:n0+32]^T for the NCO (BM, KT) tiles z_i, d (BM, 32), W (K, N) at wp."""
        KT: tl.constexpr = z0.shape[1]
        for i in range(NCO):
            z = _mma3(d, _wtile(wp, K, N, i * KT, n0, KT, 32, True), _pick(i, z0, z1, z2, z3, NCO))
            z0, z1, z2, z3 = _put(i, z, z0, z1, z2, z3, NCO)
        return z0, z1, z2, z3

    @triton.jit
    def _leaky_grad(d0, d1, d2, d3, a0, a1, a2, a3):
        """d * LeakyReLU'(.) read from the activations a (a > 0 exactly where the pre-activation is)."""
        return (tl.where(a0 > 0, d0, d0 * SLOPE), tl.where(a1 > 0, d1, d1 * SLOPE),
                tl.where(a2 > 0, d2, d2 * SLOPE), tl.where(a3 > 0, d3, d3 * SLOPE))

    @triton.jit
    def _fused_mlp_bwd_kernel(x_ptr, w_ptr, gy_ptr, gw_ptr, gx_ptr, n, n_in, width, n_out, n_mid, P, n_prog,
                              BM: tl.constexpr, KI: tl.constexpr, NC: tl.constexpr, NEED_GX: tl.constexpr):
        """Gradients of sum(gy * y): partial dW of program (pid, e) added into gw (n_prog, E, P)
        (zeroed by the caller), dx (E, n, n_in) if NEED_GX.  The program walks row blocks pid,
        pid + n_prog, ...; for each it runs the chain rule from the output layer down, recomputing
        each layer's input from x (nothing is stored between layers)."""
        pid = tl.program_id(0)
        e = tl.program_id(1).to(tl.int64)
        wp = w_ptr + e * P
        gp = gw_ptr + (pid.to(tl.int64) * tl.num_programs(1) + e) * P
        ci = tl.arange(0, KI)
        for blk in range(pid, tl.cdiv(n, BM), n_prog):
            rows = blk * BM + tl.arange(0, BM)
            rm = rows < n
            grow = e * n + rows
            x = tl.load(x_ptr + grow[:, None] * n_in + ci[None, :], mask=rm[:, None] & (ci[None, :] < n_in),
                        other=0.0)
            d0, d1, d2, d3 = _zero_tiles(BM, 32)
            for i in range(n_mid + 1):  # layer k = n_mid + 1 - i (the output layer first), input a
                a0, a1, a2, a3 = _hidden(x, wp, n_in, width, n_mid - i, NC)
                off = n_in * width + width + (n_mid - i) * (width * width + width)
                z0, z1, z2, z3 = _zero_tiles(BM, 32)  # the delta of the layer's input, before LeakyReLU'
                if i == 0:  # the output layer: gy in 32-column chunks
                    for c in range(0, n_out, 32):
                        rn = c + tl.arange(0, 32)
                        gy = tl.load(gy_ptr + grow[:, None] * n_out + rn[None, :],
                                     mask=rm[:, None] & (rn[None, :] < n_out), other=0.0)
                        _grad_w_cols(gp + off, a0, a1, a2, a3, gy, width, n_out, c, NC)
                        z0, z1, z2, z3 = _add_t(z0, z1, z2, z3, gy, wp + off, width, n_out, c, NC)
                else:
                    for j in range(NC):
                        dj = _pick(j, d0, d1, d2, d3, NC)
                        _grad_w_cols(gp + off, a0, a1, a2, a3, dj, width, width, j * 32, NC)
                        z0, z1, z2, z3 = _add_t(z0, z1, z2, z3, dj, wp + off, width, width, j * 32, NC)
                d0, d1, d2, d3 = _leaky_grad(z0, z1, z2, z3, a0, a1, a2, a3)
            gz = tl.zeros((BM, KI), dtype=tl.float32)
            for j in range(NC):  # the first layer
                dj = _pick(j, d0, d1, d2, d3, NC)
                _grad_w_cols(gp, x, x, x, x, dj, n_in, width, j * 32, 1)
                if NEED_GX:
                    gz = _add_t(gz, gz, gz, gz, dj, wp, n_in, width, j * 32, 1)[0]
            if NEED_GX:
                tl.store(gx_ptr + grow[:, None] * n_in + ci[None, :], gz, mask=rm[:, None] & (ci[None, :] < n_in))



def sizes(shapes) -> tuple:
    """(n_in, width, n_out, n_mid) of a network's layer shapes (in, w), (w, w), ..., (w, out)."""
    n_in, width = shapes[0]
    mids = shapes[1:-1]
    if len(shapes) < 2 or any(tuple(s) != (width, width) for s in mids) or shapes[-1][0] != width:
        raise ValueError(f"fused_mlp's kernels need layers (in, w), (w, w), ..., (w, out); got {shapes}")
    return n_in, width, shapes[-1][1], len(mids)


def forward_launch(flat, x, y, shapes):
    """(kernel, grid, keyword arguments) of the forward: y (E, n, out) from flat (E, P) and
    x (E, n, in), all contiguous."""
    n_in, width, n_out, n_mid = sizes(shapes)
    E, n, _ = x.shape
    cfg = config("fwd", n_in - 1, width=width, n_in=n_in, arch=device_arch(x.device))
    kw = dict(x_ptr=x, w_ptr=flat, y_ptr=y, n=n, n_in=n_in, width=width, n_out=n_out, n_mid=n_mid,
              P=flat.shape[1], **launch_kwargs(_fused_mlp_fwd_kernel, cfg))
    return _fused_mlp_fwd_kernel, (triton.cdiv(n, cfg["BM"]), E), kw


def backward_programs(n: int, E: int, BM: int) -> int:
    """Backward programs per model: about ``BACKWARD_PROGRAMS`` over all models, no more than the
    model's row blocks (each program keeps one (P,) partial sum per model)."""
    return max(1, min(triton.cdiv(n, BM), BACKWARD_PROGRAMS // max(E, 1)))


def backward_config(x, shapes) -> dict:
    """The backward's configuration for x (E, n, in) on its device."""
    n_in, width, _, _ = sizes(shapes)
    return config("bwd", n_in - 1, width=width, n_in=n_in, arch=device_arch(x.device))


def backward_launch(flat, x, gy, gw, gx, shapes):
    """(kernel, grid, keyword arguments) of the backward: partial weight gradients added into gw
    (n_prog, E, P), zeroed; gx (E, n, in) or None; gy (E, n, out) contiguous."""
    n_in, width, n_out, n_mid = sizes(shapes)
    cfg = dict(backward_config(x, shapes), NEED_GX=gx is not None)
    kw = dict(x_ptr=x, w_ptr=flat, gy_ptr=gy, gw_ptr=gw, gx_ptr=gy if gx is None else gx, n=x.shape[1],
              n_in=n_in, width=width, n_out=n_out, n_mid=n_mid, P=flat.shape[1], n_prog=gw.shape[0],
              **launch_kwargs(_fused_mlp_bwd_kernel, cfg))
    return _fused_mlp_bwd_kernel, (gw.shape[0], x.shape[0]), kw


class FusedMlpFunction(torch.autograd.Function):
    """One launch forward; one launch backward and the sum of its per-program partials (no atomics:
    deterministic).  First derivatives only."""

    @staticmethod
    def forward(ctx, flat, x, shapes):
        """flat (E, P), x (E, n, in) float32 -> (E, n, out)."""
        flat, x = flat.contiguous(), x.contiguous()
        y = torch.empty(x.shape[:2] + (shapes[-1][1],), dtype=x.dtype, device=x.device)
        if x.numel():  # no models or no cells: nothing to launch
            kernel, grid, kw = forward_launch(flat, x, y, shapes)
            kernel[grid](**kw)
        ctx.shapes = shapes
        ctx.save_for_backward(flat, x)
        return y

    @staticmethod
    def backward(ctx, gy):
        """d flat, dx (None when x needs none)."""
        flat, x = ctx.saved_tensors
        E, n, _ = x.shape
        gx = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        if not n or not E:
            grads = (torch.zeros_like(flat), gx)
        else:
            n_prog = backward_programs(n, E, backward_config(x, ctx.shapes)["BM"])
            gw = torch.zeros((n_prog, E, flat.shape[1]), dtype=flat.dtype, device=flat.device)
            kernel, grid, kw = backward_launch(flat, x, gy.contiguous(), gw, gx, ctx.shapes)
            kernel[grid](**kw)
            grads = (gw.sum(0), gx)
        return first_order_only("fused_mlp's triton backend has first derivatives only (use backend='torch')",
                                grads, (flat, x)) + (None,)


if HAS_TRITON:
    VARIANT = KernelVariant(
        name="fused_mlp", dims={torch.float32: range(1, MAX_IN)},
        kernels={"fwd": _fused_mlp_fwd_kernel, "bwd": _fused_mlp_bwd_kernel}, config=config,
        representative=tuple((kind, 5, torch.float32) for kind in ("fwd", "bwd")),
        forward_launch=forward_launch, backward_launch=backward_launch, arch_dependent=True)
    VARIANTS = (VARIANT,)
else:
    VARIANTS = ()
