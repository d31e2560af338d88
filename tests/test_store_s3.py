"""The artifact store in an S3-compatible bucket (moto's server on loopback): content addressing,
digest checks, the bounded local cache, start-up errors, and device downloads through a real
coordinator that streams blobs from the bucket."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from cloud.settings import CoordinatorSettings
from cloud.startup import admin_token_path, check_artifact_store, enroll_token_path
from cloud.store import ArtifactStore, BlobStore, DigestMismatch, StoreConfigError, StoreUnavailable, open_store
from common.methods.fedavg import SLM_ADAPTER
from common.tensorfile import read_header
from edge_sdk.client import CoordinatorClient
from tests.s3_support import KEY_ID, REGION, SECRET, S3Server, s3_server
from tests.support import CoordinatorProcess, run_spec
from tests.test_hostile_http import HOSTILE_RANGES


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


def _settings(s3: S3Server, bucket: str, tmp_path: Path, **extra) -> CoordinatorSettings:
    return CoordinatorSettings(**s3.settings(bucket), work_dir=tmp_path / "work", **extra)


def _store(s3: S3Server, bucket: str, cache: Path, cache_bytes: int = 1 << 30, hold_s: float = 3600.0):
    from cloud.blobstores.s3 import S3BlobStore

    return S3BlobStore(f"s3://{bucket}/blobs", cache, cache_bytes, endpoint_url=s3.endpoint, region=REGION,
                       access_key_id=KEY_ID, secret_access_key=SECRET, cache_hold_s=hold_s)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_has_size_path_and_range(s3, bucket, tmp_path) -> None:
    store = open_store(_settings(s3, bucket, tmp_path))
    assert store.remote
    data = bytes(range(256)) * 40
    digest = store.put_bytes(data)
    assert digest == _sha(data)
    # The key is the prefix plus the digest, the object the bytes.
    assert s3.client().get_object(Bucket=bucket, Key=f"blobs/{digest}")["Body"].read() == data
    # A second replica (its own cache) sees it; its path is a local file with the bytes.
    other = _store(s3, bucket, tmp_path / "other-cache")
    assert other.has(digest) and other.size(digest) == len(data)
    local = other.path(digest)
    assert local.is_file() and local.is_relative_to(tmp_path / "other-cache")
    assert local.read_bytes() == data and other.read_bytes(digest) == data
    assert b"".join(other.read_range(digest, 1000, 5000)) == data[1000:5000]
    assert b"".join(other.read_range(digest, len(data) - 3, len(data))) == data[-3:]
    missing = _sha(b"never stored")
    assert not other.has(missing)
    with pytest.raises(FileNotFoundError):
        other.size(missing)
    with pytest.raises(FileNotFoundError):
        other.path(missing)
    with pytest.raises(FileNotFoundError):
        other.read_range(missing, 0, 10)
    # Scratch space, as a strategy uses it, is local and exists.
    assert (store.root / "tmp").is_dir()


def test_put_file_refuses_a_wrong_digest_and_consumes_a_right_one(s3, bucket, tmp_path) -> None:
    store = _store(s3, bucket, tmp_path / "cache")
    source = tmp_path / "upload.part"
    source.write_bytes(b"an update")
    wrong = _sha(b"another update")
    with pytest.raises(DigestMismatch, match="nothing was stored"):
        store.put_file(source, wrong)
    assert source.read_bytes() == b"an update", "a refused file is left to its owner"
    assert s3.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert not store.has(wrong) and not store.has(_sha(b"an update"))

    digest = store.put_file(source, _sha(b"an update"))
    assert not source.exists(), "put_file moves the file in, as the local store does"
    assert _store(s3, bucket, tmp_path / "fresh").read_bytes(digest) == b"an update"


def test_a_held_digest_is_not_uploaded_again(s3, bucket, tmp_path) -> None:
    store = _store(s3, bucket, tmp_path / "cache")
    data = b"the same bytes"
    # The object is already there, marked: a put of the same digest must leave it untouched.
    s3.client().put_object(Bucket=bucket, Key=f"blobs/{_sha(data)}", Body=data, Metadata={"marker": "first"})
    assert store.put_bytes(data) == _sha(data)
    source = tmp_path / "again"
    source.write_bytes(data)
    assert store.put_file(source) == _sha(data)
    head = s3.client().head_object(Bucket=bucket, Key=f"blobs/{_sha(data)}")
    assert head["Metadata"] == {"marker": "first"}


def test_an_object_changed_in_the_bucket_is_refused(s3, bucket, tmp_path) -> None:
    digest = _sha(b"the real bytes")
    s3.client().put_object(Bucket=bucket, Key=f"blobs/{digest}", Body=b"tampered bytes")
    store = _store(s3, bucket, tmp_path / "cache")
    with pytest.raises(DigestMismatch, match="changed outside cotune"):
        store.path(digest)
    assert not store.cache.store.has(digest), "a blob that fails its check is never cached"
    assert list((store.root / "tmp").iterdir()) == [], "nor left half-written"


def test_the_cache_fetches_once_and_stays_bounded(s3, bucket, tmp_path) -> None:
    writer = _store(s3, bucket, tmp_path / "writer")
    blobs = [bytes([k]) * 100 for k in range(3)]
    a, b, c = (writer.put_bytes(blob) for blob in blobs)
    reader = _store(s3, bucket, tmp_path / "reader", cache_bytes=250, hold_s=0)
    for digest in (a, b, c):
        reader.path(digest)
    # Over 250 bytes with three 100-byte blobs: the least recently used one went.
    assert not reader.cache.store.has(a) and reader.cache.store.has(b) and reader.cache.store.has(c)
    assert reader.cache.total_bytes() <= 250
    # A cached blob is read from the cache, not the bucket: it survives the object's removal.
    s3.client().delete_object(Bucket=bucket, Key=f"blobs/{c}")
    assert reader.path(c).read_bytes() == blobs[2]
    # An evicted one is fetched again (and pushes out the one used longest ago, b).
    assert reader.path(a).read_bytes() == blobs[0]
    assert reader.cache.store.has(a) and not reader.cache.store.has(b)
    with pytest.raises(FileNotFoundError):
        _store(s3, bucket, tmp_path / "third").path(c)


def test_blobs_handed_out_recently_are_never_evicted(s3, bucket, tmp_path) -> None:
    writer = _store(s3, bucket, tmp_path / "writer")
    digests = [writer.put_bytes(bytes([k]) * 100) for k in range(3)]
    reader = _store(s3, bucket, tmp_path / "reader", cache_bytes=150, hold_s=3600)
    paths = [reader.path(digest) for digest in digests]
    assert all(path.is_file() for path in paths), "a reader that has not opened its file yet still finds it"
    # A blob larger than the whole cache is still handed out.
    big = writer.put_bytes(b"x" * 1000)
    assert _store(s3, bucket, tmp_path / "small", cache_bytes=10, hold_s=0).path(big).stat().st_size == 1000


def test_a_bucket_that_stops_answering_is_unavailable_not_missing(tmp_path) -> None:
    """Downloads answer 503 (which devices retry) for this, never 404 (which they do not)."""
    with s3_server() as server:
        bucket = server.new_bucket()
        store = _store(server, bucket, tmp_path / "cache")
        digest = store.put_bytes(b"held")
    with pytest.raises(StoreUnavailable):
        store.read_range(digest, 0, 4)
    with pytest.raises(StoreUnavailable):
        store.size(_sha(b"not known to this replica"))


def test_the_local_backend_has_the_same_interface(tmp_path) -> None:
    store = BlobStore(tmp_path / "blobs")
    assert isinstance(store, ArtifactStore) and not store.remote
    data = bytes(range(200))
    digest = store.put_bytes(data)
    assert store.size(digest) == 200 and store.path(digest).read_bytes() == data
    assert b"".join(store.read_range(digest, 10, 150)) == data[10:150]
    with pytest.raises(FileNotFoundError):
        store.read_range(_sha(b"absent"), 0, 1)
    assert open_store(CoordinatorSettings(artifact_dir=tmp_path / "blobs")).path(digest) == store.path(digest)


def test_a_missing_bucket_stops_start_up_with_what_to_do(s3, tmp_path) -> None:
    settings = _settings(s3, "no-such-bucket-here", tmp_path)
    with pytest.raises(StoreConfigError) as info:
        check_artifact_store(settings)
    message = str(info.value)
    assert "s3://no-such-bucket-here/blobs" in message  # what
    assert "does not exist" in message  # why
    assert "create it" in message and "artifact_dir" in message  # what to do


def test_an_unreachable_endpoint_stops_start_up_with_what_to_do(tmp_path) -> None:
    pytest.importorskip("boto3")
    from cotune.demo.quickstart import free_port

    settings = CoordinatorSettings(artifact_dir="s3://some-bucket/x", s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
                                   s3_region=REGION, s3_access_key_id=KEY_ID, s3_secret_access_key=SECRET,
                                   work_dir=tmp_path / "work")
    with pytest.raises(StoreConfigError, match="cannot connect.*check s3_endpoint_url"):
        open_store(settings)


def test_settings_name_a_bucket_and_keep_tokens_local(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COTUNE_ARTIFACT_DIR", "s3://my-bucket/some/prefix/")
    monkeypatch.setenv("COTUNE_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("COTUNE_S3_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("COTUNE_S3_SECRET_ACCESS_KEY", "hush-hush-value")
    settings = CoordinatorSettings(work_dir=tmp_path / "work")
    assert settings.artifact_dir == "s3://my-bucket/some/prefix/"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert "hush-hush-value" not in repr(settings)
    assert settings.s3_secret_access_key.get_secret_value() == "hush-hush-value"
    # Token files go to the local work directory, never to a path made from the URL.
    assert admin_token_path(settings) == tmp_path / "work" / "admin_token"
    assert enroll_token_path(settings, "r") == tmp_path / "work" / "enroll_token-r"
    # A --artifact-dir given as a path (which folds '//') still names the bucket.
    assert CoordinatorSettings(artifact_dir=Path("s3://my-bucket/p")).artifact_dir == "s3://my-bucket/p"
    # A local store keeps them beside its directory, as before.
    for name in ("ARTIFACT_DIR", "S3_ENDPOINT_URL", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(f"COTUNE_{name}")
    local = CoordinatorSettings(artifact_dir=tmp_path / "state" / "artifacts", work_dir=tmp_path / "work")
    assert admin_token_path(local) == tmp_path / "state" / "admin_token"


@pytest.mark.parametrize(("fields", "problem"), [
    ({"artifact_dir": "s3://Bad_Bucket/x"}, "not a valid bucket name"),
    ({"artifact_dir": "s3:///x"}, "not a valid bucket name"),
    ({"artifact_dir": "s3://bucket/../x"}, "'.' or '..'"),
    ({"s3_endpoint_url": "http://minio:9000"}, "is a local directory"),
    ({"artifact_dir": "s3://bucket", "s3_access_key_id": "id"}, "go together"),
])
def test_bad_store_settings_say_what_is_wrong(fields, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        CoordinatorSettings(**fields)


# -- a coordinator on the bucket, over HTTP ------------------------------------------------------


@pytest.fixture(scope="module")
def coord(world, s3, tmp_path_factory):
    spec = run_spec(world, name="s3-run", algorithm="fedavg", rounds=1, min_clients=2)
    proc = CoordinatorProcess(tmp_path_factory.mktemp("coord"), run=spec, extra=s3.settings(s3.new_bucket())).start()
    yield proc
    proc.stop()


def test_devices_download_from_the_bucket_with_ranges(coord, tmp_path) -> None:
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "ranger")
    ref = next(r for r in client.current_round(creds.run_id).artifacts if r.name == SLM_ADAPTER)
    url = f"{coord.url}/v1/artifacts/{ref.sha256}"
    auth = {"Authorization": f"Bearer {client.token}"}
    full = httpx.get(url, headers=auth, timeout=30)
    assert full.status_code == 200 and _sha(full.content) == ref.sha256
    assert full.headers["accept-ranges"] == "bytes" and full.headers["etag"] == f'"{ref.sha256}"'
    part = httpx.get(url, headers={**auth, "Range": "bytes=100-199"}, timeout=30)
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{ref.size}"
    tail = httpx.get(url, headers={**auth, "Range": "bytes=-7"}, timeout=30)
    assert tail.status_code == 206 and tail.content == full.content[-7:]
    past = httpx.get(url, headers={**auth, "Range": f"bytes={ref.size}-"}, timeout=30)
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{ref.size}"
    stale = httpx.get(url, headers={**auth, "Range": "bytes=0-9", "If-Range": '"another"'}, timeout=30)
    assert stale.status_code == 200 and stale.content == full.content
    # The edge client resumes a partial file with a Range request and checks the digest.
    dest = tmp_path / "adapter.safetensors"
    dest.with_name(dest.name + ".part").write_bytes(full.content[: ref.size // 2])
    client.download(ref, dest)
    assert dest.read_bytes() == full.content and read_header(dest).tensors
    # The admin reads any blob; a client only its run's, and never a missing one.
    assert httpx.get(url, headers=coord.admin, timeout=30).content == full.content
    assert httpx.get(f"{coord.url}/v1/artifacts/{'0' * 64}", headers=auth, timeout=30).status_code == 404
    client.close()


def test_hostile_ranges_on_the_bucket_count_only_what_is_sent(coord) -> None:
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "hostile")
    ref = next(r for r in client.current_round(creds.run_id).artifacts if r.name == SLM_ADAPTER)
    auth = {"Authorization": f"Bearer {client.token}"}
    expected = 0
    for header in [*HOSTILE_RANGES, "bytes=0-9", "bytes=-5"]:
        r = httpx.get(f"{coord.url}/v1/artifacts/{ref.sha256}", headers={**auth, "Range": header}, timeout=30)
        assert r.status_code in (200, 206, 400, 416), f"{header}: {r.status_code} {r.text[:200]}"
        if r.status_code in (200, 206):
            assert len(r.content) == int(r.headers["content-length"]) <= ref.size
            expected += len(r.content)
    seen = httpx.get(f"{coord.url}/v1/runs/{creds.run_id}", headers=auth, timeout=10).json()
    assert seen["rounds"][-1]["metrics"]["clients"][creds.client_id]["bytes_down"] == expected
    client.close()


def test_a_coordinator_on_a_missing_bucket_does_not_start(s3, tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord", extra=s3.settings("no-such-bucket-here"))
    with pytest.raises(RuntimeError, match="exited"):
        coord.start()
    log = coord.log_tail(80)
    assert "bucket 'no-such-bucket-here' does not exist" in log and "create it" in log, log
