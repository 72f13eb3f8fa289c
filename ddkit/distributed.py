"""Scale-out on ``torch.distributed``: ``torchrun --nproc_per_node=P -m ddkit COMMAND ...``.

torchrun starts P copies of the command and tells each, through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), who it is.  :func:`session` joins the process group from that
environment (gloo for CPU tensors, NCCL for CUDA tensors when a GPU is present) and leaves it at the end; the
commands then ask the helpers below what this process should do:

- :func:`shard` / :func:`owned` split work (evaluation runs, experts, classes) by ``index % world == rank``, so
  work item ``i`` is the same whichever process count trains it, and every item is seeded by its index, not by
  the rank (``make_generator(seed, "eval", model, run)``, ``make_generator(seed, "expert", index)``);
- :func:`is_main` guards the files only one process may write (reports, checkpoints, synthetic sets);
- :func:`all_gather_objects`, :func:`broadcast_object`, :func:`all_reduce_sum_`, :func:`barrier` move results;
  :func:`sum_gradients_` sums the gradients of a method whose iteration is split over ranks (DM and DC/DSA:
  classes; MTT/FTD/DDPP: trajectory segments) and :func:`broadcast_` keeps state the ranks compute alike
  identical.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here calls ``torch.distributed``: every helper answers for a
world of one process at once, so the single-process path keeps its speed and needs no process group.

The process group is torch's own process-wide state; ddkit keeps none of its own.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, DDKitError

T = TypeVar("T")

#: torchrun's variables; all must be present for a multi-process run
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes artifacts, checkpoints, logs and reports."""
    return rank() == 0


def owned(index: int, *, world: int | None = None, rank_: int | None = None) -> bool:
    """Whether this process handles work item ``index`` (items are dealt round-robin: ``index % world == rank``)."""
    w = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    return index % w == r


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (round-robin; all of them in a world of one)."""
    return list(items[rank()::world_size()])


def class_shard(num_classes: int) -> list[int] | None:
    """The classes this process handles under torchrun (``class % world == rank``); None in a world of one, where
    a method takes its unsharded path unchanged."""
    return shard(range(num_classes)) if active() else None


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (JSON-like objects; pickled by torch between our own
    processes only, never read from user files)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensors: Sequence[Tensor | None]) -> None:
    """Sum ``tensors`` over ranks in place (one flat all-reduce, not one per tensor); ``None`` entries skipped."""
    if not active():
        return
    present = [t for t in tensors if t is not None]
    if not present:
        return
    flat = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in present:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def sum_gradients_(params: Sequence[Tensor], loss: float) -> float:
    """Sum the ``.grad`` of ``params`` and the number ``loss`` over ranks, in place, in one all-reduce.

    For methods that split one iteration's terms over ranks (classes, trajectory segments): each rank
    back-propagated its own terms, so the sum of the ranks' gradients is the gradient of the whole objective and
    every rank then takes the same optimizer step.  A parameter that got no gradient on this rank (it owns no
    term) contributes zeros.  Returns the summed loss; in a world of one it returns ``loss`` and does nothing.
    """
    if not active():
        return loss
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    box = torch.tensor([loss], dtype=grads[0].dtype if grads else torch.float64,
                       device=grads[0].device if grads else None)
    all_reduce_sum_([*grads, box])
    return float(box.item())


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (one flat broadcast).

    Keeps state that every rank computes alike (a network trained on the shared synthetic set) identical even
    where kernels are not bitwise deterministic (cuDNN); on CPU it changes nothing.
    """
    if not active() or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def check_in_step(tensors: dict[str, Tensor], where: str) -> None:
    """Raise on every rank if the ranks hold different ``tensors`` (compared by SHA-256 of their bytes).

    Every rank of a distillation must hold the same synthetic set and random-stream state, since rank 0's
    checkpoint is what all of them resume from; a difference means a method drew or updated out of step, which
    would otherwise pass silently.  The digests are gathered, so all ranks reach the same verdict and none waits.
    """
    if not active():
        return
    mine = {k: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            .hexdigest() for k, t in tensors.items()}
    everyone = all_gather_objects(mine)
    differ = [k for k in mine if any(d.get(k) != mine[k] for d in everyone)]
    if differ:
        raise DDKitError(f"{where}: the torchrun ranks hold different {', '.join(differ)}; every rank must take "
                         "the same step (a method that draws or updates out of step across ranks is a bug)")


def all_reduce_sum(value: float) -> float:
    """The sum of a Python number over ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # pure NCCL groups reduce CUDA tensors only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result (or its user error) to every rank.

    For steps that read or write a shared file once (opening an evaluation log): a :class:`DDKitError` raised on
    rank 0 is raised on every rank, so no rank waits forever in a later collective for a rank that gave up.
    """
    if not active():
        return fn()
    result: Any = None
    error: tuple[type, str] | None = None
    if is_main():
        try:
            result = fn()
        except DDKitError as exc:
            error = (type(exc), str(exc))
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error[0](error[1])
    return result


def env_world_size(environ: dict[str, str] | None = None) -> int:
    """The world size torchrun announced (1 when started without torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be a whole number, got {env.get('WORLD_SIZE')!r}") from None


def backend_for(cuda: bool) -> str:
    """gloo for CPU tensors; with a GPU, NCCL for CUDA tensors beside gloo for CPU ones (object gathers,
    ``--device cpu`` runs on a GPU machine)."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun described in the environment; False (and nothing done) without one.

    With CUDA each process takes the GPU ``LOCAL_RANK`` (``torch.device("cuda")`` then means that GPU).
    """
    world = env_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start multi-process runs with "
                          f"torchrun --nproc_per_node=P -m ddkit ...")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run with one process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend_for(cuda), timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The process group for the duration of one command (nothing at all without torchrun)."""
    started = init_from_env()
    try:
        yield
        if started:
            # leave together: rank 0 still writes the run folder while the others are done, and one resumed
            # 2-rank DM run here (of about 20 launches) aborted in a rank that tore its gloo group down meanwhile
            # (SIGABRT, "terminate called without an active exception"); after an error torchrun stops the others
            barrier()
    finally:
        if started:
            shutdown()
