"""`cotune simulate`: partitioners, and runs of N virtual devices through the real coordinator,
in process (`--no-ray`) and as Ray tasks, which must give the same final adapter bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from common.digest import file_sha256
from common.records import TaskRecord, read_jsonl, write_jsonl
from cotune.simulation.partition import (
    PartitionError,
    describe,
    parse_partition,
    partition,
    read_rows,
    rows_of,
)

DOMAINS = ("a", "b", "c", "d")


def _rows(per_domain: int = 25):
    return rows_of([TaskRecord(f"p{d}{i}", f"r{d}{i}", domain=d) for d in DOMAINS for i in range(per_domain)])


def _check_split(parts: list[list[int]], total: int, devices: int) -> None:
    assert len(parts) == devices and all(parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(total)), "every record lands on exactly one device"


def test_iid_sizes_differ_by_at_most_one() -> None:
    rows = _rows()
    parts = partition(rows, parse_partition("iid"), 7, seed=3)
    _check_split(parts, 100, 7)
    assert sorted(len(p) for p in parts) == [14] * 5 + [15] * 2
    assert partition(rows, parse_partition("iid"), 7, seed=3) == parts
    assert partition(rows, parse_partition("iid"), 7, seed=4) != parts


def test_field_gives_each_device_one_value_or_whole_values() -> None:
    rows = _rows()
    values = [r.fields["domain"] for r in rows]
    eight = partition(rows, parse_partition("field:domain"), 8, seed=0)
    _check_split(eight, 100, 8)
    assert all(len({values[i] for i in p}) == 1 for p in eight)
    assert Counter(values[p[0]] for p in eight) == dict.fromkeys(DOMAINS, 2), "each value on two devices"
    two = partition(rows, parse_partition("field:domain"), 2, seed=0)
    _check_split(two, 100, 2)
    assert [sorted({values[i] for i in p}) for p in two] == [["a", "c"], ["b", "d"]]


def test_field_reads_keys_task_records_do_not_keep(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "lang": ["en", "fr"][i % 2]}) + "\n"
                            for i in range(6)))
    rows = read_rows(data)
    parts = partition(rows, parse_partition("field:lang"), 2)
    assert [{rows[i].fields["lang"] for i in p} for p in parts] == [{"en"}, {"fr"}]
    assert describe(rows, parts, parse_partition("field:lang"))["values"] == [{"en": 3}, {"fr": 3}]


def _home_share(rows, parts) -> float:
    """The mean over devices of the share of a device's records from its most common domain."""
    shares = []
    for p in parts:
        counts = Counter(rows[i].fields["domain"] for i in p)
        shares.append(max(counts.values()) / len(p))
    return sum(shares) / len(shares)


def test_dirichlet_alpha_sets_the_skew_and_the_seed_fixes_the_draw() -> None:
    rows = _rows(100)
    skewed = partition(rows, parse_partition("dirichlet:0.1"), 10, seed=1)
    even = partition(rows, parse_partition("dirichlet:1000"), 10, seed=1)
    _check_split(skewed, 400, 10)
    _check_split(even, 400, 10)
    assert _home_share(rows, skewed) > 0.6
    assert _home_share(rows, even) < 0.35
    assert partition(rows, parse_partition("dirichlet:0.1"), 10, seed=1) == skewed
    assert partition(rows, parse_partition("dirichlet:0.1"), 10, seed=2) != skewed
    assert str(parse_partition("dirichlet:0.5")) == "dirichlet:0.5:domain"


@pytest.mark.parametrize("text", ["", "random", "field", "field:", "dirichlet", "dirichlet:x", "dirichlet:0",
                                  "dirichlet:-1", "dirichlet:inf", "dirichlet:0.5:", "iid:3"])
def test_bad_specs_say_what_to_write(text: str) -> None:
    with pytest.raises(PartitionError, match="dirichlet|alpha"):
        parse_partition(text)


def test_missing_field_and_too_few_records_are_clear() -> None:
    rows = rows_of([TaskRecord("p", "r", domain="a"), TaskRecord("q", "s"), TaskRecord("t", "u", domain="b")])
    with pytest.raises(PartitionError, match=r"1 of 3 records have no field 'domain' \(records 2\)"):
        partition(rows, parse_partition("dirichlet:0.5"), 2)
    with pytest.raises(PartitionError, match="'topic'"):
        partition(rows, parse_partition("field:topic"), 2)
    with pytest.raises(PartitionError, match="3 records cannot give 4 devices"):
        partition(rows, parse_partition("iid"), 4)


# -- runs -------------------------------------------------------------------------------------


def _pool(world, tmp_path: Path) -> Path:
    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, [r for k in range(2) for r in read_jsonl(world.data[f"client_{k}"])])
    return pool


_FAST = ("--max-steps", "2", "--batch-size", "8", "--max-len", "40", "--lora-r", "4", "--no-progress")


def _invoke(*args: str):
    from typer.testing import CliRunner

    from cotune.cli.main import app

    return CliRunner().invoke(app, ["simulate", *args])


def test_simulate_in_process_writes_per_round_figures(world, tmp_path: Path) -> None:
    """No --slm: tiny models are built from the data. Local DP's ledger is device state the
    simulation carries from round to round, so round 2 counts two releases."""
    pool = _pool(world, tmp_path)
    config = tmp_path / "run.toml"
    config.write_text("[run.privacy]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n")
    out = tmp_path / "out"
    result = _invoke("--no-ray", "--devices", "3", "--rounds", "2", "--data", str(pool), "--partition",
                     "field:domain", "--run-config", str(config), "--out", str(out), *_FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "simulation.json").read_text())
    assert report["executor"]["executor"] == "local" and report["run"]["state"] == "finished"
    assert report["job"]["models"]["built"] is True
    sizes = report["job"]["data"]["partition"]["sizes"]
    assert sum(sizes) == 80 and len(sizes) == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert r["updates"] == 3 and r["wall_s"] > 0 and r["bytes_up"] > 0
        assert [d["name"] for d in r["devices"]] == ["device-0000", "device-0001", "device-0002"]
    first, second = report["rounds"]
    # The base model is downloaded once per device; later rounds fetch only the new adapter.
    assert second["bytes_down"] < first["bytes_down"]
    assert first["metrics"]["privacy_epsilon_max"] < second["metrics"]["privacy_epsilon_max"]
    adapter = out / "final" / "slm-adapter.safetensors"
    assert file_sha256(adapter) == report["final"]["slm_adapter"]["sha256"]
    assert report["final"]["artifacts"]["slm/adapter.safetensors"] == report["final"]["slm_adapter"]["sha256"]
    assert "| round |" in (out / "simulation.md").read_text()
    assert (out / "simulation.png").stat().st_size > 0
    assert not (out / "work").exists()


def test_bad_options_are_refused(world, tmp_path: Path) -> None:
    pool = _pool(world, tmp_path)
    bad = _invoke("--no-ray", "--devices", "2", "--data", str(pool), "--partition", "zipf", "--out", str(tmp_path))
    assert bad.exit_code == 2 and "unknown partition 'zipf'" in bad.output
    both = _invoke("--no-ray", "--devices", "2", "--data", str(pool), "--data-dir", str(tmp_path),
                   "--out", str(tmp_path / "o"))
    assert both.exit_code != 0 and "not both" in str(both.exception)
    folder = tmp_path / "per-device"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", read_jsonl(pool)[:5])
    mismatch = _invoke("--no-ray", "--devices", "2", "--data-dir", str(folder), "--out", str(tmp_path / "o"))
    assert mismatch.exit_code != 0 and "holds 1 .jsonl files" in str(mismatch.exception)


@pytest.mark.slow
def test_ray_run_gives_the_in_process_adapter(world, tmp_path: Path) -> None:
    """FedAvg, 4 devices, 2 rounds as Ray tasks on a local Ray of 2 CPUs, through the CLI; the same
    job in process ends with the same final adapter, bit for bit."""
    pytest.importorskip("ray", reason='Ray is not installed: pip install "cotune[simulate]"')
    pool = _pool(world, tmp_path)
    common = ("--devices", "4", "--rounds", "2", "--data", str(pool), "--partition", "dirichlet:0.5",
              "--slm", str(world.slm_dir), "--algorithm", "fedavg", "--seed", "1", *_FAST)
    ray_out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "cotune.cli.main", "simulate", *common, "--local-cpus", "2", "--num-cpus", "1",
           "--max-parallel", "3", "--out", str(ray_out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    local = _invoke(*common, "--no-ray", "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output

    ray_report = json.loads((ray_out / "simulation.json").read_text())
    local_report = json.loads((tmp_path / "local" / "simulation.json").read_text())
    executor = ray_report["executor"]
    assert executor["executor"] == "ray" and executor["cluster_cpus"] == 2 and executor["max_parallel"] == 3
    assert [r["updates"] for r in ray_report["rounds"]] == [4, 4]
    assert all(r["wall_s"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in ray_report["rounds"])
    assert ray_report["job"]["data"] == local_report["job"]["data"], "the same seed splits the data the same way"
    # Same seeds, same threads per device, updates accepted in device order: the same bits.
    assert ray_report["final"]["slm_adapter"]["sha256"] == local_report["final"]["slm_adapter"]["sha256"]
    assert [r["bytes_down"] for r in ray_report["rounds"]] == [r["bytes_down"] for r in local_report["rounds"]]
