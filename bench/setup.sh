#!/usr/bin/env bash
# Installs what bench/ drives: h2load (nghttp2-client), cfssl (golang-cfssl), openssl, meshca itself, and grpclib.
# Debian packages are installed only as root, as in scripts/test.sh; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/debian-packages.sh h2load:nghttp2-client cfssl:golang-cfssl openssl:openssl
python3 -m pip install -q --disable-pip-version-check -e .
# grpc_options.py only: grpclib, a pure-Python server of the same gRPC wire, as one of the options it measures.
python3 -m pip install -q --disable-pip-version-check grpclib
