"""The command line: help that lists the commands, and one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

from tests.support import CoordinatorProcess, run_spec


def cotune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cotune.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command() -> None:
    result = cotune("--help")
    assert result.returncode == 0
    for command in ("serve", "edge", "demo", "bench", "status"):
        assert command in result.stdout


def test_missing_data_file_is_one_clear_line(tmp_path) -> None:
    result = cotune("edge", "join", "--coordinator", "http://127.0.0.1:9", "--enroll-token", "x" * 20,
                    "--data", str(tmp_path / "nope.jsonl"), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nope.jsonl" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_clear_line(tmp_path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("port = [unclosed")
    result = cotune("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr and "Traceback" not in result.stderr
    bad.write_text('port = "eighty"')
    result = cotune("serve", "--config", str(bad))
    assert result.returncode == 2 and "port" in result.stderr


def test_status_shows_the_run_table(world, tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "c", run=run_spec(world, name="shown", algorithm="fedavg")).start()
    try:
        result = cotune("status", "--coordinator", coord.url, "--admin-token", coord.admin_token)
        assert result.returncode == 0, result.stderr
        assert "shown" in result.stdout and "| round |" in result.stdout
        denied = cotune("status", "--coordinator", coord.url, "--admin-token", "wrong-token-wrong-token")
        assert denied.returncode == 2 and "admin token" in denied.stderr
    finally:
        coord.stop()
