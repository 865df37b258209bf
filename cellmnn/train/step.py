"""One training step of an ensemble, and what it is made of: the stacked loss (``step_losses``),
AdamW on one (models, parameters) tensor, the data-parallel gather, and ``Runner``, which runs
steps eagerly or as replays of a captured CUDA graph.

A step is, for all members together: the batch drawn on the device (``sample_cells``); one stacked
MLP (batched matmuls over models); one ``local_linear_step`` over every member's cells; the
``Objective`` (one ``laplace_mmd_loss`` for every member's whole loss); one AdamW update.
Nothing is read back to the host.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from cellmnn_kernels import piecewise_decode
from cellmnn_kernels.ops.sample_cells import sample_cells

from ..model.stacked import stacked_mlp
from .layout import Layout, Setup
from .sampling import normals

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults


def step_losses(s: Setup, L: Layout, flat: torch.Tensor, step: torch.Tensor, check: bool = False,
                exact: bool = False):
    """Per-member loss and MMD part (E,) of the batch of ``step`` for the members of ``L``;
    ``flat``: (models, P) weights of ``L.models``.

    Each MMD^2 takes its observed-observed term as the expectation over the draw (``L.y_self``;
    the same gradients, see ``objective``), or, with ``exact=True``, from the batch's cells.
    Under data parallelism each process computes the MMD sums of its own source cells, which the
    op adds up over the processes (``L.x_rows``); with ``exact`` every process computes all.
    Everything stays on the device; ``check=True`` validates the decoded operators (a host
    synchronisation: used once, before training)."""
    E, D = L.E, s.D
    cells = sample_cells(s.data, s.pool, L.starts, L.lens, L.u, step, backend=s.backend, check=False)
    x0, ys = cells[:L.n_src], cells[L.n_src:]
    if L.shared:  # members of one joint model use its weights
        flat = flat.index_select(0, L.member_model)
    spec = s.decoder
    net = lambda z, t_in: stacked_mlp(flat, s.shapes, torch.cat([z, t_in], 1).view(E, L.n_src // E, -1),  # noqa: E731
                                      s.backend)
    A, b, g, pen = spec.split(net(x0, L.t_in).reshape(L.n_src, -1), s.unit, check_errors=check)

    def operator(z, u):  # re-linearised pieces: the MLP at the current states and times
        t_in = torch.cat([L.t_in[:, :1] + (u / s.t_scale)[:, None], L.t_in[:, 1:]], 1)
        return spec.split(net(z, t_in).reshape(L.n_src, -1), s.unit, check_errors=False)[:3]

    def noise(i):
        shape = (L.n_src, L.dt.shape[1], D) if spec.piece_length is None else (L.n_src, D)
        return normals(L.u_src, step, i, shape[1] * (D if len(shape) == 3 else 1), x0.dtype).view(shape)

    X, V, _, _ = piecewise_decode(operator, x0, L.dt, spec.piece_time(s.unit), noise, backend=s.backend,
                                  first=(A, b, g), check_finite=check)
    if L.world > 1:  # every rank sees all slots' decoded points (the keys of its MMD sums)
        X, V, pen = gather_slots(X, V, pen, L)
    if exact:  # every term from the batch, on every process
        return L.objective(X, V, ys, pen, check=check)
    # each process the MMD sums of its own cells (summed over processes in the op)
    group = dist.group.WORLD if L.x_rows is not None else None
    return L.objective(X, V, ys, pen, check=check, y_self=L.y_self, x_rows=L.x_rows, group=group)


def _fused_adamw(params, grads, m, v, steps, lr: float, wd: float):
    """torch's fused AdamW kernel (as ``torch.optim.AdamW(fused=True)`` calls it) on lists of
    tensors; ``steps``: the steps taken, this one included."""
    torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
                        weight_decay=wd, eps=ADAM_EPS, amsgrad=False, maximize=False)


def fused_adamw_available(like: torch.Tensor) -> bool:
    """Whether torch has a fused AdamW kernel for ``like``'s device and dtype (tried on one element)."""
    if not hasattr(torch, "_fused_adamw_"):
        return False
    z = [like.new_zeros(1) for _ in range(4)]
    try:
        _fused_adamw(z[:1], z[1:2], z[2:3], z[3:], [like.new_ones(())], 1e-3, 0.0)
    except (NotImplementedError, RuntimeError):
        return False
    return True


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments; tested against
    it) on one (E, P) tensor, with a learning rate and a weight decay per member: torch's fused
    AdamW kernel, one pass over the parameters, once per distinct (lr, weight decay), where torch
    has it for the device and dtype (``fused=None``: found out; on this project's CPU it is 13x
    faster than the tensor operations at 9 x 30k parameters); else the same update in a fixed
    number of tensor operations whatever E."""

    def __init__(self, param: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, fused: bool | None = None):
        self.param, self.lr, self.wd = param, lr[:, None], weight_decay[:, None]
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t = torch.zeros((), dtype=param.dtype, device=param.device)  # steps taken (a device tensor)
        self.fused = fused_adamw_available(param) if fused is None else fused
        self._group([(float(a), float(b)) for a, b in zip(lr.tolist(), weight_decay.tolist())])

    def _group(self, hyper: list):
        """Keep the members' (lr, weight decay) and the members sharing each pair (the fused kernel's
        calls), found once here rather than every step."""
        self.hyper, self.groups = hyper, {}
        for e, h in enumerate(hyper):
            self.groups.setdefault(h, []).append(e)

    @torch.no_grad()
    def step(self):
        """One AdamW update of every member from ``param.grad``."""
        self.t.add_(1)
        if not self.fused:
            self._ops()
            return
        tensors = (self.param, self.param.grad, self.m, self.v)
        for (lr, wd), rows in self.groups.items():
            parts = [[t] for t in tensors] if len(self.groups) == 1 else [[t[e] for e in rows] for t in tensors]
            _fused_adamw(*parts, [self.t] * len(parts[0]), lr, wd)

    def _ops(self):
        b1, b2 = ADAM_BETAS
        g, p = self.param.grad, self.param
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.mul_(1 - self.lr * self.wd)
        denom = (self.v.sqrt() / (1 - b2 ** self.t).sqrt()).add_(ADAM_EPS)
        p.sub_(self.lr / (1 - b1 ** self.t) * self.m / denom)

    def keep(self, idx: torch.Tensor):
        """Keep the state of members ``idx`` only (when members leave the ensemble)."""
        self.lr, self.wd = self.lr[idx], self.wd[idx]
        self._group([self.hyper[i] for i in idx.tolist()])
        self.m, self.v = self.m[idx].contiguous(), self.v[idx].contiguous()


# ----------------------------------------------------------------------------- data parallel

def world() -> tuple:
    """(rank, world size) of the default ``torch.distributed`` process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherSlots(torch.autograd.Function):
    """Gather every rank's (E, n_r, F) slots into (E, sum n_r, F), in rank order.

    Backward returns this rank's slice of the incoming gradient, with no communication: every
    rank computes the same loss from the gathered tensor (its MMD sums over its own cells' rows,
    added up over ranks, and the other terms in full), and the gradient on its own cells is
    complete, so that slice is the whole derivative with respect to this rank's input (the
    parameter gradients are then summed over ranks)."""

    @staticmethod
    def forward(ctx, x, counts):
        rank = dist.get_rank()
        E, n, F = x.shape
        buf = x.new_zeros(E, max(counts), F)
        buf[:, :n] = x
        parts = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(parts, buf)
        ctx.lo, ctx.n = sum(counts[:rank]), n
        return torch.cat([p[:, :c] for p, c in zip(parts, counts)], 1)

    @staticmethod
    def backward(ctx, g):
        return g[:, ctx.lo:ctx.lo + ctx.n], None


def gather_slots(X, V, pen, L: Layout):
    """Decoded points X, V (E * n_r, T, D) and penalties (E * n_r,) of this rank's slots, gathered
    from every rank into the single-process layout (E * B, T, D), in one collective."""
    E, T, D = L.E, X.shape[1], X.shape[2]
    n = L.n_src // E
    parts = [X.reshape(E, n, T * D), V.reshape(E, n, T * D)] + ([] if pen is None else [pen.reshape(E, n, 1)])
    g = _AllGatherSlots.apply(torch.cat(parts, -1), L.counts)
    X, V = g[..., :T * D].reshape(-1, T, D), g[..., T * D:2 * T * D].reshape(-1, T, D)
    return X, V, None if pen is None else g[..., -1].reshape(-1)


class Runner:
    """Training steps for the current members: eager, or replays of a captured CUDA graph.  In a
    ``torch.distributed`` process group the parameter gradients are summed over ranks (one
    all-reduce per step), so every rank takes the same AdamW step."""

    def __init__(self, s: Setup, flat: torch.Tensor, use_graph: bool):
        self.rank, self.world = world()
        self.s, self.use_graph, self.graph, self.warm = s, use_graph, None, 0
        self.step_t = torch.zeros((), dtype=torch.int64, device=s.device)
        hps = [s.members[mm[0]].hp for mm in s.model_members]
        lr = torch.tensor([hp.lr for hp in hps], dtype=s.dtype, device=s.device)
        wd = torch.tensor([hp.weight_decay for hp in hps], dtype=s.dtype, device=s.device)
        self.flat = flat.detach().clone().requires_grad_(True)
        self.opt = AdamW(self.flat, lr, wd)
        self.layout = Layout(s, s.members_of(range(len(hps))), self.rank, self.world)

    def _body(self):
        L = self.layout
        loss, _ = step_losses(self.s, L, self.flat, self.step_t)
        if L.shared:  # a joint model's loss: the sum of its members'
            loss = loss.new_zeros(len(L.models)).index_add(0, L.member_model, loss)
        loss.sum().backward()  # models are independent: each gets the gradient of its own loss
        if self.world > 1:
                dist.all_reduce(self.flat.grad)
        self.opt.step()
        self.step_t.add_(1)
        return loss.detach()

    def step(self) -> torch.Tensor:
        """One training step of every member; the (E,) losses, on the device.  In graph mode the
        first steps after a (re)layout run eagerly on a side stream (warm-up), then one step is
        captured and every step replays it."""
        if self.use_graph and self.graph is None:
            if self.warm < 3:
                self.warm += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.flat.grad = None
                    loss = self._body()
                torch.cuda.current_stream().wait_stream(side)
                return loss
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss.clone()
        self.flat.grad = None
        return self._body()

    def _capture(self):
        """Capture one step in a CUDA graph; on failure, warn and train eagerly."""
        try:
            self.flat.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_loss = self._body()
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly instead
            warnings.warn(f"cellmnn: CUDA graph capture failed ({type(exc).__name__}: {exc}); training eagerly")
            self.use_graph, self.graph = False, None

    def keep(self, keep_local: list):
        """Go on with the models at local positions ``keep_local`` only."""
        idx = torch.as_tensor(keep_local, dtype=torch.int64, device=self.s.device)
        self.flat = self.flat.detach()[idx].clone().requires_grad_(True)
        self.opt.keep(idx)
        self.opt.param = self.flat
        models = [self.layout.models[k] for k in keep_local]
        self.layout = Layout(self.s, self.s.members_of(models), self.rank, self.world)
        self.graph, self.warm = None, 0  # shapes changed: capture again

    def state(self) -> dict:
        """The state a checkpoint needs: active models, weights, moments, step counter (on the CPU)."""
        return {"active": list(self.layout.models), "flat": self.flat.detach().cpu(), "m": self.opt.m.cpu(),
                "v": self.opt.v.cpu(), "t": self.opt.t.cpu(), "step": self.step_t.cpu()}

    def load(self, st: dict):
        """Continue from ``state()`` (a checkpoint): the models still training, weights, moments, steps."""
        self.keep(list(st["active"]))  # from the full ensemble: local positions are model indices
        dev = self.s.device
        self.flat = st["flat"].to(dev).clone().requires_grad_(True)
        self.opt.param = self.flat
        self.opt.m, self.opt.v, self.opt.t = st["m"].to(dev).clone(), st["v"].to(dev).clone(), st["t"].to(dev).clone()
        self.step_t = st["step"].to(dev).clone()
