"""The CLI contract and its bad-input behaviour: one-line errors, exit status 2, nothing half-written."""
import json
import subprocess
import sys

import pytest

from ddkit.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("what,expected", [("methods", "herding"), ("datasets", "fashion-mnist"), ("models", "resnet18")])
def test_list(what, expected, capsys):
    code, out, _ = run(["list", what], capsys)
    assert code == 0 and expected in out


def test_distill_evaluate_show_export(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(["distill", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", out,
                           "--seed", "1", "--no-progress"], capsys)
    assert code == 0, stdout
    for name in ("synset.safetensors", "synset.json", "config.yaml", "metrics.jsonl", "grid.png"):
        assert (out / name).exists(), name
    code, stdout, _ = run(["evaluate", out, "--runs", "2", "--epochs", "3", "--json", tmp_path / "r.json",
                           "--device", "cpu"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["dataset"] == "digits" and res["ipc"] == 2 and res["method"] == "random"
    conv = res["results"]["convnet"]
    assert set(conv) >= {"mean", "std", "accs"} and len(conv["accs"]) == 2
    assert all(0.0 <= a <= 100.0 for a in conv["accs"])
    code, _, _ = run(["show", out, "--out", tmp_path / "g.png"], capsys)
    assert code == 0 and (tmp_path / "g.png").exists()
    code, _, _ = run(["export", out, "--out", tmp_path / "exp"], capsys)
    assert code == 0 and (tmp_path / "exp" / "labels.csv").exists()


def test_config_file_reproduces_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["distill", "--method", "herding", "--ipc", "1", "--out", a, "--no-progress",
                "--set", "method.feature_epochs=0"], capsys)[0] == 0
    assert run(["distill", "--config", a / "config.yaml", "--out", b, "--no-progress"], capsys)[0] == 0
    ja, jb = json.loads((a / "synset.json").read_text()), json.loads((b / "synset.json").read_text())
    assert ja["selected_indices"] == jb["selected_indices"]
    assert jb["config"]["feature_epochs"] == 0


def test_evaluate_full_dataset(tmp_path, capsys):
    code, stdout, _ = run(["evaluate", "--full", "--dataset", "digits", "--runs", "1", "--epochs", "1",
                           "--no-dsa", "--json", tmp_path / "f.json"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "f.json").read_text())["method"] == "whole-dataset"


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["distill", "--method", "herdin", "--out", "X"], "unknown method 'herdin'.*did you mean 'herding'"),
        (["distill", "--method", "random", "--dataset", "fashion_mnist", "--out", "X"], "did you mean 'fashion-mnist'"),
        (["distill", "--method", "random", "--dataset", "mnist", "--data-root", "{tmp}/nowhere", "--out", "X"],
         "nowhere"),
        (["distill", "--method", "random", "--ipc", "500", "--out", "X"], "ipc=500 is larger than the smallest class"),
        (["distill", "--method", "random", "--set", "method.lr_imgg=1", "--out", "X"], "did you mean method.lr_img"),
        (["distill", "--method", "random", "--set", "engine.checkpoint_every=often", "--out", "X"], "expected a value of type int"),
        (["distill", "--method", "random", "--set", "nokeyvalue", "--out", "X"], "key=value"),
        (["evaluate", "{tmp}/missing"], "no synthetic set"),
        (["evaluate", "{tmp}/bogus.safetensors"], "not a ddkit synthetic set"),
        (["evaluate", "--full", "--dataset", "digits", "--models", "convnet3"], "unknown model 'convnet3'"),
        (["distill", "--method", "random", "--out", "{tmp}/fresh", "--resume"], "no checkpoint"),
        # rejected by the method's setup, after the data has loaded
        (["distill", "--method", "dc", "--set", "speed=fast", "--out", "X"], "speed must be one of"),
    ],
)
def test_bad_input_is_one_line(argv, pattern, tmp_path, capsys):
    import re

    (tmp_path / "bogus.safetensors").write_bytes(b"\x00" * 64)
    argv = [a.replace("{tmp}", str(tmp_path)) if a != "X" else str(tmp_path / "out") for a in argv]
    code, _, err = run(argv, capsys)
    line = one_line_error(code, err)
    assert re.search(pattern, line), line
    assert not (tmp_path / "out" / "synset.safetensors").exists()
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing written for a rejected run


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddkit.cli", "distill", "--method", "randm", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "did you mean" in proc.stderr


def test_corrupt_idx_file_is_one_line(tmp_path, capsys):
    import gzip

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 10)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(raw / (name + ".gz"), "wb") as f:
            f.write(b"\x00\x00\x09\x01" + (2).to_bytes(4, "big") + b"\x00\x01")  # bad magic
    code, _, err = run(["distill", "--method", "random", "--dataset", "mnist", "--data-root", tmp_path, "--ipc", "1",
                        "--out", tmp_path / "out"], capsys)
    line = one_line_error(code, err)
    assert "MNIST" in line or "idx" in line


FAST_DM = ["--method", "dm", "--dataset", "digits", "--ipc", "1", "--no-progress",
           "--set", "method.model=convnet_w32", "--set", "method.batch_real=16"]


def test_resume_continues_exactly(tmp_path, capsys):
    from ddkit.synthetic import SyntheticSet
    import torch

    full, part = tmp_path / "full", tmp_path / "part"
    assert run(["distill", *FAST_DM, "--iterations", "4", "--out", full], capsys)[0] == 0
    assert run(["distill", *FAST_DM, "--iterations", "2", "--out", part, "--set", "engine.checkpoint_every=2"],
               capsys)[0] == 0
    assert run(["distill", *FAST_DM, "--iterations", "4", "--out", part, "--resume"], capsys)[0] == 0
    assert torch.equal(SyntheticSet.load(full).images, SyntheticSet.load(part).images)
    its = [json.loads(line)["it"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4]


def test_nan_loss_is_one_line_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    # an lr of 1e30 is a valid number (nan is refused where it is parsed) that makes the images overflow
    code, _, err = run(["distill", *FAST_DM, "--iterations", "5", "--out", out, "--set", "method.lr_img=1e30",
                        "--set", "engine.checkpoint_every=1"], capsys)
    line = one_line_error(code, err)
    assert "iteration" in line and "last good checkpoint" in line
    assert (out / "checkpoint.safetensors").exists() and not (out / "synset.safetensors").exists()
