#!/usr/bin/env bash
# Installs what bench/ drives: h2load (nghttp2-client), cfssl (golang-cfssl), openssl, PostgreSQL, meshca itself
# (with psycopg), and grpclib.
# Debian packages are installed only as root, as in scripts/test.sh; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=(h2load:nghttp2-client cfssl:golang-cfssl openssl:openssl)
# run_pg.py's throwaway cluster: Debian's postgresql, whose programs are off PATH (pg-cluster.sh finds them).
bash scripts/pg-cluster.sh bin >/dev/null 2>&1 || pairs+=(initdb:postgresql)
bash scripts/debian-packages.sh "${pairs[@]}"
python3 -m pip install -q --disable-pip-version-check -e .
# grpc_options.py only: grpclib, a pure-Python server of the same gRPC wire, as one of the options it measures.
python3 -m pip install -q --disable-pip-version-check grpclib
