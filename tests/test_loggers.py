"""Optional loggers (ddkit/engine/loggers.py): TensorBoard and W&B mirror metrics.jsonl and are never required.

The suite never depends on an extra: the loggers are tested with a fake writer and a fake ``wandb`` module, and
against the real TensorBoard only where it is installed (skipped elsewhere).
"""
from __future__ import annotations

import json
import sys
import types

import pytest

from ddkit.cli import main
from ddkit.engine.loggers import TensorBoardLogger, check_loggers, parse_loggers, scalars
from ddkit.errors import ConfigError

FLAGS = ["--method", "dm", "--dataset", "digits", "--ipc", "1", "--no-progress", "--device", "cpu",
         "--set", "speed=plain", "--set", "method.batch_real=16"]


class FakeWriter:
    """``SummaryWriter``'s calls, recorded."""

    made: list["FakeWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, global_step, value))

    def flush(self) -> None: ...

    def close(self) -> None:
        self.closed = True


def test_names_are_parsed_and_unknown_ones_refused():
    assert parse_loggers("") == [] and parse_loggers(None) == []
    assert parse_loggers(" TensorBoard , wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'.*tensorboard, wandb"):
        parse_loggers("tensorboard,mlflow")


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    with pytest.raises(ConfigError, match=r"engine.loggers=wandb needs the wandb package.*pip install 'ddkit\[wandb\]'"):
        check_loggers("wandb")


def test_cli_refuses_a_missing_logger_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    assert main(["distill", *FLAGS, "--iterations", "1", "--out", str(out), "--set", "engine.loggers=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ddkit[tensorboard]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    assert main(["distill", *FLAGS, "--iterations", "1", "--out", str(out), "--set", "engine.loggers=tb"]) == 2
    assert "unknown logger 'tb'" in capsys.readouterr().err


def test_scalars_keep_finite_numbers_and_name_the_evaluated_model():
    assert scalars({"it": 3, "loss": 1.5, "lr_clamped": 0.0, "flag": True, "bad": float("nan"), "s": "x"}) == \
        {"loss": 1.5, "lr_clamped": 0.0}
    assert scalars({"it": 4, "eval_model": "convnet", "eval_acc": 80.0, "eval_std": 1.0}) == \
        {"eval_acc/convnet": 80.0, "eval_std/convnet": 1.0}


def test_tensorboard_logger_mirrors_metrics_and_purges_after_a_resume(digits, tmp_path, one_thread):
    import ddkit
    from ddkit.engine.callbacks import MetricsLogger

    FakeWriter.made.clear()
    out = tmp_path / "run"

    def run(iterations: int, resume: bool) -> None:
        ddkit.distill(digits, "dm", ipc=1, iterations=iterations, seed=0, device="cpu", out_dir=out,
                      checkpoint_every=1, resume=resume, speed="plain", batch_real=16,
                      callbacks=[MetricsLogger(out / "metrics.jsonl"),
                                 TensorBoardLogger(out / "tensorboard", writer_factory=FakeWriter)])

    run(2, False)
    run(3, True)
    first, second = FakeWriter.made
    assert (first.purge_step, second.purge_step) == (1, 3) and first.closed and second.closed
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mirrored = sorted((step, value) for w in (first, second) for tag, step, value in w.scalars if tag == "loss")
    assert mirrored == [(r["it"], r["loss"]) for r in logged]


def test_wandb_logger_runs_offline_with_the_run_config(monkeypatch, tmp_path, one_thread):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    assert main(["distill", *FLAGS, "--iterations", "2", "--out", str(out), "--set", "engine.loggers=wandb",
                 "--set", "engine.eval_every=1", "--set", "engine.eval_runs=1", "--set", "engine.eval_epochs=2"]) == 0
    (kwargs,) = calls["init"]
    assert kwargs["mode"] == "offline" and kwargs["dir"] == str(out) and kwargs["config"]["method"] == "dm"
    assert kwargs["config"]["method_options"]["batch_real"] == 16
    assert [step for step, v in calls["log"] if "loss" in v] == [1, 2]
    assert [step for step, v in calls["log"] if "eval_acc/convnet" in v] == [1, 2]  # periodic evaluation too
    assert calls["finish"] == [True]


def test_real_tensorboard_event_files(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["distill", *FLAGS, "--iterations", "3", "--out", str(out), "--set", "engine.loggers=tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
