"""Writing a benchmark's results: JSON for machines, a markdown table for people, a PNG plot.

Every benchmark calls `write_report` once at the end; the three files share a stem under
the results folder, and the markdown is also what the CLI prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"

    def render(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if callable(self.fmt):
            return self.fmt(value)
        return self.fmt.format(value)


@dataclass(frozen=True)
class Panel:
    """One bar chart: `metric` per row, bars labelled by `label_key`, coloured by `color_key`."""

    metric: str
    title: str
    log: bool = False
    scale: float = 1.0  # values are divided by it: 2**20 shows bytes as MiB


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return info


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(c.render(r) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def plot_bars(path: Path, rows: Sequence[dict[str, Any]], panels: Sequence[Panel], label_key: str,
              color_key: str | None = None, title: str = "", row_key: str | None = None) -> Path:
    """Horizontal bar charts, one panel per metric, rows in the given order. With `row_key`, one
    row of panels per value of that field (each model its own axes, so a 70 tok/s model is not a
    sliver beside a 900 tok/s one)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    sections: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        sections.setdefault(str(r.get(row_key, "")) if row_key else "", []).append(r)
    groups = sorted({str(r.get(color_key, "")) for r in rows}) if color_key else [""]
    cmap = plt.get_cmap("tab10")
    colors = {g: cmap(i % 10) for i, g in enumerate(groups)}
    sizes = [len(part) for part in sections.values()]
    height = max(2.5, 0.32 * len(rows) + 1.2 * len(sections))
    fig, axes = plt.subplots(len(sections), len(panels), figsize=(5.2 * len(panels), height), squeeze=False,
                             sharey="row", gridspec_kw={"height_ratios": sizes})
    for axes_row, (section, part) in zip(axes, sections.items(), strict=True):
        for ax, panel in zip(axes_row, panels, strict=True):
            _bars(ax, part, panel, [colors[str(r.get(color_key, ""))] if color_key else cmap(0) for r in part])
            ax.set_title(f"{section}: {panel.title}" if section else panel.title, fontsize=10)
        axes_row[0].set_yticks(list(range(len(part))))
        axes_row[0].set_yticklabels([str(r.get(label_key, "")) for r in part], fontsize=8)
        axes_row[0].invert_yaxis()
    if color_key and len(groups) > 1:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups]
        fig.legend(handles, groups, loc="lower center", ncol=min(len(groups), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if color_key and len(groups) > 1 else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax: Any, rows: Sequence[dict[str, Any]], panel: Panel, colors: list[Any]) -> None:
    values = [r.get(panel.metric) for r in rows]
    numeric = [float(v) / panel.scale if isinstance(v, (int, float)) and not math.isnan(float(v)) else 0.0
               for v in values]
    ys = list(range(len(rows)))
    ax.barh(ys, numeric, color=colors)
    if panel.log and any(v > 0 for v in numeric):
        ax.set_xscale("log")
    for y, v, raw in zip(ys, numeric, values, strict=True):
        text = " n/a" if raw is None else f" {v:.0f}" if abs(v) >= 100 else f" {v:.3g}"
        ax.text(0 if raw is None else v, y, text, va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_report(
    out_dir: Path,
    name: str,
    title: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    panels: Sequence[Panel] = (),
    label_key: str = "label",
    color_key: str | None = None,
    meta: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    top: dict[str, Any] | None = None,
    row_key: str | None = None,
) -> dict[str, Path]:
    """Write <name>.json, <name>.md and (with panels) <name>.png under out_dir; return their paths.
    `top` adds keys at the JSON's top level, for what other tools read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    payload = {"benchmark": name, "title": title, "created_at": stamp, "machine": machine_info(),
               **(top or {}), "meta": meta or {}, "notes": list(notes), "rows": list(rows)}
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2))
    md = [f"# {title}", "", f"{stamp}, {payload['machine'].get('cpu', platform.machine())}, "
          f"{payload['machine'].get('usable_cores', '?')} usable cores", "", markdown_table(rows, columns)]
    if notes:
        md += ["", *[f"- {n}" for n in notes]]
    paths["md"].write_text("\n".join(md) + "\n")
    if panels and rows:
        paths["png"] = plot_bars(out_dir / f"{name}.png", rows, panels, label_key, color_key, title,
                                 row_key=row_key)
    return paths
