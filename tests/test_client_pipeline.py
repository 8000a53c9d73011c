"""scripts/run_pipeline.sh, the main job: train -> export -> serve -> evaluate on real MNIST.

Slow (it trains two LeNets for an epoch each: minutes on a shared 2-core machine) and
needs the real data set, so it runs only on purpose:  pytest -m "slow and realdata" tests/test_client_pipeline.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(3600)
def test_pipeline_trains_exports_serves_and_evaluates(tmp_path):
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST in {DATA_DIR}")
    env = {**os.environ, "PIPELINE_DIR": str(tmp_path), "PIPELINE_SEEDS": "0,1", "PIPELINE_EPOCHS": "1",
           "PIPELINE_MIN_ACCURACY": "0.98", "ENSEMBLE_SERVING_DATA_DIR": str(DATA_DIR),
           "ENSEMBLE_SERVING_VENV": str(Path(sys.executable).parents[1])}  # bootstrap.sh: the venv running pytest  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_pipeline.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=3500)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["model"] == "mnist" and report["num_images"] == 10_000
    assert report["accuracy"] >= 0.98
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()
    assert "gap 0.0" in result.stdout  # member m0: served == trainer's accuracy within 0.05 points
    assert "stopping the server" in result.stdout
