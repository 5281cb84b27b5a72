"""Inference for /detect: image decoding, the detector cache, the micro-batcher, box drawing.

Forward passes never run on the event loop: they run in a thread pool (``inference_threads``
threads, 1 by default since one forward already uses every core) behind a micro-batcher
that gathers the requests for the same model that arrive while its forward pass runs (and,
with ``detect_batch_wait_ms`` above 0, waits that long for more before an idle model runs) and
answers up to ``detect_batch_size`` of them from one batched forward. Each
model has one lane that runs one batch at a time, so more threads only let different
models' batches run at once.

Before any of that, a request is admitted: at most ``max_pending_detections`` are between
admission and answer, and the others are refused before their image is decoded. Decoding
and drawing run in a small pool of their own (``image_threads``), apart from the pool
that serves every other route.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from model.data.images import decode_rgb
from model.detector import Detector
from model.device import resolve_device
from model.draw import draw_detections

ACCEPTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP"}
# Pillow names a JPEG with an MPF block (phones' multi-picture JPEGs) "MPO"; its first picture is the photo.
_FORMAT_ALIASES = {"MPO": "JPEG"}
Detections = list[dict[str, Any]]


class DeviceUnavailable(RuntimeError):
    """The device the API is configured for (``SSD_DEVICE``) is not on this machine."""


class ImageRejected(ValueError):
    """An upload that is not a usable image; ``status_code`` is 400, 413 or 415."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded JPEG, PNG, WebP or BMP into an RGB image, EXIF orientation applied.

    The pixels come from ``model.data.images.decode_rgb``, the rule training and ``ssd
    detect`` follow too, so boxes are in the frame the model was trained in. Pillow's
    decompression-bomb warning is an error here, and so is anything over ``max_pixels``:
    the header is checked before any pixel is decoded.

    Raises:
        ImageRejected: 415 not an image or another format, 413 too many pixels, 400 truncated or corrupt.
    """
    accepted = ", ".join(ACCEPTED_FORMATS.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as error:
            raise ImageRejected(f"the upload is not an image Pillow can read; send {accepted}", 415) from error
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageRejected(f"the image has too many pixels: {error}", 413) from error
        image_format = _FORMAT_ALIASES.get(image.format or "", image.format)
        if image_format not in ACCEPTED_FORMATS:
            raise ImageRejected(f"{image.format} images are not accepted; send {accepted}", 415)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(
                f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", 413
            )
        try:
            return decode_rgb(image)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageRejected(f"the image has too many pixels: {error}", 413) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageRejected(f"the {image_format} image is truncated or corrupt: {error}", 400) from error


def annotated_png(image: Image.Image, detections: Detections) -> bytes:
    """The image as PNG bytes with each detection's box and ``label score`` drawn on it."""
    buffer = io.BytesIO()
    draw_detections(image, detections).save(buffer, format="PNG")
    return buffer.getvalue()


def detects_on_gpu(device: str) -> bool:
    """Whether detection with ``SSD_DEVICE=device`` runs on a GPU here."""
    return device != "cpu" and torch.cuda.is_available()


def load_detector(checkpoint: Path, device: str, cpu_precision: str = "auto") -> Detector:
    """A trained job's detector; on the CPU in bf16 where it computes that natively, unless
    ``cpu_precision`` is ``fp32`` (``SSD_CPU_PRECISION``).

    Raises:
        DeviceUnavailable: ``device`` is ``cuda`` and this machine has no CUDA GPU.
        CheckpointError: (a ValueError) for a bad file.
    """
    try:
        resolved = resolve_device(device)
    except ValueError as error:
        raise DeviceUnavailable(
            f"SSD_DEVICE is {device!r} but {error}: set SSD_DEVICE to cpu or auto for this API"
        ) from None
    amp = resolved.type != "cpu" or cpu_precision != "fp32"
    return Detector.from_checkpoint(checkpoint, device=device, amp=amp)


class CheckpointMissing(LookupError):
    """The job's checkpoint is not (or no longer) in its run's files."""


# Opens a checkpoint file for the length of a load: with a bucket, its cached copy stays meanwhile.
CheckpointSource = Callable[[], AbstractContextManager[Path]]


class DetectorCache:
    """The last ``size`` loaded detectors by key (LRU); each key is loaded once at a time.

    A load belongs to the cache, not to the request that started it: it runs to its end
    however its requesters fare (timed out, cancelled, gone), and its detector is then
    cached. A failed load is not cached: its error reaches every request waiting for it,
    and the next request loads again. A cached detector is answered without opening its
    checkpoint (no bucket request).
    """

    def __init__(self, load: Callable[[Path], Any], size: int):
        self._load = load
        self.size = size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    async def get(self, key: str, checkpoint: CheckpointSource) -> Any:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        future = self._loading.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(None, self._load_from, checkpoint)
            self._loading[key] = future
            # Added before any waiter's: the detector is cached before a waiter wakes up.
            future.add_done_callback(partial(self._loaded, key))
        # A waiter that is cancelled leaves the load running for the others and the cache.
        return await asyncio.shield(future)

    def _load_from(self, checkpoint: CheckpointSource) -> Any:
        with checkpoint() as path:
            return self._load(path)

    def _loaded(self, key: str, future: asyncio.Future) -> None:
        del self._loading[key]
        if future.cancelled() or future.exception() is not None:  # also marks the error as seen
            return
        self._cache[key] = future.result()
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._cache


@dataclass
class _Request:
    image: Image.Image
    score_threshold: float
    max_detections: int
    future: asyncio.Future


@dataclass
class _Lane:
    """The requests waiting for one model and the task that serves them."""

    detector: Any
    waiting: list[_Request] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task | None = None


class MicroBatcher:
    """Serves concurrent ``detect`` calls for the same model from shared batched forward passes.

    Requests arriving while a forward runs are gathered for the next one; with ``max_wait_s``
    above 0, a request that finds the model idle also waits that long for others to join (less
    if ``max_batch`` are waiting). The
    batch runs with the lowest score threshold and the highest ``max_detections`` of its
    requests, and each answer is then cut to its own: NMS only lets a higher-scoring box
    remove a lower one, so this equals running each request alone.

    ``max_batch=1`` turns batching off: one forward per request.
    """

    def __init__(
        self,
        executor: Executor,
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._lanes: dict[str, _Lane] = {}

    async def detect(
        self, key: str, detector: Any, image: Image.Image, score_threshold: float, max_detections: int
    ) -> Detections:
        """``detector.detect([image], ...)[0]``, batched with concurrent calls for the same ``key``."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(detector)
        request = _Request(image, score_threshold, max_detections, asyncio.get_running_loop().create_future())
        lane.waiting.append(request)
        if len(lane.waiting) >= self.max_batch:
            lane.full.set()
        if lane.runner is None:
            lane.runner = asyncio.create_task(self._serve(key, lane))
        return await request.future

    async def _serve(self, key: str, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while lane.waiting:
                if len(lane.waiting) < self.max_batch and self.max_wait_s > 0:
                    lane.full.clear()
                    try:
                        await asyncio.wait_for(lane.full.wait(), self.max_wait_s)
                    except asyncio.TimeoutError:
                        pass
                batch = [r for r in lane.waiting[: self.max_batch] if not r.future.done()]
                del lane.waiting[: self.max_batch]
                if not batch:
                    continue
                threshold = min(r.score_threshold for r in batch)
                most = max(r.max_detections for r in batch)
                images = [r.image for r in batch]
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                try:
                    results = await loop.run_in_executor(self.executor, lane.detector.detect, images, threshold, most)
                except Exception as error:
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(error)
                    continue
                for r, found in zip(batch, results, strict=True):
                    if not r.future.done():
                        kept = [d for d in found if d["score"] >= r.score_threshold]
                        r.future.set_result(kept[: r.max_detections])
        except BaseException as error:  # cancelled (shutdown) or a bug: nobody may wait forever
            for r in lane.waiting:
                if not r.future.done():
                    r.future.set_exception(RuntimeError(f"inference stopped: {error!r}"))
            lane.waiting.clear()
            raise
        finally:
            # No await since the loop's last check: no request can have joined unseen.
            lane.runner = None
            if not lane.waiting:
                self._lanes.pop(key, None)


class DetectionsBusy(RuntimeError):
    """``max_pending`` detections are already admitted and unanswered: the client should retry later."""


class DetectionService:
    """The API's inference: admission, an image pool, a detector cache and a micro-batcher.

    At most ``max_pending`` requests are admitted at once, from admission to answer; each
    holds an upload and a decoded image, so this bounds their memory. Images are decoded
    (and drawn on) in a pool of ``image_threads`` of their own, forward passes run in one
    of ``threads``. Only the event loop admits and releases, so the count needs no lock. A
    request that gives up (its timeout) releases its place at once; a decode or forward it
    started still ends in its pool, whose size bounds such leftovers.
    """

    def __init__(
        self,
        load: Callable[[Path], Any],
        cache_size: int,
        threads: int,
        max_batch: int,
        max_wait_ms: float,
        max_pending: int,
        image_threads: int,
        on_batch: Callable[[int], None] | None = None,
        on_pending: Callable[[int], None] | None = None,
        on_forward: Callable[[], None] | None = None,
    ):
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssd-inference")
        self.image_executor = ThreadPoolExecutor(max_workers=image_threads, thread_name_prefix="ssd-image")
        self.cache = DetectorCache(load, cache_size)
        self.on_forward = on_forward
        self.batcher = MicroBatcher(self.executor, max_batch, max_wait_ms / 1000, self._batch_hook(on_batch))
        self.max_pending = max_pending
        self.pending = 0
        self.on_pending = on_pending

    def _batch_hook(self, on_batch: Callable[[int], None] | None) -> Callable[[int], None]:
        def batch_starts(size: int) -> None:
            if on_batch is not None:
                on_batch(size)
            self.forward_starts()

        return batch_starts

    def forward_starts(self) -> None:
        """Called before each forward pass (detection's batches, evaluation's): ``on_forward``, where given."""
        if self.on_forward is not None:
            self.on_forward()

    def admit(self, images: int = 1) -> AbstractContextManager[None]:
        """Takes ``images`` of the ``max_pending`` places, all or none; leaving the returned context gives
        them back.

        Raises:
            DetectionsBusy: not that many places are free.
        """
        if self.pending + images > self.max_pending:
            if images == 1:
                detail = f"{self.max_pending} detections are already waiting or running (the limit)"
            else:
                detail = (
                    f"this request's {images} images do not fit: {self.pending} of the {self.max_pending} "
                    "detections allowed at once are already waiting or running"
                )
            raise DetectionsBusy(f"{detail}: try again shortly")
        self._count(images)
        return self._admitted(images)

    @contextmanager
    def _admitted(self, images: int) -> Iterator[None]:
        try:
            yield
        finally:
            self._count(-images)

    def _count(self, change: int) -> None:
        self.pending += change
        if self.on_pending is not None:
            self.on_pending(self.pending)

    async def decode(self, data: bytes, max_pixels: int) -> Image.Image:
        """``decode_image`` in the image pool."""
        return await asyncio.get_running_loop().run_in_executor(self.image_executor, decode_image, data, max_pixels)

    async def draw(self, image: Image.Image, detections: Detections) -> bytes:
        """``annotated_png`` in the image pool."""
        return await asyncio.get_running_loop().run_in_executor(self.image_executor, annotated_png, image, detections)

    async def detect(
        self, key: str, checkpoint: CheckpointSource, image: Image.Image, score_threshold: float, max_detections: int
    ) -> Detections:
        detector = await self.cache.get(key, checkpoint)
        return await self.batcher.detect(key, detector, image, score_threshold, max_detections)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.image_executor.shutdown(wait=False, cancel_futures=True)
