"""GSAM, the sharpness-aware optimiser FTD trains its expert trajectories with.

FTD (Du et al., CVPR 2023, "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation") trains
experts with GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization") so that the
trajectories are flat, which is what makes the synthetic set's accumulated trajectory error small
(anchors.md section 2.6; ``AngusDujw/FTD-distillation``, ``buffer/buffer_FTD.py`` and ``buffer/gsam/gsam.py``,
read for facts).  One update on a batch:

1. ``g = grad L(w)`` (the caller's ``loss.backward()``);
2. ascend to ``w + e`` with ``e = rho * g / ||g||``, or with FTD's ``adaptive=True`` (ASAM-style, scale-invariant)
   ``e = rho * w^2 * g / || |w| * g ||``;
3. ``h = grad L(w + e)`` on the *same* (already augmented) batch;
4. remove from ``h`` ``alpha`` times the part of ``g`` orthogonal to ``h``:
   ``d = h - alpha * (g - <g, h>/||h||^2 * h)`` (GSAM's surrogate-gap descent);
5. return to ``w`` and let the base SGD step along ``d`` (momentum and weight decay as ``torch.optim.SGD``).

FTD's settings: rho 0.01 (``run_buffer.sh``: ``--rho_max=0.01 --rho_min=0.01``, i.e. constant), ``adaptive=True``
(argparse default), alpha = 1 (paper section 4.1, "rho = 0.01, alpha = 1 as the default"; Table 7 lists 0.3 for
CIFAR-10 at IPC 1 and 10; the script's argparse default, which ``run_buffer.sh`` does not override, is 0.4).

Interface.  ``ddkit.evaluation.train.train_model`` (the one training loop) calls ``loss.backward()`` and then
``optimizer.step()`` without a closure, so the second gradient (step 3) comes from a closure registered for the
current batch with :meth:`GSAM.set_closure` before ``step`` runs (the expert trainer does this in the batch hook
it gives ``train_model``).  ``step(closure)`` works as well.  Only a constant rho is implemented (FTD uses a
constant one); the scheduled rho of the GSAM paper is not.  Batch-norm running statistics are updated by both
passes (FTD's code freezes them in the second); the field's ConvNet uses instance norm and has none.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from ..errors import ConfigError

#: FTD ``run_buffer.sh`` (anchors.md 2.6)
DEFAULT_RHO = 0.01
#: FTD paper section 4.1 default
DEFAULT_ALPHA = 1.0


class GSAM(torch.optim.Optimizer):
    """SGD whose gradient is replaced by GSAM's direction (see the module docstring).

    ``closure()`` must recompute the loss of the current batch at the current weights and return it (not
    backpropagated); :meth:`step` differentiates it.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 rho: float = DEFAULT_RHO, alpha: float = DEFAULT_ALPHA, adaptive: bool = True,
                 eps: float = 1e-12) -> None:
        if rho < 0 or alpha < 0 or lr < 0:
            raise ConfigError(f"GSAM: lr, rho and alpha must be >= 0 (got lr={lr}, rho={rho}, alpha={alpha})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.base = torch.optim.SGD(self.param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.adaptive = bool(adaptive)
        self.eps = float(eps)
        self._closure: Callable[[], Tensor] | None = None

    def set_closure(self, closure: Callable[[], Tensor]) -> None:
        """Register how to recompute the current batch's loss (used by the next :meth:`step`)."""
        self._closure = closure

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        closure = closure or self._closure
        if closure is None:
            raise RuntimeError("GSAM.step needs the batch's loss closure (set_closure or step(closure))")
        self._closure = None
        params = self._params()
        if not params:
            return
        g = [p.grad.detach().clone() for p in params]
        # 2. ascent
        scaled = [p.abs() * gi for p, gi in zip(params, g)] if self.adaptive else g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = self.rho / (norm + self.eps)
        e = [gi * scale * (p * p if self.adaptive else 1.0) for p, gi in zip(params, g)]
        for p, ei in zip(params, e):
            p.add_(ei)
        # 3. gradient at the perturbed weights, same batch
        for p in params:
            p.grad = None
        with torch.enable_grad():
            closure().backward()
        h = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        # 4. d = h - alpha * (g - <g,h>/||h||^2 h)
        inner = sum((gi * hi).sum() for gi, hi in zip(g, h))
        h_norm2 = sum((hi * hi).sum() for hi in h)
        coef = inner / (h_norm2 + self.eps)
        for p, gi, hi in zip(params, g, h):
            p.grad = hi - self.alpha * (gi - coef * hi)
        # 5. back to w, base step
        for p, ei in zip(params, e):
            p.sub_(ei)
        self.base.step()

    def state_dict(self):  # the base optimizer holds the momentum buffers
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)
