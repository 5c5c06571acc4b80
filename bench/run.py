"""Issuance benchmark: meshca serve against cfssl serve (Go), same machine, same load generator.

    python bench/run.py                     # the full comparison (several minutes)
    python bench/run.py --quick             # fewer, shorter runs
    python bench/run.py --smoke             # one tiny round of each: checks the harness works
    python bench/run.py --soak 200000       # also: RSS across 200,000 issuances

Three servers on 127.0.0.1, each with an ECDSA P-256 CA, driven by h2load
(nghttp2) with one fixed request body each, in alternating rounds:

- meshca: gRPC over TLS to the native IssueSVID with a multi-use join
  token; every request is parsed, its CSR signature verified, the token
  checked, a leaf signed with a fresh serial and the issuance durably
  recorded (SQLite, WAL, synchronous=FULL) before the response. The count
  of issuances is read from that record, not from the responses.
- cfssl same work: HTTPS (cfssl's -tls-cert/-tls-key), POST
  /api/v1/cfssl/authsign with an HMAC-SHA256 token (an auth_key profile),
  every certificate stored in cfssl's SQLite certdb (WAL,
  synchronous=FULL); counted from the certdb.
- cfssl bare: plain HTTP, POST /api/v1/cfssl/sign, no auth, no record.

Figures are medians over the rounds: issuances/s, p50, p99, both ratios,
sequential latency (one connection), and the fraction of the crypto limit
(`openssl speed ecdsap256` sign and verify rates, measured in the same run).
See bench/README.md for every choice.

Needs Debian's golang-cfssl and nghttp2-client (`bash bench/setup.sh`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

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


def h2load(urls: list[str], body: Path, headers: list[str], *, requests: int, connections: int,
           h1: bool) -> tuple[float, list[float], int]:
    """Runs one h2load per URL, all at once, sharing out requests and connections.

    Returns (seconds of the slowest, latencies in ms, 2xx count). One h2load
    reaches one host:port (it takes several URIs but connects to the first's),
    so replicas on separate ports each get their own.
    """
    n = len(urls)
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        started = []
        for i, url in enumerate(urls):
            log = Path(tmp) / f"{i}.log"
            argv = ["h2load", "-n", str(requests // n + (i < requests % n)),
                    "-c", str(connections // n + (i < connections % n)), "-t", "1", "-m", "1",
                    "-d", str(body), "--log-file", str(log)]
            for h in headers:
                argv += ["-H", h]
            if h1:
                argv.append("--h1")
            started.append((subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True), log))
        seconds, latencies, ok = 0.0, [], 0
        for proc, log in started:
            out, err = proc.communicate()
            m = re.search(r"finished in ([\d.]+)(m?s)", out)
            if proc.returncode or m is None:
                raise SystemExit(f"h2load exited {proc.returncode}:\n{out}{err}")
            seconds = max(seconds, float(m.group(1)) / (1000 if m.group(2) == "ms" else 1))
            ok += int(re.search(r"status codes: (\d+) 2xx", out).group(1))  # type: ignore[union-attr]
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 3:
                    latencies.append(int(parts[2]) / 1000)  # microseconds -> ms
    return seconds, latencies, ok


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cli(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Runs a setup command; its stdout, or exit with what it said on stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Meshca:
    """``meshca serve --workers N`` on a fresh trust domain; with ``replicas`` > 1, that many
    serve processes on their own ports sharing the trust directory and ``store`` (a URL)."""

    def __init__(self, work: Path, workers: int, jwt: bool = False, *, replicas: int = 1,
                 store: str | None = None, env: dict[str, str] | None = None, name: str = "meshca",
                 init_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.dir = work / f"{name}-{workers}{'-jwt' if jwt else ''}{f'-x{replicas}' if replicas > 1 else ''}"
        meshca = [sys.executable, "-m", "meshca.cli"]
        store_args = [] if store is None else ["--store", store]
        cli([*meshca, "init", "--trust-domain", "bench.example", "--dir", str(self.dir), *init_args])
        argv = [*meshca, "serve", "--dir", str(self.dir), "--workers", str(workers), *store_args]
        sid = "spiffe://bench.example/ns/bench/sa/load"
        if jwt:
            credential = self._jwt_setup(argv)
        else:
            token = cli([*meshca, "token", "create", "--dir", str(self.dir), "--spiffe-id", sid,
                         "--uses", "100000000", "--ttl", "24h", *store_args], env).strip()
            credential = ("join_token", token)
        self.body = self.dir / "request.bin"
        self.body.write_bytes(_grpc_request(sid, credential))
        self.procs, self.urls = [], []
        try:
            for _ in range(replicas):
                port, metrics_port = free_port(), free_port()
                self.procs.append(subprocess.Popen(
                    [*argv, "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
                wait_port(port)
                wait_port(metrics_port)
                self.urls.append(f"https://127.0.0.1:{port}/meshca.identity.v1.Identity/IssueSVID")
        except BaseException:
            self.stop()  # no replica outlives a failed start (it would hold its database open)
            raise
        time.sleep(1)  # every worker has bound the port
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

    def issued(self) -> int:
        """Issuances in meshca's durable log (gRPC errors travel as HTTP 200, so responses cannot tell)."""
        return count_rows(self.dir / "meshca.db", "issuances")

    def stop(self) -> None:
        stop(self.procs)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


def _grpc_request(sid: str, credential: tuple[str, str]) -> bytes:
    import meshca
    from meshca._proto import meshca_identity_pb2 as pb

    csr = meshca.build_csr(meshca.generate_key(), meshca.SpiffeId.parse(sid))
    message = pb.IssueSVIDRequest(csr=csr, credential=pb.Credential(**{credential[0]: credential[1]}))
    data = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def count_rows(db: Path, table: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# cfssl 1.2.0's certdb schema (certdb/sqlite/migrations/001_CreateCertificates.sql); cfssl does not create it.
CFSSL_CERTDB_SCHEMA = """
CREATE TABLE certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
"""


class SqliteCertdb:
    """cfssl's certdb in SQLite, created here (cfssl does not), WAL and synchronous=FULL."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "certs.db"
        with sqlite3.connect(self.path) as conn:
            conn.executescript(CFSSL_CERTDB_SCHEMA)
        # go-sqlite3 applies these DSN parameters to every connection it opens.
        self.config = {"driver": "sqlite3", "data_source": f"{self.path}?_journal_mode=WAL&_synchronous=FULL"}

    def issued(self) -> int:
        return count_rows(self.path, "certificates")


class Certdb(Protocol):
    config: dict[str, str]  # cfssl's -db-config

    def issued(self) -> int: ...


class Cfssl:
    """cfssl serve; ``same_work`` adds TLS, HMAC-authenticated authsign and a durable certdb
    (``certdb``, SQLite in its folder by default)."""

    def __init__(self, work: Path, *, same_work: bool, certdb: Certdb | None = None) -> None:
        self.name = "cfssl" if same_work else "cfssl-bare"
        self.dir = work / self.name
        self.dir.mkdir()
        self.port = free_port()
        self.db = (certdb or SqliteCertdb(self.dir)) if same_work else None
        (self.dir / "csr.json").write_text(json.dumps(
            {"CN": "bench CA", "key": {"algo": "ecdsa", "size": 256}, "names": [{"O": "bench.example"}]}))
        ca = json.loads(subprocess.run(["cfssl", "genkey", "-initca", str(self.dir / "csr.json")],
                                       check=True, capture_output=True, text=True).stdout)
        (self.dir / "ca.pem").write_text(ca["cert"])
        (self.dir / "ca-key.pem").write_text(ca["key"])
        (self.dir / "ca-key.pem").chmod(0o600)
        argv = ["cfssl", "serve", "-ca", str(self.dir / "ca.pem"), "-ca-key", str(self.dir / "ca-key.pem"),
                "-address", "127.0.0.1", "-port", str(self.port), "-loglevel", "2"]
        from cryptography.hazmat.primitives.serialization import Encoding

        import meshca

        csr = meshca.load_csr(meshca.build_csr(meshca.generate_key(),
                                               meshca.SpiffeId.parse("spiffe://bench.example/ns/bench/sa/load")))
        request = json.dumps({"certificate_request": csr.public_bytes(Encoding.PEM).decode()}).encode()
        if same_work:
            argv += self._same_work_setup()
            # cfssl's "standard" auth: token = HMAC-SHA256(key, request). cfssl keeps no record of tokens
            # seen (no replay check), so one fixed body stays valid and every request is still verified.
            token = hmac.new(self.auth_key, request, hashlib.sha256).digest()
            request = json.dumps({"token": base64.b64encode(token).decode(),
                                  "request": base64.b64encode(request).decode()}).encode()
            self.urls = [f"https://127.0.0.1:{self.port}/api/v1/cfssl/authsign"]
        else:
            self.urls = [f"http://127.0.0.1:{self.port}/api/v1/cfssl/sign"]
        self.body = self.dir / "request.json"
        self.body.write_bytes(request)
        self.procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        wait_port(self.port)
        self.headers = ["content-type: application/json"]
        self.h1 = True

    def _same_work_setup(self) -> list[str]:
        self.auth_key = secrets.token_bytes(16)
        (self.dir / "config.json").write_text(json.dumps({
            "signing": {"default": {"auth_key": "bench", "expiry": "24h",
                                    "usages": ["digital signature", "key encipherment", "server auth", "client auth"]}},
            "auth_keys": {"bench": {"type": "standard", "key": self.auth_key.hex()}},
        }))
        (self.dir / "tls.json").write_text(json.dumps(
            {"CN": "127.0.0.1", "hosts": ["127.0.0.1"], "key": {"algo": "ecdsa", "size": 256}}))
        tls = json.loads(subprocess.run(
            ["cfssl", "gencert", "-ca", str(self.dir / "ca.pem"), "-ca-key", str(self.dir / "ca-key.pem"),
             str(self.dir / "tls.json")], check=True, capture_output=True, text=True).stdout)
        (self.dir / "tls.pem").write_text(tls["cert"])
        (self.dir / "tls-key.pem").write_text(tls["key"])
        (self.dir / "tls-key.pem").chmod(0o600)
        assert self.db is not None
        db_json = self.dir / "db.json"
        db_json.touch(0o600)  # a PostgreSQL data source may hold a password
        db_json.write_text(json.dumps(self.db.config))
        return ["-config", str(self.dir / "config.json"), "-db-config", str(self.dir / "db.json"),
                "-tls-cert", str(self.dir / "tls.pem"), "-tls-key", str(self.dir / "tls-key.pem")]

    def issued(self) -> int | None:
        return None if self.db is None else self.db.issued()

    def stop(self) -> None:
        stop(self.procs)


def openssl_speed(seconds: int) -> tuple[float, float]:
    """ECDSA P-256 signs/s and verifies/s on one core, from `openssl speed`."""
    out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "ecdsap256"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)", out)
    if m is None:
        raise SystemExit(f"cannot read openssl speed output:\n{out}")
    return float(m.group(1)), float(m.group(2))


def measure(server: Meshca | Cfssl, label: str, requests: int, connections: int = CONNECTIONS,
            clients: int = 1) -> Run:
    """One h2load run; ``clients`` load generators at once, spread over the server's URLs (replicas)."""
    before = sum(rss_kib(p.pid) for p in server.procs)
    issued_before = server.issued()
    urls = [server.urls[i % len(server.urls)] for i in range(clients)]
    seconds, lat, ok = h2load(urls, server.body, server.headers, requests=requests,
                              connections=connections, h1=server.h1)
    if issued_before is not None:
        ok = server.issued() - issued_before  # type: ignore[operator]
    after = sum(rss_kib(p.pid) for p in server.procs)
    run = Run(server.name, label, requests, ok, seconds, requests / seconds,
              statistics.median(lat), pct(lat, 0.99), before, after)
    print(f"  {label:<28} {server.name:<12} {run.rps:8.0f}/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:7.2f} ms  "
          f"ok {ok}/{requests}  rss {before // 1024}->{after // 1024} MiB", flush=True)
    if ok != requests:
        raise SystemExit(f"{server.name}: {ok} of {requests} requests issued and recorded")
    return run


def rounds(servers: list[Meshca | Cfssl], *, count: int, requests: int, warmup: int, speed_seconds: int = 0,
           clients: int = 1) -> tuple[list[Run], list[tuple[float, float]]]:
    """A warm-up run each, then ``count`` rounds rotating the order; `openssl speed` after every round."""
    runs: list[Run] = []
    speed: list[tuple[float, float]] = []
    for server in servers:
        measure(server, "warm-up", warmup, clients=clients)
    for r in range(count):
        k = r % len(servers)
        for server in servers[k:] + servers[:k]:
            runs.append(measure(server, f"round {r + 1}", requests, clients=clients))
        # The crypto limit, between rounds so it sees the same machine state as they do.
        if speed_seconds:  # 0: no `openssl speed` (a comparison that does not need the crypto limit)
            speed.append(openssl_speed(speed_seconds))
    return runs, speed


def median(runs: list[Run], server: str, label: str, field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs if r.server == server and r.label.startswith(label))


def table(runs: list[Run], names: tuple[str, ...], headers: list[str], ratios: list[tuple[int, int]]) -> None:
    """The summary: each figure's median for every server in ``names``, then the ratios (index pairs)."""
    print("\n| figure | " + " | ".join(headers) + " |")
    print("|---" * (1 + len(headers)) + "|")
    for label, field, name in (
        ("round", "rps", f"issuances/s ({CONNECTIONS} conns)"),
        ("round", "p50_ms", f"p50 ms ({CONNECTIONS} conns)"),
        ("round", "p99_ms", f"p99 ms ({CONNECTIONS} conns)"),
        ("sequential", "p50_ms", "sequential p50 ms"),
        ("sequential", "p99_ms", "sequential p99 ms"),
    ):
        values = [median(runs, n, label, field) for n in names]
        cells = [f"{v:,.2f}" for v in values] + [f"{values[a] / values[b]:.2f}" for a, b in ratios]
        print(f"| {name} | {' | '.join(cells)} |")


def crypto_limit(speed: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(signs/s, verifies/s per core, issuances/s on all cores) from the `openssl speed` medians."""
    signs = statistics.median(s for s, _ in speed)
    verifies = statistics.median(v for _, v in speed)
    # One issuance is one P-256 verify (the CSR) and one sign (the leaf); TLS sessions are long-lived.
    return signs, verifies, (os.cpu_count() or 1) / (1 / signs + 1 / verifies)


def save(out: Path, meta: dict[str, object], runs: list[Run]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({**meta, "runs": [asdict(r) for r in runs]}, indent=2))
    print(f"\nraw runs: {path}")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script here takes; `run_sizes` applies them."""
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5,000 requests")
    parser.add_argument("--smoke", action="store_true", help="1 round of 300 requests, no extras: checks the harness")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=HERE / "results")


def run_sizes(args: argparse.Namespace) -> int:
    """Applies --quick and --smoke, checks the tools are installed; returns the warm-up run's size."""
    for tool in ("h2load", "cfssl", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run 'bash bench/setup.sh' (Debian nghttp2-client, golang-cfssl)")
    if args.quick:
        args.rounds, args.requests = 2, 5000
    if args.smoke:
        args.rounds, args.requests = 1, 300
        return 100
    return 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--extra-workers", type=int, nargs="*", default=[1, 2 * (os.cpu_count() or 1)],
                        help="also measure meshca with these --workers counts (default: 1 and 2 x cores)")
    parser.add_argument("--soak", type=int, default=0, help="issuances for the RSS soak (e.g. 200000)")
    args = parser.parse_args()
    warmup = run_sizes(args)
    if args.smoke:
        args.extra_workers = []

    with tempfile.TemporaryDirectory(prefix="meshca-bench-") as tmp:
        work = Path(tmp)
        servers = [Meshca(work, args.workers), Cfssl(work, same_work=True), Cfssl(work, same_work=False)]
        try:
            print(f"warm-up; then {args.rounds} rounds of {args.requests} requests, {CONNECTIONS} connections, "
                  f"order rotating; meshca --workers {args.workers}", flush=True)
            runs, speed = rounds(servers, count=args.rounds, requests=args.requests, warmup=warmup,
                                 speed_seconds=1 if args.smoke else 3)
            for server in servers:
                runs.append(measure(server, "sequential (1 client)", max(300, args.requests // 10), 1))
            if args.soak:
                runs.append(measure(servers[0], f"soak {args.soak}", args.soak))
        finally:
            for server in servers:
                server.stop()
        for workers in args.extra_workers:
            other = Meshca(work, workers)
            try:
                measure(other, "warm-up", warmup)
                for _ in range(args.rounds):
                    runs.append(measure(other, f"{workers} workers", args.requests))
            finally:
                other.stop()
        if not args.smoke:
            jwt = Meshca(work, args.workers, jwt=True)
            try:
                measure(jwt, "warm-up", warmup)
                for _ in range(args.rounds):
                    runs.append(measure(jwt, "JWT auth", args.requests))
            finally:
                jwt.stop()

    def med(server: str, label: str, field: str) -> float:
        return median(runs, server, label, field)

    names = ("meshca", "cfssl", "cfssl-bare")
    table(runs, names, ["meshca", "cfssl same work", "cfssl bare", "meshca/cfssl", "meshca/cfssl-bare"],
          [(0, 1), (0, 2)])
    growth = [med(n, "round", "rss_after_kib") / med(n, "round", "rss_before_kib") for n in names]
    print(f"| RSS after/before a run | {growth[0]:.2f} | {growth[1]:.2f} | {growth[2]:.2f} | - | - |")

    signs, verifies, limit = crypto_limit(speed)
    cpus = os.cpu_count() or 1
    rps = med("meshca", "round", "rps")
    print(f"\ncrypto limit: openssl speed ecdsap256 {signs:,.0f} signs/s, {verifies:,.0f} verifies/s per core "
          f"-> {limit:,.0f} issuances/s on {cpus} cores; meshca reaches {rps / limit:.2f} of it "
          f"(cfssl same work {med('cfssl', 'round', 'rps') / limit:.2f})")
    for workers in args.extra_workers:
        w = med("meshca", f"{workers} workers", "rps")
        print(f"meshca --workers {workers}: {w:,.0f}/s ({w / rps:.2f} of --workers {args.workers})")
    jwt_runs = [r for r in runs if r.label == "JWT auth"]
    if jwt_runs:
        jwt_rps = med("meshca", "JWT auth", "rps")
        print(f"meshca with Kubernetes JWT auth: {jwt_rps:,.0f}/s ({jwt_rps / rps:.2f} of the join-token figure)")
    soak = [r for r in runs if r.label.startswith("soak")]
    if soak:
        s = soak[0]
        print(f"soak: RSS {s.rss_before_kib // 1024} -> {s.rss_after_kib // 1024} MiB across {s.requests} issuances "
              f"({(s.rss_after_kib / s.rss_before_kib - 1) * 100:+.1f}%)")
    save(args.out, {"workers": args.workers, "cpus": cpus, "openssl_speed": speed}, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
