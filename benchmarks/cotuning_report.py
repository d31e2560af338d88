"""The quality benchmark's outputs: cotuning.json and cotuning.md through the shared writer
(benchmarks.report), extra tables (per domain, CrossLM's selection, Co-PLMs' proxy), and
cotuning.png: metric against round, one line per method, mean and spread over seeds (the
shared writer draws bar charts, which cannot show rounds).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

_SLM_KIND = {"standalone-het": "het", "co-plms": "het", "crosslm": "het"}


def _pm(stat: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "-"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _stat_fmt(scale: float = 100.0, digits: int = 1) -> Any:
    return lambda stat: f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: final-round stats (mean, std, values over seeds)."""
    het = "/".join(results["config"]["heterogeneous_slms"])
    rows = []
    for method, row in results["summary"].items():
        rows.append({
            "method": method, "slms": het if _SLM_KIND.get(method) else "llama-tiny (shared)",
            **{k: row.get(k) for k in ("slm_rougeL", "slm_em", "slm_local_rougeL", "slm_local_em", "llm_rougeL",
                                       "llm_em", "wall_s")},
            "up_kib": row["bytes_up_per_round"]["mean"] / 1024,
            "down_kib": f"{row['bytes_down_first_round']['mean'] / 1024:.1f} / "
                        f"{row['bytes_down_later_rounds']['mean'] / 1024:.1f}",
        })
    return rows


def _columns() -> list[Any]:
    from benchmarks.report import Column

    pct = _stat_fmt()
    return [Column("method", "method"), Column("slms", "device SLMs"), Column("slm_rougeL", "SLM Rouge-L", pct),
            Column("slm_em", "SLM EM", pct), Column("slm_local_rougeL", "SLM local Rouge-L", pct),
            Column("llm_rougeL", "LLM Rouge-L", pct), Column("llm_em", "LLM EM", pct),
            Column("up_kib", "up KiB/round", "{:.1f}"), Column("down_kib", "down KiB round 1 / later"),
            Column("wall_s", "wall s", _stat_fmt(1.0, 0))]


def main_table(results: dict[str, Any]) -> str:
    from benchmarks.report import markdown_table

    return markdown_table(summary_rows(results), _columns())


def domain_table(results: dict[str, Any]) -> str:
    domains = sorted(next(iter(results["summary"].values()))["per_domain_rougeL"])
    rows = ["| method | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for method, row in results["summary"].items():
        rows.append(f"| {method} | " + " | ".join(_pm(row["per_domain_rougeL"][d]) for d in domains) + " |")
    return "\n".join(rows)


def _per_round(results: dict[str, Any], method: str, pick: Any) -> list[str]:
    by_seed = [run["rounds"] for run in results["runs"].get(method, {}).values()]
    if not by_seed:
        return []
    out = []
    for i in range(1, len(by_seed[0])):
        values = [v for rounds in by_seed if (v := pick(rounds[i])) is not None]
        out.append(f"{statistics.fmean(values):.3g}" if values else "-")
    return out


def extras_table(results: dict[str, Any]) -> str:
    lines = []
    if "crosslm" in results["runs"]:
        extra = lambda key: (lambda r: (r.get("extra") or {}).get("crosslm", {}).get(key))  # noqa: E731
        lines += ["CrossLM per round (mean over seeds): synthetic samples, selected, share of the selected that "
                  "are exactly right (oracle), mean aggregated score", "",
                  "| round | samples | selected | selected correct | score mean |", "|---|---|---|---|---|"]
        cols = [_per_round(results, "crosslm", extra(k)) for k in ("samples", "selected", "selected_correct",
                                                                     "score_mean")]
        lines += [f"| {i + 1} | " + " | ".join(c[i] for c in cols) + " |" for i in range(len(cols[0]))]
    if "co-plms" in results["runs"]:
        dpm = lambda key: (lambda r: ((r.get("extra") or {}).get("dpm") or {}).get(key))  # noqa: E731
        lines += ["", "Co-PLMs proxy (DPM) on the global test per round (mean over seeds)", "",
                  "| round | DPM Rouge-L | DPM EM |", "|---|---|---|"]
        cols = [_per_round(results, "co-plms", dpm(k)) for k in ("rougeL", "em")]
        lines += [f"| {i + 1} | {cols[0][i]} | {cols[1][i]} |" for i in range(len(cols[0]))]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Metric against round per method; False (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("SLM Rouge-L", "slm", "rougeL"), ("SLM EM", "slm", "em"),
              ("LLM Rouge-L", "llm", "rougeL"), ("LLM EM", "llm", "em")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    # One colour per method in every panel, whichever methods a panel leaves out.
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(results["runs"])}
    for ax, (title, model, metric) in zip(axes.flat, panels, strict=True):
        for method, by_seed in results["runs"].items():
            series = [run["rounds"] for run in by_seed.values()]
            if any(r[model] is None for rounds in series for r in rounds):
                continue
            xs = [r["round"] for r in series[0]]
            values = [[100 * rounds[i][model][metric] for rounds in series] for i in range(len(xs))]
            mean = [statistics.fmean(v) for v in values]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.plot(xs, mean, marker="o", label=method, color=colors[method])
            ax.fill_between(xs, [m - s for m, s in zip(mean, spread, strict=True)],
                            [m + s for m, s in zip(mean, spread, strict=True)], alpha=0.15, color=colors[method])
            ax.set_xticks(xs)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"co-tuning quality, {len(results['config']['seeds'])} seeds (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTE = ("Final round; mean ± std over seeds; Rouge-L and EM in %. SLM: each device's model on the global test "
        "split, mean over devices; local: on the device's own held-out split. Bytes per device. Wall time leaves "
        "out the benchmark's own evaluation; the devices of a round count as running in parallel.")


def write_results(results: dict[str, Any], out_dir: Path, name: str = "cotuning") -> str:
    """<name>.json / .md through the shared writer (benchmarks.report), plus the extra tables
    and <name>.png (metric against round); return the markdown."""
    from benchmarks.report import write_report

    cfg = results["config"]
    title = f"Co-tuning quality: {len(cfg['seeds'])} seeds x {cfg['rounds']} rounds, scale {cfg['scale']}"
    paths = write_report(Path(out_dir), name, title, summary_rows(results), _columns(), meta=results,
                         notes=[NOTE, f"Total benchmark time {results['total_wall_s']:.0f} s on "
                                      f"{cfg['threads']} torch threads."])
    extra = "\n".join(["", "SLM Rouge-L per domain (final round)", "", domain_table(results), "",
                        extras_table(results), ""])
    with paths["md"].open("a") as fh:
        fh.write(extra)
    if not plot(results, Path(out_dir) / f"{name}.png"):
        extra += "\n(no PNG: matplotlib is not installed)"
    return paths["md"].read_text()
