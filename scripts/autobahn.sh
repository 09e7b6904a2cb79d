#!/usr/bin/env bash
# Installs the Autobahn|Testsuite (wstest) for tests/conformance/test_autobahn.py into .venv/autobahn,
# and prints the directory whose site-packages hold it. The suite runs on Python 2.7 only (PyPI's
# autobahntestsuite 0.8.2 with its pinned Twisted); where no Python 2.7 with pip is found, it says
# so on stderr and exits 3 (the test then skips with that message). Safe to run again.
#
# Python 2.7 is looked for in $AUTOBAHN_PYTHON, then python2.7 on PATH, then pyenv's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="$PWD/.venv/autobahn"  # absolute: pip builds sdists from their own directory
packages=(autobahntestsuite==0.8.2 'autobahn[twisted]==0.10.9' Twisted==19.10.0)
stamp="$prefix/.installed-$(printf '%s ' "${packages[@]}" | sha256sum | cut -c1-16)"

python=""
for candidate in "${AUTOBAHN_PYTHON:-}" python2.7 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/2.7*/bin/python2.7; do
  [ -n "$candidate" ] || continue
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
    python="$(command -v "$candidate")"
    break
  fi
done
if [ -z "$python" ]; then
  echo "no Python 2.7 found (the Autobahn|Testsuite runs on 2.7 only): install one (e.g. pyenv install 2.7.18) or set AUTOBAHN_PYTHON" >&2
  exit 3
fi
if ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "$python has no pip: cannot install the Autobahn|Testsuite" >&2
  exit 3
fi
if [ ! -f "$stamp" ]; then
  echo "==> installing the Autobahn|Testsuite with $python into $prefix" >&2
  rm -rf "$prefix"
  # Bounded: a registry that does not answer must not hold up the test suite.
  mkdir -p .venv
  if ! timeout 300 "$python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
      --prefix "$prefix" "${packages[@]}" > .venv/autobahn-install.log 2>&1; then
    tail -5 .venv/autobahn-install.log >&2
    echo "pip could not install ${packages[*]} for $python (log: .venv/autobahn-install.log)" >&2
    exit 3
  fi
  echo "$python" > "$stamp"
fi
echo "$prefix"
