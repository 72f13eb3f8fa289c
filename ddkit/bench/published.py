"""The papers' published accuracies, as data (``published.yaml``), for the report's "published" column.

Kept as a data file rather than code so that a corrected number is a one-line data change with its source beside
it; every entry carries the table it comes from and the anchors' verification tag (V, V*, R).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class Published:
    mean: float
    std: float | None
    tag: str
    source: str
    note: str | None

    def text(self) -> str:
        value = f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "")
        return f"{value} [{self.tag}]"


@lru_cache(maxsize=1)
def _table() -> dict:
    import yaml

    return yaml.safe_load((resources.files("ddkit.bench") / "published.yaml").read_text(encoding="utf-8")) or {}


def published(dataset: str, method: str, ipc: int) -> Published | None:
    """The published number for (dataset, method, IPC; 0 for the whole-data row), or None."""
    entry = ((_table().get(dataset) or {}).get(method) or {}).get(int(ipc))
    if entry is None:
        return None
    mean, std, tag, source, note = entry
    return Published(float(mean), None if std is None else float(std), str(tag), str(source), note)
