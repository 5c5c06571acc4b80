#!/usr/bin/env bash
# Installs what bench/ drives: h2load (nghttp2-client), cfssl (golang-cfssl), openssl, meshca itself, and grpclib.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v h2load >/dev/null || ! command -v cfssl >/dev/null || ! command -v openssl >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nghttp2-client golang-cfssl openssl >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e .
# grpc_options.py only: grpclib, a pure-Python server of the same gRPC wire, as one of the options it measures.
python3 -m pip install -q --disable-pip-version-check grpclib
