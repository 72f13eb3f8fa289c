"""Run configuration: typed sections, YAML files and ``--set key=value`` overrides.

The resolved configuration of a run is written to ``config.yaml`` next to its results, so a run can be repeated
from that file alone (``ddkit distill --config DIR/config.yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .validate import check_method_value, check_run_value


@dataclass
class DataConfig:
    root: str | None = None
    zca: bool = False
    zca_eps: float = 0.1  # kornia ZCAWhitening eps as in MTT (anchors.md §2.15)
    image_size: int | None = None


@dataclass
class EngineConfig:
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: no periodic evaluation
    eval_runs: int = 2
    eval_epochs: int = 300
    grid_every: int = 0
    progress: bool = True
    #: optional loggers beside metrics.jsonl: "tensorboard", "wandb" or both, comma-separated (engine/loggers.py)
    loggers: str = ""


@dataclass
class RunConfig:
    method: str = "dm"
    dataset: str = "digits"
    ipc: int = 10
    seed: int = 0
    iterations: int | None = None  # None: the method's default budget
    device: str = "auto"
    #: the speed layer (ddkit.accel): "auto" (the device's measured levers) or "plain" (the official computation)
    speed: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    method_config: dict[str, Any] = field(default_factory=dict)  # 'method.<field>' overrides


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse a command-line string into the field's type; a wrong type is a clear ConfigError."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split("|")[0].strip(), str)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        annotation = args[0]
    try:
        if annotation is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ValueError:
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"--set {key}={text}: expected a value of type {name}") from None
    return text


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid {where} keys: {', '.join(sorted(known))})")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value against a field type."""
    if isinstance(value, str):
        return parse_value(value, annotation, key)
    if value is None:
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
        if not optional and not (isinstance(annotation, str) and "None" in annotation):
            raise ConfigError(f"{key}: expected a value of type {getattr(annotation, '__name__', annotation)}, got null")
        return None
    hints = annotation
    if typing.get_origin(hints) in (typing.Union, types.UnionType):
        hints = [a for a in typing.get_args(hints) if a is not type(None)][0]
    if hints is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hints in (int, float, bool) and not isinstance(value, hints) or (hints is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hints.__name__}, got {value!r}")
    if hints is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def all_keys(method_config_cls: type | None) -> list[str]:
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("data", "engine", "method_config")]
    keys += [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
    keys += [f"engine.{f.name}" for f in dataclasses.fields(EngineConfig)]
    if method_config_cls is not None:
        keys += [f"method.{f.name}" for f in dataclasses.fields(method_config_cls)]
    return keys


def apply_setting(cfg: RunConfig, key: str, value: Any, method_config_cls: type | None) -> None:
    """Set one dotted key (``data.zca``, ``engine.eval_every``, ``method.lr_img``, ``ipc``) with type checks."""
    known = all_keys(method_config_cls)
    if key not in known:
        raise _unknown(key, known, "config")
    if key.startswith("method."):
        name = key.split(".", 1)[1]
        value = coerce(value, _type_hints(method_config_cls)[name], key)
        cfg.method_config[name] = check_method_value(method_config_cls, name, value)  # validate.py: one rule set
        return
    if "." in key:
        section, name = key.split(".", 1)
        target = getattr(cfg, section)
    else:
        name, target = key, cfg
    value = check_run_value(key, coerce(value, _type_hints(type(target))[name], key))
    if key == "speed":
        from .accel import check_speed  # noqa: PLC0415 - config stays importable without torch's compile stack

        value = check_speed(value)
    setattr(target, name, value)


def parse_set(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        pairs.append((k.strip(), v))
    return pairs


def flatten_yaml(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(flatten_yaml(v, key + "."))
        else:
            out.append((key, v))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


def to_yaml_dict(cfg: RunConfig, method_config: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("method_config")
    d["method_options"] = dataclasses.asdict(method_config)
    return d


def yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
