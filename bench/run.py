"""Issuance benchmark: meshca serve against cfssl serve (Go), same machine, same load generator.

    python bench/run.py                     # the full comparison (a few minutes)
    python bench/run.py --quick             # fewer, shorter runs
    python bench/run.py --soak 200000       # also: RSS across 200,000 issuances

Both servers run on 127.0.0.1 with an ECDSA P-256 CA and are driven by h2load
(nghttp2) with the same CSR in every request: gRPC over TLS to meshca's
native IssueSVID with a multi-use join token, HTTP/1.1 POST
/api/v1/cfssl/sign to cfssl. Every meshca request is parsed, its CSR
signature verified, the token checked, a leaf signed with a fresh serial and
the issuance durably logged before the response. Runs alternate A/B;
figures are medians over the runs, with meshca/cfssl ratios.

Needs Debian's golang-cfssl and nghttp2-client (`bash bench/setup.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONNECTIONS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, AttributeError):
            continue
    return total


@dataclass
class Run:
    server: str
    label: str
    requests: int
    ok: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    rss_before_kib: int
    rss_after_kib: int


def h2load(url: str, body: Path, headers: list[str], *, requests: int, connections: int, h1: bool) -> tuple[float, list[float], int]:
    """Runs h2load; returns (seconds, latencies in ms, 2xx count)."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        argv = ["h2load", "-n", str(requests), "-c", str(connections), "-t", "1", "-m", "1",
                "-d", str(body), "--log-file", log.name]
        for h in headers:
            argv += ["-H", h]
        if h1:
            argv.append("--h1")
        out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
        m = re.search(r"finished in ([\d.]+)(m?s)", out)
        if m is None:
            raise SystemExit(f"h2load said:\n{out}")
        seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))  # type: ignore[union-attr]
        latencies = []
        for line in Path(log.name).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000)  # microseconds -> ms
    return seconds, latencies, ok


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Meshca:
    name = "meshca"

    def __init__(self, work: Path, workers: int, jwt: bool = False) -> None:
        self.dir = work / f"meshca-{workers}{'-jwt' if jwt else ''}"
        self.port, self.metrics_port = free_port(), free_port()
        meshca = [sys.executable, "-m", "meshca.cli"]
        subprocess.run([*meshca, "init", "--trust-domain", "bench.example", "--dir", str(self.dir)],
                       check=True, capture_output=True)
        argv = [*meshca, "serve", "--dir", str(self.dir), "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--workers", str(workers)]
        sid = "spiffe://bench.example/ns/bench/sa/load"
        if jwt:
            credential = self._jwt_setup(argv)
        else:
            token = subprocess.run([*meshca, "token", "create", "--dir", str(self.dir), "--spiffe-id", sid,
                                    "--uses", "100000000", "--ttl", "24h"],
                                   check=True, capture_output=True, text=True).stdout.strip()
            credential = ("join_token", token)
        self.body = self.dir / "request.bin"
        self.body.write_bytes(_grpc_request(sid, credential))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        wait_port(self.metrics_port)
        time.sleep(1)  # every worker has bound the port
        self.url = f"https://127.0.0.1:{self.port}/meshca.identity.v1.Identity/IssueSVID"
        self.headers = ["content-type: application/grpc", "te: trailers"]
        self.h1 = False

    def _jwt_setup(self, argv: list[str]) -> tuple[str, str]:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid="bench", alg="ES256", use="sig")
        jwks = self.dir / "jwks.json"
        jwks.write_text(json.dumps({"keys": [jwk]}))
        now = datetime.now(UTC)
        token = jwt.encode(
            {"iss": "https://kubernetes.default.svc", "aud": ["meshca"], "sub": "system:serviceaccount:bench:load",
             "iat": now, "nbf": now, "exp": now + timedelta(hours=12)},
            key, algorithm="ES256", headers={"kid": "bench"},
        )
        argv += ["--k8s-jwks", str(jwks), "--k8s-issuer", "https://kubernetes.default.svc"]
        return ("jwt", token)

    def issued_ok(self) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("meshca_requests_total{") and 'code="OK"' in line and "IssueSVID" in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _grpc_request(sid: str, credential: tuple[str, str]) -> bytes:
    import meshca
    from meshca._proto import meshca_identity_pb2 as pb

    csr = meshca.build_csr(meshca.generate_key(), meshca.SpiffeId.parse(sid))
    message = pb.IssueSVIDRequest(csr=csr, credential=pb.Credential(**{credential[0]: credential[1]}))
    data = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


class Cfssl:
    name = "cfssl"

    def __init__(self, work: Path) -> None:
        self.dir = work / "cfssl"
        self.dir.mkdir()
        self.port = free_port()
        (self.dir / "csr.json").write_text(json.dumps(
            {"CN": "bench CA", "key": {"algo": "ecdsa", "size": 256}, "names": [{"O": "bench.example"}]}))
        ca = json.loads(subprocess.run(["cfssl", "genkey", "-initca", str(self.dir / "csr.json")],
                                       check=True, capture_output=True, text=True).stdout)
        (self.dir / "ca.pem").write_text(ca["cert"])
        (self.dir / "ca-key.pem").write_text(ca["key"])
        (self.dir / "ca-key.pem").chmod(0o600)
        self.proc = subprocess.Popen(
            ["cfssl", "serve", "-ca", str(self.dir / "ca.pem"), "-ca-key", str(self.dir / "ca-key.pem"),
             "-address", "127.0.0.1", "-port", str(self.port), "-loglevel", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        import meshca
        from cryptography.hazmat.primitives.serialization import Encoding

        csr = meshca.load_csr(meshca.build_csr(meshca.generate_key(),
                                               meshca.SpiffeId.parse("spiffe://bench.example/ns/bench/sa/load")))
        self.body = self.dir / "request.json"
        self.body.write_text(json.dumps({"certificate_request": csr.public_bytes(Encoding.PEM).decode()}))
        self.url = f"http://127.0.0.1:{self.port}/api/v1/cfssl/sign"
        self.headers = ["content-type: application/json"]
        self.h1 = True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def measure(server: Meshca | Cfssl, label: str, requests: int, connections: int = CONNECTIONS) -> Run:
    before = rss_kib(server.proc.pid)
    ok_before = server.issued_ok() if isinstance(server, Meshca) else 0
    seconds, lat, ok = h2load(server.url, server.body, server.headers, requests=requests,
                              connections=connections, h1=server.h1)
    if isinstance(server, Meshca):
        ok = server.issued_ok() - ok_before  # gRPC errors travel as HTTP 200: count OK statuses instead
    after = rss_kib(server.proc.pid)
    run = Run(server.name, label, requests, ok, seconds, requests / seconds,
              statistics.median(lat), pct(lat, 0.99), before, after)
    print(f"  {label:<28} {server.name:<7} {run.rps:8.0f}/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:7.2f} ms  "
          f"ok {ok}/{requests}  rss {before // 1024}->{after // 1024} MiB", flush=True)
    if ok != requests:
        raise SystemExit(f"{server.name}: only {ok} of {requests} requests succeeded")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5,000 requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--soak", type=int, default=0, help="issuances for the RSS soak (e.g. 200000)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 2, 5000
    for tool in ("h2load", "cfssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run 'bash bench/setup.sh' (Debian nghttp2-client, golang-cfssl)")

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="meshca-bench-") as tmp:
        work = Path(tmp)
        meshca, cfssl = Meshca(work, args.workers), Cfssl(work)
        try:
            print(f"warm-up; then {args.rounds} alternating rounds of {args.requests} requests, "
                  f"{CONNECTIONS} connections, meshca --workers {args.workers}", flush=True)
            measure(meshca, "warm-up", 2000)
            measure(cfssl, "warm-up", 2000)
            for r in range(args.rounds):
                order = [meshca, cfssl] if r % 2 == 0 else [cfssl, meshca]
                for server in order:
                    runs.append(measure(server, f"round {r + 1}", args.requests))
            for server in (meshca, cfssl):
                runs.append(measure(server, "sequential (1 client)", max(1000, args.requests // 10), 1))
            if args.soak:
                runs.append(measure(meshca, f"soak {args.soak}", args.soak))
        finally:
            meshca.stop()
            cfssl.stop()
        one = Meshca(work, 1)
        try:
            measure(one, "warm-up", 2000)
            for r in range(args.rounds):
                runs.append(measure(one, "1 worker", args.requests))
        finally:
            one.stop()
        jwt = Meshca(work, args.workers, jwt=True)
        try:
            measure(jwt, "warm-up", 2000)
            for r in range(args.rounds):
                runs.append(measure(jwt, "JWT auth", args.requests))
        finally:
            jwt.stop()

    def med(server: str, label: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs if r.server == server and r.label.startswith(label))

    rows = []
    for field, name in (("rps", "issuances/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
        m, c = med("meshca", "round", field), med("cfssl", "round", field)
        rows.append((f"{name} ({CONNECTIONS} conns)", m, c, m / c))
    growth = {s: med(s, "round", "rss_after_kib") / med(s, "round", "rss_before_kib") for s in ("meshca", "cfssl")}
    rows.append(("RSS after/before a run", growth["meshca"], growth["cfssl"], growth["meshca"] / growth["cfssl"]))
    for field, name in (("p50_ms", "sequential p50 ms"), ("p99_ms", "sequential p99 ms")):
        m, c = med("meshca", "sequential", field), med("cfssl", "sequential", field)
        rows.append((name, m, c, m / c))
    print("\n| figure | meshca | cfssl | meshca/cfssl |\n|---|---|---|---|")
    for name, m, c, ratio in rows:
        print(f"| {name} | {m:,.2f} | {c:,.2f} | {ratio:.2f} |")
    one_rps = med("meshca", "1 worker", "rps")
    all_rps = med("meshca", "round", "rps")
    jwt_rps = med("meshca", "JWT auth", "rps")
    print(f"\nmeshca scaling: 1 worker {one_rps:,.0f}/s, {args.workers} workers {all_rps:,.0f}/s "
          f"({all_rps / one_rps:.2f}x)")
    print(f"meshca with Kubernetes JWT auth: {jwt_rps:,.0f}/s ({jwt_rps / all_rps:.2f} of join-token figure)")
    soak = [r for r in runs if r.label.startswith("soak")]
    if soak:
        s = soak[0]
        print(f"soak: RSS {s.rss_before_kib // 1024} -> {s.rss_after_kib // 1024} MiB across {s.requests} issuances "
              f"({(s.rss_after_kib / s.rss_before_kib - 1) * 100:+.1f}%)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"workers": args.workers, "cpus": os.cpu_count(), "runs": [asdict(r) for r in runs]},
                              indent=2))
    print(f"\nraw runs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
