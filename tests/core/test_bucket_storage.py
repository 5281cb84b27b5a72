"""The bucket storage's pieces against a real S3 API (moto's server on loopback): conditional puts, the
run fence through the manifest, revision-ordered job records, datasets, the bounded cache, clear errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.bucket_storage import BucketStorage
from core.cache import LocalCache
from core.layout import DataLayout
from core.lease import Lease, LeaseLost, LostReason
from core.records import DatasetRecord, JobRecord
from core.s3 import Bucket, BucketError, Conflict, Location
from core.settings import Settings
from core.storage import StorageUnavailable
from tests.support.s3_server import S3Server, s3_server
from tests.support.service import shapes


@pytest.fixture(scope="module")
def s3() -> S3Server:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket_url(s3, request) -> str:
    return s3.create_bucket(f"test-{request.node.name.replace('_', '-')[:40].strip('-').lower()}")


def storage_in(url: str, folder: Path, cache_bytes: int = 10**9) -> BucketStorage:
    return BucketStorage(f"{url}/service", DataLayout(folder), cache_bytes)


def lease(token: str, job_id: str = "job1") -> Lease:
    return Lease(job_id, f"lease:{job_id}", token, ttl_ms=600_000, confirmed_at=time.monotonic())


def write(folder, name: str, data: bytes) -> None:
    folder.replace(name, lambda file: file.write(data))


def test_conditional_puts_refuse_a_changed_a_present_or_a_deleted_object(bucket_url):
    bucket = Bucket(Location.parse(bucket_url))
    first = bucket.put("key", b"one", if_absent=True)
    with pytest.raises(Conflict):
        bucket.put("key", b"again", if_absent=True)
    second = bucket.put("key", b"two", if_match=first)
    with pytest.raises(Conflict):
        bucket.put("key", b"three", if_match=first)  # stale: the object changed since
    assert bucket.read("key") == (b"two", second)
    bucket.delete("key")
    with pytest.raises(Conflict):
        bucket.put("key", b"four", if_match=second)  # it was deleted meanwhile
    assert bucket.read("key") is None


def test_a_newer_run_fences_an_older_one_and_resumes_from_what_it_committed(bucket_url, tmp_path):
    old_machine, new_machine = storage_in(bucket_url, tmp_path / "a"), storage_in(bucket_url, tmp_path / "b")
    old = old_machine.run_folder("job1", lease("old"))
    old.claim()
    write(old, "last.pt", b"epoch 1")
    write(old, "metrics.jsonl", b'{"epoch": 1}\n')

    new = new_machine.run_folder("job1", lease("new"))
    new.claim()  # on another machine with an empty data folder
    assert (new.path / "last.pt").read_bytes() == b"epoch 1"
    assert (new.path / "metrics.jsonl").read_bytes() == b'{"epoch": 1}\n'

    with pytest.raises(LeaseLost) as lost:
        write(old, "last.pt", b"stale epoch 2")  # the old run thawed: its commit is refused
    assert lost.value.reason is LostReason.FENCED
    assert not (old.path / "last.pt").read_bytes().startswith(b"stale")

    write(new, "last.pt", b"epoch 2")
    third = storage_in(bucket_url, tmp_path / "c")
    with third.run_file("job1", "last.pt") as path:
        assert path.read_bytes() == b"epoch 2"
    # Only the versions the manifest names are left: the refused and the replaced ones are deleted.
    versions = [key for key in old_machine.bucket.keys("runs/job1/files/")]
    assert sorted(key.split("/")[-1].split(".")[0] for key in versions) == ["last", "metrics"]


class LostAnswer(Bucket):
    """A bucket whose next manifest put lands but whose answer is lost: the client's retry is refused.
    ``meanwhile`` runs between the two (another run's claim, say)."""

    lose_next = True
    meanwhile = staticmethod(lambda: None)

    def put(self, key: str, data: bytes, if_match: str | None = None, if_absent: bool = False) -> str:
        etag = super().put(key, data, if_match, if_absent)
        if key.endswith("manifest.json") and self.lose_next:
            self.lose_next = False
            self.meanwhile()
            raise Conflict("the retry of a put that landed is refused")
        return etag


def test_a_commit_whose_answer_was_lost_still_counts(bucket_url, tmp_path):
    storage = storage_in(bucket_url, tmp_path)
    run = storage.run_folder("job1", lease("only"))
    run.claim()
    run.bucket = LostAnswer(run.bucket.location)
    write(run, "last.pt", b"epoch 1")  # no LeaseLost: the manifest names this version
    write(run, "last.pt", b"epoch 2")  # and the next commit matches the ETag it left
    with storage_in(bucket_url, tmp_path / "other").run_file("job1", "last.pt") as path:
        assert path.read_bytes() == b"epoch 2"


def test_a_lost_answer_then_a_takeover_keeps_the_version_the_new_run_carries_on(bucket_url, tmp_path):
    old_machine, new_machine = storage_in(bucket_url, tmp_path / "a"), storage_in(bucket_url, tmp_path / "b")
    old = old_machine.run_folder("job1", lease("old"))
    old.claim()
    new = new_machine.run_folder("job1", lease("new"))
    old.bucket = LostAnswer(old.bucket.location)
    old.bucket.meanwhile = new.claim  # the old run's put landed; the new run claims before its retry
    with pytest.raises(LeaseLost):
        write(old, "last.pt", b"epoch 1")
    assert (new.path / "last.pt").read_bytes() == b"epoch 1"  # it resumed from the version that landed
    with storage_in(bucket_url, tmp_path / "c").run_file("job1", "last.pt") as path:
        assert path.read_bytes() == b"epoch 1"  # which is still there


class ManifestAway(Bucket):
    """A store that takes uploads but is away when the manifest is written."""

    def put(self, key: str, data: bytes, if_match: str | None = None, if_absent: bool = False) -> str:
        if key.endswith("manifest.json"):
            raise BucketError(f"writing {key}: the store went away")
        return super().put(key, data, if_match, if_absent)


def test_versions_no_manifest_names_are_swept_when_a_run_claims_the_job(bucket_url, tmp_path):
    storage = storage_in(bucket_url, tmp_path / "a")
    first = storage.run_folder("job1", lease("first"))
    first.claim()
    write(first, "last.pt", b"epoch 1")
    first.bucket = ManifestAway(first.bucket.location)
    with pytest.raises(BucketError):
        write(first, "last.pt", b"epoch 2")  # uploaded, but no manifest names it
    assert len(list(storage.bucket.keys("runs/job1/files/"))) == 2
    heir = storage_in(bucket_url, tmp_path / "b").run_folder("job1", lease("heir"))
    heir.claim()
    assert (heir.path / "last.pt").read_bytes() == b"epoch 1"
    assert list(storage.bucket.keys("runs/job1/files/")) == list(heir.manifest.files.values())


class IgnoresConditions(Bucket):
    """A store that drops If-Match / If-None-Match on the floor."""

    def put(self, key: str, data: bytes, if_match: str | None = None, if_absent: bool = False) -> str:
        return super().put(key, data)


class IgnoresIfMatch(Bucket):
    """A store that honours If-None-Match but drops If-Match: the put the manifest's fence relies on."""

    def put(self, key: str, data: bytes, if_match: str | None = None, if_absent: bool = False) -> str:
        return super().put(key, data, if_absent=if_absent)


@pytest.mark.parametrize("store", [IgnoresConditions, IgnoresIfMatch])
def test_a_store_that_ignores_conditional_writes_is_refused_at_start_up(bucket_url, tmp_path, store):
    storage = storage_in(bucket_url, tmp_path)
    storage.check(thorough=True)  # moto's server honours them
    storage.bucket = store(storage.bucket.location)
    with pytest.raises(StorageUnavailable, match="ignores conditional writes"):
        storage.check(thorough=True)
    assert list(storage.bucket.keys("")) == []  # the probe object is gone


def test_a_run_whose_job_was_deleted_writes_nothing_more(bucket_url, tmp_path):
    storage = storage_in(bucket_url, tmp_path)
    run = storage.run_folder("job1", lease("only"))
    run.claim()
    write(run, "last.pt", b"epoch 1")
    storage.remove_run("job1")
    with pytest.raises(LeaseLost):
        write(run, "last.pt", b"epoch 2")
    assert list(storage.bucket.keys("runs/job1/")) == []


def test_a_run_past_its_lease_uploads_nothing(bucket_url, tmp_path):
    storage = storage_in(bucket_url, tmp_path)
    run = storage.run_folder("job1", lease("late"))
    run.claim()
    run.lease.confirmed_at -= 3600  # its last renewal was long ago
    with pytest.raises(LeaseLost):
        write(run, "last.pt", b"too late")
    assert list(storage.bucket.keys("runs/job1/files/")) == []


DATASET = DatasetRecord(
    id="d1", name="d", format="coco", num_images=3, num_boxes=3, classes=["circle"],
    created_at="2026-11-26T00:00:00Z", source="synthetic", root="files",
)  # fmt: skip


def job(revision: int, status: str = "queued") -> JobRecord:
    return JobRecord.new("job1", DATASET, {"epochs": 1}).model_copy(update={"revision": revision, "status": status})


def test_job_records_only_move_forward_and_a_deleted_job_stays_deleted(bucket_url, tmp_path):
    storage = storage_in(bucket_url, tmp_path)
    assert not storage.save_job(job(1))  # not created yet: a late write brings nothing back
    assert storage.save_job(job(1), create=True)
    assert storage.save_job(job(3, "running"))
    assert not storage.save_job(job(2, "queued"))  # an older change arriving late
    assert storage.read_job("job1").status == "running"
    assert storage.saved_job_ids() == ["job1"]
    storage.remove_run("job1")
    storage.keep_job(job(4, "failed"))
    assert storage.read_job("job1") is None


def test_a_dataset_travels_through_the_bucket_to_an_empty_cache(bucket_url, tmp_path):
    api, worker = storage_in(bucket_url, tmp_path / "api"), storage_in(bucket_url, tmp_path / "worker")
    folder = api.layout.dataset_dir("d1")
    data = shapes(folder / "files", num_images=3, seed=1)
    record = DATASET.model_copy(update={"format": data.format, "classes": list(data.classes)})
    api.publish_dataset(record, folder)
    api.place_dataset(record.id, folder)
    assert not folder.exists()  # it moved into the API's cache
    with worker.dataset_files(record) as root:
        copied = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len([name for name in copied if name.endswith((".jpg", ".png"))]) == 3
    assert [saved.id for saved in worker.saved_datasets()] == ["d1"]
    api.remove_dataset("d1")
    assert list(api.bucket.keys("datasets/")) == []
    assert list(worker.saved_datasets()) == []


def test_the_cache_evicts_the_least_recently_used_entries_but_not_those_in_use(tmp_path):
    cache = LocalCache(tmp_path, max_bytes=250)

    def fetch(data: bytes):
        return lambda path: path.write_bytes(data)

    with cache.use("a", fetch(b"a" * 100)) as a:
        pass
    time.sleep(0.01)
    with cache.use("b", fetch(b"b" * 100)) as b:
        pass
    os.utime(a)  # a used again: b is now the least recently used
    with cache.use("c", fetch(b"c" * 100)) as c:
        assert a.exists() and not b.exists() and c.read_bytes() == b"c" * 100
        with cache.use("d", fetch(b"d" * 100)) as d:
            assert c.exists() and d.exists()  # both in use, over the bound for now
    cache.evict()
    assert sum(1 for p in (a, c, d) if p.exists()) == 2


@pytest.mark.parametrize("size", [10, 9 * 1024 * 1024], ids=["one-part", "multipart"])
def test_a_refused_upload_is_refused_not_away(s3, tmp_path, size):
    """boto3's transfer manager wraps the store's answer in an error of its own: the answer still decides."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"x" * size)
    with pytest.raises(BucketError) as refused:
        Bucket(Location.parse("s3://no-such-bucket-here")).upload("runs/job1/files/last.pt", path)
    assert refused.value.refused and "does not exist" in str(refused.value), refused.value


def test_adopted_entries_are_evicted_and_discarded_like_fetched_ones(tmp_path):
    cache = LocalCache(tmp_path / "cache", max_bytes=250)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        cache.adopt(name, tmp_path / name)
        if name == "a":
            (cache.root / f"{cache._entry('a').name}.lock").unlink()  # as earlier versions adopted entries
        time.sleep(0.01)
    assert not cache._entry("a").exists() and cache._entry("b").exists() and cache._entry("c").exists()
    with cache.use("b", lambda path: None):
        assert not cache.discard("b")  # in use: it stays
    assert cache.discard("b") and not cache._entry("b").exists()
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(
        f"{cache._entry('c').name}{suffix}" for suffix in ("", ".lock", ".size")
    )


def test_an_unreachable_bucket_or_a_missing_one_is_named(s3, tmp_path):
    missing = BucketStorage("s3://no-such-bucket-here", DataLayout(tmp_path), 10**6)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        missing.check()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    try:
        away = Settings(_env_file=None, storage_url="s3://some-bucket", data_dir=tmp_path).storage
        with pytest.raises(StorageUnavailable, match="s3://some-bucket"):
            away.check()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
