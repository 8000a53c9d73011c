"""Slow HTTP clients against a running server: are they cut off, and do they cost the others?

    python benchmarks/slow_http_clients.py --url http://127.0.0.1:8000 --pid PID --model NAME \
        --connections 2000 --duration 30

1. baseline   the server's open file descriptors (/proc/PID/fd, its children's too), and a
              steady client alone for --steady-seconds: one keep-alive connection sending
              one-image JSON infers to --model (or GET /v2/health/ready without one) back to
              back; its p50/p99
2. trickle    a separate process opens --connections connections, each sending a request
              line and then one header line every --interval seconds, never finishing the
              headers, for --duration seconds; meanwhile the steady client runs again
3. result     how many trickling connections the server closed (and after how long, and
              with a 408), how many were still open at the end, the steady client's p99
              alone and during the trickle, and the server's fds before, at the peak and
              --settle seconds after the trickle ends (back to the baseline?)

Against a server with --http-header-timeout T every trickler is closed about T seconds
after it connected; against one without (main before issue 28) all of them are still open.
Prints a summary; `--json PATH` writes the numbers for a test to assert on.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

CONNECT_AT_ONCE = 200  # connections being opened at a time (the listen backlog is 1024)


# -- the trickling connections (run in their own process, `--trickle-only`) ---------------------
async def _trickle_one(host: str, port: int, interval: float, deadline: float, opened: list, closes: list) -> None:
    started = time.monotonic()  # before the server can accept it: its lifetime is at least the server's timeout
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        closes.append(("connect_failed", 0.0))
        return
    opened.append(1)
    writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: slow-client\r\n")
    line = 0
    try:
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=interval)
            except asyncio.TimeoutError:
                line += 1
                writer.write(b"X-Trickle-%d: %d\r\n" % (line, line))
                continue
            # The server answered (408) or closed: either way it cut this client off.
            kind = "408" if data.startswith(b"HTTP/1.1 408") else ("closed" if not data else "answered")
            if data and kind == "408":
                await reader.read()  # then the close
            closes.append((kind, time.monotonic() - started))
            return
    except (ConnectionError, OSError):
        closes.append(("reset", time.monotonic() - started))
        return
    finally:
        writer.close()
    closes.append(("still_open", time.monotonic() - started))


async def _trickle(host: str, port: int, connections: int, interval: float, duration: float) -> dict:
    opened: list = []
    closes: list = []
    deadline = time.monotonic() + duration
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one() -> None:
        async with gate:  # held only while connecting
            pass
        await _trickle_one(host, port, interval, deadline, opened, closes)

    tasks = [asyncio.create_task(one()) for _ in range(connections)]
    while len(opened) + sum(1 for kind, _ in closes if kind == "connect_failed") < connections:
        await asyncio.sleep(0.05)
        if time.monotonic() > deadline:
            break
    print("opened", len(opened), flush=True)  # the parent starts its measurement now
    await asyncio.gather(*tasks)
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in closes:
        by_kind.setdefault(kind, []).append(seconds)
    cut = [s for kind, values in by_kind.items() if kind in ("408", "closed", "reset") for s in values]
    return {"opened": len(opened), "outcomes": {k: len(v) for k, v in by_kind.items()},
            "closed_by_server": len(cut), "still_open": len(by_kind.get("still_open", [])),
            "closed_after_s": _spread(cut)}  # fmt: skip


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {"min": round(values[0], 3), "median": round(statistics.median(values), 3), "max": round(values[-1], 3)}


# -- the steady client ----------------------------------------------------------------------
@dataclass
class Steady:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0

    def p(self, q: float) -> float:
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def _steady_request(url, model: str | None) -> tuple[str, str, bytes, dict]:
    if not model:
        return "GET", "/v2/health/ready", b"", {}
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.request("GET", f"/v2/models/{model}")
    metadata = json.loads(connection.getresponse().read())
    connection.close()
    image = metadata["inputs"][0]
    shape = [1, *image["shape"][1:]]
    count = 1
    for dim in shape:
        count *= dim
    body = json.dumps({"inputs": [{"name": image["name"], "datatype": image["datatype"], "shape": shape,
                                   "data": [0] * count}]}).encode()  # fmt: skip
    return "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"}


def run_steady(url, request, seconds: float) -> Steady:
    method, path, body, headers = request
    result = Steady()
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            connection.close()
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        if ok:
            result.latencies_s.append(time.perf_counter() - started)
        else:
            result.errors += 1
    connection.close()
    return result


# -- the server's file descriptors ------------------------------------------------------------
def open_fds(pid: int) -> int:
    """Open fds of the server process and its children (--workers), from /proc/PID/fd."""
    total = 0
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return -1
    for process in processes:
        try:
            total += len(os.listdir(f"/proc/{process.pid}/fd"))
        except OSError:
            pass
    return total


class FdSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, open_fds(self.pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's HTTP endpoint, e.g. http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="the server's pid (for its open fds)")
    parser.add_argument("--model", help="steady client: one-image JSON infers to this model (default: health)")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a trickler's header lines")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds the tricklers keep trying")
    parser.add_argument("--steady-seconds", type=float, default=5.0, help="the steady client alone, before")
    parser.add_argument("--settle", type=float, default=10.0, help="most seconds to wait for the fds to return")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--trickle-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if args.trickle_only:
        result = asyncio.run(_trickle(url.hostname, url.port, args.connections, args.interval, args.duration))
        print("result", json.dumps(result), flush=True)
        return 0
    return _measure(args, url)


def _measure(args, url) -> int:
    request = _steady_request(url, args.model)
    run_steady(url, request, 1.0)  # warm-up
    fds_before = open_fds(args.pid) if args.pid else -1
    alone = run_steady(url, request, args.steady_seconds)
    trickler = subprocess.Popen([sys.executable, __file__, "--trickle-only", "--url", args.url,
                                 "--connections", str(args.connections), "--interval", str(args.interval),
                                 "--duration", str(args.duration)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    sampler = FdSampler(args.pid) if args.pid else None
    if sampler:
        sampler.start()
    opened_line = trickler.stdout.readline().split()
    trickle_started = time.monotonic()
    during = run_steady(url, request, max(1.0, args.duration - 1.0))
    trickle = json.loads(trickler.stdout.read().split("result", 1)[1])
    trickler.wait()
    fds_after, settle_end = -1, time.monotonic() + args.settle
    while args.pid:
        fds_after = open_fds(args.pid)
        if fds_after <= fds_before or time.monotonic() > settle_end:
            break
        time.sleep(0.25)
    if sampler:
        sampler.stop.set()
    report = {"connections": args.connections, "opened": int(opened_line[1]) if len(opened_line) > 1 else 0,
              "trickle_seconds": round(time.monotonic() - trickle_started, 1), **trickle,
              "steady_alone": {"requests": len(alone.latencies_s), "errors": alone.errors,
                               "p50_ms": round(alone.p(0.5), 3), "p99_ms": round(alone.p(0.99), 3)},
              "steady_during": {"requests": len(during.latencies_s), "errors": during.errors,
                                "p50_ms": round(during.p(0.5), 3), "p99_ms": round(during.p(0.99), 3)},
              "fds": {"before": fds_before, "peak": sampler.peak if sampler else -1, "after": fds_after}}  # fmt: skip
    _print(report)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


def _print(r: dict) -> None:
    print(f"tricklers: {r['opened']} of {r['connections']} opened; closed by the server: {r['closed_by_server']} "
          f"(after {r['closed_after_s'] or '-'} s; outcomes {r['outcomes']}); still open at the end "
          f"({r['trickle_seconds']} s): {r['still_open']}")
    a, d = r["steady_alone"], r["steady_during"]
    ratio = d["p99_ms"] / a["p99_ms"] if a["p99_ms"] else float("nan")
    print(f"steady client alone:          {a['requests']} requests, {a['errors']} errors, "
          f"p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms")
    print(f"steady client during trickle: {d['requests']} requests, {d['errors']} errors, "
          f"p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms ({ratio:.2f}x alone)")
    f = r["fds"]
    print(f"server fds: before {f['before']}, peak {f['peak']}, after {f['after']}")


if __name__ == "__main__":
    sys.exit(main())
