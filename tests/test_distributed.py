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


# ------------------------------------------------------------------------------------------------ DC / DSA distill
def _dc_distiller(name: str, real, syn):
    from ddkit.api import method_config
    from ddkit.engine.seeding import make_generator
    from ddkit.methods import create_distiller

    cfg = method_config(name, real.name, 2, {"model": "convnet_w32", "batch_real": 12, "init": "real"})
    d = create_distiller(name, cfg, device="cpu", speed="plain")
    d.setup(real, syn, make_generator(0, "setup"))
    return d


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_dc_class_shards_sum_to_the_whole_matching_step(name, digits, monkeypatch, one_thread):
    """What each rank computes (its classes' terms, after drawing everything) sums to the single-process loss and
    image gradient, and leaves the generator where the single process leaves it (DSA's siamese parameters)."""
    from ddkit.engine.seeding import make_generator
    from ddkit.synthetic import SyntheticSet

    syn = SyntheticSet.from_real(digits, 2, make_generator(0, "init"), init="real")
    d = _dc_distiller(name, digits, syn)
    net = d.new_network(digits, make_generator(0, "net")).train()
    gen = make_generator(0, "step")
    before = gen.get_state()

    def run(classes):
        gen.set_state(before)
        monkeypatch.setattr(distributed, "class_shard", lambda k: classes)
        loss = d.matching_loss(net, digits, syn, gen)
        return float(loss.detach()), torch.autograd.grad(loss, syn.images)[0], gen.get_state()

    whole = run(None)
    parts = [run([0, 2, 4, 6, 8]), run([1, 3, 5, 7, 9])]
    assert whole[1].abs().sum() > 0
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-5)
    torch.testing.assert_close(parts[0][1] + parts[1][1], whole[1], rtol=1e-4, atol=1e-7)
    assert all(torch.equal(p[2], whole[2]) for p in parts)  # every rank drew the same numbers
    # a rank's gradient touches only its own classes' images
    rows = syn.hard_labels() % 2 == 1
    assert parts[0][1][rows].abs().sum() == 0 and parts[1][1][~rows].abs().sum() == 0
    assert float(run([])[1].abs().sum()) == 0.0  # more ranks than classes: zero


def test_dsa_two_ranks_resumed_equal_one_process_with_periodic_evaluation(digits, tmp_path, one_thread):
    """DSA over 2 ranks (classes split, gradients summed, rank 0's inner network broadcast), stopped after 2
    iterations and resumed to 3, equals one process; periodic evaluation shares its runs over the ranks."""
    from ddkit.synthetic import SyntheticSet

    flags = ["--method", "dsa", "--dataset", "digits", "--ipc", "2", "--no-progress", "--device", "cpu",
             "--set", "speed=plain", "--set", "method.batch_real=12", "--set", "method.model=convnet_w32",
             "--set", "engine.eval_every=2", "--set", "engine.eval_runs=2", "--set", "engine.eval_epochs=3"]
    assert main(["distill", *flags, "--iterations", "3", "--out", str(tmp_path / "one")]) == 0
    ok(torchrun("distill", *flags, "--iterations", "2", "--out", str(tmp_path / "two"), cwd=tmp_path))
    proc = ok(torchrun("distill", *flags, "--iterations", "3", "--out", str(tmp_path / "two"), "--resume",
                       cwd=tmp_path))
    assert proc.stdout.count("wrote") == 1  # rank 0 alone writes
    one, two = SyntheticSet.load(tmp_path / "one"), SyntheticSet.load(tmp_path / "two")
    torch.testing.assert_close(two.images, one.images, rtol=1e-5, atol=1e-5)
    logs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[1]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    evals = [[(r["it"], r["eval_acc"]) for r in log if "eval_acc" in r] for log in logs]
    assert [it for it, _ in evals[1]] == [it for it, _ in evals[0]] == [2, 3]
    assert [a for _, a in evals[1]] == pytest.approx([a for _, a in evals[0]], abs=1.0)  # same set up to float order


# ------------------------------------------------------------------------------------------------ MTT segments
@pytest.fixture(scope="module")
def tiny_store(digits, tmp_path_factory):
    from ddkit.experts import ExpertConfig, train_experts

    config = ExpertConfig(model="convnet_w32", epochs=2, lr=0.05, test_every_epoch=False, speed="plain")
    return str(train_experts(digits, config, tmp_path_factory.mktemp("store") / "experts", 2, seed=0).root)


MTT_OPTIONS = {"model": "convnet_w32", "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2, "lr_img": 100.0,
               "lr_teacher": 0.05}


def test_mtt_segment_shards_sum_to_the_whole_step(digits, tiny_store, monkeypatch, one_thread):
    from ddkit.api import method_config
    from ddkit.engine.seeding import make_generator
    from ddkit.errors import ConfigError
    from ddkit.methods import create_distiller
    from ddkit.synthetic import SyntheticSet

    syn = SyntheticSet.from_real(digits, 1, make_generator(0, "init"))
    cfg = method_config("ddpp", "digits", 1, {**MTT_OPTIONS, "experts": tiny_store, "segments": 3})
    d = create_distiller("ddpp", cfg, device="cpu", speed="plain")
    d.setup(digits, syn, make_generator(0, "setup"))
    gen = make_generator(0, "step")
    before = gen.get_state()
    wrt = [syn.images, syn.extras["lr"]]

    def run(segments):
        gen.set_state(before)
        if segments is not None:
            monkeypatch.setattr(distributed, "shard", lambda items: [items[s] for s in segments])
        loss, metrics = d.loss(1, digits, syn, gen)
        return float(loss.detach()), torch.autograd.grad(loss, wrt), gen.get_state(), metrics

    whole = run(None)
    parts = [run([0, 2]), run([1])]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-5)
    for i in range(len(wrt)):
        torch.testing.assert_close(parts[0][1][i] + parts[1][1][i], whole[1][i], rtol=1e-4, atol=1e-8)
    assert all(torch.equal(p[2], whole[2]) for p in parts)
    assert parts[0][3] == whole[3] and "pruned" in whole[3]  # metrics describe segment 0, which rank 0 holds
    assert float(run([])[0]) == 0.0
    with pytest.raises(ConfigError, match="segments must be >= 1"):
        create_distiller("mtt", method_config("mtt", "digits", 1, {**MTT_OPTIONS, "experts": tiny_store,
                                                                   "segments": 0})).setup(digits, syn, gen)


def test_mtt_two_ranks_share_the_segments_and_equal_one_process(digits, tiny_store, tmp_path, one_thread):
    from ddkit.synthetic import SyntheticSet

    flags = ["--method", "mtt", "--dataset", "digits", "--ipc", "1", "--no-progress", "--device", "cpu",
             "--iterations", "2", "--experts", tiny_store, "--set", "speed=plain", "--set", "method.segments=3",
             *[a for k, v in MTT_OPTIONS.items() for a in ("--set", f"method.{k}={v}")]]
    assert main(["distill", *flags, "--out", str(tmp_path / "one")]) == 0
    ok(torchrun("distill", *flags, "--out", str(tmp_path / "two"), cwd=tmp_path))
    one, two = SyntheticSet.load(tmp_path / "one"), SyntheticSet.load(tmp_path / "two")
    assert not torch.equal(one.images, SyntheticSet.from_real(digits, 1, _init_gen()).images)  # it moved
    torch.testing.assert_close(two.images, one.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.learned_lr, one.learned_lr, rtol=1e-5, atol=1e-8)


def _init_gen():
    from ddkit.engine.seeding import make_generator

    return make_generator(0, "init")


# ------------------------------------------------------------------------------------------------ rank agreement
def test_ranks_that_diverged_are_stopped_on_every_rank(monkeypatch):
    from ddkit.errors import DDKitError

    state = {"images": torch.ones(2, 3, dtype=torch.bfloat16), "generator state": torch.zeros(4, dtype=torch.uint8)}
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda mine: [mine, mine])
    distributed.check_in_step(state, "iteration 5")  # agreement: nothing happens
    monkeypatch.setattr(distributed, "all_gather_objects", lambda mine: [mine, {**mine, "images": "other"}])
    with pytest.raises(DDKitError, match="iteration 5: the torchrun ranks hold different images;"):
        distributed.check_in_step(state, "iteration 5")
