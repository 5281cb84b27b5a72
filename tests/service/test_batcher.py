"""The micro-batcher with a stand-in detector: who shares a forward pass, and what each gets back."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.inference import MicroBatcher


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


def test_a_failed_forward_fails_its_requests_only(executor):
    batcher = MicroBatcher(executor, max_batch=4, max_wait_s=0.01)
    results = run(batcher, CountingDetector(fail=True), [(1, 0.5, 10), (2, 0.5, 10)])
    assert all(isinstance(r, RuntimeError) for r in results)
    assert run(batcher, CountingDetector(), [(1, 0.5, 10)])[0][0]["score"] == 0.9  # the batcher still serves
