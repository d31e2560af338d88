"""The training benchmark's plot (one row of panels per model: tokens/s, step time, peak RSS in
MiB, loss curves; and a row for the memory search) and the memory search's markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import Column, markdown_table


def memory_markdown(search: dict[str, Any]) -> str:
    """The memory search as a markdown section: every cell tried, then the largest fits."""
    columns = [Column("mode", "mode"), Column("r", "r"), Column("seq", "seq"),
               Column("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
               Column("train_peak_rss_mib", "training peak MiB", "{:.0f}"),
               Column("step_s", "step s", "{:.2f}"),
               Column("fits", "fits", lambda v: "yes" if v else "no"), Column("status", "status")]
    lines = [f"## Largest LoRA rank and sequence length within {search['budget_mib']:.0f} MiB "
             f"({search['model']}, batch {search['batch_size']}, {search['steps']} steps)", "",
             markdown_table(search["cells"], columns), "", *[f"- {line}" for line in search["summary"]]]
    return "\n".join(lines)


def plot_training(path: Path, rows: list[dict[str, Any]], search: dict[str, Any] | None = None) -> Path:
    """One row of panels per model; engines keep their colour across rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "tokens_per_s" in r]
    models = list(dict.fromkeys(r["model"] for r in measured))
    engines = list(dict.fromkeys(r["engine"] for r in measured))
    cmap = plt.get_cmap("tab10")
    colors = {e: cmap(i % 10) for i, e in enumerate(engines)}
    n_rows = len(models) + (1 if search else 0)
    fig, axes = plt.subplots(n_rows, 4, figsize=(19, 3.0 * n_rows + 0.8), squeeze=False)
    bars = (("tokens_per_s", "tokens/s (real tokens)", 1.0, "{:.0f}"), ("step_s", "step time (ms)", 1000.0, "{:.0f}"),
            ("peak_rss_mib", "peak RSS (MiB)", 1.0, "{:.0f}"))
    for i, model in enumerate(models):
        mine = [r for r in measured if r["model"] == model]
        for j, (key, title, scale, fmt) in enumerate(bars):
            ax = axes[i][j]
            values = [float(r[key]) * scale for r in mine]
            ax.barh(range(len(mine)), values, color=[colors[r["engine"]] for r in mine])
            for y, v in enumerate(values):
                ax.text(v, y, " " + fmt.format(v), va="center", fontsize=8)
            ax.set_yticks(range(len(mine)))
            ax.set_yticklabels([r["engine"] for r in mine], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            ax.margins(x=0.25)
        ax = axes[i][3]
        for r in mine:
            curve = r["loss_curve"]
            ax.plot(range(1, len(curve) + 1), curve, color=colors[r["engine"]], label=r["engine"], linewidth=1.2)
        ax.set_title(f"{model}: loss (median over repeats)", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if search:
        _plot_search(axes[-1], search)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_search(axes: Any, search: dict[str, Any]) -> None:
    """Peak RSS against sequence length for each mode at each rank, with the budget as a line."""
    cells = [c for c in search["cells"] if c.get("peak_rss_mib") is not None]
    modes = list(search["modes"])
    for j, ax in enumerate(axes):
        if j >= len(modes):
            ax.axis("off")
            continue
        mode = modes[j]
        for r in sorted({c["r"] for c in cells if c["mode"] == mode}):
            pts = sorted((c["seq"], c["peak_rss_mib"]) for c in cells if c["mode"] == mode and c["r"] == r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"r={r}", linewidth=1.2)
        ax.axhline(search["budget_mib"], color="red", linestyle="--", linewidth=1, label="budget")
        ax.set_xscale("log", base=2)
        lens = sorted({c["seq"] for c in cells})
        ax.set_xticks(lens, [str(n) for n in lens])
        ax.minorticks_off()
        ax.set_title(f"{search['model']} memory, {mode} (batch 1)", fontsize=10)
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("peak RSS (MiB)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
