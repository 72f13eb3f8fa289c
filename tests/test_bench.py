"""``ddkit bench``: suites are validated before anything runs, cpu-smoke runs end to end into a report, a rerun
skips finished cells, an interrupted cell resumes from its checkpoint, a failing cell is recorded and the suite
goes on, and every shipped suite (the GPU ones included) parses and validates here."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from ddkit.bench import Runner, load_suite, shipped_suites
from ddkit.bench.suite import WHOLE_DATA
from ddkit.cli import main
from ddkit.errors import ConfigError, DDKitError


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TINY = """
suite: tiny
defaults: {dataset: digits, ipc: 1, device: cpu, budget: {iterations: 2}, eval: {runs: 1, epochs: 2}}
cells:
"""


# ------------------------------------------------------------------------------------------------ validation
def test_shipped_suites_parse_and_validate():
    assert {"cpu-smoke", "cpu-fmnist", "gpu-paper", "gpu-levers"} <= set(shipped_suites())
    paper = load_suite("gpu-paper", check_data=False)
    methods = {c.method for c in paper.cells}
    assert {"dc", "dsa", "dm", "cafe", "kip", "frepo", "dd", "mtt", "ftd", "ddpp", "random", "herding",
            "kcenter", WHOLE_DATA} <= methods
    assert {c.dataset for c in paper.cells} == {"mnist", "fashion-mnist", "cifar10", "cifar100"}
    assert all(c.device == "cuda" and c.iterations in (None, 0) for c in paper.cells if not c.is_whole)
    fm = load_suite("cpu-fmnist", check_data=False)
    from ddkit.methods import METHODS

    for name in METHODS.names():  # every method of the toolkit at IPC 1 and 10
        assert {c.ipc for c in fm.cells if c.method == name} == {1, 10}, name
    assert any(c.is_whole for c in fm.cells)
    dm = next(c for c in fm.cells if c.method == "dm" and c.ipc == 10)
    assert dm.iterations == 48  # 120 s // 2.5 s per iteration
    assert load_suite("gpu-levers").is_levers


@pytest.mark.parametrize("body,message", [
    ("  - {method: dm, ipcs: 1}\n", "unknown key 'ipcs'; did you mean 'ipc'"),
    ("  - {method: dmm}\n", "unknown method 'dmm'; did you mean 'dm'"),
    ("  - {method: dm, dataset: fashion-mnst}\n", "did you mean 'fashion-mnist'"),
    ("  - {method: dm, eval: {models: [convnett]}}\n", "unknown model 'convnett'"),
    ("  - {method: dm, options: {lr_imgg: 1.0}}\n", "did you mean method.lr_img"),
    ("  - {method: dm, options: {lr_img: -1.0}}\n", "method.lr_img"),
    ("  - {method: dm, set: {data.zcaa: true}}\n", "did you mean data.zca"),
    ("  - {method: dm, eval: {runs: 0}}\n", "--runs"),
    ("  - {method: mtt}\n", "needs an expert store"),
    ("  - {method: dm, budget: {seconds: 10}}\n", "seconds needs seconds_per_iteration"),
    ("  - {method: dm, dataset: mnist}\n", "data_root"),
    ("  - {method: dm}\n  - {method: dm}\n", "distinct 'tag'"),
])
def test_bad_suite_is_refused_before_running(tmp_path, body, message):
    path = write(tmp_path, TINY + body)
    with pytest.raises(DDKitError) as info:
        load_suite(path)
    assert message in str(info.value)


def test_bad_suite_cli_one_line_and_nothing_written(tmp_path, capsys):
    path = write(tmp_path, TINY.replace("defaults:", "defaultz:") + "  - {method: dm}\n")
    out = tmp_path / "out"
    code = main(["bench", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown key 'defaultz'; did you mean 'defaults'" in err[0]
    assert not out.exists()


def test_gpu_levers_skips_cleanly_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the lever suite would run")
    code = main(["bench", "gpu-levers", "--out", str(tmp_path / "lv")])
    captured = capsys.readouterr()
    assert code == 0 and "needs a CUDA device" in captured.err
    assert "Skipped: no CUDA device" in (tmp_path / "lv" / "report.md").read_text()


def test_lever_timings_run_on_cpu_tiny(one_thread):
    from ddkit.bench.levers import time_levers

    # the eager levers (compiling them would take minutes on 2 cores; CompiledOrEager is tested in test_compiled)
    rows = time_levers("cpu", shapes={"tiny": (1, 8, 8)}, batches=(4,), forward_batch=8, repeats=1, warmup=0,
                       model="convnet_w32", only=("chunks", "patchnorm"))
    assert {r["lever"] for r in rows} == {"plain", "chunks", "patchnorm"}
    assert len(rows) == 2 * 3 and all(r["seconds"] > 0 for r in rows)
    plain = [r for r in rows if r["lever"] == "plain"]
    assert all(r["ratio"] == 1.0 and not r["error"] for r in plain)


# ------------------------------------------------------------------------------------------------ running
def cells(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """cpu-smoke run once into a folder the tests below read (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("bench") / "smoke"
    code = main(["bench", "cpu-smoke", "--out", str(out)])
    return out, code


def test_cpu_smoke_end_to_end(smoke):
    out, code = smoke
    assert code == 0
    rows = cells(out)
    assert set(rows) == {"digits-random-ipc1", "digits-dm-ipc1", "digits-herding-ipc1", "digits-whole-data"}
    for cid, r in rows.items():
        assert r["status"] == "done", (cid, r["error"])
        assert 0.0 < float(r["acc_mean"]) <= 100.0
        assert float(r["eval_s"]) > 0
    dm = rows["digits-dm-ipc1"]
    assert int(dm["iterations_done"]) == 10 and float(dm["distill_s"]) > 0 and float(dm["distill_peak_rss_mib"]) > 50
    assert (out / "cells" / "digits-dm-ipc1" / "run" / "synset.safetensors").is_file()  # ddkit distill's folder
    report = (out / "report.md").read_text()
    assert "Partial" not in report and "All 4 cells finished" in report
    for png in ("accuracy_vs_ipc.png", "accuracy_vs_time.png", "peak_memory.png", "grid_digits-dm-ipc1.png",
                "grid_digits-random-ipc1.png", "grid_digits-herding-ipc1.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/{png}" in report
    assert "| digits | dm | 1 |" in report and "| digits | whole-data | all |" in report
    data = json.loads((out / "results.json").read_text())
    assert {r["cell"] for r in data["rows"]} == set(rows)


def test_rerun_skips_finished_cells(smoke, capsys):
    out, _ = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    code = main(["bench", "cpu-smoke", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and err.count("done, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")} == before


def test_changed_cell_is_refused_not_mixed(smoke, tmp_path):
    out, _ = smoke
    text = (out / "suite.yaml").read_text().replace("budget: {iterations: 10}", "budget: {iterations: 11}")
    with pytest.raises(ConfigError, match="was run with other settings"):
        Runner(load_suite(write(tmp_path, text)), out, report=False).run()


def test_failing_cell_is_recorded_and_the_suite_goes_on(tmp_path):
    # DM with an absurd image lr diverges at run time (validation cannot know): recorded failed, next cell runs
    path = write(tmp_path, TINY + "  - {method: dm, tag: diverges, options: {lr_img: 1.0e+30, batch_real: 16}}\n"
                                  "  - {method: random}\n")
    out = tmp_path / "out"
    failed = Runner(load_suite(path), out, log=lambda line: None).run()
    rows = cells(out)
    assert failed == 1
    bad = rows["digits-dm-ipc1-diverges"]
    assert bad["status"] == "failed" and bad["error"].startswith("distill: ddkit distill: error: dm:")
    assert "non-finite" in bad["error"] or "became" in bad["error"]
    assert rows["digits-random-ipc1"]["status"] == "done"
    report = (out / "report.md").read_text()
    assert "Failed cells" in report and "digits-dm-ipc1-diverges" in report and "Partial" in report
    # a rerun does not retry it unless asked
    assert Runner(load_suite(path), out, log=lambda line: None, report=False).run() == 1
    rec = json.loads((out / "cells" / "digits-dm-ipc1-diverges" / "cell.json").read_text())
    assert len(rec["phases"]["distill"]["attempts"]) == 1


def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A distill phase interrupted (Ctrl-C) after its checkpoint at iteration 3 of 6 continues from it
    (``--resume``), and the finished set equals the one an uninterrupted run of the cell makes."""
    from ddkit.engine import callbacks
    from ddkit.engine.checkpoint import CHECKPOINT_FILE
    from ddkit.synthetic import SyntheticSet

    path = write(tmp_path, TINY.replace("iterations: 2", "iterations: 6")
                 + "  - {method: dm, options: {batch_real: 16}, set: {engine.checkpoint_every: 3}}\n")
    suite = load_suite(path)
    cell = suite.cells[0]
    out = tmp_path / "out"
    runner = Runner(suite, out, log=lambda line: None, report=False)
    fresh_cmd = runner.distill_command(cell)  # writes the cell's distill.yaml
    run = out / "cells" / cell.id / "run"
    original = callbacks.MetricsLogger.on_iteration_end

    def interrupt_at_4(self, state):
        original(self, state)
        if state.iteration == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:  # the first attempt: the very command the runner runs, stopped at iteration 4
        m.setattr(callbacks.MetricsLogger, "on_iteration_end", interrupt_at_4)
        assert main(fresh_cmd) == 130
    assert (run / CHECKPOINT_FILE).is_file() and not (run / "synset.safetensors").exists()
    rec = runner.record(cell)
    rec.phase("distill").status = "interrupted"
    rec.save()
    assert "--resume" not in fresh_cmd and "--resume" in runner.distill_command(cell)
    assert runner.run() == 0
    assert "--resume" in (out / "cells" / cell.id / "distill.log").read_text()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["it"] for x in metrics if "loss" in x] == [1, 2, 3, 4, 5, 6]
    fresh = tmp_path / "fresh"
    assert Runner(load_suite(path), fresh, log=lambda line: None, report=False).run() == 0
    a = SyntheticSet.load(run)
    b = SyntheticSet.load(fresh / "cells" / cell.id / "run")
    assert (a.images - b.images).abs().max().item() == 0.0


def test_report_only_and_partial_marking(tmp_path):
    path = write(tmp_path, TINY + "  - {method: random}\n  - {method: random, tag: again, seed: 1}\n")
    out = tmp_path / "out"
    assert Runner(load_suite(path), out, only=["digits-random-ipc1"], log=lambda line: None).run() == 0
    report = (out / "report.md").read_text()
    assert "Partial report: 1 of 2 cells finished" in report
    assert main(["bench", str(path), "--out", str(out), "--report-only"]) == 0
    # --results-md: the table goes between the suite's markers of a hand-written file, replaced in place on a rerun
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nhand-written text\n")
    for _ in range(2):
        assert main(["bench", str(path), "--out", str(out), "--report-only", "--results-md", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    assert text.count("<!-- ddkit bench tiny: begin") == 1 and text.count("<!-- ddkit bench tiny: end -->") == 1
    assert "**Partial: 1 of 2 cells finished.**" in text and "(../out/report.md)" in text
    row = next(line for line in text.splitlines() if line.startswith("| digits | random | 1 |"))
    assert "done" in row and "–" not in row.split("|")[9]  # a measured accuracy, from the cell's record
    results.write_text(text + "\nlater text\n")
    assert main(["bench", str(path), "--out", str(out), "--report-only", "--results-md", str(results)]) == 0
    assert results.read_text().endswith("later text\n") and results.read_text().count("ddkit bench tiny: begin") == 1
    with pytest.raises(ConfigError, match="did you mean 'digits-random-ipc1'"):
        Runner(load_suite(path), out, only=["digits-random-ipc2"]).run()
    _ = os
