"""The micro-batcher with a stand-in detector: who shares a forward pass, and what each gets back.
The detector cache with a stand-in load: how often a model is loaded, whatever its requesters do."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest

from app.inference import DetectorCache, MicroBatcher


class CountingDetector:
    """Returns one detection per score in ``scores`` for every image; records each batch."""

    def __init__(self, scores=(0.9, 0.6, 0.3, 0.1), fail: bool = False):
        self.scores = scores
        self.fail = fail
        self.batches: list[tuple[int, float, int]] = []
        self.lock = threading.Lock()

    def detect(self, images, score_threshold, max_detections):
        with self.lock:
            self.batches.append((len(images), score_threshold, max_detections))
        if self.fail:
            raise RuntimeError("forward failed")
        found = [{"box": [0, 0, 1, 1], "label": "x", "class_id": 1, "score": s} for s in self.scores]
        return [[d for d in found if d["score"] >= score_threshold][:max_detections] for _ in images]


def run(batcher: MicroBatcher, detector, requests):
    async def main():
        return await asyncio.gather(
            *(batcher.detect("job", detector, image, threshold, most) for image, threshold, most in requests),
            return_exceptions=True,
        )

    return asyncio.run(main())


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_concurrent_requests_share_batches_up_to_the_maximum(executor):
    detector, sizes = CountingDetector(), []
    batcher = MicroBatcher(executor, max_batch=4, max_wait_s=0.05, on_batch=sizes.append)
    results = run(batcher, detector, [(i, 0.5, 100) for i in range(6)])
    assert sizes == [4, 2] and [b[0] for b in detector.batches] == [4, 2]
    assert all([d["score"] for d in r] == [0.9, 0.6] for r in results)


def test_each_request_gets_its_own_threshold_and_limit(executor):
    detector = CountingDetector()
    batcher = MicroBatcher(executor, max_batch=8, max_wait_s=0.05)
    results = run(batcher, detector, [("a", 0.5, 100), ("b", 0.05, 100), ("c", 0.05, 1)])
    assert detector.batches == [(3, 0.05, 100)]  # one forward with the loosest settings
    assert [[d["score"] for d in r] for r in results] == [[0.9, 0.6], [0.9, 0.6, 0.3, 0.1], [0.9]]


def test_max_batch_one_turns_batching_off(executor):
    detector = CountingDetector()
    batcher = MicroBatcher(executor, max_batch=1, max_wait_s=0.05)
    run(batcher, detector, [(i, 0.5, 10) for i in range(3)])
    assert [b[0] for b in detector.batches] == [1, 1, 1]


class GatedDetector(CountingDetector):
    """Its first forward pass waits for ``gate``: requests that arrive meanwhile find the model busy."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def detect(self, images, score_threshold, max_detections):
        if not self.batches:
            assert self.gate.wait(10), "the test never opened the gate"
        return super().detect(images, score_threshold, max_detections)


def test_without_a_wait_an_idle_model_runs_at_once_and_a_busy_one_gathers_the_next_batch(executor):
    detector = GatedDetector()
    batcher = MicroBatcher(executor, max_batch=8, max_wait_s=0)

    async def main():
        lone = asyncio.create_task(batcher.detect("job", detector, 0, 0.5, 10))
        await asyncio.sleep(0.05)
        assert not detector.batches and not lone.done()  # in its forward pass, held by the gate, alone
        arriving = [asyncio.create_task(batcher.detect("job", detector, i, 0.5, 10)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        detector.gate.set()
        await asyncio.gather(lone, *arriving)

    asyncio.run(main())
    assert [size for size, _, _ in detector.batches] == [1, 5]


def test_a_failed_forward_fails_its_requests_only(executor):
    batcher = MicroBatcher(executor, max_batch=4, max_wait_s=0.01)
    results = run(batcher, CountingDetector(fail=True), [(1, 0.5, 10), (2, 0.5, 10)])
    assert all(isinstance(r, RuntimeError) for r in results)
    assert run(batcher, CountingDetector(), [(1, 0.5, 10)])[0][0]["score"] == 0.9  # the batcher still serves


class SlowLoad:
    """A stand-in for ``load_detector``: blocks until ``release`` is set, counts its calls, fails ``failures`` times."""

    def __init__(self, failures: int = 0):
        self.calls: list[Path] = []
        self.failures = failures
        self.release = threading.Event()

    def __call__(self, checkpoint: Path) -> object:
        self.calls.append(checkpoint)
        assert self.release.wait(30), "the test never released the load"
        if len(self.calls) <= self.failures:
            raise ValueError(f"{checkpoint} is not a checkpoint")
        return object()


async def loading(load: SlowLoad) -> None:
    """Returns once ``load`` has been called (it runs in a thread), yielding to the event loop meanwhile."""
    while not load.calls:
        await asyncio.sleep(0.001)


def test_a_load_is_cached_after_its_first_requester_timed_out():
    path = Path("job/model.pt")
    load, checkpoint = SlowLoad(), partial(nullcontext, path)
    cache = DetectorCache(load, size=2)

    async def main():
        first = asyncio.create_task(asyncio.wait_for(cache.get("job", checkpoint), 0.05))
        await loading(load)
        with pytest.raises(asyncio.TimeoutError):
            await first  # the load is still blocked: the first requester gives up
        second = asyncio.create_task(cache.get("job", checkpoint))
        cancelled = asyncio.create_task(cache.get("job", checkpoint))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        load.release.set()
        detector = await second
        assert cancelled.cancelled() and "job" in cache
        assert await cache.get("job", checkpoint) is detector  # a later requester: from the cache

    asyncio.run(main())
    assert load.calls == [path]


def test_a_failed_load_reaches_every_waiter_and_is_tried_again():
    path = Path("job/model.pt")
    load, checkpoint = SlowLoad(failures=1), partial(nullcontext, path)
    cache = DetectorCache(load, size=2)

    async def main():
        waiters = [asyncio.create_task(cache.get("job", checkpoint)) for _ in range(3)]
        await loading(load)
        load.release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, ValueError) and "not a checkpoint" in str(r) for r in results), results
        assert "job" not in cache
        detector = await cache.get("job", checkpoint)
        assert await cache.get("job", checkpoint) is detector

    asyncio.run(main())
    assert load.calls == [path, path]


def test_the_cache_keeps_the_most_recently_used_models():
    load = SlowLoad()
    load.release.set()
    cache = DetectorCache(load, size=2)

    async def main():
        a = await cache.get("a", partial(nullcontext, Path("a")))
        await cache.get("b", partial(nullcontext, Path("b")))
        assert await cache.get("a", partial(nullcontext, Path("a"))) is a  # a is now the most recently used
        await cache.get("c", partial(nullcontext, Path("c")))
        assert "a" in cache and "b" not in cache and "c" in cache
        await cache.get("b", partial(nullcontext, Path("b")))

    asyncio.run(main())
    assert load.calls == [Path("a"), Path("b"), Path("c"), Path("b")]
