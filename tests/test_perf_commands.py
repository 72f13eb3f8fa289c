"""The full-budget GPU commands that benchmarks/bench_{dd,kip,frepo}.py print for the papers' rows (and RESULTS.md
quotes) parse with ddkit's own CLI parser and resolve to a valid run configuration, so nobody with a GPU finds a
typo after the queue wait.  Parsing only: no data, no device."""
from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import pytest

from ddkit.cli import build_parser, resolve_run_config

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(name: str):
    """The bench module (``benchmarks`` is a package beside ``ddkit``, not installed with it)."""
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module(f"benchmarks.bench_{name}")


def _ddkit_lines(text: str) -> list[list[str]]:
    """Each ``ddkit ...`` command of a shell snippet (continuations joined, comments dropped) as argv."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] == "ddkit":
            commands.append(argv[1:])
    return commands


def _commands(name: str, ipc: int) -> str:
    module = _bench(name)
    fields = {"ipc": ipc}
    if name == "kip":
        fields.update(krr=module.PAPER["krr_conv"][ipc], nn=module.PAPER["to_nn"][ipc])
    if name == "frepo":
        fields.update(steps=1000)
    return module.GPU_COMMANDS.format(**fields)


@pytest.mark.parametrize("name", ["dd", "kip", "frepo"])
@pytest.mark.parametrize("ipc", [1, 10])
def test_gpu_commands_parse(name, ipc):
    commands = _ddkit_lines(_commands(name, ipc))
    assert any(c[0] == "distill" for c in commands) and any(c[0] == "evaluate" for c in commands)
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert args.device == "cuda"
        if args.command == "distill":
            cfg = resolve_run_config(args)  # unknown --set keys and bad values raise here
            assert (cfg.method, cfg.dataset, cfg.ipc) == (name, "fashion-mnist", ipc)
