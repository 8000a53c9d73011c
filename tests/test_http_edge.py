"""The HTTP edge's limits (server/transport/http_edge.py): header timeout, keep-alive
timeout, connection bound, each counted in ensemble_server_http_connections_closed_total."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.support.servers import ROOT

SCRIPT = ROOT / "benchmarks" / "slow_http_clients.py"


def _closed(server, reason: str) -> float:
    text = requests.get(server.metrics_url, timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'ensemble_server_http_connections_closed_total{{reason="{reason}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no closed-connections series for {reason} in:\n{text}")


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (AssertionError if it does not in time)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {timeout} s (got {received[:80]!r})") from None
    except ConnectionResetError:
        pass
    return received


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and a content-length body)."""
    sock.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def edge_server(start_server, tiny_repository):
    return start_server(tiny_repository, "--http-header-timeout", "1", "--http-keep-alive-timeout", "0.5",
                        "--http-max-connections", "300")  # fmt: skip


def test_trickled_headers_get_408_and_are_closed_at_the_timeout(edge_server):
    before = _closed(edge_server, "header_timeout")
    sock = _connect(edge_server)
    started = time.monotonic()
    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):  # still open while within the timeout, trickling
        for line in range(2):
            sock.sendall(b"X-Slow-%d: 1\r\n" % line)
            sock.recv(1)
    answer = _read_until_closed(sock, timeout=5)
    elapsed = time.monotonic() - started
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
    assert answer.endswith(b"request headers not received in time"), answer
    assert 0.9 <= elapsed < 3.0, elapsed
    _wait_for(lambda: _closed(edge_server, "header_timeout") == before + 1)


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(edge_server):
    sock = _connect(edge_server)
    started = time.monotonic()
    assert _read_until_closed(sock, timeout=5).startswith(b"HTTP/1.1 408")
    assert 0.9 <= time.monotonic() - started < 3.0
    sock.close()


def test_kept_alive_requests_each_get_the_timeout_and_idle_ones_the_keep_alive_timeout(edge_server):
    before = _closed(edge_server, "keep_alive_timeout")
    sock = _connect(edge_server)
    for _ in range(3):  # 3 requests 0.4 s apart: more than the header timeout in all, each in time
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.4)
    started = time.monotonic()
    assert _read_until_closed(sock, timeout=5) == b""  # idle: closed after 0.5 s, no response
    assert time.monotonic() - started < 2.0
    sock.close()
    _wait_for(lambda: _closed(edge_server, "keep_alive_timeout") == before + 1)


def test_a_later_request_on_a_kept_alive_connection_gets_its_own_header_deadline(edge_server):
    sock = _connect(edge_server)
    time.sleep(0.7)  # most of the connection's first deadline
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # the next request's headers: never finished
    started = time.monotonic()
    assert _read_until_closed(sock, timeout=5).startswith(b"HTTP/1.1 408")
    assert 0.9 <= time.monotonic() - started < 3.0
    sock.close()


def test_connections_beyond_the_limit_are_closed_at_once_and_counted(start_server, tiny_repository):
    server = start_server(tiny_repository, "--http-max-connections", "3")
    held = [_connect(server) for _ in range(3)]
    _wait_for(lambda: _open(server) == 3)
    extra = _connect(server)
    started = time.monotonic()
    assert _read_until_closed(extra, timeout=5) == b""
    assert time.monotonic() - started < 1.0
    assert _closed(server, "max_connections") == 1
    for sock in held + [extra]:
        sock.close()
    _wait_for(lambda: _open(server) == 0)
    # Below the limit again: served.
    assert requests.get(f"{server.http_url}/v2/health/ready", timeout=5).status_code == 200


def _open(server) -> float:
    text = requests.get(server.metrics_url, timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith("ensemble_server_http_connections_open "))
    return float(line.rsplit(" ", 1)[1])


def _run_slow_clients(server, tmp_path, connections: int, duration: float) -> dict:
    out = tmp_path / "slow.json"
    command = [sys.executable, str(SCRIPT), "--url", server.http_url, "--pid", str(server.process.pid),
               "--model", "tiny-m0", "--connections", str(connections), "--duration", str(duration),
               "--steady-seconds", "2", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def _check_slow_clients(report: dict, connections: int, timeout_s: float, p99_factor: float) -> None:
    assert report["opened"] == connections
    assert report["closed_by_server"] == connections and report["still_open"] == 0, report
    assert report["outcomes"].get("408") == connections, report["outcomes"]
    closed = report["closed_after_s"]
    assert timeout_s - 0.05 <= closed["min"] and closed["max"] < timeout_s + 5.0, closed
    assert report["steady_during"]["errors"] == 0 and report["steady_alone"]["errors"] == 0
    alone, during = report["steady_alone"]["p99_ms"], report["steady_during"]["p99_ms"]
    assert during <= p99_factor * alone + 5.0, f"steady p99 {during} ms during the trickle, {alone} ms alone"
    assert report["fds"]["after"] <= report["fds"]["before"], report["fds"]


def test_trickling_clients_are_cut_off_while_a_steady_client_is_served(edge_server, tmp_path):
    """200 tricklers, header timeout 1 s: all get 408 at ~1 s, the steady client is served
    throughout (a tolerant p99 bound on this shared machine), fds return to the baseline."""
    report = _run_slow_clients(edge_server, tmp_path, connections=200, duration=3)
    _check_slow_clients(report, 200, timeout_s=1.0, p99_factor=5.0)


@pytest.mark.slow
def test_two_thousand_trickling_clients(start_server, tiny_repository, tmp_path):
    """The issue's measurement: 2,000 tricklers (one header line a second), header timeout 5 s;
    the steady client's p99 within 2x of its p99 alone."""
    server = start_server(tiny_repository, "--http-header-timeout", "5")
    report = _run_slow_clients(server, tmp_path, connections=2000, duration=12)
    _check_slow_clients(report, 2000, timeout_s=5.0, p99_factor=2.0)
