#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for meshca's tests, on 127.0.0.1 only.
#
#   pg-cluster.sh start DIR PORT   initdb in DIR (first time), start on PORT, print the URL
#                                  of a password-authenticated role 'meshca' (CREATEDB)
#   pg-cluster.sh stop DIR         stop it (fast shutdown); DIR is kept, start again reuses it
#   pg-cluster.sh bin              print the folder of initdb/pg_ctl; exit 3 when there is none
#
# As root the server runs as the unprivileged 'postgres' user (PostgreSQL refuses root).
# fsync is off (tests need no durability); PG_CLUSTER_FSYNC=on keeps it on (bench/run_pg.py: durable commits).
set -euo pipefail

usage() {
  echo "usage: pg-cluster.sh start DIR PORT | stop DIR | bin" >&2
  exit 2
}

bindir() {
  local initdb
  if initdb=$(command -v initdb 2>/dev/null); then
    dirname "$(readlink -f "$initdb")"
    return
  fi
  # Debian's postgresql package keeps the server programs off PATH, one folder per major version.
  initdb=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ]; then
    echo "pg-cluster: PostgreSQL server programs (initdb, pg_ctl) not found: install Debian's postgresql" >&2
    exit 3
  fi
  dirname "$initdb"
}

as_server_user() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

[ $# -ge 1 ] || usage
case "$1" in
  bin)
    bindir
    ;;
  start)
    [ $# -eq 3 ] || usage
    dir=$(readlink -f "$2")
    port=$3
    bin=$(bindir)
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [ "$(id -u)" = 0 ]; then
      chown postgres: "$dir"
    fi
    cd /  # the server user may not be allowed into the caller's folder
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_server_user "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --no-sync -A trust >/dev/null
      # Superuser by Unix socket only; every TCP client authenticates with a password.
      as_server_user sh -c "cat >'$dir/data/pg_hba.conf'" <<EOF
local all postgres trust
host all all 127.0.0.1/32 scram-sha-256
EOF
      od -An -N16 -tx1 /dev/urandom | tr -d ' \n' | as_server_user sh -c "umask 077; cat >'$dir/password'"
      fresh=1
    else
      fresh=0
    fi
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 120 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=${PG_CLUSTER_FSYNC:-off}" start >/dev/null
    password=$(as_server_user cat "$dir/password")
    if [ "$fresh" = 1 ]; then
      as_server_user "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE meshca LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE meshca OWNER meshca" >/dev/null
    fi
    echo "postgresql://meshca:$password@127.0.0.1:$port/meshca"
    ;;
  stop)
    [ $# -eq 2 ] || usage
    dir=$(readlink -f "$2")
    bin=$(bindir)
    cd /
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    ;;
  *)
    usage
    ;;
esac
