#!/usr/bin/env bash
# Sets up and runs meshca's whole test suite: Debian tools the tests talk to,
# the package with its test extras, then lint, types and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/debian-packages.sh openssl:openssl certtool:gnutls-bin sqlite3:sqlite3 psql:postgresql-client promtool:prometheus
# The PKCS#11 tests use a throwaway SoftHSM2 token and OpenSC's pkcs11-tool: installed
# as root; otherwise they skip locally (and fail in CI).
if [ "$(id -u)" = 0 ]; then
  bash scripts/debian-packages.sh softhsm2-util:softhsm2 pkcs11-tool:opensc
fi

# The PostgreSQL store tests need a server: as root, install Debian's postgresql
# if its programs are missing and start a throwaway cluster (stopped at exit).
# Without one they skip locally and fail in CI.
if [ -z "${MESHCA_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ]; then
  if ! bash scripts/pg-cluster.sh bin >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  pg_dir=$(mktemp -d /tmp/meshca-pg-XXXXXX)
  trap 'bash scripts/pg-cluster.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
  pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  MESHCA_TEST_POSTGRES_URL=$(bash scripts/pg-cluster.sh start "$pg_dir" "$pg_port")
  export MESHCA_TEST_POSTGRES_URL
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check meshca tests scripts fuzz
python3 -m ruff format --check meshca tests scripts fuzz
python3 -m mypy
python3 -m pytest "$@"
