"""The report's figures (matplotlib, Agg backend: no display needed), drawn from the result rows alone.

- accuracy vs IPC, one line per method, one panel per dataset, with the published numbers as hollow markers;
- accuracy vs distillation wall time (log scale), one point per cell;
- peak resident memory of the distillation process per method and IPC.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _done(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["acc_mean"] != ""]


def _save(fig, path: Path) -> None:
    """Write the PNG atomically (a report being rewritten never shows a torn image)."""
    from ..io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def make_plots(rows: list[dict[str, Any]], folder: str | Path) -> list[tuple[str, str]]:
    """Write the figures that have data into ``folder``; returns ``(title, path relative to the report)``."""
    folder = Path(folder)
    done = _done(rows)
    if not done:
        return []
    plt = _pyplot()
    out = []
    for title, name, draw in (("Accuracy vs IPC", "accuracy_vs_ipc.png", _acc_vs_ipc),
                              ("Accuracy vs distillation wall time", "accuracy_vs_time.png", _acc_vs_time),
                              ("Peak memory of the distillation process", "peak_memory.png", _memory)):
        fig = draw(plt, done)
        if fig is None:
            continue
        _save(fig, folder / name)
        plt.close(fig)
        out.append((title, f"{folder.name}/{name}"))
    return out


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen and r["method"] != "whole-data":
            seen.append(r["method"])
    return seen


def _colours(plt) -> list:
    """One colour per method: the default cycle has 10, a full suite has 12 methods or more, and two methods
    sharing a colour in one plot cannot be told apart; tab20 alternates dark and light shades of 10 hues."""
    cmap = plt.get_cmap("tab20")
    return [cmap(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]


def _acc_vs_ipc(plt, rows):
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    colours = _colours(plt)
    methods = _methods(rows)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for i, method in enumerate(methods):
            pts = sorted((r["ipc"], r["acc_mean"], r["acc_std"]) for r in mine if r["method"] == method)
            if not pts:
                continue
            colour = colours[i % len(colours)]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        label=method, color=colour, capsize=3)
            pub = [(r["ipc"], float(r["published"].split()[0])) for r in mine
                   if r["method"] == method and r["published"]]
            if pub:
                ax.scatter([p[0] for p in pub], [p[1] for p in pub], facecolors="none", edgecolors=colour, s=60)
        whole = [r for r in mine if r["method"] == "whole-data"]
        if whole:
            ax.axhline(whole[0]["acc_mean"], color="black", linestyle="--", linewidth=1, label="whole data (ours)")
        ax.set_xscale("log")
        ax.set_xlabel("images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset} (hollow: published)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _acc_vs_time(plt, rows):
    pts = [r for r in rows if r["method"] != "whole-data" and r["distill_s"] != ""]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(plt)
    markers = {}
    for i, method in enumerate(_methods(pts)):
        mine = [r for r in pts if r["method"] == method]
        for r in mine:
            marker = markers.setdefault(r["ipc"], "osD^v<>"[len(markers) % 7])
            ax.scatter(max(float(r["distill_s"]), 0.1), r["acc_mean"], color=colours[i % len(colours)], marker=marker,
                       label=f"{method}" if r is mine[0] else None)
            ax.annotate(f"{r['ipc']}", (max(float(r["distill_s"]), 0.1), r["acc_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("distillation wall time (s, log; label: IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _memory(plt, rows):
    pts = [r for r in rows if r["method"] != "whole-data" and r["distill_peak_rss_mib"] != ""]
    if not pts:
        return None
    methods = _methods(pts)
    ipcs = sorted({r["ipc"] for r in pts})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) * len(ipcs)), 4.5))
    width = 0.8 / len(ipcs)
    for j, ipc in enumerate(ipcs):
        xs, ys = [], []
        for i, method in enumerate(methods):
            found = [r for r in pts if r["method"] == method and r["ipc"] == ipc]
            if found:
                xs.append(i + j * width)
                ys.append(float(found[0]["distill_peak_rss_mib"]))
        ax.bar(xs, ys, width=width, label=f"IPC {ipc}")
    ax.set_xticks([i + width * (len(ipcs) - 1) / 2 for i in range(len(methods))])
    ax.set_xticklabels(methods, rotation=30)
    ax.set_ylabel("peak RSS of `ddkit distill` (MiB)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
