"""What killed writers leave is removed at the next start, whatever its age; what live ones write is kept.

The writer is a real process that takes its owner lock, starts a checkpoint write and a
dataset import, and then waits (alive, or frozen) or is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from core.layout import TEMP_SUFFIX, DataLayout, incoming_name, temp_prefix
from core.leftovers import hold_owner_lock, remove_leftovers, settle_imports
from core.storage import FolderStorage
from core.store import Store
from tests.support.processes import REPO, api_process, wait_until
from tests.support.service import DATASET

WRITER = """
import sys, time
from pathlib import Path
from core.layout import TEMP_SUFFIX, DataLayout, incoming_name, temp_prefix
from core.leftovers import hold_owner_lock

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


PUBLISHER = """
import sys, time
from pathlib import Path
from core.layout import DATASET_FILE, DataLayout, incoming_name
from core.leftovers import hold_owner_lock

layout = DataLayout(Path(sys.argv[1]))
hold_owner_lock(layout)
for dataset_id in sys.argv[2:]:
    folder = layout.datasets_dir / incoming_name(dataset_id)
    (folder / "files").mkdir(parents=True)
    (folder / DATASET_FILE).write_text(sys.argv[1])  # an import that had reached publishing
print("ready", flush=True)
time.sleep(600)
"""


def test_imports_a_killed_process_was_publishing_are_finished_or_removed(redis_server, tmp_path):
    """One import had its record in Redis when its process died (only the move into place was left):
    it is finished. The other had not: it is removed, with what reached the storage."""
    recorded, unrecorded = (DATASET.model_copy(update={"id": f"{uuid.uuid4().hex[:12]}"}) for _ in "ab")
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(tmp_path), recorded.id, unrecorded.id], cwd=REPO, stdout=subprocess.PIPE
    )
    assert publisher.stdout.readline().strip() == b"ready"
    layout = DataLayout(tmp_path)
    store = Store.from_url(redis_server.url, f"settle-{uuid.uuid4().hex[:8]}")
    store.put_dataset(recorded)
    try:
        assert remove_leftovers(layout) == [] and settle_imports(layout, store, FolderStorage(layout)) == []  # alive
        publisher.kill()
        publisher.wait(10)
        assert remove_leftovers(layout) == []  # not its to remove: they had begun publishing
        assert sorted(settle_imports(layout, store, FolderStorage(layout))) == [
            f"finished the import of dataset {recorded.id}",
            f"removed the interrupted import of dataset {unrecorded.id}",
        ]
    finally:
        publisher.kill()
        publisher.wait(10)
        store.redis.close()
    assert sorted(p.name for p in layout.datasets_dir.iterdir()) == [recorded.id]
    assert (layout.dataset_dir(recorded.id) / "files").is_dir()
