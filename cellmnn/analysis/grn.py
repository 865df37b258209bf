"""Snapshot data from gene networks with known interactions, for ground-truth recovery.

* ``linear_system`` / ``sample_linear``: dx/dt = M x with a random sparse signed M; snapshots of
  independent cells at several times (the exact flow expm(t M) applied to a Gaussian mixture).
* ``krumsiek_network`` / ``simulate_krumsiek``: the 11-gene myeloid network of Krumsiek et al.
  (2011) in a continuous Hill form of its Boolean rules, dx_i/dt = f_i(h(x)) - x_i plus noise,
  with h(x) = x^n / (x^n + k^n) and fuzzy logic (a and b = ab, a or b = a + b - ab, not a = 1 - a),
  integrated by Euler-Maruyama; independent cells are sampled at several times.
"""
from __future__ import annotations

import ast
import re
from importlib import resources

import numpy as np

from ..data.load import load_marginals
from ..data.marginals import Marginals


def linear_system(D: int = 10, density: float = 0.15, seed: int = 0, scale: float = 0.6) -> np.ndarray:
    """A stable sparse signed matrix: -I plus off-diagonal entries +-U(0.5, 1) * scale at ``density``."""
    rng = np.random.default_rng(seed)
    M = np.zeros((D, D))
    off = ~np.eye(D, dtype=bool)
    mask = (rng.random((D, D)) < density) & off
    M[mask] = rng.choice([-1.0, 1.0], mask.sum()) * rng.uniform(0.5, 1.0, mask.sum()) * scale
    M -= np.eye(D)
    while np.linalg.eigvals(M).real.max() >= -0.05:  # keep the flow stable
        M -= 0.1 * np.eye(D)
    return M


def sample_linear(M: np.ndarray, times=(0.0, 0.5, 1.0, 1.5, 2.0), n_cells: int = 400, seed: int = 0,
                  noise: float = 0.01, n_states: int = 40) -> Marginals:
    """Independent snapshots of dx/dt = M x from a Gaussian mixture of ``n_states`` starting states.

    Starts: centres N(0, 2^2 I), per-state scales U(0.2, 0.8) per gene.  Snapshots only identify
    M on what the population spans: with n_states < D the centre trajectories expm(t M) c_k
    leave most directions of M unconstrained.
    """
    from scipy.linalg import expm

    if isinstance(n_states, bool) or not isinstance(n_states, (int, np.integer)) or n_states < 1:
        raise ValueError(f"n_states must be a positive integer, got {n_states!r}")
    rng = np.random.default_rng(seed)
    D = len(M)
    centers = rng.normal(0.0, 2.0, (n_states, D))
    scales = rng.uniform(0.2, 0.8, (n_states, D))
    arrays = []
    for t in times:
        comp = rng.integers(0, n_states, n_cells)
        x0 = centers[comp] + scales[comp] * rng.normal(size=(n_cells, D))
        arrays.append(x0 @ expm(t * M).T + noise * rng.normal(size=(n_cells, D)))
    m = load_marginals(arrays, times=list(times), n_components=None)
    m.transform.feature_names = [f"g{i + 1}" for i in range(D)]
    return m


def krumsiek_network(path=None):
    """(genes, rules, signed couplings): rules as Python boolean expressions over the genes, the
    coupling matrix C (targets x sources) with the model file's weights, 0 for no edge."""
    text = (open(path).read() if path is not None
            else (resources.files("cellmnn.data") / "datasets" / "krumsiek11_model.txt").read_text())
    rules, couplings, section = {}, [], None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            section = "couplings" if "coupling list" in s else ("rules" if "update rules" in s else section)
            continue
        if not s:
            continue
        if section == "rules" and "=" in s:
            name, expr = (p.strip() for p in s.split("=", 1))
            rules[name] = expr
        elif section == "couplings":
            tgt, src, w = s.split()
            couplings.append((tgt, src, float(w)))
    genes = list(rules)
    index = {g: i for i, g in enumerate(genes)}
    C = np.zeros((len(genes), len(genes)))
    for tgt, src, w in couplings:
        C[index[tgt], index[src]] = w
    return genes, rules, C


class _Fuzzy(ast.NodeTransformer):
    """Boolean expression -> fuzzy-logic arithmetic on Hill activations."""

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        out = node.values[0]
        for v in node.values[1:]:
            if isinstance(node.op, ast.And):
                out = ast.BinOp(out, ast.Mult(), v)
            else:  # a or b = a + b - a b
                out = ast.BinOp(ast.BinOp(out, ast.Add(), v), ast.Sub(), ast.BinOp(out, ast.Mult(), v))
        return out

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            return ast.BinOp(ast.Constant(1.0), ast.Sub(), node.operand)
        return node


def _compile_rules(genes, rules):
    ident = {g: f"g{i}" for i, g in enumerate(genes)}
    pattern = re.compile("|".join(re.escape(g) for g in sorted(genes, key=len, reverse=True)))
    fns = []
    for g in genes:
        expr = rules[g].strip()
        if not expr:
            fns.append(None)
            continue
        tree = _Fuzzy().visit(ast.parse(pattern.sub(lambda m: ident[m.group(0)], expr), mode="eval"))
        fns.append(compile(ast.fix_missing_locations(tree), f"<rule {g}>", "eval"))
    return ident, fns


def simulate_krumsiek(times=(0.0, 1.0, 2.0, 3.0, 4.0), n_cells: int = 400, seed: int = 0, noise: float = 0.03,
                      hill_n: float = 4.0, k: float = 0.5, dt: float = 0.01, start: str = "progenitor",
                      path=None) -> Marginals:
    """Independent cells of the Hill-form Krumsiek network sampled at ``times`` (module docstring).

    start "progenitor": cells start as progenitors (Gata2 in [0.2, 0.8], the lineage factors
    Gata1, Pu.1 and Cebpa uniform in [0.1, 0.8], the rest low) and branch towards the
    erythroid/megakaryocyte or the myeloid fates depending on that balance.  start "uniform":
    every gene uniform in [0, 1], so that every gene varies across the population.
    """
    if start not in ("progenitor", "uniform"):
        raise ValueError(f"start must be 'progenitor' or 'uniform', got {start!r}")
    genes, rules, _ = krumsiek_network(path)
    rng = np.random.default_rng(seed)
    G = len(genes)
    n = n_cells * len(times)
    if start == "uniform":
        x = rng.uniform(0.0, 1.0, (n, G))
    else:
        x = np.clip(0.1 + 0.05 * rng.normal(size=(n, G)), 0.0, None)
        x[:, genes.index("Gata2")] = rng.uniform(0.2, 0.8, n)
        for g in ("Gata1", "Pu.1", "Cebpa"):  # the lineage choice depends on their balance
            x[:, genes.index(g)] = rng.uniform(0.1, 0.8, n)
    arrays = {float(t): None for t in times}
    owner = np.repeat(np.arange(len(times)), n_cells)  # each cell is sampled at exactly one time
    sorted_times = sorted(arrays)
    step = _krumsiek_step(genes, rules, hill_n, k, dt, noise)
    t, nxt = 0.0, 0
    while nxt < len(sorted_times):
        if t >= sorted_times[nxt] - 1e-12:
            arrays[sorted_times[nxt]] = x[owner == nxt].copy()
            nxt += 1
            continue
        x = step(x, rng)
        t += dt
    m = load_marginals([arrays[float(t)] for t in sorted_times], times=sorted_times, n_components=None)
    m.transform.feature_names = list(genes)
    return m


def _krumsiek_step(genes, rules, hill_n, k, dt, noise, clamp=None):
    """One Euler-Maruyama step of the Hill-form network, x -> x + dt (f(h(x)) - x) + noise dW,
    clipped at 0; genes of ``clamp`` (index -> value) held at their values."""
    ident, fns = _compile_rules(genes, rules)
    clamp = dict(clamp or {})

    def step(x, rng):
        a = x ** hill_n / (x ** hill_n + k ** hill_n)
        env = {ident[g]: a[:, i] for i, g in enumerate(genes)}
        f = np.stack([eval(fn, {}, env) if fn is not None else np.zeros(len(x)) for fn in fns], axis=1)
        x = np.clip(x + dt * (f - x) + noise * np.sqrt(dt) * rng.normal(size=x.shape), 0.0, None)
        for i, v in clamp.items():
            x[:, i] = v
        return x
    return step


def advance_krumsiek(x, duration: float, clamp=None, seed: int = 0, noise: float = 0.03, hill_n: float = 4.0,
                     k: float = 0.5, dt: float = 0.01, path=None) -> np.ndarray:
    """Cells ``x`` (n, 11) of the Krumsiek network carried forward by ``duration`` (the dynamics of
    ``simulate_krumsiek``), with the genes of ``clamp`` (name -> value) held at their values from
    the start: the ground truth of a knockout (value 0) or an over-expression.  The same ``seed``
    gives the same noise, so a clamped and an unclamped run differ by the clamp alone."""
    genes, rules, _ = krumsiek_network(path)
    unknown = [g for g in (clamp or {}) if g not in genes]
    if unknown:
        raise ValueError(f"clamp: {unknown} are not genes of the network ({genes})")
    index = {genes.index(g): float(v) for g, v in (clamp or {}).items()}
    step = _krumsiek_step(genes, rules, hill_n, k, dt, noise, index)
    x = np.array(x, dtype=np.float64)
    for i, v in index.items():
        x[:, i] = v
    rng = np.random.default_rng(seed)
    for _ in range(int(round(duration / dt))):
        x = step(x, rng)
    return x
