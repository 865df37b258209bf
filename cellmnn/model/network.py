"""The Cell-MNN model: an MLP predicts a local linear operator A(x, t) per cell, and the cell's
trajectory is decoded in closed form, x(t') = expm((t' - t) A) x, by ``local_linear_step``; or, with
the decoder options, with an affine drift, a learned diffusion and re-linearised pieces
(``piecewise_decode``)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cellmnn_kernels import piecewise_decode, sde_covariance

from .. import checks

PARAMETERIZATIONS = ("direct", "eigen")
NOISES = ("none", "state")
#: The learned noise scale g = NOISE_MAX * sigmoid(output + offset), per square root of ``time_unit`` in
#: the z-scored model space (where every coordinate has unit spread): NOISE_INIT at the start, never
#: above NOISE_MAX (a diffusion that would scatter a cell over the whole data in one time unit).
NOISE_INIT, NOISE_MAX = 0.1, 2.0
#: The noise outputs enter the sigmoid multiplied by NOISE_GAIN: with the small last-layer weights of
#: ``init_scale`` and Adam's steps of about lr per parameter, g could otherwise move only a few percent
#: in a whole fit (measured: 0.1 -> 0.2 where the simulated diffusion is 0.6).
NOISE_GAIN = 10.0
_NOISE_OFFSET = math.log(NOISE_INIT / (NOISE_MAX - NOISE_INIT))


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

    Decoder options (the defaults are the paper's closed-form decoder):

    * ``affine``: the drift is A x + b with b (D,) from the same MLP, so each cell relaxes towards
      its own fixed point instead of the origin (decoded exactly on the augmented state [x; 1]);
      b is bounded by ``rate_bound`` per time unit (r tanh(b / r)).
    * ``noise="state"``: a diagonal diffusion g(x, t) (D,) from the same MLP (a scaled sigmoid:
      ``NOISE_INIT`` at the start, at most ``NOISE_MAX``), dx = (A x + b) ds + diag(g) dW: predictions
      are samples of the exact Gaussian transition (``local_linear_sde_step``);
      ``predict_distribution`` gives its mean and covariance.
    * ``piece_length``: re-evaluate A (and b, g) every ``piece_length`` (in units of ``time_unit``)
      along the path (``piecewise_decode``), with each rate bounded by ``rate_bound`` per time unit
      (r tanh(a / r), elementwise) so that re-linearised training stays finite.
    """

    def __init__(self, dim: int, width: int = 96, depth: int = 4, init_scale: float = 0.01,
                 parameterization: str = "direct", num_const_dims: int = 0, backend: str = "auto",
                 time_offset: float = 0.0, time_scale: float = 1.0, time_unit: float = 1.0, n_datasets: int = 0,
                 affine: bool = False, noise: str = "none", piece_length: float | None = None,
                 rate_bound: float = 10.0):
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
        self.decoder = DecoderSpec(dim, parameterization, num_const_dims, affine, noise, piece_length, rate_bound)
        n_out = self.decoder.n_outputs
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
                    time_unit=self.time_unit, n_datasets=self.n_datasets, **self.decoder.options())

    @property
    def stochastic(self) -> bool:
        """Whether predictions are samples (a learned diffusion)."""
        return self.decoder.noise != "none"

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

    def outputs(self, x: torch.Tensor, t: torch.Tensor, dataset=None, check_errors: bool = True):
        """(A, b, g, penalty) for cells x (B, D) at times t (B,): A (B, D, D) per unit of the data's time,
        b (B, D) or None, g (B, D) or None, the per-cell eigen penalty (B,) or None (``DecoderSpec.split``)."""
        tin = ((t - self.time_offset) / self.time_scale).to(x.dtype)  # in t's dtype first (float64 keeps offsets)
        h = self.mlp(torch.cat([x, tin[:, None], self._dataset_code(dataset, x.shape[0], x)], dim=1))
        return self.decoder.split(h, self.time_unit, check_errors)

    def operator(self, x: torch.Tensor, t: torch.Tensor, return_penalty: bool = False, dataset=None):
        """A (B, D, D) for cells x (B, D) at times t (B,), per unit of the data's time; with the eigen
        penalty if asked.  ``dataset``: see the class docstring."""
        A, _, _, penalty = self.outputs(x, t, dataset)
        penalty = penalty.mean() if penalty is not None else x.new_zeros(())
        return (A, penalty) if return_penalty else A

    def forward(self, x0: torch.Tensor, t0: torch.Tensor, t: torch.Tensor, return_penalty: bool = False,
                dataset=None, seed: int | None = 0, noise: bool = True, first: tuple | None = None,
                project: torch.Tensor | None = None):
        """Decode cells x0 (B, D) observed at t0 (B,) to times t (B, T): X, V (B, T, D).

        Times may be float64 while x0 is float32: offsets t - t0 are then taken in float64.  With a
        learned diffusion X is a sample (draws from ``seed``; None: torch's global generator) and V
        the drift there; ``noise=False`` decodes with the diffusion off (the noise-free path; for
        the single-piece decoder the predictive mean).  ``first``: the first piece's (A, b, g) when
        read elsewhere (default: at x0, t0); ``project``: a (D, D) matrix P that every piece's drift
        passes through, P (A z + b) (a perturbation held along the path)."""
        first = self.outputs(x0, t0, dataset) if first is None else tuple(first[:3]) + (None,)
        dt = (t - t0[:, None]).to(x0.dtype)
        code = self._dataset_code(dataset, x0.shape[0], x0)

        def shaped(A, b, g):
            if project is not None:
                A, b = project @ A, None if b is None else b @ project.T
            return A, b, g if noise else None

        def operator(z, u):
            tin = ((t0 + u - self.time_offset) / self.time_scale).to(x0.dtype)
            return shaped(*self.decoder.split(self.mlp(torch.cat([z, tin[:, None], code], 1)), self.time_unit)[:3])

        gen = None
        if self.stochastic and noise and seed is not None:
            gen = torch.Generator(device=x0.device).manual_seed(int(seed))
        draw = lambda i: torch.randn(dt.shape + x0.shape[1:] if self.decoder.piece_length is None  # noqa: E731
                                     else x0.shape, generator=gen, dtype=x0.dtype, device=x0.device)
        X, V, _, _ = piecewise_decode(operator, x0, dt, self.decoder.piece_time(self.time_unit), draw,
                                      backend=self.backend, first=shaped(*first[:3]))
        penalty = first[3].mean() if first[3] is not None else x0.new_zeros(())
        return (X, V, penalty) if return_penalty else (X, V)

    @torch.no_grad()
    def predict(self, x0, t0, t, dataset=None, n_samples: int | None = None, seed: int = 0, noise: bool = True):
        """Push cells x0 (n, D) observed at time(s) t0 to time(s) t.

        t0 is a number or (n,); t a number (returns (n, D)) or a sequence of T times (returns
        (n, T, D)); ``dataset`` (models with a dataset embedding only) the cells' dataset.  Accepts and
        returns numpy arrays, or tensors if x0 is a tensor.  Non-numeric,
        NaN/Inf or wrongly shaped inputs are a ValueError/TypeError naming the argument.

        A model with a learned diffusion returns samples: one per cell, or ``n_samples`` per cell
        with a leading axis (n_samples, n, ...), drawn from ``seed`` (reproducible).  A deterministic
        model accepts n_samples too (identical copies).  ``noise=False``: the noise-free path (for
        the single-piece decoder the predictive mean), one per cell.
        """
        checks.flag("noise", noise)
        x0, t0, tt, scalar, as_numpy = self._prediction_inputs(x0, t0, t)
        if n_samples is not None:
            n_samples = checks.positive_int("n_samples", n_samples)
        n = x0.shape[0]
        reps = 1 if n_samples is None or not (noise and self.stochastic) else n_samples
        outs = []
        for r in range(reps):
            X, _ = self(x0, t0, tt.reshape(1, -1).expand(n, -1), dataset=dataset, seed=seed + r, noise=noise)
            outs.append(X[:, 0] if scalar else X)
        X = outs[0] if n_samples is None else torch.stack(outs * (n_samples // reps))
        return X.cpu().numpy() if as_numpy else X

    @torch.no_grad()
    def predict_distribution(self, x0, t0, t, dataset=None):
        """The predictive distribution of each cell in closed form: mean (n, D) and covariance (n, D, D)
        for a number t, or (n, T, D) and (n, T, D, D) for T times.  Exact for the single-piece decoder
        (with noise="none" the covariance is 0); re-linearised pieces have no closed form (ValueError:
        sample with ``predict(n_samples=...)``)."""
        if self.decoder.piece_length is not None:
            raise ValueError("predict_distribution needs the single-piece decoder (piece_length=None); this model "
                             f"re-linearises every {self.decoder.piece_length} time units: use predict(n_samples=...)")
        x0, t0, tt, scalar, as_numpy = self._prediction_inputs(x0, t0, t)
        n = x0.shape[0]
        dt = (tt.reshape(1, -1).expand(n, -1) - t0[:, None]).to(x0.dtype)
        A, b, g, _ = self.outputs(x0, t0, dataset)
        M, _, _, _ = piecewise_decode(lambda z, u: (A, b, None), x0, dt, None, first=(A, b, None))
        S = sde_covariance(A, dt, g) if g is not None else M.new_zeros(M.shape + M.shape[-1:])
        if scalar:
            M, S = M[:, 0], S[:, 0]
        return (M.cpu().numpy(), S.cpu().numpy()) if as_numpy else (M, S)

    def _prediction_inputs(self, x0, t0, t):
        """x0 (n, D) as a tensor of the model's dtype, t0 (n,), the times (float64), whether t was a
        number, and whether x0 came as numpy; errors name the argument."""
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
        return x0, t0, tt, scalar, as_numpy


class DecoderSpec:
    """How the MLP's outputs become a decoder: the operator's parameterisation and the options of
    ``CellMNN`` (affine, noise, piece_length, rate_bound).  Outputs, in order: the operator's
    (``n_outputs``), then b (D, affine), then the noise (D, noise="state")."""

    def __init__(self, dim, parameterization="direct", num_const_dims=0, affine=False, noise="none",
                 piece_length=None, rate_bound=10.0):
        if not isinstance(affine, (bool, np.bool_)):
            raise TypeError(f"affine must be True or False, got {affine!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        for name, v in (("piece_length", piece_length), ("rate_bound", rate_bound)):
            if name == "piece_length" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
                    not 0 < float(v) < math.inf:
                alt = " or None" if name == "piece_length" else ""
                raise ValueError(f"{name} must be a positive finite number{alt}, got {v!r}")
        self.dim, self.parameterization, self.num_const_dims = dim, parameterization, num_const_dims
        self.affine, self.noise = bool(affine), noise
        self.piece_length = None if piece_length is None else float(piece_length)
        self.rate_bound = float(rate_bound)
        self.n_operator = n_outputs(dim, parameterization, num_const_dims)
        self.n_outputs = self.n_operator + dim * (int(self.affine) + int(noise != "none"))

    def options(self) -> dict:
        """The decoder's constructor options (recorded in saved models)."""
        return dict(affine=self.affine, noise=self.noise, piece_length=self.piece_length, rate_bound=self.rate_bound)

    def piece_time(self, time_unit: float):
        """The piece length in the data's units of time, or None (one piece)."""
        return None if self.piece_length is None else self.piece_length * time_unit

    def split(self, h: torch.Tensor, time_unit: float = 1.0, check_errors: bool = True):
        """MLP outputs h (n, n_outputs) -> (A, b, g, penalty) in the data's units of time: A (n, D, D),
        b (n, D) or None, g (n, D) or None (per square root of time), the eigen penalty (n,) or None."""
        D, k = self.dim, self.n_operator
        A, penalty = outputs_to_operator(h[:, :k], D, self.parameterization, self.num_const_dims, 1.0, check_errors)
        if self.piece_length is not None:  # bounded rates, per time unit
            r = self.rate_bound
            A = r * torch.tanh(A / r)
        b = g = None
        if self.affine:
            r = self.rate_bound
            b = r * torch.tanh(h[:, k:k + D] / r) / time_unit
            k += D
        if self.noise != "none":
            g = NOISE_MAX * torch.sigmoid(NOISE_GAIN * h[:, k:k + D] + _NOISE_OFFSET) / math.sqrt(time_unit)
        if time_unit != 1.0:
            A = A / time_unit
        return A, b, g, penalty


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
