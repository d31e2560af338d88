"""The quality benchmark's outputs: cotuning.json (with the top-level `claims` list other tools
read), cotuning.md (claims, the main table, scores by kind of knowledge, the factor-averaging gap)
and cotuning.png (validation curves per round and the claims' intervals)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

WORD_KINDS = ("both", "device-only", "llm-only", "nowhere")


def _pm(stat: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method, row in results["summary"].items():
        rows.append({"method": method, **{k: row.get(k) for k in (
            "slm_rougeL", "slm_em", "slm_home_rougeL", "slm_foreign_rougeL", "llm_rougeL", "llm_em",
            "llm_general_ppl", "wall_s")}, "up_kib": row["bytes_up_per_round"]["mean"] / 1024})
    return rows


def _columns() -> list[Any]:
    from benchmarks.report import Column

    return [Column("method", "method"), Column("slm_rougeL", "SLM Rouge-L", _pm), Column("slm_em", "SLM EM", _pm),
            Column("slm_home_rougeL", "SLM home", _pm), Column("slm_foreign_rougeL", "SLM foreign", _pm),
            Column("llm_rougeL", "LLM Rouge-L", _pm), Column("llm_em", "LLM EM", _pm),
            Column("llm_general_ppl", "LLM general ppl", lambda s: _pm(s, 1.0, 2)),
            Column("up_kib", "up KiB/round", "{:.1f}"), Column("wall_s", "wall s", lambda s: _pm(s, 1.0, 0))]


def claims_table(claims: list[dict[str, Any]]) -> str:
    lines = ["| claim | difference | 95% CI | holds |", "|---|---|---|---|"]
    for c in claims:
        if c["difference"] is None:
            lines.append(f"| {c['claim']} | – | – | not tested ({c['note']}) |")
            continue
        scale, unit = (100.0, " pts") if "share" not in c["claim"] and "ppl" not in c["claim"] else (100.0, " %")
        lo, hi = c["ci95"]
        lines.append(f"| {c['claim']} | {scale * c['difference']:+.1f}{unit} | [{scale * lo:+.1f}, {scale * hi:+.1f}]"
                     f" | {'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines)


def kinds_table(results: dict[str, Any]) -> str:
    """Rouge-L by the kind of the test item's focus word (who could know it)."""
    lines = ["| method | " + " | ".join(f"SLM {k}" for k in WORD_KINDS) + " | "
             + " | ".join(f"LLM {k}" for k in WORD_KINDS) + " |", "|" + "---|" * (1 + 2 * len(WORD_KINDS))]
    for method, row in results["summary"].items():
        cells = []
        for side in ("slm", "llm"):
            by = row.get(f"{side}_by", {})
            cells += [_pm(by.get(f"word:{k}")) for k in WORD_KINDS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(results: dict[str, Any]) -> str:
    rows = [(m, r["factor_gap"]) for m, r in results["summary"].items() if "factor_gap" in r]
    if not rows:
        return ""
    lines = ["Relative error of averaging LoRA factors separately, ||mean(BA) - mean(B) mean(A)|| / ||mean(BA)||, "
             "per round (mean ± std over rounds and seeds)", "", "| method | factor-averaging error |", "|---|---|"]
    lines += [f"| {m} | {g['mean']:.3f} ± {g['std']:.3f} |" for m, g in rows]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Validation Rouge-L per round (SLM, LLM) and the claims' intervals; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(results["runs"])}
    curves = any(len(run["rounds"]) > 1 and "validation" in run["rounds"][0]
                 for by_world in results["runs"].values() for by_seed in by_world.values() for run in by_seed.values())
    if not curves:
        _final_bars(axes[:2], results, colors)
    for ax, side in zip(axes[:2], ("slm", "llm") if curves else (), strict=False):
        for method, by_world in results["runs"].items():
            series = [run["rounds"] for by_seed in by_world.values() for run in by_seed.values()]
            if any("validation" not in r or r["validation"][side] is None for rounds in series for r in rounds) \
                    or len(series[0]) < 2:
                continue
            xs = [r["round"] for r in series[0]]
            values = [[100 * rounds[i]["validation"][side]["rougeL"] for rounds in series] for i in range(len(xs))]
            ax.plot(xs, [statistics.fmean(v) for v in values], marker="o", label=method, color=colors[method])
        ax.set_title(f"{side.upper()} Rouge-L on validation, per round")
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    claims = [c for c in results.get("claims", []) if c["difference"] is not None]
    ax = axes[2]
    for y, c in enumerate(claims):
        lo, hi = c["ci95"]
        ax.errorbar(100 * c["difference"], y, xerr=[[100 * (c["difference"] - lo)], [100 * (hi - c["difference"])]],
                    fmt="o", color="tab:green" if c["holds"] else "tab:red", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(claims)), [c["claim"] for c in claims], fontsize=7)
    ax.set_title("claims: difference with 95% CI (green: holds)")
    ax.grid(alpha=0.3)
    cfg = results["config"]
    fig.suptitle(f"co-tuning quality, {cfg['track']} track, aux {cfg['aux']}: {len(cfg['world_seeds'])} worlds x "
                 f"{len(cfg['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _final_bars(axes: Any, results: dict[str, Any], colors: dict[str, Any]) -> None:
    """Without per-round curves: the final test Rouge-L per method (mean, std over runs)."""
    for ax, side in zip(axes, ("slm", "llm"), strict=True):
        rows = [(m, r[f"{side}_rougeL"]) for m, r in results["summary"].items() if f"{side}_rougeL" in r]
        xs = range(len(rows))
        ax.bar(xs, [100 * s["mean"] for _, s in rows], yerr=[100 * s["std"] for _, s in rows], capsize=3,
               color=[colors[m] for m, _ in rows])
        ax.set_xticks(xs, [m for m, _ in rows], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{side.upper()} Rouge-L on test, final round (mean ± std)")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3, axis="y")


NOTE = ("Final round on the test split (read once per run); mean ± std over world seeds x training seeds; "
        "Rouge-L and EM in %. SLM: each device's model on the whole test split, mean over devices; home: on "
        "the device's home domain (where it holds most records); foreign: the other domains. Settings were "
        "chosen on the validation split (benchmarks/settings). Wall time leaves out the benchmark's own "
        "evaluation; the devices of a round count as running in parallel.")


def write_results(results: dict[str, Any], out_dir: Path, name: str = "cotuning") -> str:
    """<name>.json / .md through the shared writer (benchmarks.report) and <name>.png; return the markdown."""
    from benchmarks.report import write_report

    cfg = results["config"]
    title = (f"Co-tuning quality, {cfg['track']} track, auxiliary data '{cfg['aux']}': {len(cfg['world_seeds'])} "
             f"world seeds x {len(cfg['seeds'])} training seeds, {cfg['settings']['rounds']} rounds")
    paths = write_report(Path(out_dir), name, title, summary_rows(results), _columns(), meta=results,
                         top={"claims": results.get("claims", []), "summary": results["summary"]},
                         notes=[NOTE, _time_note(results)])
    sections = ["", "## Claims (paired bootstrap over worlds, seeds and test items)", "",
                claims_table(results.get("claims", [])), "",
                "## Rouge-L by who could know the item's focus word", "",
                "both: in the LLM's dictionary and in training data; device-only: in training data only; "
                "llm-only: in the LLM's dictionary only; nowhere: neither.", "", kinds_table(results), "",
                gap_table(results), ""]
    with paths["md"].open("a") as fh:
        fh.write("\n".join(sections))
    if not plot(results, Path(out_dir) / f"{name}.png"):
        with paths["md"].open("a") as fh:
            fh.write("\n(no PNG: matplotlib is not installed)\n")
    return paths["md"].read_text()


def _time_note(results: dict[str, Any]) -> str:
    cfg, kept = results["config"], results.get("runs_kept", 0)
    note = f"This invocation took {results['total_wall_s']:.0f} s on {cfg['threads']} torch threads"
    if kept:
        note += (f"; {kept} of its {results.get('runs_total', kept)} runs were kept from earlier invocations "
                 "sharing the runs folder, and that time covers only the others")
    return note + "."
