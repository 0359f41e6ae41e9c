"""Optimizers and learning-rate schedules for the autograd trainers of every model family.

Why not just torch.optim:

- ``Adagrad`` follows the official GRU4Rec code (and ``FastStep`` in training/native/fast_step.py,
  which it must match exactly): eps goes *inside* the square root, sqrt(acc + eps), where
  torch.optim.Adagrad uses sqrt(acc) + eps; optional heavy-ball or Nesterov momentum on top.
- Item tables get row-sparse gradients (``embedding(..., sparse=True)``). Both optimizers
  then touch only the rows in the batch: duplicates are summed first (the update is
  non-linear in the gradient), untouched rows keep their parameters *and* their state
  (their velocity is not decayed), and lazy Adam counts steps per row, so a row's bias
  correction depends on how often that row was seen.
- ``clip_grad_norm`` understands sparse COO gradients; ``make_schedule`` provides the
  polynomial decay of Villatel et al. 2018 (TensorFlow's ``polynomial_decay``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch

__all__ = ["Adagrad", "Adam", "clip_grad_norm", "LRSchedule", "make_schedule", "build_optimizer"]


def _sparse_rows(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row view of ``p``, unique rows, their summed gradients) of a sparse COO ``grad``.

    Rows are the ``sparse_dim`` leading dims flattened (one dim for embedding grads)."""
    g = grad.coalesce()  # sums duplicate rows; indices come out sorted and unique
    idx, vals = g._indices(), g._values()
    k = idx.shape[0]
    if k == 1:
        return p, idx[0], vals
    if not p.is_contiguous():
        raise ValueError("a sparse gradient with several sparse dims needs a contiguous parameter")
    rows = idx[0]
    for d in range(1, k):
        rows = rows * p.shape[d] + idx[d]
    return p.view(-1, *p.shape[k:]), rows, vals


def _rows_of(state: torch.Tensor, p: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``state`` (shaped like ``p``) viewed with the same rows as ``table``."""
    return state if table is p else state.view(table.shape)


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value}")


class Adagrad(torch.optim.Optimizer):
    """Adagrad as in the official GRU4Rec: acc += g², upd = g / sqrt(acc + eps), then
    p -= lr·upd, or with momentum m: vel = m·vel - lr·upd; p += vel (Nesterov: p += m·vel - lr·upd).
    ``weight_decay`` adds L2 (g += wd·p). Sparse COO grads update only the touched rows."""

    def __init__(self, params: Iterable, lr: float = 0.01, eps: float = 1e-6, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        _check("lr", lr, lr >= 0, ">= 0")
        _check("eps", eps, eps >= 0, ">= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        super().__init__(params, dict(lr=lr, eps=eps, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, m, wd = group["lr"], group["eps"], group["momentum"], group["weight_decay"]
            nesterov = group["nesterov"] and m > 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["acc"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if m > 0 and "vel" not in st:
                    st["vel"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if p.grad.is_sparse:
                    self._rows_step(p, st, lr, eps, m, nesterov, wd)
                else:
                    self._dense_step(p, st, lr, eps, m, nesterov, wd)
        return loss

    @staticmethod
    def _dense_step(p, st, lr, eps, m, nesterov, wd) -> None:
        # same op sequence as FastStep._dense_update, so the results agree bit for bit
        g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
        acc = st["acc"]
        acc.addcmul_(g, g)
        upd = g / (acc + eps).sqrt_()
        if m > 0:
            vel = st["vel"]
            vel.mul_(m).add_(upd, alpha=-lr)
            if nesterov:
                p.add_(vel, alpha=m).add_(upd, alpha=-lr)
            else:
                p.add_(vel)
        else:
            p.add_(upd, alpha=-lr)

    @staticmethod
    def _rows_step(p, st, lr, eps, m, nesterov, wd) -> None:
        # same op sequence as FastStep._rows_update (gather rows, update, scatter back)
        table, rows, g = _sparse_rows(p, p.grad)
        if wd > 0:
            g = g.add(table.index_select(0, rows), alpha=wd)
        acc = _rows_of(st["acc"], p, table)
        a = acc.index_select(0, rows).addcmul_(g, g)
        acc.index_copy_(0, rows, a)
        upd = g.div(a.add_(eps).sqrt_()).mul_(-lr)
        if m > 0:
            vel = _rows_of(st["vel"], p, table)
            v = vel.index_select(0, rows).mul_(m).add_(upd)  # only touched rows decay
            vel.index_copy_(0, rows, v)
            upd = v.mul(m).add_(upd) if nesterov else v
        table.index_add_(0, rows, upd)


class Adam(torch.optim.Optimizer):
    """Adam with bias correction; dense grads as torch.optim.Adam (``weight_decay`` = L2 added
    to the gradient, not AdamW). Sparse COO grads: lazy Adam on the touched rows, each row
    with its own step count (state ``row_step``) for the bias correction."""

    def __init__(self, params: Iterable, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        _check("lr", lr, lr >= 0, ">= 0")
        _check("betas", betas, all(0 <= b < 1 for b in betas) and len(betas) == 2, "two values in [0, 1)")
        _check("eps", eps, eps >= 0, ">= 0")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                # "step" counts the steps this parameter took part in; a dense step touches every
                # row, so it advances row_step too (mixing dense and sparse grads stays coherent)
                st["step"] += 1
                if p.grad.is_sparse:
                    self._rows_step(p, st, lr, b1, b2, eps, wd)
                else:
                    if "row_step" in st:
                        st["row_step"].add_(1)
                    self._dense_step(p, st, lr, b1, b2, eps, wd)
        return loss

    @staticmethod
    def _dense_step(p, st, lr, b1, b2, eps, wd) -> None:
        # torch.optim.Adam's single-tensor formulas
        g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
        t = st["step"]
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"].sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    @staticmethod
    def _rows_step(p, st, lr, b1, b2, eps, wd) -> None:
        # same op sequence as FastStep's lazy Adam in _rows_update
        table, rows, g = _sparse_rows(p, p.grad)
        if "row_step" not in st:  # rows start from the dense steps taken so far (0 if none)
            st["row_step"] = torch.full(table.shape[:1], float(st["step"] - 1),
                                        dtype=torch.float32, device=p.device)
        if wd > 0:
            g = g.add(table.index_select(0, rows), alpha=wd)
        tt = st["row_step"]
        t = tt.index_select(0, rows).add_(1)
        tt.index_copy_(0, rows, t)
        mom, sq = _rows_of(st["exp_avg"], p, table), _rows_of(st["exp_avg_sq"], p, table)
        mo = mom.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
        mom.index_copy_(0, rows, mo)
        v = sq.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
        sq.index_copy_(0, rows, v)
        shape = (-1,) + (1,) * (g.dim() - 1)
        mhat = mo / (1 - b1 ** t).view(shape)
        vhat = v / (1 - b2 ** t).view(shape)
        table.index_add_(0, rows, mhat.div_(vhat.sqrt_().add_(eps)).mul_(-lr))


def clip_grad_norm(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Total L2 norm of all grads (sparse COO: of the coalesced values); when it exceeds
    ``max_norm`` every grad is scaled in place by max_norm / (norm + 1e-6), the rule of
    torch.nn.utils.clip_grad_norm_. Returns the total norm (a tensor: no host sync)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    values = []
    for p in params:
        if p.grad.is_sparse:
            # duplicate rows must be summed before squaring; keep the coalesced grad so the
            # values scaled below are the grad's own storage
            p.grad = p.grad.coalesce()
            values.append(p.grad._values())
        else:
            values.append(p.grad)
    dev = values[0].device
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v).to(dev) for v in values]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # 1.0 when within the bound
    for v in values:
        v.mul_(coef.to(v.device, v.dtype))
    return total


class LRSchedule(Protocol):
    """What trainers rely on (torch.optim.lr_scheduler.LambdaLR has it)."""

    def step(self) -> None: ...
    def get_last_lr(self) -> list[float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


class _Polynomial:
    """Multiplier of one group's initial lr ``lr0``: TensorFlow's polynomial_decay,
    lr = (lr0 - end_lr) · (1 - min(step, decay_steps) / decay_steps)^power + end_lr.
    A class, not a lambda, so LambdaLR's state_dict carries its settings (exact resume)."""

    def __init__(self, lr0: float, end_lr: float, decay_steps: int, power: float):
        self.lr0, self.end_lr, self.decay_steps, self.power = lr0, end_lr, decay_steps, power

    def __call__(self, step: int) -> float:
        if self.lr0 == 0:
            return 0.0
        frac = 1.0 - min(step, self.decay_steps) / self.decay_steps
        return ((self.lr0 - self.end_lr) * frac ** self.power + self.end_lr) / self.lr0


def make_schedule(optimizer: torch.optim.Optimizer, kind: str = "constant", *, decay_steps: int = 0,
                  end_lr: float = 0.0, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LR schedule stepped once per optimizer step. ``"constant"``, or ``"polynomial"``: each
    param group decays from its own initial lr to ``end_lr`` (absolute) over ``decay_steps``
    steps, then stays there (Villatel et al. 2018: 0.01 -> 0.001, power 0.5, 50,000 steps).
    To resume: build the optimizer and the schedule, then load both state dicts (in that order,
    since building a schedule resets the groups' lr)."""
    if kind == "constant":
        lambdas = [_Constant() for _ in optimizer.param_groups]
    elif kind == "polynomial":
        _check("decay_steps", decay_steps, decay_steps > 0, "> 0 for a polynomial schedule")
        _check("power", power, power > 0, "> 0")
        lambdas = []
        for g in optimizer.param_groups:
            lr0 = g.get("initial_lr", g["lr"])
            _check("end_lr", end_lr, 0 <= end_lr <= lr0, f"in [0, initial lr {lr0}]")
            lambdas.append(_Polynomial(lr0, end_lr, decay_steps, power))
    else:
        raise ValueError(f"kind must be 'constant' or 'polynomial', got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adagrad": Adagrad, "adam": Adam}


def build_optimizer(name: str, param_groups: Iterable, lr: float, **kw) -> torch.optim.Optimizer:
    """``Adagrad`` or ``Adam`` by name; ``kw`` are the optimizer's other arguments."""
    cls = _OPTIMIZERS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(_OPTIMIZERS)}")
    return cls(param_groups, lr=lr, **kw)
