"""What `cotune serve` settles before the coordinator starts: secret files readable by their
owner only from the first byte, the enroll token of the run its config names, so that a
start-up run is always joinable and the same command restarts it (ARCHITECTURE.md, "Privacy"),
and an artifact store that answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud.auth import hash_token, new_token
from cloud.blobstores.s3url import is_s3_url
from cloud.services.runs import spec_differences
from cloud.settings import CoordinatorSettings
from cloud.state import CoordinatorState
from cloud.store import open_store
from common.private_file import write_private
from common.protocol import RunSpec


def write_secret(path: Path, text: str) -> None:
    """A token file, one line, readable by its owner only from the first byte."""
    write_private(path, text + "\n")


def secrets_dir(settings: CoordinatorSettings) -> Path:
    """Where token files are kept: beside a local artifact directory (in the state directory,
    `.cotune/` by default), or in `work_dir` when the artifacts are in a bucket, since an
    s3:// URL names no folder on this machine."""
    if is_s3_url(settings.artifact_dir):
        return Path(settings.work_dir)
    return Path(settings.artifact_dir).parent


def admin_token_path(settings: CoordinatorSettings) -> Path:
    return secrets_dir(settings) / "admin_token"


def enroll_token_path(settings: CoordinatorSettings, run_name: str) -> Path:
    # Run names are [A-Za-z0-9_.-]+ (RunSpec), so the prefix keeps this a plain file name.
    return secrets_dir(settings) / f"enroll_token-{run_name}"


def check_artifact_store(settings: CoordinatorSettings) -> None:
    """Open the artifact store once before serving, so that a bucket that is missing or refuses
    access stops `cotune serve` with one line saying what to fix (StoreConfigError), rather than
    a traceback from the app's start-up."""
    open_store(settings)


@dataclass(frozen=True)
class StartUpRun:
    spec: RunSpec  # with the enroll token to create or resume the run with
    token_file: Path | None  # where that token is kept, unless the config gave it
    generated: bool  # a new token, written to token_file now


def prepare_start_up_run(spec: RunSpec, state: CoordinatorState, token_file: Path) -> StartUpRun:
    """The start-up run with its enroll token: the one the config gives, else the one kept in
    `token_file`, else (for a run not created yet) a new one, written there first.

    A run of that name already in the state resumes when the spec is the same; a different
    spec, or a token other than the run's, is a ValueError saying what differs, so the same
    command restarts a coordinator and a changed one stops with a reason."""
    existing = state.run_by_name(spec.name)
    if existing is not None:
        differences = spec_differences(existing.spec, spec)
        if differences:
            raise ValueError(
                f"the state already holds a run named {spec.name!r} with another spec: {', '.join(differences)} "
                "differ; restore the run's own [run] settings to resume it, or give the new run another name")
    token, kept, generated = spec.enroll_token, None, False
    if token is None:
        kept = token_file
        if token_file.is_file():
            token = token_file.read_text().strip()
        elif existing is None:
            token, generated = new_token(), True
            write_secret(token_file, token)
        else:
            raise ValueError(f"run {spec.name!r} exists but its enroll token is not in {token_file}; set "
                             "[run] enroll_token (or COTUNE_ENROLL_TOKEN) to the token it was created with")
    if existing is not None and hash_token(token) != existing.enroll_token_hash:
        where = f"the one in {kept}" if kept else "the one in the config"
        raise ValueError(f"run {spec.name!r} was created with another enroll token than {where}; "
                         "give the run's own token, or give the new run another name")
    return StartUpRun(spec.model_copy(update={"enroll_token": token}), kept, generated)
