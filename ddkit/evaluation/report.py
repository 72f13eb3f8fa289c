"""Report: evaluation rows, mean ± std per architecture, JSON/CSV/Markdown, merging for benchmark tables."""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    method: str
    dataset: str
    ipc: int
    model: str
    run: int
    seed: int
    accuracy: float
    seconds: float
    peak_rss_mib: float | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def models(self) -> list[str]:
        seen: list[str] = []
        for r in self.rows:
            if r.model not in seen:
                seen.append(r.model)
        return seen

    def accuracies(self, model: str) -> list[float]:
        return [r.accuracy for r in self.rows if r.model == model]

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for m in self.models():
            accs = self.accuracies(m)
            out[m] = {
                "mean": statistics.fmean(accs),
                "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "accs": accs,
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``ddkit evaluate --json`` shape: dataset, ipc, method, results per model (percent)."""
        first = self.rows[0] if self.rows else None
        return {
            "dataset": first.dataset if first else None,
            "ipc": first.ipc if first else None,
            "method": first.method if first else None,
            "results": self.summary(),
            "protocol": self.protocol,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(list(Row.__dataclass_fields__))
        for r in self.rows:
            w.writerow(list(asdict(r).values()))
        return buf.getvalue()

    def to_markdown(self) -> str:
        first = self.rows[0] if self.rows else None
        head = f"{first.method} on {first.dataset}, IPC {first.ipc}" if first else "empty report"
        lines = [f"**{head}**", "", "| model | accuracy (%) | runs | seconds/model |", "|---|---|---|---|"]
        for m, s in self.summary().items():
            secs = statistics.median([r.seconds for r in self.rows if r.model == m])
            lines.append(f"| {m} | {s['mean']:.2f} ± {s['std']:.2f} | {len(s['accs'])} | {secs:.1f} |")
        return "\n".join(lines)

    @staticmethod
    def merge(reports: list["Report"]) -> "Report":
        merged = Report()
        for r in reports:
            merged.rows.extend(r.rows)
        return merged


def format_mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"
