"""A benchmark suite: a grid of cells (dataset, method, IPC, budget, evaluation protocol), read and checked whole.

A suite is a named file shipped in ``ddkit/bench/suites/`` (``cpu-smoke``, ``cpu-fmnist``, ``gpu-paper``,
``gpu-levers``) or any YAML file of the same shape::

    suite: my-suite
    description: what it measures and why its budgets are what they are
    defaults:                      # every cell starts from these
      dataset: fashion-mnist
      ipc: 1
      seed: 0
      device: cpu                  # cpu | cuda | auto
      speed: auto                  # the speed layer's setting
      data_root: null              # the folder with the dataset files (--data-root fills it when null)
      budget: {seconds: 120}       # {iterations: N}, or {seconds: T, seconds_per_iteration: s} -> max(1, T // s)
      eval: {protocol: field, runs: 2, epochs: 300, models: [convnet]}
      options: {}                  # the method's own options (method.<field>)
      set: {}                      # other run settings: data.zca, engine.checkpoint_every, ...
    experts:                       # expert stores trained once (``ddkit experts``) for mtt / ftd / ddpp cells
      fm-sgd: {dataset: fashion-mnist, num_experts: 2, epochs: 3, optimizer: sgd}
    cells:                         # lists in method / ipc / dataset expand to their product
      - {method: [random, herding, kcenter], ipc: [1, 10]}
      - {method: dm, ipc: [1, 10], budget: {seconds_per_iteration: 2.5}}
      - {method: mtt, ipc: 1, experts: fm-sgd, options: {syn_steps: 10}}
      - {method: whole-data}       # ConvNet-3 on the full training set under the cell's protocol, for scale

Everything is checked before anything runs (:func:`validate`): unknown keys, methods, datasets, models and
options are refused with the project's one-line errors and close matches; values follow the same rules as
``--set``, YAML and the Python API (:mod:`ddkit.validate`).  A lever suite (``levers:``) times the speed layer's
levers on one device instead of running cells (:mod:`ddkit.bench.levers`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: the method name of the whole-data row: not a distillation method, the full training set itself
WHOLE_DATA = "whole-data"

TOP_KEYS = ("suite", "description", "defaults", "experts", "cells", "levers")
CELL_KEYS = ("method", "dataset", "ipc", "seed", "device", "speed", "data_root", "budget", "eval", "options",
             "set", "experts", "tag", "note")
BUDGET_KEYS = ("iterations", "seconds", "seconds_per_iteration")
EVAL_KEYS = ("protocol", "runs", "epochs", "steps", "models", "dsa", "lr", "batch_size")
EXPERT_KEYS = ("dataset", "num_experts", "epochs", "model", "optimizer", "seed", "device", "data_root", "set")
LEVER_KEYS = ("requires", "dataset_shapes", "repeats", "warmup", "batches", "forward_batch", "model")
#: run-config keys a cell's ``set`` may not hold: the cell's own keys say them (one place for each setting)
CELL_OWNED = ("method", "dataset", "ipc", "seed", "iterations", "device", "speed", "data.root")


def _close(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_keys(mapping: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    """``mapping`` if it is a mapping whose keys are all in ``known``; else a ConfigError naming ``where``."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(known)}, got {type(mapping).__name__}")
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}{_close(key, known)} (valid keys: {', '.join(known)})")
    return mapping


@dataclass(frozen=True)
class ExpertSpec:
    """An expert store trained once by ``ddkit experts`` and shared by the trajectory-matching cells naming it."""

    name: str
    dataset: str
    num_experts: int
    epochs: int
    model: str = "convnet"
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    set: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        return _digest(dataclasses.asdict(self))


@dataclass(frozen=True)
class Cell:
    """One measurement: distill ``method`` on ``dataset`` at ``ipc`` within ``iterations``, then evaluate."""

    method: str
    dataset: str
    ipc: int
    seed: int
    device: str
    speed: str
    data_root: str | None
    iterations: int | None  # None: the method's own budget (full-budget suites)
    budget: dict[str, Any]
    eval: dict[str, Any]
    options: dict[str, Any]
    set: dict[str, Any]
    experts: str | None
    tag: str | None
    note: str | None

    @property
    def id(self) -> str:
        """A readable, filesystem-safe name: ``dataset-method-ipcK[-tag]`` (the whole-data row has no IPC)."""
        parts = [self.dataset, self.method] + ([] if self.is_whole else [f"ipc{self.ipc}"])
        return "-".join(parts + ([self.tag] if self.tag else []))

    @property
    def is_whole(self) -> bool:
        return self.method == WHOLE_DATA

    def spec(self) -> dict[str, Any]:
        """What the cell's results depend on (stored with its records; a changed spec is not resumed).
        ``note`` is free text and ``data_root`` a location, so neither is part of it."""
        d = dataclasses.asdict(self)
        d.pop("note")
        d.pop("data_root")
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def fingerprint(self) -> str:
        return _digest(self.spec())


@dataclass
class Suite:
    name: str
    description: str
    cells: list[Cell]
    experts: dict[str, ExpertSpec]
    levers: dict[str, Any] | None
    source: str

    @property
    def is_levers(self) -> bool:
        return self.levers is not None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------
def shipped_suites() -> list[str]:
    """Names of the suites shipped with ddkit (``ddkit/bench/suites/*.yaml``)."""
    folder = resources.files("ddkit.bench") / "suites"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def suite_text(name_or_path: str | Path) -> tuple[str, str]:
    """``(yaml text, source)`` of a shipped suite name or a YAML file path."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file() or "/" in text:
        if not path.is_file():
            raise ConfigError(f"suite file not found: {path} (shipped suites: {', '.join(shipped_suites())})")
        return path.read_text(encoding="utf-8"), str(path)
    names = shipped_suites()
    if text not in names:
        raise ConfigError(f"unknown suite {text!r}{_close(text, names)} (shipped suites: {', '.join(names)}; "
                          f"or give a YAML file)")
    return (resources.files("ddkit.bench") / "suites" / f"{text}.yaml").read_text(encoding="utf-8"), f"{text} (shipped)"


def load_suite(name_or_path: str | Path, *, data_root: str | None = None, device: str | None = None,
               check_data: bool = True) -> Suite:
    """Read, expand and validate a suite; nothing runs.  ``data_root``/``device`` fill cells that leave them
    unset (``--data-root``, ``--device``); ``check_data=False`` skips the check that dataset folders exist (for
    validating a GPU suite on a machine without its data)."""
    import yaml

    text, source = suite_text(name_or_path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}".splitlines()[0]) from None
    raw = check_keys(raw, TOP_KEYS, f"suite {source}")
    name = str(raw.get("suite") or Path(str(name_or_path)).stem)
    defaults = check_keys(raw.get("defaults"), CELL_KEYS, f"{name}: defaults")
    if "method" in defaults:
        raise ConfigError(f"{name}: defaults: 'method' belongs to each cell, not to the defaults")
    experts = _read_experts(name, raw.get("experts"), data_root, device)
    levers = raw.get("levers")
    if levers is not None:
        levers = check_keys(levers, LEVER_KEYS, f"{name}: levers")
        if raw.get("cells"):
            raise ConfigError(f"{name}: a lever suite (levers:) times the speed layer and has no cells")
        return Suite(name, str(raw.get("description") or ""), [], experts, dict(levers), source)
    items = raw.get("cells")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{name}: 'cells' must be a non-empty list of cells (each a mapping with a method)")
    cells: list[Cell] = []
    for i, item in enumerate(items):
        where = f"{name}: cells[{i}]"
        item = check_keys(item, CELL_KEYS, where)
        if "method" not in item:
            raise ConfigError(f"{where}: every cell needs a method (ddkit list methods, or {WHOLE_DATA!r})")
        cells.extend(_expand(where, defaults, item, data_root, device))
    seen: dict[str, int] = {}
    for cell in cells:
        if cell.id in seen:
            raise ConfigError(f"{name}: two cells are both {cell.id!r}; give one of them a distinct 'tag'")
        seen[cell.id] = 1
    suite = Suite(name, str(raw.get("description") or ""), cells, experts, None, source)
    validate(suite, check_data=check_data)
    return suite


def _read_experts(name: str, raw: Any, data_root: str | None, device: str | None) -> dict[str, ExpertSpec]:
    out: dict[str, ExpertSpec] = {}
    for key, spec in check_keys(raw, tuple(raw or ()), f"{name}: experts").items():
        where = f"{name}: experts.{key}"
        spec = check_keys(spec, EXPERT_KEYS, where)
        for needed in ("dataset", "num_experts", "epochs"):
            if needed not in spec:
                raise ConfigError(f"{where}: missing {needed!r}")
        out[str(key)] = ExpertSpec(
            name=str(key), dataset=str(spec["dataset"]), num_experts=spec["num_experts"], epochs=spec["epochs"],
            model=str(spec.get("model", "convnet")), optimizer=str(spec.get("optimizer", "sgd")),
            seed=spec.get("seed", 0), device=str(spec.get("device") or device or "auto"),
            data_root=spec.get("data_root") or data_root, set=dict(spec.get("set") or {}))
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _merged(defaults: dict[str, Any], item: dict[str, Any], key: str) -> dict[str, Any]:
    """Mapping-valued keys (budget, eval, options, set) merge the cell's entries over the defaults'."""
    base = copy.deepcopy(defaults.get(key) or {})
    own = item.get(key) or {}
    for where, value in (("defaults", base), ("cell", own)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} ({where}): expected a mapping, got {type(value).__name__}")
    base.update(copy.deepcopy(own))
    return base


def _budget(defaults: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """The cell's budget over the defaults': a cell that states an iteration count drops a default time budget,
    and one that states a time or a cost per iteration drops a default iteration count."""
    own = item.get("budget") or {}
    base = dict(defaults.get("budget") or {})
    if isinstance(own, dict) and "iterations" in own:
        base = {}
    elif isinstance(own, dict) and own:
        base.pop("iterations", None)
    return _merged({"budget": base}, item, "budget")


def _expand(where: str, defaults: dict[str, Any], item: dict[str, Any], data_root: str | None,
            device: str | None) -> list[Cell]:
    get = lambda key, fallback=None: item.get(key, defaults.get(key, fallback))  # noqa: E731
    out = []
    for method, dataset, ipc in itertools.product(_as_list(item["method"]), _as_list(get("dataset", "digits")),
                                                  _as_list(get("ipc", 1))):
        budget = check_keys(_budget(defaults, item), BUDGET_KEYS, f"{where}: budget")
        evaluation = check_keys(_merged(defaults, item, "eval"), EVAL_KEYS, f"{where}: eval")
        method = str(method).lower()
        whole = method == WHOLE_DATA
        out.append(Cell(
            method=method, dataset=str(dataset).lower(), ipc=0 if whole else ipc, seed=get("seed", 0),
            device=str(get("device") or device or "auto"), speed=str(get("speed", "auto")),
            data_root=get("data_root") or data_root,
            iterations=None if whole else 0 if _selects_only(method) else _iterations(f"{where} ({method}, ipc {ipc})",
                                                                                       budget),
            budget=budget, eval=evaluation, options=_merged(defaults, item, "options"),
            set=_merged(defaults, item, "set"), experts=get("experts"), tag=get("tag"), note=get("note")))
    return out


def _selects_only(method: str) -> bool:
    """Coreset selectors pick real images and run no iterations, so a distillation budget does not apply."""
    from ..methods import METHODS

    return method in METHODS and bool(METHODS.get(method).selects_only)


def _iterations(where: str, budget: dict[str, Any]) -> int | None:
    """The cell's iteration count: ``iterations``, or a time budget converted with a measured cost per iteration
    (``max(1, seconds // seconds_per_iteration)``: at least one iteration, so a method whose one iteration is over
    the budget still runs, and the report shows its real time); None: the method's own full budget."""
    from ..validate import Rule, check_number

    if "iterations" in budget:
        if "seconds" in budget or "seconds_per_iteration" in budget:
            raise ConfigError(f"{where}: budget: give either iterations or seconds with seconds_per_iteration")
        return check_number(f"{where}: budget.iterations", budget["iterations"], Rule(low=0))
    if "seconds" in budget or "seconds_per_iteration" in budget:
        if "seconds" not in budget or "seconds_per_iteration" not in budget:
            raise ConfigError(f"{where}: budget: seconds needs seconds_per_iteration (the method's measured cost on "
                              f"this machine kind) to become an iteration count; got {budget}")
        seconds = check_number(f"{where}: budget.seconds", budget["seconds"], Rule(low=0, low_exclusive=True))
        per = check_number(f"{where}: budget.seconds_per_iteration", budget["seconds_per_iteration"],
                           Rule(low=0, low_exclusive=True))
        return max(1, int(seconds // per))
    return None


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def validate(suite: Suite, *, check_data: bool = True) -> None:
    """Every cell and expert store checked with the library's own rules; the first problem raises, naming the cell."""
    for spec in suite.experts.values():
        _check_experts(suite.name, spec, check_data)
    for cell in suite.cells:
        try:
            _check_cell(cell, suite, check_data)
        except ConfigError as exc:
            raise ConfigError(f"{suite.name}: cell {cell.id}: {exc}") from None
        except Exception as exc:  # UnknownNameError, DataError: same one line, naming the cell
            from ..errors import DDKitError

            if not isinstance(exc, DDKitError):
                raise
            raise type(exc)(f"{suite.name}: cell {cell.id}: {exc}") from None


def _check_dataset(name: str, root: str | None, check_data: bool) -> None:
    from ..data.datasets import get_dataset_spec

    spec = get_dataset_spec(name)  # unknown names: close matches
    if spec.needs_root and check_data:
        if not root:
            raise ConfigError(f"dataset {name!r} is read from local files: pass --data-root or set data_root")
        if not Path(root).expanduser().is_dir():
            raise ConfigError(f"data_root {root} does not exist or is not a folder (dataset {name!r})")


def _check_experts(suite: str, spec: ExpertSpec, check_data: bool) -> None:
    from ..models import MODELS
    from ..validate import Rule, check_number

    where = f"{suite}: experts.{spec.name}"
    try:
        _check_dataset(spec.dataset, spec.data_root, check_data)
        MODELS.get(spec.model)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check_number(f"{where}.num_experts", spec.num_experts, Rule(low=1))
    check_number(f"{where}.epochs", spec.epochs, Rule(low=1))
    check_number(f"{where}.seed", spec.seed, Rule(low=0))
    if spec.optimizer not in ("sgd", "gsam"):
        raise ConfigError(f"{where}.optimizer: expected sgd or gsam, got {spec.optimizer!r}")
    _check_device(spec.device)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}")


def protocol_of(cell: Cell):
    """The cell's :class:`~ddkit.evaluation.EvalProtocol` (named protocol with the cell's overrides)."""
    from ..evaluation import EvalProtocol

    ev = dict(cell.eval)
    name = str(ev.pop("protocol", "field"))
    models = ev.pop("models", None)
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    dsa = ev.pop("dsa", None)
    protocol = EvalProtocol.named(name, models=tuple(models) if models is not None else None, speed=cell.speed, **ev)
    if ev.get("epochs") is not None and ev.get("steps") is None:
        protocol.steps = None  # explicit epochs replace a step budget, as ddkit evaluate --epochs does
    if ev.get("lr") is not None:
        protocol.use_learned_lr = False
    if dsa is not None:
        if not isinstance(dsa, bool):
            raise ConfigError(f"eval.dsa: expected true or false, got {dsa!r}")
        protocol.dsa = dsa
    return protocol


def _check_cell(cell: Cell, suite: Suite, check_data: bool) -> None:
    from ..accel import check_speed
    from ..config import RunConfig, apply_setting
    from ..evaluation.protocol import check_protocol as check_protocol_choices
    from ..methods import METHODS
    from ..models import MODELS
    from ..validate import check_protocol, check_run_value

    _check_dataset(cell.dataset, cell.data_root, check_data)
    _check_device(cell.device)
    check_speed(cell.speed)
    check_run_value("seed", cell.seed)
    protocol = protocol_of(cell)
    check_protocol(protocol)
    check_protocol_choices(protocol)
    for model in protocol.models:
        MODELS.get(model)
    if cell.is_whole:
        if cell.options or cell.experts:
            raise ConfigError("the whole-data row trains on the real training set: it takes no options or experts")
        return
    check_run_value("ipc", cell.ipc)
    cls = METHODS.get(cell.method)
    run = RunConfig()
    for key, value in cell.set.items():
        if key in CELL_OWNED or key.startswith("method."):
            raise ConfigError(f"set: {key!r} is a cell key (method, dataset, ipc, seed, device, speed, data_root, "
                              f"budget, options), not a set key")
        apply_setting(run, key, value, cls.Config)  # unknown keys with close matches, the values' rules
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "experts" in fields:
        if not cell.experts:
            raise ConfigError(f"{cell.method} needs an expert store: give the cell experts: NAME "
                              f"(one of the suite's experts: {', '.join(suite.experts) or 'none defined'})")
        if cell.experts not in suite.experts:
            raise ConfigError(f"experts {cell.experts!r} is not defined{_close(cell.experts, list(suite.experts))} "
                              f"(the suite's experts: {', '.join(suite.experts) or 'none'})")
        if suite.experts[cell.experts].dataset != cell.dataset:
            raise ConfigError(f"experts {cell.experts!r} were trained on {suite.experts[cell.experts].dataset}, "
                              f"not {cell.dataset}")
        if "experts" in cell.options:
            raise ConfigError("options.experts: name the suite's store with the cell's 'experts' key instead")
    elif cell.experts:
        raise ConfigError(f"{cell.method} does not use expert trajectories (experts: {cell.experts!r})")
    for key, value in cell.options.items():
        if key not in fields:
            apply_setting(run, f"method.{key}", value, cls.Config)  # raises: unknown option, close matches
        apply_setting(run, f"method.{key}", value, cls.Config)  # type and value rules (validate.py)
