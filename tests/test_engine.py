"""The one loop: exact resume, seed determinism, NaN guard, atomic checkpoints, callbacks."""
from dataclasses import dataclass

import pytest
import torch

from ddkit.engine import MetricsLogger, distill, make_generator
from ddkit.engine.seeding import seeded_global
from ddkit.errors import DivergenceError
from ddkit.methods.base import DistillConfig, Distiller
from ddkit.synthetic import SyntheticSet


@dataclass
class ToyConfig(DistillConfig):
    lr_img: float = 0.05
    explode_at: int = 0


class ToyDistiller(Distiller):
    """Pulls each synthetic image towards a random real image of its class (uses the generator and momentum)."""

    name = "toy"
    Config = ToyConfig

    def loss(self, it, real, syn, generator):
        loss = 0.0
        for c in range(real.num_classes):
            target = self.real_batch(real, c, 4, generator).mean(0, keepdim=True)
            loss = loss + ((syn.images[syn.class_slice(c)] - target) ** 2).mean()
        if self.config.explode_at and it >= self.config.explode_at:
            loss = loss * float("nan")
        return loss, {}


def fresh(real, seed=0):
    return SyntheticSet.from_real(real, 2, make_generator(seed, "init"), init="noise")


def test_resume_is_exact(tiny_real, tmp_path):
    full = distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=6, seed=1)
    part_dir = tmp_path / "run"
    distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=3, seed=1, checkpoint_dir=part_dir,
            checkpoint_every=3)
    resumed = distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=6, seed=1, checkpoint_dir=part_dir,
                      resume=True)
    assert torch.equal(full.images, resumed.images)


def test_seed_changes_result(tiny_real):
    a = distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=3, seed=1)
    b = distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=3, seed=2)
    assert not torch.equal(a.images, b.images)


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_real, tmp_path):
    from ddkit.engine.checkpoint import load_checkpoint

    with pytest.raises(DivergenceError, match="iteration 3.*iteration 2"):
        distill(ToyDistiller(ToyConfig(explode_at=3)), tiny_real, fresh(tiny_real), iterations=5, seed=0,
                checkpoint_dir=tmp_path, checkpoint_every=1)
    state = load_checkpoint(tmp_path)
    assert state["iteration"] == 2
    assert torch.isfinite(state["syn"]["images"]).all()
    assert not list(tmp_path.glob("*.tmp"))


def test_metrics_log_is_cut_back_on_resume(tiny_real, tmp_path):
    import json

    log = tmp_path / "metrics.jsonl"
    distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=4, seed=0, checkpoint_dir=tmp_path,
            checkpoint_every=2, callbacks=[MetricsLogger(log)])
    # pretend the run died after iteration 2's checkpoint but had logged iteration 3 and 4
    from ddkit.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
    distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=2, seed=0, checkpoint_dir=tmp_path,
            checkpoint_every=2)
    distill(ToyDistiller(), tiny_real, fresh(tiny_real), iterations=4, seed=0, checkpoint_dir=tmp_path,
            resume=True, callbacks=[MetricsLogger(log)])
    its = [json.loads(line)["it"] for line in log.read_text().splitlines()]
    assert its == [1, 2, 3, 4]


def test_seeded_global_does_not_touch_global_rng():
    before = torch.get_rng_state()
    with seeded_global(make_generator(0)):
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())
