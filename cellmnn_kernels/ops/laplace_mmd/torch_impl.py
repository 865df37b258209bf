"""Chunked pure-PyTorch row reduction for ``laplace_mmd`` (the CPU default).

Rows of a job are processed in chunks so that no more than ``CHUNK_ELEMS`` kernel values exist at
once: memory O((N + M) D + chunk), never the N x M matrix.
"""
from __future__ import annotations

import torch

from .common import CLAMP

CHUNK_ELEMS = 1 << 22  # kernel values per chunk (16 MB in float32)
# Below this many kernel values a single call is cheaper in the dense form (measured on CPU:
# dense wins below about 500 x 500 points, is even up to 2000 and loses above).
DENSE_MAX_ELEMS = 1 << 18


@torch.no_grad()
def reduce_rows_torch(Q, K, WK, jobs, out_starts, n_out, compute_g, sigma):
    """r (n_out,) and, if ``compute_g``, G (n_out, D) for every job (q0, q1, k0, k1); see common.py."""
    D = Q.shape[1]
    r = Q.new_empty(n_out)
    G = Q.new_empty(n_out, D) if compute_g else None
    scale, clamp_d = 1.0 / (sigma * D), CLAMP * D  # k = exp(-max(dist, 1e-8 D) / (sigma D))
    for (q0, q1, k0, k1), o in zip(jobs, out_starts):
        Kj, wk = K[k0:k1], WK[k0:k1]
        step = max(1, CHUNK_ELEMS // max(1, k1 - k0))
        for a in range(q0, q1, step):
            b = min(q1, a + step)
            Qc = Q[a:b]
            dist = torch.cdist(Qc, Kj, p=1)
            kv = torch.exp(dist.clamp_min(clamp_d).mul_(-scale))
            kv.mul_(wk)
            r[o + a - q0:o + b - q0] = kv.sum(1)
            if compute_g:
                kv.masked_fill_(dist <= clamp_d, 0.0)  # no gradient where the clamp is active
                del dist
                rows = G[o + a - q0:o + b - q0]
                for d in range(D):
                    s = torch.sub(Qc[:, d, None], Kj[None, :, d]).sign_().mul_(kv)
                    rows[:, d] = s.sum(1)
    return r, G
