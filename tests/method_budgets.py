"""Cheap configurations of every registered method, for the registry-parametrised contract tests.

``tests/test_contract.py`` runs each method in ``ddkit.methods.METHODS`` through exact resume, a state-dict round
trip and "learns on digits" (its IPC-1 set beats random real images of the same IPC under the same seeded
evaluation).  A method without an entry here fails ``test_every_method_has_a_budget``, so a new method is tested
the moment it is registered.

Each entry says how to run the method in seconds on 2 cores: the iteration count, config overrides, and an
optional ``prepare(tmp_dir, real) -> extra options`` hook for what the method needs beyond the data (e.g. a few
tiny expert trajectories).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class MethodBudget:
    #: iterations of the "learns" run (the resume tests use min(iterations, 3))
    iterations: int
    #: method config overrides (``method.<field>``) for every contract run
    options: dict[str, Any] = field(default_factory=dict)
    #: extra overrides for the resume / round-trip runs only (e.g. smaller inner loops)
    quick_options: dict[str, Any] = field(default_factory=dict)
    #: builds what the method needs beyond the data; returns extra options (``{"experts": path}``)
    prepare: Callable[[Path, Any], dict[str, Any]] | None = None
    #: a coreset selector: it picks real images, so it is only held to not losing against random ones
    selects_only: bool = False
    #: the margin (accuracy points) by which the set must beat random real images of the same IPC
    margin: float = 1.0


#: expert stores of the trajectory-matching budgets, trained once per test process (keyed by optimizer, dataset)
_EXPERT_STORES: dict[tuple[str, str], Path] = {}


def trajectory_experts(optimizer: str) -> Callable[[Path, Any], dict[str, Any]]:
    """``prepare`` hook of mtt/ddpp (``"sgd"``) and ftd (``"gsam"``): 3 ConvNet-W32 experts x 5 epochs on the
    data, lr 0.05 (0.01 learns too little in 5 epochs on digits), trained once per process (about 10 s, twice that
    with GSAM) in the first caller's tmp folder."""

    def prepare(tmp_path: Path, real: Any) -> dict[str, Any]:
        from ddkit.experts import ExpertConfig, train_experts

        key = (optimizer, real.name)
        if key not in _EXPERT_STORES:
            config = ExpertConfig(model="convnet_w32", epochs=5, lr=0.05, optimizer=optimizer, test_every_epoch=False)
            _EXPERT_STORES[key] = train_experts(real, config, Path(tmp_path) / f"experts-{optimizer}", 3, seed=0).root
        return {"experts": str(_EXPERT_STORES[key])}

    return prepare


#: the student settings those experts support (the official lr_img 100-1000 and 20-50 steps are for CIFAR-size runs)
_TM = {"model": "convnet_w32", "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 3, "lr_img": 100.0,
       "lr_teacher": 0.05}


BUDGETS: dict[str, MethodBudget] = {
    # trajectory matching on a shared store of 3 tiny experts: 60-80 iterations of 10 student steps beat random
    # real images by about 10 points (digits IPC 1, 3 seeds each); FTD's image average with decay 0.9 (the paper's
    # 0.999-0.9999 are for 5000 iterations)
    "mtt": MethodBudget(iterations=60, options=_TM, quick_options={"syn_steps": 3}, prepare=trajectory_experts("sgd")),
    "ddpp": MethodBudget(iterations=60, options=_TM, quick_options={"syn_steps": 3}, prepare=trajectory_experts("sgd")),
    "ftd": MethodBudget(iterations=80, options={**_TM, "ema_decay": 0.9}, quick_options={"syn_steps": 3},
                        prepare=trajectory_experts("gsam")),
    "random": MethodBudget(iterations=0, selects_only=True, margin=-100.0),
    "herding": MethodBudget(iterations=0, options={"feature_epochs": 0}, selects_only=True, margin=-100.0),
    "kcenter": MethodBudget(iterations=0, options={"feature_epochs": 0}, selects_only=True, margin=-100.0),
    "dm": MethodBudget(iterations=30, options={"batch_real": 64}),
    # DC from the random real images it must beat (its official noise start reaches ~real-image accuracy only after
    # hundreds of iterations; tests/test_dc.py checks that 20 iterations leave noise far behind)
    "dc": MethodBudget(iterations=30, options={"model": "convnet_w32", "batch_real": 64, "init": "real"}),
    "dsa": MethodBudget(iterations=30, options={"model": "convnet_w32", "batch_real": 64}),
    "cafe": MethodBudget(iterations=1, options={"batch_real": 64, "watch_per_class": 16, "max_updates": 5,
                                                 "max_inner_epochs": 5},
                         quick_options={"model": "convnet_w32", "max_updates": 2, "max_inner_epochs": 2}),
    # FC-1 NTK (the default kernel); digits has ~135 training images per class, so 1000 is nearly all of them
    "kip": MethodBudget(iterations=20, options={"target_batch": 1000}),
    # DD: an MLP inner network (LeNet on 8x8 digits learns too slowly for seconds), starting from the random real
    # images it must beat (the official noise start needs hundreds of iterations: tests/test_dd.py shows that)
    "dd": MethodBudget(iterations=100, options={"model": "mlp", "init": "real", "batch_real": 256},
                       quick_options={"distill_epochs": 1}),
    # FRePo: a real batch of 128 (official 1024) and LAMB lr 0.03 (official 3e-4, tuned for 500k steps): 30
    # iterations reached 74.9 / 76.6 % (seeds 0 / 1) against random real images' 67.2 % (this file's protocol)
    "frepo": MethodBudget(iterations=30, options={"batch_real": 128, "lr_img": 0.03},
                          quick_options={"model": "convnet_w32", "num_models": 3, "max_online_updates": 2,
                                         "batch_real": 64}),
}
