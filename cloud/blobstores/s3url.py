"""`s3://bucket/prefix`: how `artifact_dir` names a bucket, checked without boto3."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "s3://"
# S3's bucket naming rules (MinIO and Ceph follow them): 3-63 of a-z 0-9 . -, letter or digit at the ends.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/": a blob's key is prefix + digest

    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, digest: str) -> str:
        return self.prefix + digest


def is_s3_url(location: str) -> bool:
    return location.startswith(SCHEME)


def parse_s3_url(url: str) -> S3Location:
    """The bucket and key prefix of `s3://bucket[/prefix]`; a ValueError saying what is wrong."""
    if not is_s3_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL; write it as s3://bucket/prefix")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{url!r}: {bucket!r} is not a valid bucket name (3-63 characters of lowercase letters, "
                         "digits, '.' and '-', starting and ending with a letter or digit); write s3://bucket/prefix")
    parts = [part for part in prefix.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"{url!r}: the key prefix may not hold '.' or '..' parts")
    return S3Location(bucket, "".join(f"{part}/" for part in parts))
