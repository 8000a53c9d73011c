#!/usr/bin/env bash
# The test command: sets up .venv if needed, checks the import contracts, then runs the fast test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow, scripts/test.sh -m realdata).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/scripts/bootstrap.sh"
cd "$repo"
# The architecture first (import-linter: the contracts in pyproject.toml): a broken one fails
# the run before any test starts.
lint-imports --no-cache --no-logo
exec python -m pytest "$@"
