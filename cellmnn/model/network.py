"""The Cell-MNN model: an MLP predicts a local linear operator A(x, t) per cell, and the cell's
trajectory is decoded in closed form, x(t') = expm((t' - t) A) x, by ``local_linear_step``."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cellmnn_kernels import local_linear_step

PARAMETERIZATIONS = ("direct", "eigen")


class CellMNN(nn.Module):
    """A(x, t) from an MLP on (x, t), decoded with ``local_linear_step``.

    parameterization "direct": A = reshape(D^2 outputs).  "eigen" (the paper's): A = P diag(l) P^-1
    with P = I + reshape(D^2 outputs), real eigenvalues l from D - num_const_dims outputs and
    num_const_dims eigenvalues fixed at 0; ``operator(..., return_penalty=True)`` also returns the
    invertibility penalty mean 1 / (|det P| + 1e-4).  This one convention for P holds for decoding
    and for every read-out of A.  Times enter the MLP as (t - time_offset) / time_scale.

    ``time_unit`` makes the model independent of the unit of time: the MLP's outputs are the
    operator per ``time_unit`` (``fit`` uses the mean gap between timepoints), so that
    ``operator`` returns A = outputs / time_unit in the data's own units and the same network
    decodes the same trajectories whatever unit the times were given in.

    ``n_datasets`` > 0 (joint training with a dataset embedding): the MLP also reads the one-hot
    code of the cell's dataset, so the first layer's weights for it are a learned per-dataset
    embedding (``width`` numbers per dataset); ``dataset=`` then names the dataset (0-based, in
    the order of ``fit``'s list) wherever cells enter.
    """

    def __init__(self, dim: int, width: int = 96, depth: int = 4, init_scale: float = 0.01,
                 parameterization: str = "direct", num_const_dims: int = 0, backend: str = "auto",
                 time_offset: float = 0.0, time_scale: float = 1.0, time_unit: float = 1.0, n_datasets: int = 0):
        super().__init__()
        for name, v in (("dim", dim), ("width", width), ("depth", depth), ("n_datasets", n_datasets + 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a {'non-negative' if name == 'n_datasets' else 'positive'} "
                                 f"integer, got {v if name != 'n_datasets' else n_datasets!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if not 0 <= num_const_dims <= dim or (num_const_dims and parameterization != "eigen"):
            raise ValueError(f"num_const_dims must be in [0, dim] and needs parameterization='eigen'; "
                             f"got {num_const_dims} with {parameterization!r}")
        for name, v in (("time_scale", time_scale), ("time_unit", time_unit)):
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not (isinstance(time_offset, (int, float)) and np.isfinite(time_offset)):
            raise ValueError(f"time_offset must be a finite number, got {time_offset!r}")
        self.dim, self.width, self.depth = int(dim), int(width), int(depth)
        self.init_scale, self.parameterization = float(init_scale), parameterization
        self.num_const_dims, self.backend = int(num_const_dims), backend
        self.time_offset, self.time_scale, self.time_unit = float(time_offset), float(time_scale), float(time_unit)
        self.n_datasets = int(n_datasets)
        n_out = n_outputs(dim, parameterization, num_const_dims)
        layers, n_in = [], dim + 1 + self.n_datasets
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.LeakyReLU()]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # A ~ 0 at the start
            self.mlp[-1].weight.mul_(init_scale)

    def config(self) -> dict:
        """The constructor's arguments (what ``save_model`` records)."""
        return dict(dim=self.dim, width=self.width, depth=self.depth, init_scale=self.init_scale,
                    parameterization=self.parameterization, num_const_dims=self.num_const_dims,
                    backend=self.backend, time_offset=self.time_offset, time_scale=self.time_scale,
                    time_unit=self.time_unit, n_datasets=self.n_datasets)

    def _dataset_code(self, dataset, n: int, like: torch.Tensor) -> torch.Tensor:
        """The (n, n_datasets) one-hot input of ``dataset`` (an index, or one index per cell)."""
        if self.n_datasets == 0:
            if dataset is not None:
                raise ValueError("dataset= is only for models trained jointly with a dataset embedding")
            return like.new_zeros(n, 0)
        if dataset is None:
            raise ValueError(f"this model was trained on {self.n_datasets} datasets with a dataset embedding; "
                             f"pass dataset= (0..{self.n_datasets - 1}, in the order given to fit)")
        d = torch.as_tensor(dataset, device=like.device)
        if d.dtype.is_floating_point or d.dtype == torch.bool or d.dim() > 1 or \
                (d.dim() == 1 and d.shape[0] != n) or bool(((d < 0) | (d >= self.n_datasets)).any()):
            raise ValueError(f"dataset must be an index in 0..{self.n_datasets - 1} (or one per cell); "
                             f"got {dataset!r}")
        return torch.nn.functional.one_hot(d.expand(n).long(), self.n_datasets).to(like.dtype)

    def operator(self, x: torch.Tensor, t: torch.Tensor, return_penalty: bool = False, dataset=None):
        """A (B, D, D) for cells x (B, D) at times t (B,), per unit of the data's time; with the eigen
        penalty if asked.  ``dataset``: see the class docstring."""
        tin = ((t - self.time_offset) / self.time_scale).to(x.dtype)  # in t's dtype first (float64 keeps offsets)
        h = self.mlp(torch.cat([x, tin[:, None], self._dataset_code(dataset, x.shape[0], x)], dim=1))
        A, penalty = outputs_to_operator(h, self.dim, self.parameterization, self.num_const_dims, self.time_unit)
        penalty = penalty.mean() if penalty is not None else x.new_zeros(())
        return (A, penalty) if return_penalty else A

    def forward(self, x0: torch.Tensor, t0: torch.Tensor, t: torch.Tensor, return_penalty: bool = False,
                dataset=None):
        """Decode cells x0 (B, D) observed at t0 (B,) to times t (B, T): X, V (B, T, D).

        Times may be float64 while x0 is float32: offsets t - t0 are then taken in float64."""
        A, penalty = self.operator(x0, t0, return_penalty=True, dataset=dataset)
        X, V = local_linear_step(A, x0, (t - t0[:, None]).to(x0.dtype), backend=self.backend)
        return (X, V, penalty) if return_penalty else (X, V)

    @torch.no_grad()
    def predict(self, x0, t0, t, dataset=None):
        """Push cells x0 (n, D) observed at time(s) t0 to time(s) t.

        t0 is a number or (n,); t a number (returns (n, D)) or a sequence of T times (returns
        (n, T, D)); ``dataset`` (models with a dataset embedding only) the cells' dataset.  Accepts and
        returns numpy arrays, or tensors if x0 is a tensor.  Non-numeric,
        NaN/Inf or wrongly shaped inputs are a ValueError/TypeError naming the argument.
        """
        as_numpy = not isinstance(x0, torch.Tensor)
        p = next(self.parameters())
        if as_numpy:
            x0 = np.asarray(x0)
            if x0.dtype.kind not in "fiu":
                raise TypeError(f"x0 must be a numeric array of shape (n, {self.dim}); got dtype {x0.dtype}")
        x0 = torch.as_tensor(x0, dtype=p.dtype, device=p.device)
        if x0.dim() != 2 or x0.shape[1] != self.dim:
            raise ValueError(f"x0 must have shape (n, {self.dim}); got {tuple(x0.shape)}")
        bad = (~torch.isfinite(x0).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"x0 has {len(bad)} cell(s) with NaN or Inf "
                             f"(rows {bad[:5]}{' ...' if len(bad) > 5 else ''})")
        n = x0.shape[0]
        t0 = _times("t0", t0, p)
        if t0.dim() > 1 or (t0.dim() == 1 and t0.shape[0] != n):
            raise ValueError(f"t0 must be a number or have one time per cell ({n}); got shape {tuple(t0.shape)}")
        t0 = t0.expand(n)
        scalar = isinstance(t, (int, float, np.integer, np.floating)) or (hasattr(t, "ndim") and t.ndim == 0)
        tt = _times("t", t, p)
        if tt.dim() > 1:
            raise ValueError(f"t must be a number or a 1-d sequence of times; got shape {tuple(tt.shape)}")
        X, _ = self(x0, t0, tt.reshape(1, -1).expand(n, -1), dataset=dataset)
        X = X[:, 0] if scalar else X
        return X.cpu().numpy() if as_numpy else X


def n_outputs(dim: int, parameterization: str, num_const_dims: int = 0) -> int:
    """Outputs of the MLP: D^2 (the operator, or P for "eigen") plus the free eigenvalues."""
    return dim * dim + (dim - num_const_dims if parameterization == "eigen" else 0)


def outputs_to_operator(h: torch.Tensor, D: int, parameterization: str, num_const_dims: int = 0,
                        time_unit: float = 1.0, check_errors: bool = True):
    """The MLP's outputs h (n, n_out) -> operators A (n, D, D) per unit of the data's time and the
    per-cell eigen penalty 1 / (|det P| + 1e-4) (n,) (None for "direct").  ``check_errors=False``
    solves without a host synchronisation (a singular P then gives non-finite A, not an error)."""
    n = h.shape[0]
    if parameterization == "direct":
        A, penalty = h.view(n, D, D), None
    else:
        P = torch.eye(D, dtype=h.dtype, device=h.device) + h[:, : D * D].view(n, D, D)
        lam = torch.cat([h[:, D * D:], h.new_zeros(n, num_const_dims)], dim=1)
        # A = P diag(lam) P^-1, i.e. the solution of A P = P diag(lam): solve P^T A^T = (P diag(lam))^T.
        rhs = (P * lam[:, None, :]).transpose(1, 2)
        if check_errors:
            At = torch.linalg.solve(P.transpose(1, 2), rhs)
        else:
            At = torch.linalg.solve_ex(P.transpose(1, 2), rhs, check_errors=False)[0]
        A = At.transpose(1, 2)
        penalty = 1.0 / (torch.linalg.det(P).abs() + 1e-4)
    if time_unit != 1.0:
        A = A / time_unit
    return A, penalty


def _times(name, v, like) -> torch.Tensor:
    """A number or sequence of times as a float64 tensor on ``like``'s device (offsets between large
    times stay exact); non-numeric or non-finite -> error."""
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be real numbers, got a {v.dtype} tensor")
        tt = v.detach().to(dtype=torch.float64, device=like.device)
    else:
        arr = np.asarray(v) if not isinstance(v, str) else np.asarray([v])
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a number or a sequence of numbers, got {v!r}")
        tt = torch.as_tensor(arr, dtype=torch.float64, device=like.device)
    if not torch.isfinite(tt).all():
        raise ValueError(f"{name} has NaN or Inf: {v!r}")
    return tt
