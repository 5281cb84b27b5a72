"""Does the job store stay fast as jobs pile up? Times what reads the store often, at two sizes.

For each size, a throwaway redis-server gets ``--active`` jobs that are queued or running (half
each; the running ones hold a lease, the queued ones were just sent) and ``finished`` jobs that
ended (succeeded, failed, cancelled, spread over 10 datasets), all written through the store's
own scripts so every index is as the service keeps it. Then, against a real API process:

- the first page of ``GET /jobs`` (100 jobs);
- a filtered page: ``GET /jobs?status=succeeded&dataset_id=...`` (100 jobs);
- the page after it, through its ``Link`` cursor;
- a ``/metrics`` scrape (it counts the jobs in each status);
- and, in this process, a reaper pass (``Reaper.run_once``, as each worker runs it every heartbeat).

Each is timed ``--repeats`` times after two warm-up calls; the table gives the median, the 95th
percentile and the slowest. The target: each at most 50 ms with 100,000 finished jobs, and no growth from 1,000.

    python bench/store_scale.py                       # 1,000 jobs, then 100,000 finished + 1,000 active
    python bench/store_scale.py --finished 0,100000 --active 1000 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service_api import start_api  # noqa: E402

from core.launcher import start_redis, stop  # noqa: E402
from core.records import CANCELLED, FAILED, RUNNING, SUCCEEDED, DatasetRecord, JobRecord, now_iso  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import Store  # noqa: E402
from worker.reaper import Reaper  # noqa: E402

PREFIX = "bench"
DATASETS = 10
ENDED = (SUCCEEDED, SUCCEEDED, FAILED, CANCELLED)  # a realistic mix, mostly successes


def fill(store: Store, finished: int, active: int) -> list[str]:
    """Write the datasets and the jobs; the dataset ids."""
    datasets = [
        DatasetRecord(id=f"d{n}", name=f"d{n}", format="coco", num_images=1, num_boxes=1, classes=["a"], root="files")
        for n in range(DATASETS)
    ]
    for dataset in datasets:
        store.put_dataset(dataset)
    config = {"epochs": 10, "batch_size": 16, "learning_rate": 0.001}
    now = time.time()
    total = finished + active
    for n in range(total):
        job = JobRecord.new(f"{n:012x}", datasets[n % DATASETS], config)
        created = now - (total - n)  # oldest first
        if n < finished:
            status = ENDED[n % len(ENDED)]
            job = job.model_copy(update={"status": status, "finished_at": now_iso(), "checkpoint": "best.pt"})
        else:
            running = (n - finished) % 2 == 0
            job = job.model_copy(update={"status": RUNNING if running else "queued", "dispatch_id": "x"})
            if running:
                store.redis.set(store.lease_key(job.id), "bench-worker/1", px=600_000)
        store.restore_job(job, created, created + 1 if job.status == SUCCEEDED else None)
    return [d.id for d in datasets]


def timed(call: Callable[[], object], repeats: int) -> dict[str, float]:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(p95, 2), "max_ms": round(max(times), 2)}


def measure(finished: int, active: int, repeats: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        redis_url, redis_process = start_redis(data_dir / "redis")
        api = None
        try:
            store = Store.from_url(redis_url, PREFIX)
            started = time.perf_counter()
            datasets = fill(store, finished, active)
            print(f"  filled {finished + active} jobs in {time.perf_counter() - started:.1f}s", flush=True)
            settings = Settings(redis_url=redis_url, data_dir=data_dir, key_prefix=PREFIX)
            reaper = Reaper(store, settings, lambda job_id: None, broker_task_ids=lambda: set())
            reaper.run_once()  # the first pass reads the (empty) data folder once, as at a worker's start
            api, url = start_api(redis_url, data_dir, SSD_KEY_PREFIX=PREFIX)
            with httpx.Client(base_url=url, timeout=60) as client:
                filtered = {"status": SUCCEEDED, "dataset_id": datasets[3], "limit": 100}

                results = {
                    "GET /jobs (first page)": timed(lambda: client.get("/jobs").raise_for_status(), repeats),
                    "GET /jobs?status&dataset_id": timed(
                        lambda: client.get("/jobs", params=filtered).raise_for_status(), repeats
                    ),
                    "GET /metrics": timed(lambda: client.get("/metrics").raise_for_status(), repeats),
                    "reaper pass": timed(reaper.run_once, repeats),
                }
                link = client.get("/jobs", params=filtered).headers.get("link")
                if link:  # the page after it, through its cursor
                    following = link[1 : link.index(">")]
                    results["the next filtered page"] = timed(lambda: client.get(following).raise_for_status(), repeats)
            store.redis.close()
            return results
        finally:
            if api is not None:
                stop(api, "api")
            stop(redis_process, "redis-server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", default="0,100000", help="finished jobs at each size, comma-separated")
    parser.add_argument("--active", type=int, default=1000, help="queued and running jobs at every size")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    sizes = [int(v) for v in args.finished.split(",")]
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "command": "python bench/store_scale.py " + " ".join(sys.argv[1:]),
        "sizes": {},
    }
    for finished in sizes:
        print(f"{finished} finished + {args.active} active jobs", flush=True)
        report["sizes"][str(finished + args.active)] = measure(finished, args.active, args.repeats)
    names = list(next(iter(report["sizes"].values())))
    for size in report["sizes"].values():
        names += [name for name in size if name not in names]
    header = "| | " + " | ".join(f"{int(s):,} jobs: median / p95 / max ms" for s in report["sizes"]) + " |"
    print("\n" + header + "\n|---|" + "---|" * len(report["sizes"]))
    for name in names:
        cells = [
            f"{size[name]['median_ms']} / {size[name]['p95_ms']} / {size[name]['max_ms']}" if name in size else "-"
            for size in report["sizes"].values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
