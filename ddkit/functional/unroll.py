"""Differentiable SGD over ``torch.func.functional_call``: the inner loop of every bi-level method.

DD (unrolled meta-learning), MTT/FTD/DDPP (trajectory matching), expert training and evaluation parity all train
a network with SGD from given parameters and, for the distillation methods, differentiate the result with
respect to what the training consumed: the synthetic images, learnable (soft) labels, learnable step sizes and
the initial parameters.  This module is that loop, once, as pure functions of parameter dicts:

- :func:`sgd_update`: one ``torch.optim.SGD`` update (momentum, dampening, Nesterov, weight decay), written
  with out-of-place tensor ops so that it is differentiable in the parameters, the gradients and the lr;
- :func:`loss_and_grads`: the loss of ``functional_call(model, params, x)`` and its gradient;
- :func:`unroll_sgd`: ``steps`` updates, in one of three modes.

Why three modes.  The official MTT code keeps every student network in one autograd graph ("graph" here): exact,
but activation memory grows linearly with the number of inner steps, which is what limits MTT's and DD's
unrolls on one GPU.  TESLA (Cui et al., 2023) bounds the memory by dropping the cross-step terms of the
gradient (each step's gradient is treated as a constant of the earlier parameters), which changes the
gradient.  "checkpoint" here bounds the memory *and* keeps the gradient exact: the forward pass runs without a
graph and stores only each step's parameters (and momentum buffers); the backward pass walks the steps in
reverse, recomputes one step at a time with ``create_graph=True`` and pulls the adjoint through it (a
vector-Jacobian product of the update, i.e. a Hessian-vector product of the inner loss plus the direct terms).
Activation memory is that of one double-backward step, whatever ``steps`` is; what grows with ``steps`` is
only the parameter trajectory, ``steps`` copies of the parameters (and buffers), which is what an expert
trajectory stores anyway.  The cost is one extra forward-and-gradient per step.  "no_grad" trains without any
graph (expert training, evaluation-like use) and returns detached parameters.

Determinism: "checkpoint" calls ``batch_fn(i, *inputs)`` again during the backward pass, so it must return the
same batch for the same ``i``: pre-draw the indices and augmentation parameters, do not draw inside it.

Buffers and modes: outputs must not depend on buffers that the forward updates in place (they do not for batch
norm in train mode, which normalises with batch statistics, nor in eval mode, which does not update).
"checkpoint" recomputes steps on copies of the buffers, so running statistics are updated once per step, as in
"graph", and with each submodule's train/eval flag as it was during the forward (a caller typically switches to
eval mode for its outer loss).  Layers that draw random numbers in train mode (dropout) would draw different
ones in the recomputation: use "graph" for them.
Parameters whose gradient is undefined (unused by the loss) get a zero gradient (``torch.optim.SGD`` would skip
them, weight decay included).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
BatchFn = Callable[..., tuple[Tensor, Tensor]]

MODES = ("graph", "checkpoint", "no_grad")


@dataclass(frozen=True)
class SGDRule:
    """The hyper-parameters of ``torch.optim.SGD`` besides the lr, with its exact semantics."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        for name in ("momentum", "weight_decay", "dampening"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SGDRule.{name} must be >= 0, got {getattr(self, name)}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            # torch.optim.SGD refuses the same combination.
            raise ConfigError("SGDRule: nesterov momentum requires momentum > 0 and dampening == 0")


def sgd_update(
    params: Params, grads: Params, lr: Tensor | float, rule: SGDRule, momentum_buf: Params | None
) -> tuple[Params, Params | None]:
    """One SGD update, pure and differentiable in params, grads and lr (torch.optim.SGD's formula; first step
    initialises the buffer with the gradient).

    ``d = g + wd * p``; with momentum ``buf = d`` on the first step (``momentum_buf is None``) and
    ``buf = momentum * buf + (1 - dampening) * d`` after it; the step direction is ``d + momentum * buf``
    (Nesterov) or ``buf``; ``p - lr * direction``.  Returns the new parameters and the new buffers (``None``
    without momentum).
    """
    new_params: Params = {}
    new_buf: Params | None = {} if rule.momentum != 0 else None
    for name, p in params.items():
        d = grads[name]
        if rule.weight_decay != 0:
            d = d + rule.weight_decay * p
        if new_buf is not None:
            if momentum_buf is None:
                buf = d
            else:
                buf = rule.momentum * momentum_buf[name] + (1.0 - rule.dampening) * d
            new_buf[name] = buf
            d = d + rule.momentum * buf if rule.nesterov else buf
        new_params[name] = p - lr * d
    return new_params, new_buf


def loss_and_grads(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    buffers: Params | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Params]:
    """Loss of functional_call(model, (params, buffers), x) and its gradient w.r.t. params.

    Works under ``torch.no_grad`` too (grad mode is switched on locally).  Parameters that do not require grad
    are differentiated as fresh leaves; with ``create_graph=True`` the gradients stay differentiable in
    everything the loss depends on (the parameters' history, ``x``, ``y``).
    """
    with torch.enable_grad():
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        state = leaves if buffers is None else (leaves, buffers)
        loss = loss_fn(functional_call(model, state, (x,)), y)
        found = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph, allow_unused=True)
    grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), found)}
    return loss, grads


def _check_lrs(lrs: Tensor | float, steps: int, like: Tensor) -> Tensor:
    lrs = torch.as_tensor(lrs, dtype=like.dtype, device=like.device) if not isinstance(lrs, Tensor) else lrs
    if lrs.dim() == 0 or (lrs.dim() == 1 and lrs.shape[0] == steps):
        return lrs
    raise ConfigError(f"unroll_sgd: lrs must be a scalar or a [steps]={steps} tensor, got shape {tuple(lrs.shape)}")


def _step_lr(lrs: Tensor, i: int) -> Tensor:
    return lrs[i] if lrs.dim() == 1 else lrs


def _one_step(
    model: nn.Module, params: Params, buf: Params | None, lr: Tensor, batch: tuple[Tensor, Tensor],
    rule: SGDRule, loss_fn: LossFn, buffers: Params | None, create_graph: bool,
) -> tuple[Params, Params | None]:
    x, y = batch
    _, grads = loss_and_grads(model, params, x, y, loss_fn, buffers=buffers, create_graph=create_graph)
    return sgd_update(params, grads, lr, rule, buf)


def unroll_sgd(
    model: nn.Module,
    params: Params,
    batch_fn: BatchFn,
    inputs: Sequence[Tensor],
    lrs: Tensor | float,
    steps: int,
    *,
    rule: SGDRule = SGDRule(),
    loss_fn: LossFn = F.cross_entropy,
    mode: str = "checkpoint",
    buffers: Params | None = None,
    momentum_buf: Params | None = None,
) -> Params:
    """`steps` SGD steps from `params`; step i trains on `batch_fn(i, *inputs)` (must be deterministic in i:
    pre-draw indices/augmentation), with lr `lrs` (a scalar tensor, or a [steps] tensor for per-step lrs).

    Returns the final parameters, differentiable w.r.t. `params`, `lrs` and `inputs` (e.g. the synthetic images,
    learnable labels) in modes "graph" (plain unrolled graph; memory grows with ``steps``), "checkpoint" (the
    same exact gradient with activation memory independent of ``steps``; see the module docstring) and
    "no_grad" (no graph; detached results).  Under ``torch.no_grad`` every mode runs as "no_grad".
    """
    if mode not in MODES:
        raise ConfigError(f"unroll_sgd: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"unroll_sgd: steps must be an integer >= 0, got {steps!r}")
    if not params:
        raise ConfigError("unroll_sgd: params is empty; expected a dict name -> tensor "
                          "(e.g. dict(model.named_parameters()))")
    if momentum_buf is not None and rule.momentum == 0:
        raise ConfigError("unroll_sgd: momentum_buf given but rule.momentum is 0")
    inputs = tuple(inputs)
    lrs = _check_lrs(lrs, steps, next(iter(params.values())))
    if mode == "no_grad" or not torch.is_grad_enabled():
        return _unroll_no_grad(model, params, batch_fn, inputs, lrs, steps, rule, loss_fn, buffers, momentum_buf)
    if mode == "graph":
        buf = momentum_buf
        for i in range(steps):
            params, buf = _one_step(model, params, buf, _step_lr(lrs, i), batch_fn(i, *inputs), rule, loss_fn,
                                    buffers, create_graph=True)
        return params
    return _checkpointed(model, params, batch_fn, inputs, lrs, steps, rule, loss_fn, buffers, momentum_buf)


def _unroll_no_grad(
    model: nn.Module, params: Params, batch_fn: BatchFn, inputs: tuple[Tensor, ...], lrs: Tensor, steps: int,
    rule: SGDRule, loss_fn: LossFn, buffers: Params | None, momentum_buf: Params | None,
) -> Params:
    with torch.no_grad():
        params = {k: p.detach() for k, p in params.items()}
        buf = None if momentum_buf is None else {k: b.detach() for k, b in momentum_buf.items()}
        inputs = tuple(t.detach() for t in inputs)
        lrs = lrs.detach()
        for i in range(steps):
            params, buf = _one_step(model, params, buf, _step_lr(lrs, i), batch_fn(i, *inputs), rule, loss_fn,
                                    buffers, create_graph=False)
    return params


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of the checkpointed unroll, and how its flat tensor arguments are laid out."""

    model: nn.Module
    batch_fn: BatchFn
    rule: SGDRule
    loss_fn: LossFn
    steps: int
    names: tuple[str, ...]
    has_buf: bool
    n_inputs: int
    buffers: Params | None
    #: each submodule's ``training`` flag during the forward, restored for the recomputation (the caller may
    #: switch the model to eval mode for its outer loss before calling backward)
    modes: tuple[bool, ...]

    def split(self, flat: Sequence) -> tuple[Params, Params | None, Tensor, tuple]:
        n = len(self.names)
        params = dict(zip(self.names, flat[:n]))
        buf = dict(zip(self.names, flat[n : 2 * n])) if self.has_buf else None
        rest = flat[2 * n :] if self.has_buf else flat[n:]
        return params, buf, rest[0], tuple(rest[1:])

    def buffer_copies(self) -> Params | None:
        """Copies of the buffers for a recomputation, so that running statistics are not updated twice."""
        source = dict(self.model.named_buffers()) if self.buffers is None else self.buffers
        return {k: b.clone() for k, b in source.items()} or None


def _checkpointed(
    model: nn.Module, params: Params, batch_fn: BatchFn, inputs: tuple[Tensor, ...], lrs: Tensor, steps: int,
    rule: SGDRule, loss_fn: LossFn, buffers: Params | None, momentum_buf: Params | None,
) -> Params:
    names = tuple(params)
    has_buf = momentum_buf is not None
    spec = _Spec(model, batch_fn, rule, loss_fn, steps, names, has_buf, len(inputs), buffers,
                 tuple(m.training for m in model.modules()))
    flat = [params[k] for k in names] + ([momentum_buf[k] for k in names] if has_buf else []) + [lrs, *inputs]
    out = _CheckpointedUnroll.apply(spec, *flat)
    return dict(zip(names, out))


class _CheckpointedUnroll(torch.autograd.Function):
    """``steps`` SGD updates whose backward recomputes one step at a time (exact, second order).

    Forward: no graph; saves the state (parameters, momentum buffers) before each step.  Backward: for
    ``i = steps-1 .. 0`` rebuild step ``i`` from its saved state with ``create_graph=True`` and take the
    vector-Jacobian product of ``(p_{i+1}, buf_{i+1})`` with the carried adjoint, w.r.t. ``(p_i, buf_i)`` (the
    next adjoint), the lrs and the inputs (accumulated).  The result is not differentiable again
    (no third-order use in the field).
    """

    @staticmethod
    def forward(ctx, spec: _Spec, *flat: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        params, buf, lrs, inputs = spec.split(flat)
        trajectory: list[Tensor] = []
        with_buf: list[bool] = []  # whether step i starts with a momentum buffer (not on a fresh first step)
        for i in range(spec.steps):
            trajectory += list(params.values()) + (list(buf.values()) if buf is not None else [])
            with_buf.append(buf is not None)
            params, buf = _one_step(spec.model, params, buf, _step_lr(lrs, i), spec.batch_fn(i, *inputs),
                                    spec.rule, spec.loss_fn, spec.buffers, create_graph=False)
            params = {k: p.detach() for k, p in params.items()}
            buf = None if buf is None else {k: b.detach() for k, b in buf.items()}
        ctx.spec = spec
        ctx.with_buf = with_buf
        ctx.save_for_backward(lrs, *inputs, *trajectory)
        # An output that is also an input (steps == 0) must be returned as a new tensor for autograd.
        return tuple(p.clone() if spec.steps == 0 else p for p in params.values())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        n_p = len(spec.names)
        saved = ctx.saved_tensors
        lrs, inputs, trajectory = saved[0], saved[1 : 1 + spec.n_inputs], saved[1 + spec.n_inputs :]
        n_state = 2 * n_p if spec.has_buf else n_p
        need_p = ctx.needs_input_grad[1 : 1 + n_p]
        need_b = ctx.needs_input_grad[1 + n_p : 1 + n_state]
        need_lr = ctx.needs_input_grad[1 + n_state]
        need_in = ctx.needs_input_grad[2 + n_state :]

        offsets = [0]
        for has in ctx.with_buf:
            offsets.append(offsets[-1] + (2 * n_p if has else n_p))
        modules = list(spec.model.modules())
        caller_modes = [m.training for m in modules]
        for m, mode in zip(modules, spec.modes):
            m.training = mode
        try:
            return _CheckpointedUnroll._walk_back(ctx, spec, grad_out, lrs, inputs, trajectory, offsets,
                                                  need_p, need_b, need_lr, need_in)
        finally:
            for m, mode in zip(modules, caller_modes):
                m.training = mode

    @staticmethod
    def _walk_back(ctx, spec: _Spec, grad_out, lrs, inputs, trajectory, offsets, need_p, need_b, need_lr,
                   need_in) -> tuple[Tensor | None, ...]:
        n_p = len(spec.names)
        # Adjoint of the final state (autograd materialises zeros for outputs the loss does not use); the final
        # buffers are not outputs, so their adjoint is zero (None).
        adj_p: list[Tensor] = list(grad_out)
        adj_b: list[Tensor] | None = None
        grad_lrs = torch.zeros_like(lrs) if need_lr else None
        grad_in: list[Tensor | None] = [torch.zeros_like(t) if need else None for t, need in zip(inputs, need_in)]
        with torch.enable_grad():
            lr_leaf = lrs.detach().requires_grad_(need_lr)
            in_leaves = tuple(t.detach().requires_grad_(bool(need)) for t, need in zip(inputs, need_in))
            extra_leaves = ([lr_leaf] if need_lr else []) + [t for t, need in zip(in_leaves, need_in) if need]
            for i in reversed(range(spec.steps)):
                state = trajectory[offsets[i] : offsets[i + 1]]
                p_i = {k: t.detach().requires_grad_(True) for k, t in zip(spec.names, state[:n_p])}
                b_i = {k: t.detach().requires_grad_(True) for k, t in zip(spec.names, state[n_p:])} \
                    if ctx.with_buf[i] else None
                new_p, new_b = _one_step(spec.model, p_i, b_i, _step_lr(lr_leaf, i), spec.batch_fn(i, *in_leaves),
                                         spec.rule, spec.loss_fn, spec.buffer_copies(), create_graph=True)
                outs, adjs = list(new_p.values()), list(adj_p)
                if adj_b is not None and new_b is not None:
                    outs += list(new_b.values())
                    adjs += adj_b
                wrt = list(p_i.values()) + (list(b_i.values()) if b_i is not None else []) + extra_leaves
                found = torch.autograd.grad(outs, wrt, grad_outputs=adjs, allow_unused=True)
                found = [torch.zeros_like(w) if g is None else g for g, w in zip(found, wrt)]
                adj_p = found[:n_p]
                adj_b = found[n_p : 2 * n_p] if b_i is not None else None
                extra = iter(found[len(wrt) - len(extra_leaves) :])
                if need_lr:
                    grad_lrs = grad_lrs + next(extra)
                for j, need in enumerate(need_in):
                    if need:
                        grad_in[j] = grad_in[j] + next(extra)

        grad_p = [g if need else None for g, need in zip(adj_p, need_p)]
        grad_b = [g if need and adj_b is not None else None
                  for g, need in zip(adj_b if adj_b is not None else [None] * n_p, need_b)] if spec.has_buf else []
        return (None, *grad_p, *grad_b, grad_lrs, *grad_in)
