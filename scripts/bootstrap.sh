#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the
# project with every extra (train, export, server, client, test). Idempotent: a
# second run only checks that the install is current.
# Sourced by scripts/run_pipeline.sh and scripts/test.sh; run it alone to set up.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ENSEMBLE_SERVING_VENV:-$repo/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.ensemble-serving-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: installing ensemble-serving[all] into $venv (torch takes a few minutes the first time)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[all]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
