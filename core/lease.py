"""A job's lease: at most one run trains a job and writes its records and files.

- **Acquire.** A run takes the job's lease (``p:job:<id>:lease``: its token, with a
  ``SSD_LEASE_SECONDS`` expiry) with ``SET NX`` before it starts the job.
- **Renew.** The run's monitor thread (``worker.lease_monitor.JobMonitor``) pushes the expiry out
  every third of the TTL. A lease that lapsed while Redis was away (or lost its last renewal)
  is taken back if nobody else took it and the job still names this run's token.
- **Fence.** A run trusts its lease only until ``TRUST_FRACTION`` of the TTL after the last
  renewal Redis confirmed, counted on its own monotonic clock from when it sent that renewal
  (so never past the expiry Redis holds). Past that the run stops before its next batch and
  writes nothing more. Its Redis writes (progress, epoch records, the job's end) are scripts
  that check its token against the lease atomically. Its files are fenced too: a run that
  takes a job writes its token to the run folder's ``.fence`` under the folder's lock
  (``core.run_files.run_lock``) before it reads anything there, and each file it writes
  is renamed into place under that lock only while ``.fence`` names it and it still trusts
  its lease. A run that was frozen (SIGSTOP, swap) or cut off from Redis past its lease can
  therefore not overwrite the files of the run that took the job over: the newer run's
  claim either came first (then ``.fence`` names the newer run) or waited for the older
  run's commit to finish (then the newer run resumes from what that commit left).
- **Release.** At the job's end (with the same script that records it), when the job is
  paused, or when a run gives up before starting.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis

from core.layout import FENCE_FILE
from core.lua_scripts import register
from core.run_files import LOCK_TIMEOUT_SECONDS, run_lock
from model.run_folder import RunFolder, Writer, atomic_write, commit_temp

log = logging.getLogger(__name__)

TRUST_FRACTION = 0.75  # of the TTL after the last confirmed renewal: the margin covers clock rates and a batch


class LostReason(enum.Enum):
    """Why a run may no longer write its job."""

    TAKEN = "another run holds the job's lease now (the job was requeued, taken over or has ended)"
    LAPSED = "the lease was not renewed in time (Redis was unreachable, or this process was frozen)"
    FENCED = "the run folder names another run: a newer run took the job over"


class LeaseLost(RuntimeError):
    """The run lost its job: it must stop and write nothing more."""

    def __init__(self, reason: LostReason):
        super().__init__(reason.value)
        self.reason = reason


@dataclass(eq=False)
class Lease:
    """A lease a run holds. ``confirmed_at``: monotonic time at which the last renewal that Redis
    confirmed was sent; ``lost``: why the run no longer holds it (it stays lost)."""

    job_id: str
    key: str
    token: str
    ttl_ms: int
    confirmed_at: float
    lost: LostReason | None = None

    @property
    def trusted_until(self) -> float:
        return self.confirmed_at + TRUST_FRACTION * self.ttl_ms / 1000

    def check(self) -> None:
        """Raises LeaseLost unless the run may still write: not lost, and renewed recently enough."""
        if self.lost is None and time.monotonic() > self.trusted_until:
            self.lost = LostReason.LAPSED
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def trusted(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True


class Leases:
    """Job leases in Redis. ``lease_key`` and ``job_key`` name a job's lease and record keys."""

    def __init__(self, client: redis.Redis, lease_key: Callable[[str], str], job_key: Callable[[str], str]):
        self.redis = client
        self.lease_key = lease_key
        self.job_key = job_key
        self._renew = register(client, "renew_lease")
        self._release = register(client, "release_lease")

    def acquire(self, job_id: str, token: str, ttl_seconds: float) -> Lease | None:
        """Take the job's lease (SET NX PX), or None if another run holds it."""
        sent = time.monotonic()
        lease = Lease(job_id, self.lease_key(job_id), token, max(1, int(ttl_seconds * 1000)), sent)
        return lease if self.redis.set(lease.key, token, nx=True, px=lease.ttl_ms) else None

    def renew(self, lease: Lease) -> bool:
        """Push the lease's expiry out by its TTL (or take a lapsed one back); False, and ``lease.lost``
        set, if another run has the job now. Redis errors are raised: the TTL decides then."""
        sent = time.monotonic()
        renewed = self._renew(keys=[lease.key, self.job_key(lease.job_id)], args=[lease.token, lease.ttl_ms])
        if not renewed:
            lease.lost = lease.lost or LostReason.TAKEN
            return False
        lease.confirmed_at = max(lease.confirmed_at, sent)
        return True

    def release(self, lease: Lease) -> bool:
        return bool(self._release(keys=[lease.key], args=[lease.token]))

    def holder(self, job_id: str) -> str | None:
        return cast("str | None", self.redis.get(self.lease_key(job_id)))  # a client that decodes replies


def fence_holder(run_dir: Path) -> str | None:
    """The token of the run the folder's fence names, or None if there is no fence."""
    try:
        return (Path(run_dir) / FENCE_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


class LeasedRunFolder(RunFolder):
    """A run folder one run at a time may write: the run holding the job's lease ``claim``s it before
    it reads or writes anything there (in the data folder ``FencedRunFolder``, in a bucket
    ``core.bucket_storage.BucketRunFolder``)."""

    def claim(self) -> None:
        raise NotImplementedError


class FencedRunFolder(LeasedRunFolder):
    """The run folder of the run holding ``lease``: ``fit`` writes it through ``commit``, which
    renames a file into place only under the folder's lock, while the fence names this run and
    its lease is trusted (else LeaseLost, and the file is thrown away). A write never creates
    the folder: a run whose job was deleted under it must not bring the folder back."""

    make_folder = False

    def __init__(self, path: Path, lease: Lease, lock_timeout: float = LOCK_TIMEOUT_SECONDS):
        super().__init__(path)
        self.lease = lease
        self.lock_timeout = lock_timeout

    def claim(self) -> None:
        """Name this run in the folder's fence; before anything in the folder is read.

        Raises:
            LeaseLost: the lease is no longer trusted.
            RunFolderBusy: another process holds the folder's lock (frozen mid-commit?).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        token = self.lease.token.encode()
        with run_lock(self.path, self.lock_timeout):
            self.lease.check()
            atomic_write(self.file(FENCE_FILE), lambda file: file.write(token))

    def check(self) -> None:
        """Raises LeaseLost unless this run may write the folder now (call it under the lock)."""
        self.lease.check()
        if fence_holder(self.path) != self.lease.token:
            self.lease.lost = LostReason.FENCED
            raise LeaseLost(LostReason.FENCED)

    def replace(self, name: str, write: Writer) -> None:
        try:
            super().replace(name, write)
        except FileNotFoundError:  # the run folder was deleted under this run
            self.lease.lost = LostReason.FENCED
            raise LeaseLost(LostReason.FENCED) from None

    def commit(self, temp: Path, target: Path) -> None:
        with run_lock(self.path, self.lock_timeout):
            self.check()
            commit_temp(temp, target)
