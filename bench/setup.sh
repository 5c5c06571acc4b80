#!/usr/bin/env bash
# Installs what bench/run.py drives: h2load (nghttp2-client) and cfssl (golang-cfssl), and meshca itself.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in h2load:nghttp2-client cfssl:golang-cfssl; do
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
python3 -m pip install -q --disable-pip-version-check -e .
