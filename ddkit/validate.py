"""Value rules for numeric and named options, applied where a value enters ddkit.

The same rule answers a ``--set`` override, a YAML key, a command-line flag and a Python API argument, so a value
that means nothing (a negative iteration count, an lr of NaN, zero evaluation runs, a null where a number is
needed) is refused with one line naming the option, before any work starts.

Method options are checked generically from the method's config dataclass, so methods added later are covered:
the field's type (a null only where the type is ``Optional``), finite floats, and no negative value for a number
whose default is not negative (counts, rates, weights).  A field can state its own bounds with
``dataclasses.field(..., metadata={"min": 0.0, "max": 1.0, "min_exclusive": True, "choices": (...)})``.
The options every method inherits from :class:`~ddkit.methods.base.DistillConfig` have their rules here.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
    """A bound on a number (``low`` inclusive unless ``low_exclusive``; ``high`` exclusive if ``high_exclusive``)."""

    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    high_exclusive: bool = False
    allow_none: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_exclusive else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_exclusive else '<='} {_num(self.high)}")
        return " and ".join(parts) or "a number"

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_exclusive and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_exclusive and value == self.high)):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


#: run-level keys (``ddkit distill`` flags, ``--set``, YAML)
RUN_RULES: dict[str, Rule] = {
    "ipc": Rule(low=1),
    "iterations": Rule(low=0, allow_none=True),  # None: the method's budget
    "seed": Rule(low=0, high=2**63, high_exclusive=True),
    "engine.checkpoint_every": Rule(low=0),  # 0: only at the end
    "engine.eval_every": Rule(low=0),  # 0: no periodic evaluation
    "engine.eval_runs": Rule(low=1),
    "engine.eval_epochs": Rule(low=1),
    "engine.grid_every": Rule(low=0),
    "data.zca_eps": Rule(low=0, low_exclusive=True),
    "data.image_size": Rule(low=1, allow_none=True),
}

#: the options of DistillConfig, which every method inherits
BASE_METHOD_RULES: dict[str, Rule] = {
    "iterations": Rule(low=0),
    "lr_img": Rule(low=0, low_exclusive=True),  # an lr of 0 is a run that does not learn
    "momentum_img": Rule(low=0, high=1, high_exclusive=True),
}
BASE_METHOD_CHOICES: dict[str, tuple[str, ...]] = {"init": ("real", "noise")}


def check_number(key: str, value: Any, rule: Rule) -> Any:
    """``value`` if it is a finite number obeying ``rule`` (or an allowed None); else a ConfigError naming ``key``."""
    if value is None:
        if rule.allow_none:
            return value
        raise ConfigError(f"{key}: expected a number {rule.describe()}, got null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number {rule.describe()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number {rule.describe()}, got {value}")
    if not rule.admits(value):
        raise ConfigError(f"{key}: must be {rule.describe()}, got {value}")
    return value


def check_run_value(key: str, value: Any) -> Any:
    """Check one run-level setting (``ipc``, ``engine.eval_runs``, ...); keys without a rule pass unchanged."""
    rule = RUN_RULES.get(key)
    return value if rule is None else check_number(key, value, rule)


def check_run_config(cfg: Any) -> None:
    """Every ruled key of a :class:`~ddkit.config.RunConfig` (flags set without ``apply_setting`` included)."""
    for key in RUN_RULES:
        target = cfg
        for part in key.split(".")[:-1]:
            target = getattr(target, part)
        check_run_value(key, getattr(target, key.split(".")[-1]))


# --------------------------------------------------------------------------------------------------------------
# method options: generic over the config dataclass
# --------------------------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, accepts None)`` for ``X | None`` / ``Optional[X]``; string annotations are parsed loosely."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        base = {"int": int, "float": float, "bool": bool, "str": str}.get(parts[0], Any)
        return base, "None" in parts
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return dataclasses.MISSING


def _field_rule(cls: type, f: dataclasses.Field, optional: bool) -> Rule | None:
    meta = f.metadata or {}
    if any(k in meta for k in ("min", "max")):
        return Rule(low=meta.get("min"), high=meta.get("max"), low_exclusive=bool(meta.get("min_exclusive")),
                    high_exclusive=bool(meta.get("max_exclusive")), allow_none=optional)
    from .methods.base import DistillConfig

    if f.name in BASE_METHOD_RULES and f.name in {g.name for g in dataclasses.fields(DistillConfig)}:
        base = BASE_METHOD_RULES[f.name]
        return dataclasses.replace(base, allow_none=optional)
    default = _default(f)
    if isinstance(default, (int, float)) and not isinstance(default, bool) and default >= 0:
        return Rule(low=0, allow_none=optional)  # counts, rates and weights are not negative
    return Rule(allow_none=optional)


def check_method_value(cls: type, name: str, value: Any) -> Any:
    """Check one option of the method config dataclass ``cls``; raises ConfigError naming ``method.<name>``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    f = fields[name]
    key = f"method.{name}"
    base, optional = _split_optional(_hints(cls).get(name, Any))
    if value is None:
        if optional:
            return None
        tname = getattr(base, "__name__", str(base))
        raise ConfigError(f"{key}: expected a value of type {tname}, got null")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (base is int and isinstance(value, float)):
            raise ConfigError(f"{key}: expected a value of type {base.__name__}, got {value!r}")
        value = float(value) if base is float else value
        rule = _field_rule(cls, f, optional)
        return check_number(key, value, rule) if rule is not None else value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        choices = (f.metadata or {}).get("choices") or BASE_METHOD_CHOICES.get(name)
        if choices and value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        if name == "model":
            from .models import MODELS

            MODELS.get(value)  # an unknown model fails here, with close matches, not inside setup
    return value


def check_method_config(config: Any) -> None:
    """Every field of a method's config dataclass instance (what the Python API passes, defaults included)."""
    for f in dataclasses.fields(config):
        setattr(config, f.name, check_method_value(type(config), f.name, getattr(config, f.name)))


# --------------------------------------------------------------------------------------------------------------
# evaluation protocol
# --------------------------------------------------------------------------------------------------------------
PROTOCOL_RULES: dict[str, Rule] = {
    "runs": Rule(low=1),
    "epochs": Rule(low=1),
    "lr": Rule(low=0, low_exclusive=True),
    "momentum": Rule(low=0, high=1, high_exclusive=True),
    "weight_decay": Rule(low=0),
    "batch_size": Rule(low=1),
}
#: the CLI's names for the protocol's fields, so a message names the flag the user typed
PROTOCOL_FLAGS = {"runs": "--runs", "epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size"}


def check_protocol(protocol: Any) -> None:
    """An :class:`~ddkit.evaluation.EvalProtocol` with at least one model, one run, one epoch, a positive lr."""
    models = tuple(protocol.models) if not isinstance(protocol.models, str) else (protocol.models,)
    if not models or any(not isinstance(m, str) or not m.strip() for m in models):
        raise ConfigError(f"--models: expected one or more model names, got {list(models)!r}")
    for name, rule in PROTOCOL_RULES.items():
        if hasattr(protocol, name):
            key = PROTOCOL_FLAGS.get(name, f"protocol.{name}")
            check_number(key, getattr(protocol, name), rule)
