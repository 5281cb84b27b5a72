"""The run folder's fence and job.json ordering, with real files and real flocks (no Redis needed).

A ``Lease`` here is only what a run knows of its lease: its token and when it last renewed it.
"""

from __future__ import annotations

import threading
import time

import pytest

from core.layout import TEMP_SUFFIX
from core.lease import FencedRunFolder, Lease, LeaseLost, LostReason, fence_holder
from core.records import JobRecord
from core.run_files import RunFolderBusy, keep_job_file, read_job_file, remove_run, run_lock, save_job_file
from core.settings import Settings
from tests.support.service import DATASET


def _lease(token: str, ttl: float = 30) -> Lease:
    return Lease("j1", "p:job:j1:lease", token, int(ttl * 1000), time.monotonic())


def _write(folder: FencedRunFolder, name: str, text: str) -> None:
    folder.replace(name, lambda file: file.write(text.encode()))


def _temps(path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_a_newer_run_fences_the_older_one_out_of_the_folder(tmp_path):
    old = FencedRunFolder(tmp_path / "run", _lease("old/1"))
    old.claim()
    _write(old, "last.pt", "epoch 1 by old")
    new = FencedRunFolder(tmp_path / "run", _lease("new/2"))
    new.claim()  # the newer run names itself before it reads anything
    assert fence_holder(tmp_path / "run") == "new/2"
    with pytest.raises(LeaseLost) as lost:
        _write(old, "last.pt", "epoch 2 by old, late")
    assert lost.value.reason is LostReason.FENCED and not old.lease.trusted()
    _write(new, "last.pt", "epoch 2 by new")
    assert (tmp_path / "run" / "last.pt").read_text() == "epoch 2 by new"
    assert _temps(tmp_path / "run") == []  # the refused file was thrown away


def test_a_run_that_stopped_trusting_its_lease_writes_nothing(tmp_path):
    run = FencedRunFolder(tmp_path / "run", _lease("me/1", ttl=0.2))
    run.claim()
    time.sleep(0.2)  # past three quarters of the TTL without a renewal
    with pytest.raises(LeaseLost) as lost:
        _write(run, "metrics.jsonl", "late")
    assert lost.value.reason is LostReason.LAPSED and not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(LeaseLost):
        FencedRunFolder(tmp_path / "run", run.lease).claim()


def test_a_claim_waits_for_a_commit_in_flight_and_then_sees_it(tmp_path):
    """A run frozen in the middle of a commit holds the folder's lock: the newer run's claim waits,
    so the commit lands before the newer run reads the folder, never after."""
    old = FencedRunFolder(tmp_path / "run", _lease("old/1"))
    old.claim()
    in_commit, resume = threading.Event(), threading.Event()

    def frozen_commit(self, temp, target):
        with run_lock(self.path):
            self.check()
            in_commit.set()
            resume.wait(10)  # frozen here (SIGSTOP), after its checks
            temp.replace(target)

    old.commit = frozen_commit.__get__(old)
    writer = threading.Thread(target=_write, args=(old, "last.pt", "epoch 3 by old"))
    writer.start()
    assert in_commit.wait(10)
    new = FencedRunFolder(tmp_path / "run", _lease("new/2"), lock_timeout=0.3)
    with pytest.raises(RunFolderBusy):
        new.claim()  # the frozen commit holds the lock: the claim gives up (and the job waits)
    resume.set()
    writer.join(10)
    new.lock_timeout = 5
    new.claim()
    assert (tmp_path / "run" / "last.pt").read_text() == "epoch 3 by old"  # what the newer run resumes from


def test_a_run_whose_folder_was_deleted_does_not_bring_it_back(tmp_path):
    settings = Settings(data_dir=tmp_path)
    run = FencedRunFolder(settings.layout.run_dir("j1"), _lease("me/1"))
    run.claim()
    remove_run(settings.layout, "j1")
    with pytest.raises(LeaseLost):
        _write(run, "best.pt", "late")
    assert not settings.layout.run_dir("j1").exists()


def test_job_json_only_moves_forward(tmp_path):
    job = JobRecord.new("j1", DATASET, {"epochs": 1}).model_copy(update={"revision": 3})
    assert save_job_file(tmp_path, job)
    cancelled = job.model_copy(update={"status": "cancelled", "revision": 5})
    assert save_job_file(tmp_path, cancelled)
    assert not save_job_file(tmp_path, job.model_copy(update={"status": "running", "revision": 4}))  # late
    assert not save_job_file(tmp_path, cancelled)  # the same revision again: nothing to do
    assert read_job_file(tmp_path) == cancelled


def test_a_late_record_does_not_bring_back_a_deleted_run(tmp_path):
    settings = Settings(data_dir=tmp_path)
    job = JobRecord.new("j1", DATASET, {"epochs": 1})
    assert save_job_file(settings.layout.run_dir("j1"), job, create=True)
    remove_run(settings.layout, "j1")
    with pytest.raises(FileNotFoundError):
        save_job_file(settings.layout.run_dir("j1"), job.model_copy(update={"revision": 9}))
    keep_job_file(settings.layout.run_dir("j1"), job.model_copy(update={"revision": 9}))  # logged, not raised
    assert not settings.layout.run_dir("j1").exists()
