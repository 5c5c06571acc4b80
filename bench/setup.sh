#!/usr/bin/env bash
# Installs what bench/run.py drives: h2load (nghttp2-client) and cfssl (golang-cfssl), and meshca itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v h2load >/dev/null || ! command -v cfssl >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nghttp2-client golang-cfssl >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e .
