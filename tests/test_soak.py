"""Soak: concurrency 32 for 5 minutes of valid, invalid, cancelled and expired requests
against the real server (benchmarks/soak.py does the work and the checking).

Slow, so deselected by default; run it on purpose:

    pytest -m slow tests/test_soak.py -s                      # 300 s
    SOAK_DURATION=30 pytest -m slow tests/test_soak.py -s     # a quick look
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DURATION_S = float(os.environ.get("SOAK_DURATION", "300"))


@pytest.mark.slow
@pytest.mark.timeout(DURATION_S + 300)
def test_soak_mixed_load_loses_nothing(start_server, tiny_repository, tmp_path, capsys):
    server = start_server(tiny_repository)
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--url", server.grpc_address,
         "--pid", str(server.process.pid), "--metrics-url", server.metrics_url, "--model", tiny_repository.ensemble,
         "--duration", str(DURATION_S), "--warmup", str(min(30.0, DURATION_S / 10)), "--concurrency", "32",
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=DURATION_S + 240,
    )  # fmt: skip
    with capsys.disabled():
        print("\n" + result.stdout + result.stderr[-3000:])
    report = json.loads(report_path.read_text())
    assert report["unexpected"] == 0, report["unexpected_examples"]
    assert report["wrong_answers"] == 0
    assert report["rss_growth"] < 0.10
    assert report["pending_at_end"] == 0
    assert report["server_alive"] and server.process.poll() is None
    for kind in ("valid", "invalid", "cancelled", "expired"):
        assert sum(report["by_kind"][kind].values()) > 0, f"no {kind} requests were sent"
    assert report["by_kind"]["cancelled"].get("CANCELLED", 0) > 0
    assert report["by_kind"]["expired"].get("DEADLINE_EXCEEDED", 0) > 0
    assert result.returncode == 0
