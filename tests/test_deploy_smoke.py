"""The CPU image end to end: deploy/smoke-test builds it, serves the exported model
repository from it, evaluates real test images through it and stops it with SIGTERM; then
serves it again with TLS on, where the image's own HEALTHCHECK must pass over HTTPS and
gRPC with TLS.

Slow (an image build) and needs root (the container tool installs podman on first use),
../shared/tools/container, the exported model_repository/ and the real data sets:
run on purpose with `pytest -m slow tests/test_deploy_smoke.py`.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINER_TOOL = ROOT.parent / "shared" / "tools" / "container"
MODEL_REPOSITORY = ROOT / "model_repository"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(1800)
def test_smoke_test_passes_against_the_built_image():
    if not CONTAINER_TOOL.exists():
        pytest.skip(f"{CONTAINER_TOOL} is not there")
    if os.geteuid() != 0:
        pytest.skip("the container tool needs root")
    if not any(MODEL_REPOSITORY.glob("*/config.pbtxt")):
        pytest.skip("no exported model_repository/ (run the exporter first)")
    result = subprocess.run([str(ROOT / "deploy" / "smoke-test"), "--limit", "200"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1700)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "SMOKE TEST: PASS" in output
    for step in ("build:", "user:", "serve:", "health:", "evaluate:", "http:", "metrics:", "stop: exited with status 0",
                 "tls: the server in the image serves HTTPS",
                 "tls: the image's HEALTHCHECK (python3 /opt/healthcheck.py) passes with TLS on",
                 "tls: the image's HEALTHCHECK (python3 /opt/healthcheck.py --grpc) passes with TLS on",
                 "tls: curl --cacert", "tls: a plain-HTTP health check", "tls: stopped with status 0"):
        assert f"PASS  {step}" in output, output[-4000:]
