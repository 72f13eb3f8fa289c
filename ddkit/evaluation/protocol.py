"""The field's evaluation protocol: fresh models trained on the synthetic set, tested on the real test split.

Defaults follow ``evaluate_synset`` of the DC/DSA/DM/MTT code (anchors.md §2.13): SGD momentum 0.9, weight decay
5e-4, lr 0.01 (or the set's learned lr), x0.1 at half, batch 256, 1000 epochs, DSA during training.
The final model is reported; nothing is selected on the test set.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..augment import DSA
from ..data.realdata import RealData
from ..engine.seeding import make_generator, seeded_global
from ..errors import DataError
from ..validate import check_protocol as check_protocol_values
from .compat import check_set_matches
from ..functional.compiled import forward_of, resolve_compile, train_chunk
from ..models import create_model
from .report import Report, Row
from .train import accuracy, train_model


@dataclass
class EvalProtocol:
    models: tuple[str, ...] = ("convnet",)
    runs: int = 5
    epochs: int = 1000
    lr: float = 0.01
    use_learned_lr: bool = True  # MTT/FTD evaluate with the distilled step size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str | None = None  # None: the dataset's strategy
    soft_label_loss: str = "soft_ce"
    channels_last: bool = False  # a CPU/GPU speed lever; measured in benchmarks/bench_eval_cost.py
    #: torch.compile the model's forward: "auto" (on for CPU float32 evaluations of at least
    #: COMPILE_MIN_PIXEL_STEPS per model, where the ~20 s compile pays off), "on" or "off"
    compile: str = "auto"
    model_overrides: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        return d


#: "auto" compiles when one model's training touches at least this many pixels (epochs x images x H x W):
#: Fashion-MNIST IPC 10 at 300 epochs is 2.4e7 (compiled: 1.5x faster steps, measured in bench_eval_cost.py);
#: the digits runs of the tests and the main job stay eager, where the compile time would dominate.
COMPILE_MIN_PIXEL_STEPS = 1.5e7


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dataset_strategy(name: str) -> str:
    from ..data import get_dataset_spec

    return get_dataset_spec(name).dsa_strategy


def train_and_test(
    model_name: str,
    images: Tensor,
    labels: Tensor,
    real: RealData,
    protocol: EvalProtocol,
    generator: torch.Generator,
    lr: float,
    device: torch.device,
) -> float:
    """Train one fresh model on ``(images, labels)`` and return its real test accuracy (percent)."""
    with seeded_global(generator):
        model = create_model(
            model_name,
            channels=real.channels,
            num_classes=real.num_classes,
            image_size=real.image_size,
            **protocol.model_overrides,
        ).to(device)
    if protocol.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    pixel_steps = protocol.epochs * images.shape[0] * images.shape[-1] * images.shape[-2]
    compiled = resolve_compile(protocol.compile, device, images.dtype, pixel_steps >= COMPILE_MIN_PIXEL_STEPS)
    # CPU: cache-sized chunks of each batch (the same SGD step for models without batch norm; forward_of)
    forward = forward_of(model, compiled, train_chunk(tuple(images.shape), device, compiled))
    augment: Callable | None = None
    if protocol.dsa:
        aug = DSA.from_strategy(protocol.dsa_strategy or dataset_strategy(real.name))
        augment = None if aug.is_identity else aug
    train_model(
        model,
        images.to(device),
        labels.to(device),
        epochs=protocol.epochs,
        lr=lr,
        generator=generator,
        momentum=protocol.momentum,
        weight_decay=protocol.weight_decay,
        batch_size=protocol.batch_size,
        augment=augment,
        soft_loss=protocol.soft_label_loss,
        forward=forward,
    )
    # the test pass stays eager: its eval-mode graph and its last short batch would cost two more compiles
    return accuracy(model, real.test_images.to(device), real.test_labels.to(device))


def evaluate_tensors(
    images: Tensor,
    labels: Tensor,
    real: RealData,
    protocol: EvalProtocol,
    *,
    seed: int = 0,
    lr: float | None = None,
    method: str = "?",
    ipc: int = 0,
    device: str | torch.device = "cpu",
    on_row: Callable[[Row], None] | None = None,
    done: Sequence[Row] = (),
) -> Report:
    """Evaluate any image/label tensors (a synthetic set, a coreset, or the whole training set).

    ``done`` holds rows of an interrupted evaluation (``ddkit evaluate --resume``): their (model, run) pairs are
    reported as they are and not trained again.
    """
    check_protocol_values(protocol)  # validate.py: runs, epochs, lr, batch size, models (same rules as the CLI)
    if len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels to evaluate")
    if len(labels) and not labels.is_floating_point() and int(labels.max()) >= real.num_classes:
        raise DataError(f"labels reach class {int(labels.max())} but {real.name!r} has {real.num_classes} classes")
    device = torch.device(device)
    report = Report(protocol=protocol.to_json())
    use_lr = protocol.lr if lr is None else lr
    report.protocol["lr_used"] = use_lr
    finished = {(r.model, int(r.run)): r for r in done}
    for model_name in protocol.models:
        for run in range(protocol.runs):
            if (model_name, run) in finished:
                report.add(finished[(model_name, run)])
                continue
            gen = make_generator(seed, "eval", model_name, run)
            start = time.perf_counter()
            acc = train_and_test(model_name, images, labels, real, protocol, gen, use_lr, device)
            row = Row(method, real.name, ipc, model_name, run, seed, acc, time.perf_counter() - start, peak_rss_mib())
            report.add(row)
            if on_row is not None:
                on_row(row)
    return report


def evaluate(syn, real: RealData, protocol: EvalProtocol | None = None, *, seed: int = 0,
             device: str | torch.device = "cpu", on_row: Callable[[Row], None] | None = None,
             done: Sequence[Row] = ()) -> Report:
    """Evaluate a :class:`~ddkit.synthetic.SyntheticSet` under ``protocol`` (default: the field's protocol).

    The set's preprocessing must match the real data's (same normalisation / same ZCA), which
    :func:`ddkit.api.load_real_for` guarantees when the set is loaded from disk; a set made from other data
    (another dataset, class count, class names, image shape or encoding) is refused before any training.
    """
    check_set_matches(syn, real)
    protocol = protocol or EvalProtocol()
    lr = syn.learned_lr if (protocol.use_learned_lr and syn.learned_lr is not None) else protocol.lr
    return evaluate_tensors(
        syn.images.detach(),
        syn.labels.detach(),
        real,
        protocol,
        seed=seed,
        lr=lr,
        method=str(syn.meta.get("method", "?")),
        ipc=syn.ipc,
        device=device,
        on_row=on_row,
        done=done,
    )
