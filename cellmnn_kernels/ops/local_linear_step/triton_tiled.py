"""Tiled kernels of ``local_linear_step``: float64, and float32 with 16 < D <= 64 (smaller
float32 D take the register and lane-group kernels, ``triton_reg`` and ``triton_group``).

One program owns a block of BB cells and a block of BT of their target times.  Per direction of
time it marches the cells' anchors (``common.py``); at each anchor it forms the Krylov vectors
K_j = Z^j y / j! of Z = h A once per cell (M+1 matrix-vector products in registers) and adds them
into X and V of the pairs sitting at that anchor with scalar weights (O(M D) per pair).  Nothing of
size (B, T, D, D) is ever written; the number of anchors is decided inside the kernel from
||A[b]||_1 and dt, so a call is one launch (forward) or one launch plus a sum over time blocks
(backward) whatever the norms, with no host synchronisation.

Backward (per cell, reverse sweep over anchors): with upstream gX and gV/h of the pairs,
    Kbar_j = sum_pairs (rho^j gX + j rho^(j-1) gV/h) + [j<=M] sign^j ybar_{a+1} + Z^T Kbar_{j+1} / (j+1)
    dZ    += Kbar_j K_{j-1}^T / j,        ybar_a = Kbar_0,        dx0 = ybar_0 (both directions)
    dA = h dZ,   ddt = (1/h) d/drho of the pair's polynomials, dotted with gX and gV/h.
The anchor states are needed in reverse order: the kernel keeps CAP checkpoints in registers
(every c-th anchor, c = ceil(levels / CAP)) and recomputes at most c - 1 steps from the nearest
checkpoint, so the sweep costs O(levels * (1 + (c - 1) / 2)) anchor steps.  Each program
writes its cells' dA and dx0 summed over its own time block: the backward leaves one partial sum
per time block (``VARIANT.backward_parts``), which the caller adds up.

``VARIANT`` is this family as the dispatch (``triton_impl``) and the compile tools see it.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, next_power_of_2, tl, triton
from ..variant import KernelVariant, launch_kwargs
from .common import MAX_TRITON_D, launch_scalars, taylor_params

CAP = 16  # anchor checkpoints held in registers by the backward kernel
MIN_FP32_D = 17  # float32 below takes the register and lane-group kernels


def config(kind: str, D: int, dtype: torch.dtype, T: int) -> dict:
    """Compile-time configuration of the forward (kind "fwd") or backward ("bwd") kernel.

    Blocks are sized so that per-pair tensors (BB, BT, DP) hold about 1024 and the cells'
    operators (BB, DP, DP) at most 2048 32-bit registers' worth per program (half for float64);
    the backward takes half as many cells per program.
    """
    _, m = taylor_params(dtype)
    DP = max(2, next_power_of_2(D))
    BT = 4 if T <= 4 else 16
    scale = 2 if dtype == torch.float64 else 1
    BB = max(1, min(1024 // (BT * DP * scale), 2048 // (DP * DP * scale), 64))
    cfg = dict(DP=DP, BT=BT, BB=BB, M=m, num_warps=4 if DP <= 16 else 8)
    if kind == "bwd":
        cfg.update(BB=max(1, BB // 2), MP=next_power_of_2(m + 2), CAP=CAP)
    return cfg


if HAS_TRITON:

    @triton.jit
    def _load_block(A_ptr, x0_ptr, dt_ptr, B, T, D, n_tblocks, sAb, sAi, sAj, sxb, sxd, stb, stt,
                    theta, nu_max, DP: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr):
        """Inputs of one program and its anchor layout.

        Returns the scaled operators Z = h A with h = theta / ||A||_1 (where A = 0, h = max |dt|
        so that gradients at A = 0 stay exact), 1/h, and per pair its level and normalised signed
        remainder rho = (dt - anchor time) / h, |rho| <= 1.
        """
        pid = tl.program_id(0).to(tl.int64)
        cell = (pid // n_tblocks) * BB + tl.arange(0, BB)
        t = (pid % n_tblocks) * BT + tl.arange(0, BT)
        d = tl.arange(0, DP)
        cm = cell < B
        dm = d < D
        pm = cm[:, None] & (t < T)[None, :]
        A = tl.load(A_ptr + cell[:, None, None] * sAb + d[None, :, None] * sAi + d[None, None, :] * sAj,
                    mask=cm[:, None, None] & dm[None, :, None] & dm[None, None, :], other=0.0)
        x0 = tl.load(x0_ptr + cell[:, None] * sxb + d[None, :] * sxd, mask=cm[:, None] & dm[None, :], other=0.0)
        tau = tl.load(dt_ptr + cell[:, None] * stb + t[None, :] * stt, mask=pm, other=0.0)
        nrm = tl.max(tl.sum(tl.abs(A), axis=1), axis=1)  # ||A||_1, (BB,)
        nu = tl.abs(tau) * nrm[:, None]
        ok = pm & (nu <= nu_max)  # false for NaN/Inf and out-of-range pairs
        lev = tl.floor(tl.where(ok, nu / theta, 0.0))
        live = nrm > 0
        reach = tl.max(tl.where(ok, tl.abs(tau), 0.0), axis=1)
        h_dead = tl.where(reach > 0, reach, 1.0)
        # Subnormal norms are raised to the smallest normal number, so that theta / n cannot
        # overflow; h and 1/h stay exact partners (Z = h A and rho = dt / h).
        if A.dtype == tl.float64:
            n_safe = tl.maximum(nrm, 2.2250738585072014e-308)
        else:
            n_safe = tl.maximum(nrm, 1.1754943508222875e-38)
        h = tl.where(live, theta / n_safe, h_dead)
        inv_h = tl.where(live, n_safe / theta, 1.0 / h_dead)
        rho = tau * inv_h[:, None] - tl.where(tau < 0, -lev, lev)
        Z = A * h[:, None, None]
        return cell, t, d, cm, dm, pm, Z, x0, tau, ok, lev.to(tl.int32), rho, h, inv_h

    @triton.jit
    def _direction(tau, ok, lev, s):
        """Pairs of direction s (0: dt >= 0, 1: dt < 0) and the anchor levels each cell needs."""
        in_dir = ok & ((tau < 0).to(tl.int32) == s)
        n_cell = tl.max(tl.where(in_dir, lev + 1, 0), axis=1)
        return in_dir, n_cell

    @triton.jit
    def _anchor_step(Z, y, sgn, a, n_cell, M: tl.constexpr):
        """y_{a+1} = sum_{j<=M} (sgn Z)^j y_a / j!, the forward march's arithmetic exactly.

        Cells whose pairs need no anchor beyond a keep y (no pointless growth or overflow).
        """
        K = y
        y_next = y
        sj = sgn
        for j in range(1, M + 1):
            K = tl.sum(Z * K[:, None, :], axis=2) / j
            y_next = y_next + sj * K
            sj = sj * sgn
        return tl.where((a + 1 < n_cell)[:, None], y_next, y)

    @triton.jit
    def _llstep_fwd_tiled_kernel(A_ptr, x0_ptr, dt_ptr, X_ptr, V_ptr, B, T, D, n_tblocks,
                                 sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                                 DP: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr, M: tl.constexpr):
        """X, V (B, T, D) contiguous from A (B, D, D), x0 (B, D), dt (B, T), any strides; one
        program per block of BB cells and block of BT target times (n_tblocks per cell)."""
        cell, t, d, cm, dm, pm, Z, x0, tau, ok, lev, rho, h, inv_h = _load_block(
            A_ptr, x0_ptr, dt_ptr, B, T, D, n_tblocks, sAb, sAi, sAj, sxb, sxd, stb, stt,
            theta, nu_max, DP, BB, BT)
        # K_j = Z^j y / j! at each anchor; X = sum_{j<=M} rho^j K_j; V = A X = (1/h) sum_j j rho^(j-1) K_j.
        X = tl.zeros((BB, BT, DP), dtype=Z.dtype)
        Vh = tl.zeros((BB, BT, DP), dtype=Z.dtype)  # h V
        for s in range(0, 2):
            in_dir, n_cell = _direction(tau, ok, lev, s)
            sgn = 1.0 - 2.0 * s
            y = x0
            for a in range(0, tl.max(n_cell)):
                at = (in_dir & (lev == a))[:, :, None]
                K = y
                X = tl.where(at, X + K[:, None, :], X)
                pw = tl.full((BB, BT), 1.0, Z.dtype)  # rho^(j-1) at the top of iteration j
                y_next = y
                sj = sgn
                for j in range(1, M + 1):
                    K = tl.sum(Z * K[:, None, :], axis=2) / j
                    Vh = tl.where(at, Vh + (j * pw)[:, :, None] * K[:, None, :], Vh)
                    pw = pw * rho
                    X = tl.where(at, X + pw[:, :, None] * K[:, None, :], X)
                    y_next = y_next + sj * K
                    sj = sj * sgn
                K = tl.sum(Z * K[:, None, :], axis=2) / (M + 1)  # K_{M+1}: V only
                Vh = tl.where(at, Vh + ((M + 1) * pw)[:, :, None] * K[:, None, :], Vh)
                y = tl.where((a + 1 < n_cell)[:, None], y_next, y)
        bad = (pm & ~ok)[:, :, None]
        X = tl.where(bad, float("nan"), X)
        V = tl.where(bad, float("nan"), Vh * inv_h[:, None, None])
        off = (cell[:, None, None] * T + t[None, :, None]) * D + d[None, None, :]
        om = pm[:, :, None] & dm[None, None, :]
        tl.store(X_ptr + off, X, mask=om)
        tl.store(V_ptr + off, V, mask=om)

    @triton.jit
    def _llstep_bwd_tiled_kernel(A_ptr, x0_ptr, dt_ptr, gX_ptr, gV_ptr, dA_ptr, dx0_ptr, ddt_ptr,
                                 B, T, D, n_tblocks, sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                                 DP: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr, M: tl.constexpr,
                                 MP: tl.constexpr, CAP: tl.constexpr):
        """dA (n_tblocks, B, D, D) and dx0 (n_tblocks, B, D), one partial sum per time block, and
        ddt (B, T) from the upstream gX, gV (B, T, D) contiguous; MP: a power of two >= M + 2."""
        cell, t, d, cm, dm, pm, Z, x0, tau, ok, lev, rho, h, inv_h = _load_block(
            A_ptr, x0_ptr, dt_ptr, B, T, D, n_tblocks, sAb, sAi, sAj, sxb, sxd, stb, stt,
            theta, nu_max, DP, BB, BT)
        off = (cell[:, None, None] * T + t[None, :, None]) * D + d[None, None, :]
        om = pm[:, :, None] & dm[None, None, :]
        gX = tl.load(gX_ptr + off, mask=om, other=0.0)
        gVh = tl.load(gV_ptr + off, mask=om, other=0.0) * inv_h[:, None, None]  # upstream of h V
        slot = tl.arange(0, MP)[None, :, None]
        ring_slot = tl.arange(0, CAP)[None, :, None]
        dZ = tl.zeros((BB, DP, DP), dtype=Z.dtype)
        dx0 = tl.zeros((BB, DP), dtype=Z.dtype)
        drho = tl.zeros((BB, BT), dtype=Z.dtype)
        for s in range(0, 2):
            in_dir, n_cell = _direction(tau, ok, lev, s)
            sgn = 1.0 - 2.0 * s
            n_lev = tl.max(n_cell)
            c = (n_lev + CAP - 1) // CAP  # checkpoint stride
            ring = tl.zeros((BB, CAP, DP), dtype=Z.dtype)
            y = x0
            for a in range(0, n_lev):
                keep = (ring_slot == a // c) & (a % c == 0)
                ring = tl.where(keep, y[:, None, :], ring)
                y = _anchor_step(Z, y, sgn, a, n_cell, M)
            ybar = tl.zeros((BB, DP), dtype=Z.dtype)  # adjoint of the next anchor state
            for ia in range(0, n_lev):
                a = n_lev - 1 - ia
                seg = a // c
                y = tl.sum(tl.where(ring_slot == seg, ring, 0.0), axis=1)
                for i in range(0, a - seg * c):
                    y = _anchor_step(Z, y, sgn, seg * c + i, n_cell, M)
                at2 = in_dir & (lev == a)
                at = at2[:, :, None]
                gXa = tl.where(at, gX, 0.0)
                gVa = tl.where(at, gVh, 0.0)
                # Ascending j: Krylov vectors K_j, direct adjoints chat_j, d rho.
                K = y
                Ks = tl.where(slot == 0, K[:, None, :], 0.0)
                Cs = tl.where(slot == 0, tl.sum(gXa, axis=1)[:, None, :], 0.0)
                pw = tl.full((BB, BT), 1.0, Z.dtype)  # rho^(j-1) at the top of iteration j
                pwm1 = tl.zeros((BB, BT), dtype=Z.dtype)  # rho^(j-2) at the top of iteration j
                for j in range(1, M + 1):
                    K = tl.sum(Z * K[:, None, :], axis=2) / j
                    Ks = tl.where(slot == j, K[:, None, :], Ks)
                    dr = (j * (j - 1)) * pwm1 * tl.sum(gVa * K[:, None, :], axis=2) \
                        + j * pw * tl.sum(gXa * K[:, None, :], axis=2)
                    drho = tl.where(at2, drho + dr, drho)
                    cvec = (j * pw)[:, :, None] * gVa + (pw * rho)[:, :, None] * gXa
                    Cs = tl.where(slot == j, tl.sum(cvec, axis=1)[:, None, :], Cs)
                    pwm1 = pw
                    pw = pw * rho
                K = tl.sum(Z * K[:, None, :], axis=2) / (M + 1)  # K_{M+1} enters V only
                Ks = tl.where(slot == M + 1, K[:, None, :], Ks)
                dr = ((M + 1) * M) * pwm1 * tl.sum(gVa * K[:, None, :], axis=2)
                drho = tl.where(at2, drho + dr, drho)
                cvec = ((M + 1) * pw)[:, :, None] * gVa
                Cs = tl.where(slot == M + 1, tl.sum(cvec, axis=1)[:, None, :], Cs)
                # Descending j: Kbar_j = chat_j + [j<=M] sgn^j ybar + Z^T Kbar_{j+1} / (j+1);
                # dZ += Kbar_j K_{j-1}^T / j.
                carry = tl.zeros((BB, DP), dtype=Z.dtype)
                for jj in range(0, M + 1):
                    j = M + 1 - jj
                    kbar = tl.sum(tl.where(slot == j, Cs, 0.0), axis=1) + carry
                    if jj > 0:  # j <= M: the next anchor uses K_j with coefficient sgn^j
                        kbar += (1.0 - 2.0 * ((s * j) % 2)) * ybar
                    kprev = tl.sum(tl.where(slot == j - 1, Ks, 0.0), axis=1)
                    dZ += kbar[:, :, None] * kprev[:, None, :] / j
                    carry = tl.sum(Z * kbar[:, :, None], axis=1) / j
                ybar = tl.sum(tl.where(slot == 0, Cs, 0.0), axis=1) + carry + ybar
            dx0 += ybar
        dA = dZ * h[:, None, None]
        dtau = drho * inv_h[:, None]
        # A pair with NaN/Inf or out-of-range inputs poisons its cell's gradients, as it would
        # poison a dense computation; it is never silently dropped.
        bad = pm & ~ok
        cell_bad = tl.max(bad.to(tl.int32), axis=1) > 0
        dA = tl.where(cell_bad[:, None, None], float("nan"), dA)
        dx0 = tl.where(cell_bad[:, None], float("nan"), dx0)
        dtau = tl.where(bad, float("nan"), dtau)
        pid_t = tl.program_id(0).to(tl.int64) % n_tblocks
        cmd = cm[:, None] & dm[None, :]
        tl.store(dA_ptr + ((pid_t * B + cell[:, None, None]) * D + d[None, :, None]) * D + d[None, None, :],
                 dA, mask=cmd[:, :, None] & dm[None, None, :])
        tl.store(dx0_ptr + (pid_t * B + cell[:, None]) * D + d[None, :], dx0, mask=cmd)
        tl.store(ddt_ptr + cell[:, None] * T + t[None, :], dtau, mask=pm)


def _n_tblocks(D: int, T: int, dtype: torch.dtype) -> int:
    """Time blocks per cell: the backward's partial sums of dA and dx0."""
    return triton.cdiv(T, config("fwd", D, dtype, T)["BT"])


def forward_launch(A, x0, dt, X, V):
    """(kernel, grid, keyword arguments) of the forward launch: X, V (B, T, D) contiguous from
    A, x0, dt (validated, any strides)."""
    (B, D), T = x0.shape, dt.shape[1]
    cfg = config("fwd", D, A.dtype, T)
    n_tblocks = triton.cdiv(T, cfg["BT"])
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, X_ptr=X, V_ptr=V, D=D, n_tblocks=n_tblocks,
              **launch_scalars(A, x0, dt), **launch_kwargs(_llstep_fwd_tiled_kernel, cfg))
    return _llstep_fwd_tiled_kernel, (triton.cdiv(B, cfg["BB"]) * n_tblocks,), kw


def backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, S=None, LS=None):
    """(kernel, grid, keyword arguments) of the backward launch: dA (P, B, D, D) and dx0 (P, B, D),
    P = ``VARIANT.parts(D, T, dtype)`` partial sums, and ddt (B, T) from the upstream gX, gV
    (B, T, D) contiguous.  No scratch: S and LS are not used."""
    (B, D), T = x0.shape, dt.shape[1]
    cfg = config("bwd", D, A.dtype, T)
    n_tblocks = triton.cdiv(T, cfg["BT"])
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, gX_ptr=gX, gV_ptr=gV, dA_ptr=dA, dx0_ptr=dx0, ddt_ptr=ddt, D=D,
              n_tblocks=n_tblocks, **launch_scalars(A, x0, dt), **launch_kwargs(_llstep_bwd_tiled_kernel, cfg))
    return _llstep_bwd_tiled_kernel, (triton.cdiv(B, cfg["BB"]) * n_tblocks,), kw


if HAS_TRITON:
    VARIANT = KernelVariant(
        name="llstep_tiled",
        dims={torch.float32: range(MIN_FP32_D, MAX_TRITON_D + 1), torch.float64: range(1, MAX_TRITON_D + 1)},
        kernels={"fwd": _llstep_fwd_tiled_kernel, "bwd": _llstep_bwd_tiled_kernel}, config=config,
        representative=(("fwd", 32, torch.float32), ("bwd", 32, torch.float32),
                        ("fwd", 5, torch.float64), ("bwd", 5, torch.float64)),
        forward_launch=forward_launch, backward_launch=backward_launch, backward_parts=_n_tblocks,
        times=(4, 16))
