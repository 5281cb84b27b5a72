"""A closed-loop load generator for POST /detect: N clients, each sending its next image as soon as
its last answer came, for a fixed time (or several images a request, to POST /detect/batch, with
``--per-request``); throughput, latency percentiles, errors, and the time spent
inside the server (the ``Server-Timing`` header) told apart from the time on the wire.

The clients are spread over several processes (one Python event loop saturates near a thousand
requests a second). The images are distinct photo-like JPEGs (the synthetic shapes generator,
640x480 by default), cycled through.

Against a running API:   python bench/detect_load.py --url http://127.0.0.1:8000 --job-id ID
Self-contained (a Redis, an API and an untrained SSD300-VGG16 job of its own; ``--device cuda``
on a GPU machine):       python bench/detect_load.py --clients 64 --seconds 20 [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    seconds: float  # as the client saw it
    status: int  # 0: no answer (a connection error or a timeout)
    server_ms: dict[str, float] = field(default_factory=dict)  # the Server-Timing phases
    images: int = 1  # in the request


def server_timing(header: str | None) -> dict[str, float]:
    """``decode;dur=1.2, total;dur=3.4`` -> ``{"decode": 1.2, "total": 3.4}`` (ms)."""
    phases = {}
    for part in (header or "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            phases[name] = float(duration)
    return phases


def _request(job_id: str, images: list[bytes]) -> dict:
    """POST /detect for one image, POST /detect/batch for several."""
    if len(images) == 1:
        return {"url": "/detect", "params": {"job_id": job_id}, "files": {"file": ("i.jpg", images[0])}}
    files = [("files", (f"{i}.jpg", image)) for i, image in enumerate(images)]
    return {"url": "/detect/batch", "params": {"job_id": job_id}, "files": files}


async def _clients(
    url: str, job_id: str, images: list[bytes], clients: int, warmup: float, seconds: float, per_request: int
):
    samples: list[Sample] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(session: httpx.AsyncClient, index: int) -> None:
        turn = index * per_request
        while time.perf_counter() < stop_at:
            sending = [images[(turn + k) % len(images)] for k in range(per_request)]
            turn += clients * per_request
            sent = time.perf_counter()
            try:
                answer = await session.post(**_request(job_id, sending))
                sample = Sample(
                    time.perf_counter() - sent,
                    answer.status_code,
                    server_timing(answer.headers.get("server-timing")),
                    per_request,
                )
            except httpx.HTTPError:
                sample = Sample(time.perf_counter() - sent, 0, images=per_request)
            if sent >= measure_from:
                samples.append(sample)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    return samples


def _process(args: tuple) -> list[dict]:
    return [asdict(s) for s in asyncio.run(_clients(*args))]


def run_load(
    url: str,
    job_id: str,
    images: list[bytes],
    clients: int,
    processes: int,
    warmup: float,
    seconds: float,
    per_request: int = 1,
):
    """``clients`` closed-loop clients over ``processes`` processes, each request carrying ``per_request``
    images (/detect/batch when more than one); the samples sent after ``warmup`` s."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    jobs = [(url, job_id, images, share, warmup, seconds, per_request) for share in shares]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return [Sample(**s) for part in pool.map(_process, jobs) for s in part]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def summary(samples: list[Sample], clients: int, seconds: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    latencies = [s.seconds * 1000 for s in ok]
    result = {
        "clients": clients,
        "images_per_request": samples[0].images if samples else None,
        "seconds": seconds,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_statuses": sorted({s.status for s in samples if s.status != 200}),
        "images_per_second": sum(s.images for s in ok) / seconds,
        "latency_ms": {q: round(percentile(latencies, p), 2) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "latency_ms_max": round(max(latencies), 2) if latencies else None,
        "server_ms": {},
    }
    for phase in sorted({name for s in ok for name in s.server_ms}):
        values = [s.server_ms[phase] for s in ok if phase in s.server_ms]
        result["server_ms"][phase] = {
            "p50": round(statistics.median(values), 2),
            "p99": round(percentile(values, 0.99), 2),
        }
    return result


def test_images(count: int, width: int, height: int) -> list[bytes]:
    from model.data import make_shapes_dataset

    with tempfile.TemporaryDirectory() as folder:
        data = make_shapes_dataset(Path(folder), count, seed=0, image_size=(height, width))
        return [image.path.read_bytes() for image in data.images]


def own_service(device: str, batch_max_size: int | None, width_multiplier: float = 1.0):
    """A Redis, an API and a succeeded bench job (untrained SSD300-VGG16) in a temporary folder:
    (url, job id, stop function)."""
    sys.path.insert(0, str(REPO / "bench"))
    from detect_service import write_job
    from service_api import start_api

    from core.launcher import start_redis, stop
    from core.layout import DataLayout
    from core.store import Store

    folder = tempfile.TemporaryDirectory()
    data_dir = Path(folder.name)
    redis_url, redis_process = start_redis(data_dir / "redis")
    job_id = write_job(Store.from_url(redis_url, "bench"), DataLayout(data_dir).runs_dir, width_multiplier)
    batching = {"SSD_DETECT_BATCH_SIZE": str(batch_max_size)} if batch_max_size else {}
    api, url = start_api(redis_url, data_dir, SSD_DEVICE=device, SSD_KEY_PREFIX="bench", **batching)

    def stop_all() -> None:
        stop(api, "api")
        stop(redis_process, "redis-server")
        folder.cleanup()

    return url, job_id, stop_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running API (else one is started here with its own Redis and job)")
    parser.add_argument("--job-id", help="with --url: the succeeded job whose model answers")
    parser.add_argument("--device", default="cpu", help="without --url: SSD_DEVICE of the API started here")
    parser.add_argument("--batch-max-size", type=int, help="without --url: SSD_DETECT_BATCH_SIZE (else its default)")
    parser.add_argument(
        "--width-multiplier",
        type=float,
        default=1.0,
        help="without --url: the job's network width (0.125: a near-free forward, to time the service itself)",
    )
    parser.add_argument("--clients", default="1,64", help="concurrency levels, comma-separated")
    parser.add_argument("--per-request", type=int, default=1, help="images per request (over 1: POST /detect/batch)")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="time per level before measuring")
    parser.add_argument("--images", type=int, default=32, help="distinct JPEGs, cycled through")
    parser.add_argument("--size", default="640x480", help="image width x height")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    images = test_images(args.images, width, height)
    if args.url:
        if not args.job_id:
            parser.error("--url needs --job-id")
        url, job_id, stop_all = args.url, args.job_id, lambda: None
    else:
        url, job_id, stop_all = own_service(args.device, args.batch_max_size, args.width_multiplier)
    results = []
    try:
        for clients in (int(v) for v in args.clients.split(",")):
            samples = run_load(
                url, job_id, images, clients, args.processes, args.warmup, args.seconds, args.per_request
            )
            results.append(summary(samples, clients, args.seconds))
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop_all()
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "images": args.images, "levels": results}, indent=2))


if __name__ == "__main__":
    main()
