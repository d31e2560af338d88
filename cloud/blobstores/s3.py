"""The artifact store in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2...), shared by
coordinator replicas on several machines; `cloud.store` documents the behaviour. boto3 is
imported inside the functions that use it (`pip install "cotune[s3]"`)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.blobstores.base import ArtifactStore, DigestMismatch, StoreConfigError, StoreUnavailable, check_digest
from cloud.blobstores.cache import TEMP_PREFIX, BlobCache
from cloud.blobstores.s3url import parse_s3_url
from common.digest import file_sha256

if TYPE_CHECKING:
    from cloud.settings import CoordinatorSettings

log = logging.getLogger("cotune.store")

T = TypeVar("T")
_CHUNK = 1 << 20
_LOCKS = 64  # fetches of one digest wait for each other; of different digests, rarely
_KNOWN_SIZES = 100_000  # digests whose size is kept in memory (about 15 MB at most)


class S3BlobStore(ArtifactStore):
    """Blobs at `prefix + digest` in a bucket, read through a bounded local `BlobCache`."""

    remote = True

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int, *, endpoint_url: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, cache_hold_s: float = 3600.0) -> None:
        """Connect and check that the bucket answers (a StoreConfigError saying what to fix if
        not), then open the cache in `cache_dir`."""
        self.location = parse_s3_url(url)
        self._where = f"artifact store {self.location.url()} at {endpoint_url or 'AWS S3'}"
        self._client = _client(endpoint_url, region, access_key_id, secret_access_key)
        self._check_bucket()
        self.cache = BlobCache(Path(cache_dir), cache_bytes, cache_hold_s)
        self.root = self.cache.root
        self._locks = [threading.Lock() for _ in range(_LOCKS)]
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()
        log.info("%s, cached in %s (up to %d MiB)", self._where, self.root, cache_bytes >> 20)

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings) -> S3BlobStore:
        secret = settings.s3_secret_access_key
        return cls(settings.artifact_dir, settings.artifact_cache_dir or Path(settings.work_dir) / "artifact-cache",
                   settings.artifact_cache_bytes, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                   access_key_id=settings.s3_access_key_id,
                   secret_access_key=secret.get_secret_value() if secret is not None else None)

    def describe(self) -> str:
        return self.location.url()

    # -- reads ------------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        try:
            self.size(digest)
        except FileNotFoundError:
            return False
        return True

    def size(self, digest: str) -> int:
        """From memory once known (a digest's size never changes): devices polling the round
        listing ask for every artifact's size, and need not cost a request to the bucket each."""
        known = self._sizes.get(check_digest(digest))
        if known is not None:
            return known
        try:
            size = self.cache.store.size(digest)
        except FileNotFoundError:
            head = self._head(digest)
            if head is None:
                raise FileNotFoundError(f"artifact {digest} is not in {self.location.url()}") from None
            size = int(head["ContentLength"])
        with self._sizes_lock:
            self._sizes[digest] = size
            if len(self._sizes) > _KNOWN_SIZES:
                del self._sizes[next(iter(self._sizes))]  # the first known: dicts keep insertion order
        return size

    def path(self, digest: str) -> Path:
        cached = self.cache.get(check_digest(digest))
        if cached is not None:
            return cached
        with self._locks[int(digest[:4], 16) % _LOCKS]:
            # Another thread may have fetched it while this one waited.
            return self.cache.get(digest) or self._fetch(digest)

    def read_range(self, digest: str, start: int, stop: int) -> Iterator[bytes]:
        key = self.location.key(check_digest(digest))
        if stop <= start:
            return iter(())
        response = self._request(f"reading {key}", lambda: self._client.get_object(
            Bucket=self.location.bucket, Key=key, Range=f"bytes={start}-{stop - 1}"))
        return _body_chunks(response["Body"])

    def _fetch(self, digest: str) -> Path:
        """Download into the cache's scratch folder, check the digest, rename into the cache."""
        key = self.location.key(digest)
        fd, name = tempfile.mkstemp(dir=self.cache.tmp, prefix=TEMP_PREFIX)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                self._request(f"downloading {key}", lambda: self._client.download_fileobj(
                    self.location.bucket, key, fh))
            actual = file_sha256(tmp)
            if actual != digest:
                raise DigestMismatch(
                    f"{self._where}: object {key} hashes to {actual}, not to its name; it was changed outside "
                    "cotune. Restore the original, or delete it so that the blob is stored again")
            return self.cache.add(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)  # gone already once renamed into the cache

    def _head(self, digest: str) -> dict[str, Any] | None:
        key = self.location.key(digest)
        try:
            return self._request(f"looking up {key}", lambda: self._client.head_object(
                Bucket=self.location.bucket, Key=key))
        except FileNotFoundError:
            return None

    # -- writes -----------------------------------------------------------------------------

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        sha = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=self.cache.tmp, prefix=TEMP_PREFIX)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    sha.update(chunk)
                    fh.write(chunk)
            return self._store(tmp, sha.hexdigest())
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, source: Path, digest: str | None = None) -> str:
        """Upload `source` and move it into the cache. A `digest` its bytes do not have is a
        DigestMismatch: nothing is stored and `source` is left where it is."""
        source = Path(source)
        actual = file_sha256(source)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"{source.name} hashes to {actual}, not to the digest {digest} it was to be "
                                 f"stored under; nothing was stored in {self.location.url()}")
        return self._store(source, actual)

    def _store(self, file: Path, digest: str) -> str:
        """Upload unless the key exists (same name, same bytes), then keep the file in the cache:
        the step that wrote it usually reads it next."""
        key = self.location.key(digest)
        if self._head(digest) is None:
            # upload_file does a multipart upload for large files; like a PUT, the object
            # appears whole when it completes, so a reader never sees part of a blob.
            self._request(f"uploading {key}", lambda: self._client.upload_file(str(file), self.location.bucket, key))
        try:
            self.cache.add(file, digest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # The file is on another filesystem than the cache: the bucket holds it, and a
            # reader fetches it when it needs it.
            file.unlink(missing_ok=True)
        return digest

    # -- talking to the bucket --------------------------------------------------------------

    def _request(self, what: str, call: Callable[[], T]) -> T:
        """`call`, with a missing key as FileNotFoundError and any other failure as StoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self._where}: {what}: no such object") from None
            raise StoreUnavailable(f"{self._where}: {what} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{self._where}: {what} failed: {exc}") from exc

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        bucket = self.location.bucket
        try:
            self._client.head_bucket(Bucket=bucket)
        except NoCredentialsError:
            raise StoreConfigError(
                f"{self._where}: no S3 credentials were found; set s3_access_key_id and s3_secret_access_key "
                "(COTUNE_S3_ACCESS_KEY_ID, COTUNE_S3_SECRET_ACCESS_KEY), or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or an AWS profile or instance role") from None
        except EndpointConnectionError as exc:
            raise StoreConfigError(f"{self._where}: cannot connect ({exc}); check s3_endpoint_url and that the "
                                   "S3 server is running and reachable from this machine") from None
        except ClientError as exc:
            status = _status(exc)
            if status == 404 or _code(exc) in ("404", "NoSuchBucket"):
                why = f"bucket {bucket!r} does not exist"
                fix = (f"create it (e.g. `aws s3 mb s3://{bucket}`, or in the S3 server's console), or set "
                       "artifact_dir to an existing bucket")
            elif status == 403:
                why = f"access to bucket {bucket!r} is denied to these credentials"
                fix = ("give them s3:ListBucket, s3:GetObject and s3:PutObject on the bucket, or set "
                       "s3_access_key_id and s3_secret_access_key to ones that have them")
            elif status in (301, 400):
                why = f"the bucket answered HTTP {status} ({_code(exc)}), as for a wrong region or endpoint"
                fix = "set s3_region to the bucket's region and check s3_endpoint_url"
            else:
                why = f"checking bucket {bucket!r} failed: {exc}"
                fix = "check artifact_dir, s3_endpoint_url, s3_region and the credentials"
            raise StoreConfigError(f"{self._where}: {why}; {fix}") from None
        except BotoCoreError as exc:
            raise StoreConfigError(f"{self._where}: {exc}; check s3_endpoint_url, s3_region and the "
                                   "credentials") from None


def _client(endpoint_url: str | None, region: str | None, access_key_id: str | None,
            secret_access_key: str | None) -> Any:
    """A boto3 S3 client; keys left None come from boto3's own chain (environment, ~/.aws, a role)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreConfigError('artifact_dir is an s3:// URL, but boto3 is not installed; pip install "cotune[s3]"'
                               ) from None
    session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                    region_name=region)
    # A few quick retries: a missing endpoint fails start-up in seconds, not minutes.
    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=60)
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _body_chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(_CHUNK)
    finally:
        body.close()


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
