#!/usr/bin/env bash
# Prepares this checkout to run (`bootstrap.sh run`) or to test (`bootstrap.sh test`):
# a virtualenv in .venv with the project installed, and, for tests, the programs the test suite
# starts itself (redis-server, chromium), installed from Debian's packages when they are missing.
# Safe to run again: it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$mode-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing Python packages ($mode)"
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$mode" = test ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi

if [ "$mode" = test ]; then
  # The Autobahn|Testsuite (Python 2.7 only); without a Python 2.7 its test skips, saying why.
  scripts/autobahn.sh >/dev/null || echo "==> the Autobahn conformance test will be skipped (see above)"
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]} from Debian's packages"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi
