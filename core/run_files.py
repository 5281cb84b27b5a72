"""A job's run folder as the service reads and writes it beside ``fit``: the folder lock,
``job.json`` (revision-ordered), the loss history, deletion.

Several processes write a run folder: the run training the job (through ``fit``), the API
(the job's record when it is created, cancelled or fails to be queued) and the reaper (when
it puts the job back). Each write happens under the folder's lock (``flock`` on its
``.lock``, which the kernel releases when a process dies), so a write and the check that
allows it are one step for every other writer:

- ``job.json`` only moves forward: it is replaced only by a record of a higher ``revision``
  (every change in Redis counts one), whatever order the writers arrive in;
- a run's files are committed only while the run's fence holds (``core.lease``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from core.layout import JOB_FILE, METRICS_FILE, RUN_LOCK_FILE, DataLayout
from core.records import JobRecord
from model.run_folder import atomic_write, remove_aside

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

LOCK_TIMEOUT_SECONDS = 10.0  # a commit takes well under a second; longer means a frozen holder


class RunFolderBusy(TimeoutError):
    """Another process has held the run folder's lock for longer than the timeout (frozen?)."""


@contextmanager
def run_lock(run_dir: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold the run folder's lock. The folder must exist: a deleted run is never brought back.

    Raises:
        RunFolderBusy: not taken within ``timeout`` seconds.
        FileNotFoundError: the run folder is gone.
    """
    fd = os.open(Path(run_dir) / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunFolderBusy(f"{run_dir} has been locked by another process for over {timeout:g}s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # also releases the lock


def read_job_file(run_dir: Path) -> JobRecord | None:
    """The record in ``run_dir/job.json``, or None if there is none or it cannot be read."""
    return read_record(JobRecord, Path(run_dir) / JOB_FILE)


def read_record(model: type[R], path: Path) -> R | None:
    """The JSON file ``path`` as a ``model``, or None if there is none or it cannot be read (logged)."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as error:
        log.warning("cannot read %s: %s", path, error)
        return None


def save_job_file(
    run_dir: Path, record: JobRecord, create: bool = False, timeout: float = LOCK_TIMEOUT_SECONDS
) -> bool:
    """Write ``record`` as ``run_dir/job.json`` unless the file holds the same or a later revision.

    ``create``: make the run folder (a new job's); otherwise a missing folder is an error, so a
    late write never brings back the folder of a job deleted meanwhile.

    Returns:
        Whether it was written.
    """
    run_dir = Path(run_dir)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, timeout):
        current = read_job_file(run_dir)
        if current is not None and current.id == record.id and current.revision >= record.revision:
            return False
        data = record.model_dump_json(indent=2).encode()
        atomic_write(run_dir / JOB_FILE, lambda file: file.write(data))
    return True


def keep_job_file(run_dir: Path, record: JobRecord | None) -> None:
    """``save_job_file``, where Redis already holds the change: a failure is logged, not raised (the
    next change writes the file again, and Redis is what the service reads while it has the record)."""
    if record is None:
        return
    try:
        save_job_file(run_dir, record)
    except OSError as error:  # RunFolderBusy among them
        log.warning("job %s: could not update %s: %s", record.id, Path(run_dir) / JOB_FILE, error)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records in ``run_dir/metrics.jsonl``, oldest first (up to a torn last line)."""
    try:
        return parse_history((Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []


def parse_history(text: str) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl``'s text, oldest first (up to a torn last line)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def remove_run(layout: DataLayout, job_id: str) -> None:
    """Delete a job's run folder (``model.run_folder.remove_aside``: a run still writing it finds it gone)."""
    remove_aside(layout.run_dir(job_id))
