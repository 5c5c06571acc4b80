#!/usr/bin/env bash
# Sets up and runs meshca's whole test suite: Debian tools the tests talk to,
# the package with its test extras, then lint, types and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in openssl:openssl certtool:gnutls-bin; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing Debian packages: ${need[*]} (run: sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check meshca tests scripts fuzz
python3 -m ruff format --check meshca tests scripts fuzz
python3 -m mypy
python3 -m pytest "$@"
