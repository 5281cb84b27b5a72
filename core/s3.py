"""An S3-compatible bucket (AWS S3, MinIO, Ceph...) as the service uses it: whole objects, and
conditional puts for the few objects several processes write.

The client is boto3: it reads the standard AWS configuration (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and
the shared config files) exactly as the AWS tools do, speaks to every S3-compatible store,
sends the ``If-Match``/``If-None-Match`` conditional puts the run fence needs, and its
transfer manager streams large files in parts from disk (an upload never sits in memory).

An object is written whole or not at all (S3 never shows half of a PUT), so a reader sees
either the old version of a key or the new one.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9_.\-/]*)?$"
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
_CHECKING = "checking the bucket"
_PROBE_PREFIX = ".ssd-service-probe-"  # a key of one byte that lives for the moment of a check
_NO_SUCH_ETAG = '"00000000000000000000000000000000"'  # an MD5 ETag no probe's one byte has


class BucketError(OSError):
    """The bucket could not be read or written (unreachable, refused credentials, no such bucket...)."""

    refused = False  # True: trying again cannot help (the bucket or the credentials are wrong)


class Refused(BucketError):
    """The bucket does not exist, or refuses these credentials: it will not work until the set-up changes."""

    refused = True


class Conflict(BucketError):
    """A conditional put was refused: the object changed (or appeared, or vanished) since it was read."""


@dataclass(frozen=True)
class Location:
    """``s3://<bucket>/<prefix>``: where the service keeps its objects."""

    bucket: str
    prefix: str  # "" or ends with "/"

    @classmethod
    def parse(cls, url: str) -> Location:
        """``s3://bucket`` or ``s3://bucket/prefix`` (ValueError otherwise)."""
        if not re.match(URL_PATTERN, url):
            raise ValueError(f"a storage URL looks like s3://bucket or s3://bucket/prefix, got {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(error: BaseException) -> int:
    response = getattr(error, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _answer(error: BaseException) -> BaseException:
    """The error that carries the store's answer: ``error``, or the one it was raised from. boto3's
    transfer manager turns a refused upload into an ``S3UploadFailedError`` of its own, with no
    answer, raised while handling the store's ``ClientError``."""
    found: BaseException | None = error
    while found is not None and getattr(found, "response", None) is None:
        found = found.__cause__ or found.__context__
    return found or error


class Bucket:
    """Keys are relative to the location's prefix. Every failure is a ``BucketError`` naming the bucket."""

    def __init__(self, location: Location, client: Any = None):
        import boto3  # only a service with SSD_STORAGE_URL set needs it
        from botocore.config import Config

        self.location = location
        session = boto3.session.Session()
        # Standard retries: throttling and dropped connections are retried a few times before an error.
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.client = client or session.client("s3", config=config)
        # The readiness probe answers quickly instead: one try, short timeouts.
        probe = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5)
        self._probe = client or session.client("s3", config=probe)

    def _key(self, key: str) -> str:
        return self.location.prefix + key

    def _error(self, error: Exception, doing: str) -> BucketError:
        answer = _answer(error)
        code, status = _code(answer), _status(answer)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return Conflict(f"{doing}: the object changed meanwhile ({code or status})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken") or status == 403:
            why = "the bucket refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"
        elif code == "NoSuchBucket" or (status == 404 and doing == _CHECKING):
            why = "the bucket does not exist"
        elif type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            why = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        else:
            return BucketError(f"{doing} in {self.location}: {error}")
        return Refused(f"{doing} in {self.location}: {why}")

    def _call(self, doing: str, method: str, client: Any = None, **kwargs) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(client or self.client, method)(Bucket=self.location.bucket, **kwargs)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, doing) from error

    def check(self) -> None:
        """Raises BucketError unless the bucket answers and lets these credentials in."""
        self._call(_CHECKING, "head_bucket", client=self._probe)

    def create(self) -> bool:
        """Create the bucket unless it exists; whether it was created."""
        try:
            self.check()
            return False
        except Refused as error:
            if "does not exist" not in str(error):
                raise
        region = self.client.meta.region_name
        where = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        self._call("creating the bucket", "create_bucket", **where)
        return True

    def check_conditional_writes(self) -> None:
        """Raises Refused unless the store refuses both conditional puts the service relies on: a second
        ``If-None-Match: *`` put of one key (a run's first manifest, a new job's record) and a put whose
        ``If-Match`` names another version (every later manifest and record). A store that ignores
        either would let a stale run overwrite a newer run's files."""
        key = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        self.put(key, b"1", if_absent=True)
        try:
            for header, write in (
                ("If-None-Match", lambda: self.put(key, b"2", if_absent=True)),
                ("If-Match", lambda: self.put(key, b"3", if_match=_NO_SUCH_ETAG)),
            ):
                try:
                    write()
                except Conflict:
                    continue
                raise Refused(
                    f"{self.location} ignores conditional writes ({header}): the service needs a store that "
                    "honours them (AWS S3, MinIO, Ceph RGW) to keep a stale worker from overwriting a newer "
                    "one's files"
                )
        finally:
            self.delete(key)

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if there is no such object (a missing bucket is an error)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_object(Bucket=self.location.bucket, Key=self._key(key))
            return answer["Body"].read(), answer["ETag"]
        except ClientError as error:
            if _code(error) == "NoSuchKey":
                return None
            raise self._error(error, f"reading {key}") from error
        except BotoCoreError as error:
            raise self._error(error, f"reading {key}") from error

    def put(self, key: str, data: bytes, if_match: str | None = None, if_absent: bool = False) -> str:
        """Write ``data`` as ``key``; its new ETag.

        ``if_match``: only if the object's ETag is still this one; ``if_absent``: only if there is
        no such object yet. Either refused: ``Conflict`` (an object that vanished counts as changed).
        """
        kwargs: dict[str, Any] = {"Key": self._key(key), "Body": data}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        try:
            return self._call(f"writing {key}", "put_object", **kwargs)["ETag"]
        except BucketError as error:
            cause = error.__cause__
            if if_match is not None and cause is not None and (_code(cause) == "NoSuchKey" or _status(cause) == 404):
                raise Conflict(f"writing {key}: the object was deleted meanwhile") from cause
            raise

    def upload(self, key: str, path: Path) -> None:
        """Stream the file ``path`` to ``key`` (in parts when it is large)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.location.bucket, self._key(key))
        except (Boto3Error, ClientError, BotoCoreError) as error:
            raise self._error(error, f"uploading {key}") from error

    def download(self, key: str, path: Path) -> None:
        """Stream ``key`` into the file ``path``; FileNotFoundError if there is no such object."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(self.location.bucket, self._key(key), str(path))
        except ClientError as error:
            if _code(error) in ("NoSuchKey", "404"):  # the transfer's HEAD has no body: "404" is all it says
                raise FileNotFoundError(f"{self.location}{key} does not exist") from error
            raise self._error(error, f"downloading {key}") from error
        except (Boto3Error, BotoCoreError) as error:
            raise self._error(error, f"downloading {key}") from error

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (relative to the location), in key order."""
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.location.prefix) :]

    def children(self, prefix: str) -> Iterator[str]:
        """The names of the "folders" right under ``prefix`` (which ends with "/")."""
        for page in self._pages(prefix, delimiter="/"):
            for item in page.get("CommonPrefixes", []):
                yield item["Prefix"][len(self._key(prefix)) :].rstrip("/")

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"Bucket": self.location.bucket, "Prefix": self._key(prefix)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, f"listing {prefix}") from error

    def delete(self, key: str) -> None:
        """Delete ``key`` (nothing happens if there is no such object)."""
        self._call(f"deleting {key}", "delete_object", Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; how many there were."""
        keys = list(self.keys(prefix))
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self._key(key)} for key in keys[start : start + _DELETE_BATCH]]
            answer = self._call(f"deleting {prefix}", "delete_objects", Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise BucketError(f"deleting {prefix} in {self.location}: {first.get('Key')}: {first.get('Message')}")
        return len(keys)
