"""Simulated time courses with known dynamics: snapshots of a stochastic differential equation
dx = f(x) dt + s dW, integrated by Euler-Maruyama (step ``STEP``).  Every snapshot is an independent
population (cells are destroyed by measurement), so only the marginals carry the dynamics; ``advance``
carries given cells forward, which gives the true fate of each cell for checks of fate read-outs.

The cases (``CASES``):

* ``bifurcation`` (2-d): a pitchfork, dx = 2 (x - x^3) dt, dy = 0.5 dt, from x ~ N(0, 0.1^2):
  one population splits into two fates (the sign of the first coordinate).
* ``cycle`` (2-d): a limit cycle of radius 1 turning at one radian per unit time, from a cluster
  at angle 0: the population travels most of the way round.
* ``converging`` (2-d): two starting clusters at (-2, +-1) drawn to one fate at (2, 0) at rate 0.6.
* ``uneven-gaps``: the bifurcation with snapshots at t = 0, 0.3, 1.0, 1.2, 3.0.
* ``heavy-noise``: the converging case with diffusion s = 0.6 (others 0.1).
* ``bifurcation-5d`` and ``bifurcation-10d``: the bifurcation plus 3 or 8 Ornstein-Uhlenbeck
  coordinates (rate 1, s = 0.3), all turned by a random rotation, so every coordinate mixes the
  dynamics with noise.

Every case has 5 snapshots (t = 0..4 unless stated).
"""
from __future__ import annotations

import numpy as np

STEP = 0.01


def bifurcation(x):
    """The pitchfork drift (2-d)."""
    return np.stack([2.0 * (x[:, 0] - x[:, 0] ** 3), np.full(len(x), 0.5)], axis=1)


def cycle(x):
    """The limit-cycle drift (2-d)."""
    r2 = (x ** 2).sum(axis=1, keepdims=True)
    rot = np.stack([-x[:, 1], x[:, 0]], axis=1)
    return x * (1.0 - r2) + rot


def converging(x):
    """Linear attraction to (2, 0) (2-d)."""
    return -0.6 * (x - np.array([2.0, 0.0]))


def ou_padded(drift):
    """``drift`` on the first two coordinates, Ornstein-Uhlenbeck decay (rate 1) on the others."""
    def f(x):
        return np.concatenate([drift(x[:, :2]), -x[:, 2:]], axis=1)
    return f


CASES = {  # name: (drift, dimension, times, diffusion)
    "bifurcation": (bifurcation, 2, (0, 1, 2, 3, 4), 0.1),
    "cycle": (cycle, 2, (0, 1, 2, 3, 4), 0.1),
    "converging": (converging, 2, (0, 1, 2, 3, 4), 0.1),
    "uneven-gaps": (bifurcation, 2, (0, 0.3, 1.0, 1.2, 3.0), 0.1),
    "heavy-noise": (converging, 2, (0, 1, 2, 3, 4), 0.6),
    "bifurcation-5d": (ou_padded(bifurcation), 5, (0, 1, 2, 3, 4), 0.1),
    "bifurcation-10d": (ou_padded(bifurcation), 10, (0, 1, 2, 3, 4), 0.1),
}


def start(case: str, n: int, rng, dim: int) -> np.ndarray:
    """``n`` cells of the case's initial distribution (before any rotation), (n, dim)."""
    if case.startswith("bifurcation") or case == "uneven-gaps":
        x = np.stack([rng.normal(0.0, 0.1, n), rng.normal(0.0, 0.3, n)], axis=1)
    elif case == "cycle":
        angle, radius = rng.normal(0.0, 0.2, n), rng.normal(1.0, 0.1, n)
        x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    else:  # converging, heavy-noise
        x = np.stack([rng.normal(-2.0, 0.25, n), rng.choice([-1.0, 1.0], n) + rng.normal(0.0, 0.25, n)], axis=1)
    return np.concatenate([x, rng.normal(0.0, 0.3, (n, dim - 2))], axis=1)


def _case(case: str):
    if case not in CASES:
        raise ValueError(f"case must be one of {list(CASES)}, got {case!r}")
    return CASES[case]


def rotation(case: str, seed: int) -> np.ndarray:
    """The orthogonal (dim, dim) matrix Q that mixes a case's coordinates (x_observed = Q x), the
    identity for the 2-d cases."""
    dim = _case(case)[1]
    if dim == 2:
        return np.eye(2)
    Q, _ = np.linalg.qr(np.random.default_rng(1000 + seed).standard_normal((dim, dim)))
    return Q


def _integrate(drift, x, duration, noise, rng):
    for _ in range(int(round(duration / STEP))):
        x = x + drift(x) * STEP + noise * np.sqrt(STEP) * rng.standard_normal(x.shape)
    return x


def _noise(case: str) -> np.ndarray:
    _, dim, _, s = _case(case)
    noise = np.full(dim, s)
    noise[2:] = 0.3  # the Ornstein-Uhlenbeck coordinates
    return noise


def simulate(case: str, n_cells: int, seed: int, initial=None, rotation_seed=None):
    """(arrays, times): one independent population of ``n_cells`` per snapshot time, each started
    from the case's initial distribution (or ``initial(n, rng)``, a 2-d case's other start) and
    integrated by Euler-Maruyama with step ``STEP``; arrays are (n_cells, dim) float64 in observed
    (rotated) coordinates.  The rotation is ``rotation(case, seed)``, or of ``rotation_seed`` when
    given (an independent re-simulation of the same observed course)."""
    drift, dim, times, _ = _case(case)
    if initial is not None and dim != 2:
        raise ValueError(f"another initial distribution is for the 2-d cases; {case} has {dim} dimensions")
    rng = np.random.default_rng(seed)
    noise = _noise(case)
    arrays = []
    for t in times:
        x = start(case, n_cells, rng, dim) if initial is None else initial(n_cells, rng)
        arrays.append(_integrate(drift, x, t, noise, rng))
    Q = rotation(case, seed if rotation_seed is None else rotation_seed)
    return [a @ Q.T for a in arrays], list(times)


def advance(case: str, x, duration: float, seed: int, data_seed: int = 0, repeats: int = 1) -> np.ndarray:
    """Carry cells ``x`` (n, dim), in the observed coordinates of ``simulate(case, ..., seed=data_seed)``,
    forward by ``duration`` under the case's SDE: (repeats, n, dim), each repeat with its own noise
    (seeded by ``seed``).  The truth that fate read-outs are checked against."""
    drift, dim, _, _ = _case(case)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (n, {dim}) for case {case!r}; got {x.shape}")
    if not (np.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a non-negative finite number, got {duration!r}")
    Q = rotation(case, data_seed)
    rng = np.random.default_rng(seed)
    start_x = np.broadcast_to(x @ Q, (repeats,) + x.shape).reshape(-1, dim)
    out = _integrate(drift, start_x, duration, _noise(case), rng)
    return (out @ Q.T).reshape(repeats, len(x), dim)
