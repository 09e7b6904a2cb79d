#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs every test.
# Extra arguments go to pytest (for example: scripts/test.sh -m "not slow" for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
exec .venv/bin/python -m pytest "$@"
