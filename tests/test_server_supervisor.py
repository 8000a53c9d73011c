"""`--workers N`: a worker killed with SIGKILL is restarted while the others serve
(server/process/supervisor.py); workers that keep dying stop the server."""

from __future__ import annotations

import threading
import time

import grpc
import psutil
import pytest
import requests

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.process.supervisor import DeathWindow, TooManyDeaths, describe_exit
from tests.support.requests import infer_request
from tests.support.servers import listening_workers, wait_until

CONNECTIONS = 12  # load connections; the kernel spreads them over the two workers


def _established(worker: psutil.Process, port: int) -> int:
    return sum(1 for c in worker.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")


def _metric(server, series: str) -> float:
    for line in requests.get(server.metrics_url, timeout=5).text.splitlines():
        if line.rpartition(" ")[0] == series:
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no {series} on /metrics")


def _start_two(start_server, repository, *flags):
    server = start_server(repository, "--workers", "2", *flags, wait=False)
    wait_until(server, lambda: len(listening_workers(server)) == 2 and _ready(server))
    return server


def _ready(server) -> bool:
    try:
        return _metric(server, "ensemble_server_ready") == 1.0
    except (requests.ConnectionError, AssertionError):
        return False


class Load:
    """`CONNECTIONS` threads, each on its own TCP connection, sending requests back to back."""

    def __init__(self, server, model: str, images):
        self.request = infer_request(model, images)
        self.channels = [grpc.insecure_channel(server.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(CONNECTIONS)]  # fmt: skip
        self.ok, self.failed, self.failures = 0, 0, []
        self.failed_connections: set[int] = set()  # indexes of the channels that saw a failure
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(channel, index))
                        for index, channel in enumerate(self.channels)]

    def _run(self, channel, index: int) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not self.stop.is_set():
            try:
                # wait_for_ready: a request is never sent on a connection known to be down; one
                # in flight when its worker dies still fails (gRPC does not resend it).
                stub.ModelInfer(self.request, timeout=30, wait_for_ready=True)
                with self.lock:
                    self.ok += 1
            except grpc.RpcError as error:
                with self.lock:
                    self.failed += 1
                    self.failed_connections.add(index)
                    self.failures.append(f"{error.code().name}: {error.details()}")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        for channel in self.channels:
            channel.close()


def test_a_killed_worker_is_restarted_and_only_its_in_flight_requests_fail(start_server, tiny_repository):
    server = _start_two(start_server, tiny_repository)
    member = tiny_repository.members[0]
    with Load(server, member, tiny_repository.images(2, seed=1)) as load:
        wait_until(server, lambda: load.ok >= 200, timeout=60, what="under load")
        victim, survivor = listening_workers(server)
        on_victim = _established(victim, server.grpc_port)
        assert on_victim > 0 and _established(survivor, server.grpc_port) > 0, "the connections went to one worker"
        ok_before = load.ok
        victim.kill()  # SIGKILL
        wait_until(server, lambda: len(listening_workers(server)) == 2 and victim.pid not in [w.pid for w in listening_workers(server)],
                   timeout=90, what="restarted")  # fmt: skip
        ok_during = load.ok - ok_before
        time.sleep(1.0)
    print(f"kill -9 of worker pid {victim.pid} with {on_victim} of {CONNECTIONS} load connections: "
          f"{load.failed} request(s) failed on {len(load.failed_connections)} connection(s) "
          f"({sorted(set(load.failures))}), {load.ok} succeeded "
          f"({ok_during} between the kill and the restart)")
    # Only the victim's connections may fail. One request in flight each when it dies, and
    # sometimes a second: the next one written before gRPC has seen the reset (a broken
    # pipe), still to the dead worker; the reconnect then reaches a live one.
    assert len(load.failed_connections) <= on_victim, load.failures
    assert load.failed <= 2 * on_victim, load.failures
    assert all(failure.startswith("UNAVAILABLE") for failure in load.failures), load.failures
    assert ok_during > 0, "the surviving worker served nothing while the other was restarted"
    assert server.process.poll() is None
    assert _metric(server, 'ensemble_server_worker_restarts_total{worker="1"}') + \
        _metric(server, 'ensemble_server_worker_restarts_total{worker="2"}') == 1
    assert _metric(server, "ensemble_server_workers_running") == 2
    log = server.log()
    assert f"(pid {victim.pid}) killed by SIGKILL; restarting it in 0.5 s" in log

    # Both serve again: fresh connections reach the replacement too, and are answered.
    replacement = next(w for w in listening_workers(server) if w.pid != survivor.pid)
    with Load(server, member, tiny_repository.images(1, seed=2)) as load:
        wait_until(server, lambda: load.ok >= 100, timeout=60, what="serving again")
        assert _established(replacement, server.grpc_port) > 0 and _established(survivor, server.grpc_port) > 0
    assert load.failed == 0, load.failures
    # The siblings find the replacement's private socket again: statistics add up both.
    stub = pb_grpc.GRPCInferenceServiceStub(server.channel())
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=member), timeout=10).model_stats
    assert stats[0].inference_stats.success.count > 0


def test_workers_that_keep_dying_stop_the_server(start_server, tiny_repository):
    server = _start_two(start_server, tiny_repository, "--max-worker-deaths", "2", "--worker-death-window", "60")
    first = listening_workers(server)[0]
    first.kill()
    wait_until(server, lambda: len(listening_workers(server)) == 2 and first.pid not in [w.pid for w in listening_workers(server)],
               timeout=90, what="restarted")  # fmt: skip
    second = listening_workers(server)[0]
    second.kill()
    assert server.process.wait(timeout=60) == 1
    log = server.log()
    assert "server: error: 2 worker deaths within 60 s (--max-worker-deaths 2): " in log
    assert f"(pid {first.pid}) killed by SIGKILL" in log and f"(pid {second.pid}) killed by SIGKILL" in log


def test_with_one_death_allowed_the_first_stops_the_server(start_server, tiny_repository):
    server = _start_two(start_server, tiny_repository, "--max-worker-deaths", "1")
    victim = listening_workers(server)[0]
    victim.kill()
    assert server.process.wait(timeout=60) == 1
    assert "server: error: 1 worker death within 60 s (--max-worker-deaths 1): worker-" in server.log()


def test_the_death_window_counts_only_recent_deaths():
    window = DeathWindow(limit=3, window_s=60)
    window.record(0.0, "worker-1 (pid 10) killed by SIGKILL")
    window.record(30.0, "worker-2 (pid 11) exit status 1")
    window.record(85.0, "worker-1 (pid 12) killed by SIGSEGV")  # the first is 85 s old: forgotten
    assert len(window.deaths) == 2
    with pytest.raises(TooManyDeaths) as error:
        window.record(88.0, "worker-2 (pid 13) killed by SIGKILL")
    assert str(error.value) == ("3 worker deaths within 60 s (--max-worker-deaths 3): worker-2 (pid 11) exit status 1; "
                                "worker-1 (pid 12) killed by SIGSEGV; worker-2 (pid 13) killed by SIGKILL")
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(1) == "exit status 1"
