"""The one distillation loop.

It owns seeding (named generator streams), the device, resume, checkpoints and the NaN guard; methods only
implement ``setup``/``step``.  Checkpoints are written atomically every ``checkpoint_every`` iterations, and a
resumed run continues exactly (same result as an uninterrupted run with the same seed, on CPU).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from .. import distributed
from ..errors import DivergenceError
from .callbacks import Callback, RunState, is_finite
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, restore, save_checkpoint
from .seeding import make_generator


def distill(
    distiller,
    real,
    syn,
    *,
    iterations: int,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    run_record: dict | None = None,
):
    """Run ``iterations`` steps of ``distiller`` on ``syn`` (modified in place and returned).

    ``run_record`` (the run's resolved settings, :mod:`ddkit.engine.runfolder`) is stored in every checkpoint;
    comparing it with a resumed run's settings is the caller's job (``ddkit.api.distill`` does it before setup).
    After every step the synthetic tensors are checked finite, so the last step cannot leave a NaN set behind.
    """
    device = distiller.device
    syn.to(device)
    real = real.to(device)
    generator = make_generator(seed, "distill")
    # the speed layer decides what pays off for a run of this length (compilation); methods never size that
    distiller.speed.plan_run(iterations)
    distiller.setup(real, syn, generator)
    start_it = 0
    if resume:
        state = load_checkpoint(checkpoint_dir)
        start_it = restore(state, syn=syn, distiller=distiller, generator=generator)
    if distiller.selects_only:
        iterations = 0
    # under torchrun (ddkit/distributed.py) every rank runs the loop on the same set with the same generator (the
    # sharding methods all-reduce their gradients, so the ranks stay identical); rank 0 alone runs the callbacks
    # (logs, loggers, grids, run-folder files; periodic evaluation runs on all ranks, which share its runs) and
    # writes checkpoints, after every rank has set up and read any checkpoint it resumes from
    main = distributed.is_main()
    if not main:
        callbacks = [cb for cb in callbacks if getattr(cb, "all_ranks", False)]
    distributed.barrier()
    run = RunState(start_it, iterations, start_it, {}, syn, real, seed, 0.0, distiller.name,
                   Path(checkpoint_dir) if checkpoint_dir else None)
    for cb in callbacks:
        cb.on_start(run)
    t0 = time.perf_counter()
    last_good = start_it
    for it in range(start_it + 1, iterations + 1):
        t_it = time.perf_counter()
        metrics = distiller.step(it, real, syn, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics["seconds"] = time.perf_counter() - t_it
        bad = [k for k, v in metrics.items() if k.startswith("loss") and not is_finite(v)]
        if bad:
            where = f"; the last good checkpoint (iteration {last_good}) is kept in {checkpoint_dir}" \
                if checkpoint_dir and (Path(checkpoint_dir) / CHECKPOINT_FILE).exists() else ""
            raise DivergenceError(
                f"{distiller.name}: {bad[0]} became {metrics[bad[0]]} at iteration {it}{where}; "
                f"lower the image learning rate (e.g. --set method.lr_img=...)"
            )
        nonfinite = syn.nonfinite()
        if nonfinite:
            where = f"; the last good checkpoint (iteration {last_good}) is kept in {checkpoint_dir}" \
                if checkpoint_dir and (Path(checkpoint_dir) / CHECKPOINT_FILE).exists() else ""
            raise DivergenceError(
                f"{distiller.name}: the synthetic {nonfinite[0]} became non-finite (NaN/Inf) at iteration {it}"
                f"{where}; lower the image learning rate (e.g. --set method.lr_img=...)"
            )
        run.iteration, run.metrics, run.elapsed = it, metrics, time.perf_counter() - t0
        for cb in callbacks:
            cb.on_iteration_end(run)
        if checkpoint_dir is not None and checkpoint_every > 0 and it % checkpoint_every == 0:
            if distributed.active():  # every rank resumes from rank 0's checkpoint: they must agree
                distributed.check_in_step(in_step_state(syn, generator), f"iteration {it}")
            if main:
                save_checkpoint(checkpoint_dir, iteration=it, syn=syn, distiller=distiller, generator=generator,
                                run_record=run_record)
            last_good = it
    run.elapsed = time.perf_counter() - t0
    for cb in reversed(callbacks):  # last started, first ended: the final evaluation still finds the logs open
        cb.on_end(run)
    if distributed.active() and checkpoint_dir is not None and iterations > start_it:
        distributed.check_in_step(in_step_state(syn, generator), f"iteration {iterations}")
    if main and checkpoint_dir is not None and iterations > start_it:
        save_checkpoint(checkpoint_dir, iteration=iterations, syn=syn, distiller=distiller, generator=generator,
                        run_record=run_record)
    return syn


def in_step_state(syn, generator: torch.Generator) -> dict:
    """What every torchrun rank must hold alike at a checkpoint: the synthetic tensors and the random stream."""
    return {**{k: v for k, v in syn.tensors().items() if not k.startswith("preprocess")},
            "generator state": generator.get_state()}
