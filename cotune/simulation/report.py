"""A simulation's results as the benchmarks write theirs: `simulation.json` for machines, a
markdown table for people (also what the command prints) and a PNG of the per-round figures."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("cotune.simulate")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    return info


def write_report(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write simulation.json, simulation.md and (with matplotlib) simulation.png; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine()}
    paths = {"json": out_dir / "simulation.json", "md": out_dir / "simulation.md"}
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(result) + "\n", encoding="utf-8")
    png = out_dir / "simulation.png"
    try:
        plot(result, png)
        paths["png"] = png
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib, or cotune[bench])")
    return paths


def _kib(value: float) -> str:
    return f"{value / 1024:.1f}"


def _score(metrics: dict[str, Any], model: str) -> str:
    scores = metrics.get(model) or {}
    return f"{100 * scores['rougeL']:.1f}" if isinstance(scores, dict) and "rougeL" in scores else "–"


def markdown(result: dict[str, Any]) -> str:
    run, ex = result["run"], result["executor"]
    devices = len(result["rounds"][0]["devices"]) if result["rounds"] else 0
    where = ex["executor"] if ex["executor"] == "local" else (
        f"ray ({ex.get('address')}, {ex.get('nodes')} node(s), {ex.get('cluster_cpus')} CPUs; per device "
        f"{ex.get('num_cpus')} CPU, {ex.get('num_gpus')} GPU; at most {ex.get('max_parallel') or 'as resources allow'}"
        " at once)")
    part = (result.get("job", {}).get("data") or {}).get("partition", {}).get("scheme", "one file per device")
    lines = [f"# cotune simulate: {run['algorithm']}, {devices} devices, {run['rounds']} rounds",
             "", f"Devices on {where}; data split {part}; run {run['state']}.", "",
             "| round | wall s | devices s | server s | device s (mean / max) | updates | samples | "
             "up KiB/device | down KiB/device | train loss | SLM Rouge-L | LLM Rouge-L |",
             "|" + "---|" * 12]
    initial = run.get("initial_metrics") or {}
    if initial:
        lines.append(f"| 0 (start) | | | | | | | | | | {_score(initial, 'slm')} | {_score(initial, 'llm')} |")
    for r in result["rounds"]:
        n = max(1, len(r["devices"]))
        loss = f"{r['train_loss_mean']:.3f}" if r["train_loss_mean"] is not None else "–"
        lines.append(f"| {r['round']} | {r['wall_s']:.1f} | {r['devices_s']:.1f} | {r['server_s']:.1f} | "
                     f"{r['device_s_mean']:.1f} / {r['device_s_max']:.1f} | {r['updates']} | {r['samples']} | "
                     f"{_kib(r['bytes_up'] / n)} | {_kib(r['bytes_down'] / n)} | {loss} | "
                     f"{_score(r['metrics'], 'slm')} | {_score(r['metrics'], 'llm')} |")
    totals = result["totals"]
    lines += ["", f"Total {totals['wall_s']:.1f} s (set-up {totals['setup_s']:.1f} s); "
              f"{_kib(totals['bytes_up'])} KiB up, {_kib(totals['bytes_down'])} KiB down."]
    final = result.get("final", {})
    for key in ("slm_adapter", "llm_adapter"):
        if key in final:
            lines.append(f"Final {key.replace('_', ' ')}: {final[key]['path']} (sha256 {final[key]['sha256']}).")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    xs = [r["round"] for r in rounds]
    n = [max(1, len(r["devices"])) for r in rounds]
    fig, (times, data, quality) = plt.subplots(1, 3, figsize=(15, 4))
    parts = [("open_s", "opening (round 1: starting inputs)"), ("devices_s", "devices (training)"),
             ("server_s", "coordinator (aggregation, server step)")]
    bottom = [0.0] * len(rounds)
    for key, label in parts:
        values = [r.get(key, 0.0) for r in rounds]
        times.bar(xs, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    times.bar(xs, [r["wall_s"] - b for r, b in zip(rounds, bottom, strict=True)], bottom=bottom,
              label="dispatch and uploads")
    times.set_ylabel("wall seconds")
    times.set_title("Wall time per round")
    times.legend(fontsize=7)
    width = 0.38
    data.bar([x - width / 2 for x in xs], [r["bytes_up"] / k / 1024 for r, k in zip(rounds, n, strict=True)],
             width, label="up")
    data.bar([x + width / 2 for x in xs], [r["bytes_down"] / k / 1024 for r, k in zip(rounds, n, strict=True)],
             width, label="down")
    data.set_ylabel("KiB per device")
    data.set_title("Bytes per device")
    data.legend(fontsize=8)
    losses = [r["train_loss_mean"] for r in rounds]
    if any(v is not None for v in losses):
        quality.plot(xs, [v if v is not None else float("nan") for v in losses], marker="o",
                     label="train loss (device mean)")
        quality.set_ylabel("train loss")
        quality.legend(fontsize=8, loc="upper left")
    scores = [(r["metrics"].get("slm") or {}).get("rougeL") for r in rounds]
    if any(v is not None for v in scores):
        twin = quality.twinx()
        twin.plot(xs, [v if v is not None else float("nan") for v in scores], marker="s", color="tab:green",
                  label="SLM Rouge-L (eval data)")
        twin.set_ylabel("Rouge-L")
        twin.legend(fontsize=8, loc="upper right")
    quality.set_title("Training loss and score")
    for ax in (times, data, quality):
        ax.set_xlabel("round")
        ax.set_xticks(xs)
    fig.suptitle(f"cotune simulate: {result['run']['algorithm']}, {n[0] if n else 0} devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
