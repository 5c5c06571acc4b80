#!/usr/bin/env bash
# Installs what bench/run.py drives: h2load (nghttp2-client) and cfssl (golang-cfssl), and meshca itself.
# Debian packages are installed only as root, as in scripts/test.sh; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/debian-packages.sh h2load:nghttp2-client cfssl:golang-cfssl
python3 -m pip install -q --disable-pip-version-check -e .
