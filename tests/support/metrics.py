"""The server's /metrics, scraped and parsed with prometheus_client."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the server's /metrics."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels))  # fmt: skip


def scrape_families(server) -> dict:
    """{family name: metric family} from the server's /metrics (the endpoint must answer 200)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def wait_for_no_pending(server, timeout: float = 10.0) -> float:
    """The server's pending-requests gauge once it reads 0, or its value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        pending = metric(scrape(server), "ensemble_server_pending_requests")
        if pending == 0 or time.monotonic() > deadline:
            return pending
        time.sleep(0.1)
