"""Load test of ``omniseg serve``: N concurrent clients on loopback for a bounded time.

Starts ``omniseg serve`` as a subprocess on a free 127.0.0.1 port (the bundled model unless
``--model``), then each client thread posts CamVid val frames (multipart, ``format=json``)
back to back over one keep-alive connection (after a 503, waiting its Retry-After) until ``--seconds`` have passed or
``--max-requests`` were sent. Prints requests/s, latency p50/p95/max, errors (any answer
but 200 or 503), busy answers (503, by design when clients outnumber workers + queue), and
the server's peak RSS (VmHWM, loading included) and its RSS before the load.

    python benchmarks/bench_serve.py [--clients 4] [--seconds 30] [--workers 1]
        [--queue-size 8] [--threads 2] [--model DIR] [--task auto]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID_VAL = Path(os.environ.get("OMNISEG_SHARED", REPO.parent / "shared")) / "datasets" / "camvid" / "images" / "val"


def multipart(fields: dict[str, str], name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and the file ``data`` as ``image``."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "omniseg", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(args.workers), "--queue-size", str(args.queue_size)]
    if args.model:
        command += ["--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"omniseg serve exited with {server.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("omniseg serve did not start within 120 s")


def client(port: int, bodies: list[tuple[bytes, str]], stop_at: float, budget: list[int],
           lock: threading.Lock, results: list[tuple[int, float]]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    index = 0
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] == 0:
                return
            budget[0] -= 1
        body, content_type = bodies[index % len(bodies)]
        index += 1
        start = time.perf_counter()
        try:
            connection.request("POST", "/v1/segment", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            status = response.status
            retry_after = float(response.getheader("retry-after", "0")) if status == 503 else 0.0
            if response.getheader("connection", "").lower() == "close":
                connection.close()
        except OSError:
            status = 0  # connection failure: an error
            connection.close()
            retry_after = 0.0
        elapsed = time.perf_counter() - start
        with lock:
            results.append((status, elapsed))
        time.sleep(retry_after)  # a busy answer asks the client to come back later


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--task", default="auto")
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()

    paths = sorted(CAMVID_VAL.glob("*.png"))[: args.frames]
    if not paths:
        raise SystemExit(f"no CamVid frames in {CAMVID_VAL} (set OMNISEG_SHARED)")
    bodies = [multipart({"task": args.task, "format": "json"}, p.name, p.read_bytes()) for p in paths]

    server, port = start_server(args)
    try:
        # Warm-up: one request per frame, alone (first calls compile and allocate).
        warm: list[tuple[int, float]] = []
        client(port, bodies, time.monotonic() + 300, [len(bodies)], threading.Lock(), warm)
        if any(status != 200 for status, _ in warm):
            raise SystemExit(f"warm-up failed: statuses {[s for s, _ in warm]}")
        rss_before = memory_kib(server.pid, "VmRSS")

        results: list[tuple[int, float]] = []
        lock, budget = threading.Lock(), [args.max_requests]
        start = time.monotonic()
        stop_at = start + args.seconds
        threads = [threading.Thread(target=client, args=(port, bodies, stop_at, budget, lock, results))
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        peak = memory_kib(server.pid, "VmHWM")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/healthz")
        health = json.loads(connection.getresponse().read())
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    ok = [latency for status, latency in results if status == 200]
    busy = sum(1 for status, _ in results if status == 503)
    errors = sum(1 for status, _ in results if status not in (200, 503))
    print(f"omniseg serve, model {args.model or 'bundled default'}, {len(paths)} CamVid frames 480x360, "
          f"task {args.task}; {args.workers} worker(s), queue {args.queue_size}, {args.threads} torch threads; "
          f"{args.clients} clients for {elapsed:.1f} s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; slots in use after the run: {health['in_use']}")
    print("| clients | workers | requests | req/s (200) | p50 (s) | p95 (s) | max (s) | errors | 503 busy | "
          "RSS before load (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.workers} | {len(results)} | {len(ok) / elapsed:.2f} | "
          f"{percentile(ok, 0.5):.3f} | {percentile(ok, 0.95):.3f} | {max(ok):.3f} | {errors} | {busy} | "
          f"{rss_before / 1024:.0f} | {peak / 1024:.0f} |")


if __name__ == "__main__":
    main()
