"""What killed writers leave is removed at the next start, whatever its age; what live ones write is kept.

The writer is a real process that takes its owner lock, starts a checkpoint write and a
dataset import, and then waits (alive, or frozen) or is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from model.layout import TEMP_SUFFIX, DataLayout, incoming_name, temp_prefix
from tests.service.conftest import REPO, api_process, wait_until
from worker.leftovers import hold_owner_lock, remove_leftovers

WRITER = """
import sys, time
from pathlib import Path
from model.layout import TEMP_SUFFIX, DataLayout, incoming_name, temp_prefix
from worker.leftovers import hold_owner_lock

layout = DataLayout(Path(sys.argv[1]))
hold_owner_lock(layout)
run = layout.run_dir("j1")
run.mkdir(parents=True, exist_ok=True)
(run / (temp_prefix("last.pt") + "abc123" + TEMP_SUFFIX)).write_bytes(b"half a checkpoint")
(layout.datasets_dir / incoming_name("d1") / "files").mkdir(parents=True)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def writer(tmp_path):
    """A writer process in the middle of its writes under ``tmp_path``; killed after the test."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"ready"
    yield process
    process.kill()
    process.wait(10)


def _names(layout: DataLayout) -> set[str]:
    return {p.relative_to(layout.root).as_posix() for p in layout.root.rglob("*")}


def test_a_live_writers_files_are_kept_even_when_frozen(writer, tmp_path):
    layout = DataLayout(tmp_path)
    before = _names(layout)
    assert remove_leftovers(layout) == []
    os.kill(writer.pid, signal.SIGSTOP)  # frozen (swap, a debugger): still alive, still its files
    try:
        assert remove_leftovers(layout) == [] and _names(layout) == before
    finally:
        os.kill(writer.pid, signal.SIGCONT)


def test_a_killed_writers_files_are_removed_whatever_their_age(writer, tmp_path):
    layout = DataLayout(tmp_path)
    (layout.runs_dir / ".trash-old-abc").mkdir()  # a delete interrupted between rename and removal
    (layout.run_dir("j1") / f".metrics.jsonl.legacy{TEMP_SUFFIX}").write_text("")  # a name with no owner
    mine = layout.run_dir("j1") / (temp_prefix("best.pt") + "xyz" + TEMP_SUFFIX)
    hold_owner_lock(layout)  # this process writes too, and lives on
    mine.write_text("in progress")
    (layout.datasets_dir / incoming_name("d2")).mkdir()
    writer.kill()
    writer.wait(10)

    removed = remove_leftovers(layout)
    assert sorted(removed) == sorted(
        [
            "runs/.trash-old-abc",
            "runs/j1/.metrics.jsonl.legacy.tmp",
            next(name for name in removed if name.startswith("runs/j1/.last.pt.")),
            next(name for name in removed if name.startswith("datasets/.incoming-") and name.endswith("-d1")),
        ]
    )
    left = _names(layout)
    assert mine.exists() and any(name.endswith("-d2") for name in left)  # this live process's work stays
    assert sum(name.startswith("owners/") for name in left) == 1  # the dead writer's lock file is gone too
    assert remove_leftovers(layout) == []


def test_the_api_sweeps_at_start(writer, tmp_path, env, log_dir):
    layout = DataLayout(tmp_path)
    half_written = next(layout.run_dir("j1").glob(f"*{TEMP_SUFFIX}"))
    writer.kill()
    writer.wait(10)
    with api_process(env, log_dir, "api-sweep", SSD_DATA_DIR=str(tmp_path)):
        wait_until(lambda: not half_written.exists(), 30, "the API's start-up sweep")
        assert not list(layout.datasets_dir.glob(".incoming-*"))
