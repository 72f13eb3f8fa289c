"""Scale-out (ddkit/distributed.py): 2 CPU processes with gloo, launched by torchrun, against one process.

Every multi-process test starts ``torchrun --standalone --nproc_per_node=2 -m ddkit ...`` (a free port is chosen
by torchrun) with one thread per process, and compares what rank 0 wrote with the same command run in this
process on one thread: evaluation reports and expert stores must be identical, DM distillation equal up to the
order of floating-point sums.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddkit import distributed
from ddkit.cli import main

TIMEOUT_S = 240


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddkit", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------ world of one
def test_world_of_one_helpers_need_no_process_group():
    assert not distributed.active()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.shard([3, 4, 5]) == [3, 4, 5]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    t = torch.ones(3)
    distributed.all_reduce_sum_([t, None])
    assert torch.equal(t, torch.ones(3)) and distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.run_on_main(lambda: 7) == 7
    assert not distributed.init_from_env()  # no WORLD_SIZE: nothing initialised


def test_round_robin_ownership_covers_every_item_once():
    owners = [[i for i in range(7) if distributed.owned(i, world=3, rank_=r)] for r in range(3)]
    assert owners == [[0, 3, 6], [1, 4], [2, 5]]


def test_world_size_without_torchrun_variables_is_refused(monkeypatch):
    from ddkit.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.init_from_env()


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture
def synset_path(digits, tmp_path):
    from ddkit.synthetic import SyntheticSet

    syn = SyntheticSet.from_real(digits, 1, torch.Generator().manual_seed(3), init="real")
    syn.meta.update({"method": "random", "ipc": 1})
    syn.save(tmp_path / "set")
    return tmp_path / "set"


def test_evaluate_two_ranks_gives_the_single_process_report(synset_path, tmp_path, one_thread, capsys):
    flags = ["--runs", "3", "--epochs", "4", "--speed", "plain", "--device", "cpu"]
    assert main(["evaluate", str(synset_path), *flags, "--json", str(tmp_path / "one.json"),
                 "--log", str(tmp_path / "one.jsonl")]) == 0
    proc = ok(torchrun("evaluate", str(synset_path), *flags, "--json", str(tmp_path / "two.json"),
                       "--eval-log", str(tmp_path / "two.jsonl"), cwd=tmp_path))
    assert proc.stdout.count("| convnet |") == 1  # rank 0 alone prints the report
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    key = lambda r: (r["model"], r["run"], r["seed"], r["accuracy"])  # noqa: E731
    assert [key(r) for r in one["rows"]] == [key(r) for r in two["rows"]]
    logged = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert sorted(r["row"]["run"] for r in logged if "row" in r) == [0, 1, 2]  # one log, each run once

    # a user error on rank 0 (nothing to resume) reaches both ranks as one line: no rank waits forever
    bad = torchrun("evaluate", str(synset_path), *flags, "--resume", "--eval-log", str(tmp_path / "none.jsonl"),
                   cwd=tmp_path)
    assert bad.returncode != 0 and "holds no earlier evaluation" in bad.stderr


# ------------------------------------------------------------------------------------------------ experts
def _store_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(root.glob("expert_*.safetensors"))}


def test_experts_two_ranks_fill_the_store_one_process_writes(tmp_path, one_thread):
    flags = ["--dataset", "digits", "--epochs", "1", "--quiet", "--device", "cpu"]
    assert main(["experts", *flags, "--num-experts", "3", "--out", str(tmp_path / "one")]) == 0
    # a run "crashed" after expert 0: the two ranks train the missing experts 1 and 2 with --resume
    assert main(["experts", *flags, "--num-experts", "1", "--out", str(tmp_path / "two")]) == 0
    proc = ok(torchrun("experts", *flags, "--num-experts", "3", "--out", str(tmp_path / "two"), "--resume",
                       cwd=tmp_path))
    assert proc.stdout.count("3 experts") == 1
    one, two = _store_tensors(tmp_path / "one"), _store_tensors(tmp_path / "two")
    assert list(one) == list(two) == [f"expert_0000{i}.safetensors" for i in range(3)]
    for name in one:
        assert one[name].keys() == two[name].keys()
        assert all(torch.equal(one[name][k], two[name][k]) for k in one[name]), name


# ------------------------------------------------------------------------------------------------ DM distill
def test_dm_two_ranks_resumed_equal_one_process_up_to_float_order(digits, tmp_path, one_thread):
    from ddkit.engine.seeding import make_generator
    from ddkit.synthetic import SyntheticSet

    flags = ["--method", "dm", "--dataset", "digits", "--ipc", "2", "--no-progress", "--device", "cpu",
             "--set", "speed=plain", "--set", "method.batch_real=32"]
    assert main(["distill", *flags, "--iterations", "4", "--out", str(tmp_path / "one")]) == 0
    # two ranks, stopped after 2 iterations and resumed to 4: rank 0 wrote the checkpoint both ranks resume from
    ok(torchrun("distill", *flags, "--iterations", "2", "--out", str(tmp_path / "two"), cwd=tmp_path))
    proc = ok(torchrun("distill", *flags, "--iterations", "4", "--out", str(tmp_path / "two"), "--resume",
                       cwd=tmp_path))
    assert proc.stdout.count("wrote") == 1
    one, two = SyntheticSet.load(tmp_path / "one"), SyntheticSet.load(tmp_path / "two")
    start = SyntheticSet.from_real(digits, 2, make_generator(0, "init"), init="real")
    assert start.images.shape == one.images.shape and not torch.allclose(one.images, start.images)  # it moved
    torch.testing.assert_close(two.images, one.images, rtol=1e-5, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(losses[1]) == 4  # the resumed run appended iterations 3 and 4 to the log of 1 and 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
