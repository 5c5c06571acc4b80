#!/bin/sh
# The SPIFFE Workload API end to end: meshca serve, two registration entries,
# meshca agent, and a py-spiffe client that knows nothing of meshca.
# Everything lives in a temporary directory and on 127.0.0.1; stops by itself.
set -eu
MESHCA=${MESHCA:-meshca}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
chmod 755 "$work"
pids=""
cleanup() {
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for pid in $pids; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# 1. A trust domain and its identity service.
"$MESHCA" init --dir "$work/ca" --trust-domain example.org >/dev/null
"$MESHCA" serve --dir "$work/ca" --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 2>"$work/serve.log" &
pids="$pids $!"

# 2. Two entries: this user gets "web"; this user running this Python also gets "python-tool".
"$MESHCA" entry create --dir "$work/ca" --spiffe-id spiffe://example.org/web --selector "unix:uid:$(id -u)" >/dev/null
exe=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
"$MESHCA" entry create --dir "$work/ca" --spiffe-id spiffe://example.org/python-tool \
    --selector "unix:uid:$(id -u)" --selector "unix:path:$exe" >/dev/null

# 3. The node agent, joining with a one-time agent token.
"$MESHCA" token create --dir "$work/ca" --agent node-1 >"$work/token"
chmod 600 "$work/token"
tries=0
until "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 100 ] || { echo "meshca serve did not start"; cat "$work/serve.log"; exit 1; }
    sleep 0.1
done
"$MESHCA" agent --server "localhost:$port" --bundle "$work/ca/bundle.pem" --token-file "$work/token" \
    --socket "$work/run/agent.sock" --data-dir "$work/agent" --sync-interval 1s 2>"$work/agent.log" &
pids="$pids $!"
tries=0
until [ -S "$work/run/agent.sock" ]; do
    tries=$((tries + 1)); [ "$tries" -lt 100 ] || { echo "meshca agent did not start"; cat "$work/agent.log"; exit 1; }
    sleep 0.1
done

# 4. Any SPIFFE client: py-spiffe finds the agent through SPIFFE_ENDPOINT_SOCKET.
SPIFFE_ENDPOINT_SOCKET="unix://$work/run/agent.sock" "$PYTHON" "$here/client.py"
