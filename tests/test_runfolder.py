"""Run folders as a trustworthy record (issue 14): resume compares settings, no silent reuse, one process at a time,
nothing non-finite saved, checksums verified, evaluate checks its data, one-line errors for bad paths and values.

Everything runs on digits with 1-3 iterations of a narrow DM (about a second per run on one core).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from ddkit.cli import main, run_command
from ddkit.engine.runfolder import LOCK_FILE, RunFolder, check_resume, compare_records, run_record
from ddkit.errors import ArtifactError, ConfigError, DataError, DivergenceError, RunFolderError
from ddkit.synthetic import SyntheticSet

FAST_DM = ["--method", "dm", "--dataset", "digits", "--ipc", "1", "--no-progress",
           "--set", "method.model=convnet_w32", "--set", "method.batch_real=16"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, status=2):
    assert code == status, err
    lines = [line for line in err.strip().splitlines() if line.strip() and ": warning:" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-iteration DM run (checkpoint at its end), copied fresh for each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in ["distill", *FAST_DM, "--iterations", "2", "--out", out]]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# resume: the checkpoint's run record against the settings given now
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,named", [
    (["--ipc", "2"], r"\bipc 1 in the checkpoint, 2 now"),
    (["--seed", "3"], r"\bseed 0 in the checkpoint, 3 now"),
    (["--method", "dc"], r"method 'dm' in the checkpoint, 'dc' now"),
    (["--set", "method.lr_img=0.5"], r"method\.lr_img 1\.0 in the checkpoint, 0\.5 now"),
    (["--set", "method.batch_real=8"], r"method\.batch_real 16 in the checkpoint, 8 now"),
    (["--set", "method.model=convnet_w64"], r"method\.model 'convnet_w32' in the checkpoint, 'convnet_w64' now"),
    (["--set", "method.dsa_strategy=color"], r"method\.dsa_strategy null in the checkpoint, 'color' now"),
    (["--set", "data.zca=true"], r"data\.zca false in the checkpoint, true now"),
    (["--set", "data.image_size=16"], r"data\.image_size null in the checkpoint, 16 now"),
    (["--iterations", "1"], r"iterations 2 in the checkpoint .* 1 now: --resume may only keep or extend"),
])
def test_resume_with_other_settings_is_refused_naming_the_field(run_dir, change, named, capsys):
    before = snapshot(run_dir)
    argv = ["distill", *FAST_DM, "--iterations", "2", "--out", run_dir, "--resume"]
    for i in range(0, len(change), 2):  # replace a flag given in FAST_DM, else append the change
        if change[i] in argv and change[i] != "--set":
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    code, _, err = run(argv, capsys)
    line = one_line_error(code, err)
    assert "--resume refused" in line and re.search(named, line), line
    assert snapshot(run_dir) == before  # nothing written, the finished run intact
    assert not (run_dir / LOCK_FILE).exists()


def test_resume_names_every_difference_at_once(run_dir, capsys):
    code, _, err = run(["distill", *FAST_DM, "--iterations", "2", "--out", run_dir, "--resume", "--seed", "5",
                        "--set", "method.lr_img=2"], capsys)
    line = one_line_error(code, err)
    assert "seed 0 in the checkpoint, 5 now" in line and "method.lr_img 1.0 in the checkpoint, 2.0 now" in line


def test_resume_may_extend_the_iterations_and_says_so(run_dir, tmp_path, capsys):
    code, _, err = run(["distill", *FAST_DM, "--iterations", "3", "--out", run_dir, "--resume"], capsys)
    assert code == 0, err
    assert re.search(r"note: .*extending the run from 2 to 3 iterations", err), err
    meta = json.loads((run_dir / "synset.json").read_text())
    assert meta["iterations"] == 3 and meta["extended_from"] == [2]
    # DM's steps do not depend on the planned length: the extended set equals an uninterrupted 3-iteration run
    straight = tmp_path / "straight"
    assert run(["distill", *FAST_DM, "--iterations", "3", "--out", straight], capsys)[0] == 0
    assert torch.equal(SyntheticSet.load(run_dir).images, SyntheticSet.load(straight).images)
    its = [json.loads(line)["it"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3]


def test_resume_of_a_checkpoint_without_a_record_is_refused(run_dir, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["ddkit_meta"])
    meta.pop("run")
    header["ddkit_meta"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)
    line = one_line_error(*run(["distill", *FAST_DM, "--iterations", "2", "--out", run_dir, "--resume"], capsys)[::2])
    assert "no record of its run's settings" in line


@dataclass
class FutureConfig:
    """A method config no list in ddkit knows: the record and the comparison walk its fields."""

    iterations: int = 10
    unroll_steps: int = 20
    kernel: str = "ntk"
    compile: str = field(default="auto", metadata={"resume": "free"})


def test_record_and_comparison_are_generic_over_the_config_dataclass(digits):
    a = run_record(method="future", method_config=FutureConfig(), ipc=1, seed=0, iterations=10, real=digits)
    assert a["method.unroll_steps"] == 20 and a["method.kernel"] == "ntk" and "method.iterations" not in a
    b = run_record(method="future", method_config=FutureConfig(unroll_steps=5, compile="off"), ipc=1, seed=0,
                   iterations=10, real=digits)
    diffs, notes = compare_records(a, b, at_iteration=4)
    assert diffs == ["method.unroll_steps 20 in the checkpoint, 5 now"]  # compile is marked speed-only
    c = run_record(method="future", method_config=FutureConfig(), ipc=1, seed=0, iterations=12, real=digits)
    diffs, notes = compare_records(a, c, at_iteration=10)
    assert diffs == [] and "from 10 to 12 iterations" in notes[0]


def test_record_fingerprints_the_training_data(digits):
    from ddkit.api import real_from_tensors

    other = real_from_tensors(digits.preprocess.decode(digits.train_images).flip(0), digits.train_labels.flip(0),
                              digits.preprocess.decode(digits.test_images), digits.test_labels, name="digits")
    a = run_record(method="x", method_config=FutureConfig(), ipc=1, seed=0, iterations=10, real=digits)
    b = run_record(method="x", method_config=FutureConfig(), ipc=1, seed=0, iterations=10, real=other)
    diffs, _ = compare_records(a, b, at_iteration=1)
    assert any("training images differ" in d for d in diffs)


# ---------------------------------------------------------------------------------------------------------------
# no reuse of a folder without --resume or --overwrite
# ---------------------------------------------------------------------------------------------------------------
def test_finished_run_is_not_overwritten(run_dir, capsys):
    before = snapshot(run_dir)
    line = one_line_error(*run(["distill", "--method", "random", "--ipc", "1", "--out", run_dir, "--no-progress"],
                               capsys)[::2])
    assert "holds a finished run (dm on digits, ipc 1, 2 iterations)" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


def test_unfinished_run_needs_resume_or_overwrite(run_dir, capsys):
    (run_dir / "synset.safetensors").unlink()
    line = one_line_error(*run(["distill", *FAST_DM, "--iterations", "2", "--out", run_dir], capsys)[::2])
    assert "holds an unfinished run (checkpoint at iteration 2)" in line and "--resume" in line


def test_overwrite_replaces_every_file_of_the_old_run(run_dir, capsys):
    (run_dir / "grid_it1.png").write_bytes(b"old")
    (run_dir / "evaluations.jsonl").write_text('{"old": 1}\n')
    (run_dir / "notes.txt").write_text("mine")  # not a run file: kept
    code, _, err = run(["distill", "--method", "random", "--ipc", "1", "--out", run_dir, "--no-progress",
                        "--overwrite"], capsys)
    assert code == 0, err
    names = {p.name for p in run_dir.iterdir()}
    assert "checkpoint.safetensors" not in names  # the old DM checkpoint does not sit beside a random set
    assert not {"grid_it1.png", "evaluations.jsonl", LOCK_FILE} & names and "notes.txt" in names
    assert json.loads((run_dir / "synset.json").read_text())["method"] == "random"
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_resume_and_overwrite_together_are_refused(run_dir, capsys):
    line = one_line_error(*run(["distill", *FAST_DM, "--out", run_dir, "--resume", "--overwrite"], capsys)[::2])
    assert "--resume" in line and "--overwrite" in line


def test_python_api_follows_the_same_folder_rules(digits, tmp_path):
    import ddkit

    out = tmp_path / "api"
    ddkit.distill(digits, "dm", 1, iterations=1, device="cpu", out_dir=out, model="convnet_w32", batch_real=16)
    with pytest.raises(RunFolderError, match="unfinished run"):
        ddkit.distill(digits, "dm", 1, iterations=1, device="cpu", out_dir=out, model="convnet_w32", batch_real=16)
    with pytest.raises(RunFolderError, match=r"method\.batch_real 16 in the checkpoint, 8 now"):
        ddkit.distill(digits, "dm", 1, iterations=1, device="cpu", out_dir=out, resume=True, model="convnet_w32",
                      batch_real=8)
    ddkit.distill(digits, "dm", 1, iterations=1, device="cpu", out_dir=out, overwrite=True, model="convnet_w32",
                  batch_real=8)


# ---------------------------------------------------------------------------------------------------------------
# one process per folder: the lock
# ---------------------------------------------------------------------------------------------------------------
def _process_start(pid):
    from ddkit.engine.runfolder import _process_start as start

    return start(pid)


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_replaced(tmp_path, capsys):
    import socket

    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now", "command": "distill",
                "process_start": _process_start(holder.pid), "token": "x"}
        (out / LOCK_FILE).write_text(json.dumps(lock))
        line = one_line_error(*run(["distill", "--method", "random", "--ipc", "1", "--out", out, "--no-progress"],
                                   capsys)[::2])
        assert f"in use by another ddkit process (pid {holder.pid}" in line
        assert not (out / "synset.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the run proceeds, saying so
    code, _, err = run(["distill", "--method", "random", "--ipc", "1", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert f"note: {out}: removed a stale lock left by pid {holder.pid}" in err
    assert not (out / LOCK_FILE).exists() and (out / "synset.safetensors").exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    import socket

    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    # our own pid, but a different process start time: the pid was reused after the holder died
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1", "token": "x"}
    (folder.path / LOCK_FILE).write_text(json.dumps(lock))
    with pytest.warns(Warning, match="stale lock"):
        with folder.lock():
            assert json.loads((folder.path / LOCK_FILE).read_text())["token"] != "x"
    assert not (folder.path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_not_broken(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    (folder.path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
    with pytest.raises(RunFolderError, match="on host elsewhere.*delete"):
        with folder.lock():
            pass


def test_two_processes_distilling_into_one_folder(tmp_path, capsys):
    """A real second process: while it runs, an in-process distill into its folder is refused."""
    out = tmp_path / "busy"
    cmd = [sys.executable, "-m", "ddkit.cli", "distill", *FAST_DM, "--iterations", "900", "--out", str(out),
           "--set", "engine.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / LOCK_FILE).exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the background distill never took its lock"
            time.sleep(0.1)
        line = one_line_error(*run(["distill", *FAST_DM, "--iterations", "1", "--out", out, "--overwrite"],
                                   capsys)[::2])
        assert f"pid {proc.pid}" in line and "in use" in line
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# nothing non-finite is saved; checksums catch damaged files
# ---------------------------------------------------------------------------------------------------------------
def test_a_non_finite_set_is_never_written(digits, tmp_path):
    syn = SyntheticSet.from_real(digits, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        syn.images[3, 0, 2, 2] = float("inf")
    with pytest.raises(DivergenceError, match="images hold NaN/Inf"):
        syn.save(tmp_path / "bad")
    assert not (tmp_path / "bad" / "synset.safetensors").exists()


def test_the_last_step_is_checked_finite(tiny_real, tmp_path):
    """The loss is finite at every step, but the last update makes the images NaN: no set, no NaN checkpoint."""
    from ddkit.engine import distill
    from ddkit.engine.checkpoint import load_checkpoint
    from ddkit.methods.base import Distiller

    class LastStepBreaks(Distiller):
        name = "breaks"

        def step(self, it, real, syn, generator):
            with torch.no_grad():
                syn.images.mul_(0.5)
                if it == 3:
                    syn.images[0] = float("nan")
            return {"loss": 1.0}

    syn = SyntheticSet.from_real(tiny_real, 1, torch.Generator().manual_seed(0))
    with pytest.raises(DivergenceError, match=r"images became non-finite .* iteration 3.*iteration 2"):
        distill(LastStepBreaks(), tiny_real, syn, iterations=3, checkpoint_dir=tmp_path, checkpoint_every=1)
    state = load_checkpoint(tmp_path)
    assert state["iteration"] == 2 and torch.isfinite(state["syn"]["images"]).all()


def _flip_tensor_byte(path: Path, offset: int = 17) -> None:
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len + offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_detected_on_resume(run_dir, capsys):
    _flip_tensor_byte(run_dir / "checkpoint.safetensors")
    line = one_line_error(*run(["distill", *FAST_DM, "--iterations", "3", "--out", run_dir, "--resume"], capsys)[::2])
    assert "checkpoint.safetensors is corrupt" in line and "checksum" in line


def test_a_damaged_set_is_detected(run_dir, capsys):
    _flip_tensor_byte(run_dir / "synset.safetensors")
    line = one_line_error(*run(["evaluate", run_dir, "--runs", "1", "--epochs", "1"], capsys)[::2])
    assert "synset.safetensors is corrupt" in line


@pytest.mark.parametrize("entry", ["ddkit_state", "ddkit_meta"])
def test_a_checkpoint_with_broken_inner_json_is_one_line(run_dir, entry, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header[entry] = header[entry][: len(header[entry]) // 2]
    save_file(tensors, str(path), metadata=header)
    line = one_line_error(*run(["distill", *FAST_DM, "--iterations", "3", "--out", run_dir, "--resume"], capsys)[::2])
    assert "checkpoint.safetensors" in line and "not valid JSON" in line


# ---------------------------------------------------------------------------------------------------------------
# evaluate checks the set against its data; results kept run by run
# ---------------------------------------------------------------------------------------------------------------
def make_folder(root: Path, classes: list[str], size: tuple[int, int] | dict[str, tuple[int, int]], mode="L"):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = size if isinstance(size, dict) else {"train": size, "test": size}
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(4):
                h, w = sizes[split] if i % 2 == 0 else sizes.get(split + "_alt", sizes[split])
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


@pytest.fixture
def folder_set(tmp_path, capsys):
    data = make_folder(tmp_path / "cats", ["cat", "dog"], (8, 8))
    out = tmp_path / "set"
    assert run(["distill", "--method", "random", "--dataset", "imagefolder", "--data-root", data, "--ipc", "1",
                "--out", out, "--no-progress"], capsys)[0] == 0
    return out


@pytest.mark.parametrize("classes,size,mode,named", [
    (["cat", "dog", "eel"], (8, 8), "L", "the set has 2 classes, the data 3"),
    (["cat", "cow"], (8, 8), "L", r"the class names differ \(1: 'dog' vs 'cow'\)"),
    (["cat", "dog"], (8, 8), "RGB", r"the set's images are \(1, 8, 8\), the data's \(3, 8, 8\)"),
])
def test_evaluate_refuses_data_that_do_not_match_the_set(folder_set, tmp_path, classes, size, mode, named, capsys):
    other = make_folder(tmp_path / "other", classes, size, mode)
    line = one_line_error(*run(["evaluate", folder_set, "--data-root", other, "--runs", "1", "--epochs", "1"],
                               capsys)[::2])
    assert "does not match the data" in line and re.search(named, line), line


def test_api_evaluate_refuses_another_dataset(digits):
    from ddkit.api import real_from_tensors
    from ddkit.evaluation import EvalProtocol, evaluate

    syn = SyntheticSet.from_real(digits, 1, torch.Generator().manual_seed(0))
    few = digits.test_labels < 2
    two = real_from_tensors(digits.preprocess.decode(digits.train_images[digits.train_labels < 2]),
                            digits.train_labels[digits.train_labels < 2],
                            digits.preprocess.decode(digits.test_images[few]), digits.test_labels[few], name="digits")
    with pytest.raises(DataError, match="the set has 10 classes, the data 2"):
        evaluate(syn, two, EvalProtocol(runs=1, epochs=1))


def test_data_root_that_the_dataset_ignores_is_reported(tmp_path, capsys):
    code, _, err = run(["distill", "--method", "random", "--ipc", "1", "--out", tmp_path / "r", "--no-progress",
                        "--data-root", tmp_path], capsys)
    assert code == 0 and re.search(r"warning: dataset 'digits' .* --data-root .* is ignored", err), err


def test_mixed_size_folder_is_resized_to_one_square_size_and_evaluates(tmp_path, capsys):
    data = make_folder(tmp_path / "mixed", ["cat", "dog"],
                       {"train": (10, 14), "train_alt": (12, 12), "test": (20, 28), "test_alt": (9, 9)})
    out = tmp_path / "set"
    assert run(["distill", "--method", "random", "--dataset", "imagefolder", "--data-root", data, "--ipc", "1",
                "--out", out, "--no-progress"], capsys)[0] == 0
    syn = SyntheticSet.load(out)
    assert syn.images.shape[-2:] == (12, 12)  # median of sqrt(h*w) over the training images: 11.8 and 12
    assert "12x12" in json.loads((out / "synset.json").read_text())["data"]["resized"]
    code, stdout, err = run(["evaluate", out, "--runs", "1", "--epochs", "1"], capsys)
    assert code == 0, err


def test_evaluation_keeps_finished_runs_and_resumes(folder_set, monkeypatch, capsys):
    import ddkit.evaluation.protocol as protocol

    real_train = protocol.train_and_test
    calls = []

    def interrupted_on_third(*args, **kw):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kw)

    argv = ["evaluate", folder_set, "--runs", "2", "--epochs", "2", "--models", "convnet_w32,mlp", "--no-dsa"]
    monkeypatch.setattr(protocol, "train_and_test", interrupted_on_third)
    code, _, err = run(argv, capsys)
    assert code == 130 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the two finished runs' progress lines
    assert line.startswith("ddkit evaluate: interrupted after 2 of 4 runs"), err
    assert "after 2 of 4 runs" in line and "evaluations.jsonl" in line and "--resume" in line
    monkeypatch.setattr(protocol, "train_and_test", lambda *a, **k: calls.append(a[0]) or real_train(*a, **k))
    calls.clear()
    code, resumed, err = run(argv + ["--resume", "--json", folder_set / "r.json"], capsys)
    assert code == 0, err
    assert calls == ["mlp", "mlp"]  # the two finished convnet runs were not trained again
    calls.clear()
    code, _, _ = run(argv + ["--json", folder_set / "fresh.json"], capsys)  # from scratch: the same accuracies
    assert code == 0 and len(calls) == 4
    rows = [json.loads((folder_set / name).read_text())["rows"] for name in ("r.json", "fresh.json")]
    assert [(r["model"], r["run"], r["accuracy"]) for r in rows[0]] == [
        (r["model"], r["run"], r["accuracy"]) for r in rows[1]]
    log = [json.loads(line) for line in (folder_set / "evaluations.jsonl").read_text().splitlines()]
    assert sum("row" in rec for rec in log) == 8 and sum("begin" in rec for rec in log) == 2


def test_evaluate_resume_without_an_earlier_evaluation_is_one_line(folder_set, capsys):
    line = one_line_error(*run(["evaluate", folder_set, "--runs", "1", "--epochs", "1", "--resume"], capsys)[::2])
    assert "no earlier evaluation of this set" in line


# ---------------------------------------------------------------------------------------------------------------
# one line for file-system errors and meaningless values
# ---------------------------------------------------------------------------------------------------------------
def test_output_paths_that_cannot_be_written_are_one_line(folder_set, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["distill", "--method", "random", "--ipc", "1", "--out", a_file], "is not a folder"),
        (["evaluate", folder_set, "--runs", "1", "--epochs", "1", "--json", a_file / "r.json"], r"--json .*a_file"),
        (["evaluate", folder_set, "--runs", "1", "--epochs", "1", "--json", tmp_path], "is a folder"),
        (["evaluate", folder_set, "--runs", "1", "--epochs", "1", "--log", a_file / "log.jsonl"], "a_file"),
        (["show", folder_set, "--out", tmp_path], "is a folder"),
        (["show", folder_set, "--out", a_file / "g.png"], "a_file"),
        (["export", folder_set, "--out", a_file], "a_file"),
    ]
    for argv, pattern in cases:
        start = time.perf_counter()
        line = one_line_error(*run(argv, capsys)[::2])
        assert re.search(pattern, line), (argv, line)
        assert time.perf_counter() - start < 30  # refused before the work, not after it


def test_top_level_handler_turns_any_oserror_into_one_line(capsys):
    def handler():
        raise PermissionError(13, "Permission denied", "/some/path")

    assert run_command("show", handler) == 2
    err = capsys.readouterr().err
    assert err.strip() == "ddkit show: error: Permission denied: /some/path"


@pytest.mark.parametrize("argv,pattern", [
    (["distill", "--method", "dm", "--iterations", "-3", "--out", "X"], r"iterations: must be >= 0, got -3"),
    (["distill", "--method", "dm", "--ipc", "0", "--out", "X"], r"ipc: must be >= 1, got 0"),
    (["distill", "--method", "dm", "--set", "method.lr_img=-1", "--out", "X"], r"method\.lr_img: must be > 0"),
    (["distill", "--method", "dm", "--set", "method.lr_img=nan", "--out", "X"], r"method\.lr_img: expected a finite"),
    (["distill", "--method", "dm", "--set", "method.lr_img=null", "--out", "X"], r"method\.lr_img.*expected .*float"),
    (["distill", "--method", "dm", "--set", "method.momentum_img=1.5", "--out", "X"], r"momentum_img: must be >= 0 and < 1"),
    (["distill", "--method", "dm", "--set", "method.batch_real=-4", "--out", "X"], r"method\.batch_real: must be >= 0"),
    (["distill", "--method", "dm", "--set", "method.model=convnett", "--out", "X"], r"unknown model 'convnett'"),
    (["distill", "--method", "dm", "--set", "method.init=zeros", "--out", "X"], r"method\.init: must be one of real, noise"),
    (["distill", "--method", "dm", "--set", "engine.eval_runs=0", "--out", "X"], r"engine\.eval_runs: must be >= 1"),
    (["distill", "--method", "dm", "--set", "data.zca_eps=0", "--out", "X"], r"data\.zca_eps: must be > 0"),
    (["evaluate", "--full", "--dataset", "digits", "--runs", "0"], r"--runs: must be >= 1, got 0"),
    (["evaluate", "--full", "--dataset", "digits", "--epochs", "0"], r"--epochs: must be >= 1, got 0"),
    (["evaluate", "--full", "--dataset", "digits", "--models", ","], r"--models: expected one or more model names"),
    (["evaluate", "--full", "--dataset", "digits", "--lr", "-0.1"], r"--lr: must be > 0"),
])
def test_meaningless_values_are_refused_where_parsed(argv, pattern, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "X" else a for a in argv]
    line = one_line_error(*run(argv, capsys)[::2])
    assert re.search(pattern, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("yaml_text,pattern", [
    ("method: dm\nmethod_options:\n  lr_img: null\n", r"method\.lr_img: expected a value of type float, got null"),
    ("method: dm\nmethod_options:\n  lr_img: -2\n", r"method\.lr_img: must be > 0, got -2"),
    ("method: dm\nmethod_options: [1, 2]\n", r"method_options must be a mapping"),
    ("method: dm\niterations: -1\n", r"iterations: must be >= 0"),
    ("method: dm\nmethod_options:\n  model: [convnet]\n", r"method\.model: expected a string"),
])
def test_yaml_values_follow_the_same_rules(yaml_text, pattern, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    line = one_line_error(*run(["distill", "--config", cfg, "--out", tmp_path / "out"], capsys)[::2])
    assert re.search(pattern, line), line


def test_python_api_values_follow_the_same_rules(digits):
    import ddkit
    from ddkit.api import real_from_tensors
    from ddkit.evaluation import EvalProtocol, evaluate

    with pytest.raises(ConfigError, match=r"method\.lr_img: must be > 0"):
        ddkit.distill(digits, "dm", 1, iterations=1, lr_img=-1.0)
    with pytest.raises(ConfigError, match=r"iterations: must be >= 0"):
        ddkit.distill(digits, "dm", 1, iterations=-2)
    with pytest.raises(ConfigError, match=r"method\.lr_img: expected a value of type float, got null"):
        ddkit.distill(digits, "dm", 1, iterations=1, lr_img=None)
    syn = SyntheticSet.from_real(digits, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"--runs: must be >= 1"):
        evaluate(syn, digits, EvalProtocol(runs=0))
    with pytest.raises(DataError, match="at least 2 classes"):
        real_from_tensors(torch.rand(4, 8, 8), torch.zeros(4), torch.rand(2, 8, 8), torch.zeros(2))


def test_artifacts_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o002)
    try:
        assert run(["distill", "--method", "random", "--ipc", "1", "--out", tmp_path / "r", "--no-progress"],
                   capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("synset.safetensors", "synset.json", "config.yaml", "grid.png"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o664, name
