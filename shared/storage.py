"""Result storage: S3-compatible object stores (S3, MinIO, R2) and a local folder.

Workers upload; producers list and download. Keys are built only from validated ids, so a batch
name or a prompt file name never reaches a path. Credentials come from the standard AWS_*
variables through boto3 and are never logged or written anywhere by zfarm.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from urllib.parse import urlparse

from shared.errors import StorageError
from shared.schema import check_id

log = logging.getLogger(__name__)




def result_name(batch_id: str, index: int, ext: str) -> str:
    """`{batch_id}/{index:06d}.{ext}` relative to the storage prefix."""
    check_id(batch_id)
    if not isinstance(index, int) or index < 0:
        raise StorageError(f"bad job index {index!r}")
    return f"{batch_id}/{index:06d}.{ext}"


class FileStorage:
    def __init__(self, root: str):
        self.root = Path(root).expanduser().resolve()

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            raise StorageError(f"key {name!r} escapes the storage root")
        return path

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # a reader never sees half a file
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {name}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def describe(self) -> str:
        return f"file://{self.root}"


class S3Storage:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str = "", client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # botocore logs each request's headers at DEBUG, and the Authorization header names the
        # access key id: keep its loggers at INFO or above, whatever level the process logs at.
        botocore_log = logging.getLogger("botocore")
        botocore_log.setLevel(max(logging.INFO, botocore_log.level))
        # Our own retry loop (put_with_retry) spans outages; botocore's stays short so one
        # attempt fails fast instead of hanging.
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url or None,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30))

    def _key(self, name: str) -> str:
        if ".." in name.split("/"):
            raise StorageError(f"key {name!r} escapes the prefix")
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot upload s3://{self.bucket}/{self._key(name)}: {exc}") from exc

    def get(self, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot read s3://{self.bucket}/{self._key(name)}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix)
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    names.append(key[len(self.prefix) + 1:] if self.prefix else key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot list s3://{self.bucket}/{full}: {exc}") from exc
        return sorted(names)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def open_storage(storage_url: str, s3_endpoint_url: str = ""):
    parsed = urlparse(storage_url)
    if parsed.scheme == "file":
        netloc = "" if parsed.netloc == "localhost" else parsed.netloc
        return FileStorage((netloc + parsed.path) or ".")
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {storage_url!r} names no bucket (s3://bucket/prefix)")
        return S3Storage(parsed.netloc, parsed.path, s3_endpoint_url)
    raise StorageError(f"storage URL {storage_url!r}: expected s3://bucket/prefix or file:///abs/dir")


def put_with_retry(storage, name: str, data: bytes, content_type: str, retry_s: float,
                   on_retry=None, first_delay_s: float = 0.5, max_delay_s: float = 10.0) -> int:
    """Upload, retrying with jittered exponential backoff for up to `retry_s` seconds.

    Returns how many retries it took; raises StorageError once the period is spent."""
    retries = 0

    def put():
        storage.put(name, data, content_type)

    def counted(exc):
        nonlocal retries
        retries += 1
        if on_retry:
            on_retry(exc)

    with_retry(put, f"upload of {name}", retry_s, counted, first_delay_s, max_delay_s)
    return retries


def with_retry(call, what: str, retry_s: float, on_retry=None, first_delay_s: float = 0.5,
               max_delay_s: float = 10.0):
    """`call()`'s result, calling again on StorageError with jittered exponential backoff for up to
    `retry_s` seconds; raises StorageError once the period is spent."""
    deadline = time.monotonic() + retry_s
    delay_s, retries = first_delay_s, 0
    while True:
        try:
            return call()
        except StorageError as exc:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise StorageError(f"gave up after {retries} retries over {retry_s:g} s: {exc}") from exc
            retries += 1
            if on_retry:
                on_retry(exc)
            log.warning("%s failed (%s); retry %d in %.1f s", what, exc, retries, delay_s)
            time.sleep(min(delay_s * random.uniform(0.8, 1.2), remaining_s))
            delay_s = min(delay_s * 2, max_delay_s)
