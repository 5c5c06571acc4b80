"""Soak: `meshca serve` at a fraction of its measured maximum rate, mixed APIs, a few bad requests.

    python bench/soak.py                        # 20 s max-rate probe, then 10 minutes at 70 % of it
    python bench/soak.py --minutes 1            # a short check
    python bench/soak.py --rate 500 --json      # skip the probe; JSON report on stdout

Everything runs on 127.0.0.1: a fresh trust domain (`meshca init`), a
multi-use join token (`meshca token create`), a throwaway RSA key whose JWKS
`meshca serve --k8s-jwks` trusts, so Linkerd and Istio requests carry
service-account JWTs. The client drives meshca over the wire only (grpc.aio
over TLS, trusting DIR/bundle.pem), with a pool of pre-made keys and CSRs.

The mix: native IssueSVID with the join token, native renewal with an SVID
proof of possession, Linkerd Certify, Istio CreateCertificate, WatchBundle
streams opened and closed, and a few bad requests whose status is known in
advance (garbage CSR, unknown join token, wrong identity natively and on
Linkerd). Any other status is unexpected and counted by request kind and code.

Every interval (a minute by default) prints one line: achieved rate, p50/p99
of that interval (from each request's scheduled start, so a stalled server
shows), and the RSS, threads and open file descriptors summed over the
server's processes (supervisor and workers, from /proc). Growth compares the
last interval with the first one after warm-up (the first interval). Exit 1
if RSS, threads or fds grew by 5 % or more, a status was unexpected, or a
server process died or was replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp

from meshca._proto import istio_ca_pb2 as ipb
from meshca._proto import istio_ca_pb2_grpc as ipb_grpc
from meshca._proto import linkerd_identity_pb2 as lpb
from meshca._proto import linkerd_identity_pb2_grpc as lpb_grpc
from meshca._proto import meshca_identity_pb2 as pb
from meshca._proto import meshca_identity_pb2_grpc as pb_grpc
from meshca.pki._proof import sign_svid_proof

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port, pct, wait_port  # bench/run.py, beside this file

TD = "soak.example"
NATIVE_ID = f"spiffe://{TD}/ns/soak/sa/native"
OTHER_ID = f"spiffe://{TD}/ns/soak/sa/other"
WEB_ID = f"spiffe://{TD}/ns/default/sa/web"  # what the service-account JWT maps to
LINKERD_WEB = f"web.default.serviceaccount.identity.linkerd.{TD}"
LINKERD_API = f"api.default.serviceaccount.identity.linkerd.{TD}"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVER_NAME = "localhost"  # the DNS SAN of meshca serve's own certificate by default

CALL_TIMEOUT = 10.0  # s; a slower answer is DEADLINE_EXCEEDED, which is unexpected
MAX_INFLIGHT = 2000  # open loop: beyond this the client sheds (counted) instead of growing without bound
WATCH_HOLD = 2.0  # s; open loop: a WatchBundle stream stays open up to this long after its first bundle
CSR_POOL = 16
GROWTH_LIMIT = 0.05

# Good requests and their share of the traffic (before the bad ones are carved out).
MIX = {"native": 0.3, "renew": 0.2, "linkerd": 0.2, "istio": 0.2, "watch": 0.1}
# Bad requests and the one status each must get.
BAD = {
    "bad-csr": "INVALID_ARGUMENT",
    "bad-token": "UNAUTHENTICATED",
    "bad-identity": "PERMISSION_DENIED",
    "bad-linkerd-identity": "FAILED_PRECONDITION",
}
EXPECTED = {**dict.fromkeys(MIX, "OK"), **BAD}


def log(quiet_stdout: bool, line: str) -> None:
    print(line, file=sys.stderr if quiet_stdout else sys.stdout, flush=True)


# -- the server


def meshca_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshca.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"meshca {args[0]} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the supervisor and its workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


@dataclass(frozen=True)
class ProcSample:
    pids: tuple[int, ...]
    rss_kib: int
    threads: int
    fds: int


def sample_procs(pid: int) -> ProcSample:
    pids, rss, threads, fds = [], 0, 0, 0
    for p in descendants(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            p_threads = len(os.listdir(f"/proc/{p}/task"))
            p_fds = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue  # gone between the listing and the read
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        pids.append(p)
        threads += p_threads
        fds += p_fds
    return ProcSample(tuple(sorted(pids)), rss, threads, fds)


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of each name run in the server's processes: which pool grew, when threads did."""
    names: collections.Counter[str] = collections.Counter()
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                names[(task / "comm").read_text().strip()] += 1
    return dict(sorted(names.items()))


class Server:
    """`meshca serve` with Kubernetes JWTs verified offline, on ephemeral 127.0.0.1 ports."""

    def __init__(self, work: Path, workers: int, jwks: Path) -> None:
        self.dir = work / "trust"
        self.port, self.metrics_port = free_port(), free_port()
        self.workers = workers
        self.log_path = work / "server.log"
        argv = [
            sys.executable, "-m", "meshca.cli", "serve", "--dir", str(self.dir),
            "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--workers", str(workers), "--k8s-jwks", str(jwks), "--k8s-issuer", K8S_ISSUER,
        ]  # fmt: skip
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        wait_port(self.port, timeout)  # exits the script with a message when nothing listens in time
        wait_port(self.metrics_port, max(1.0, deadline - time.monotonic()))
        # Connections made before every worker has bound the port would all land on the first ones.
        # --workers 1 serves in the process itself; more are a supervisor and its workers.
        processes = self.workers + 1 if self.workers > 1 else 1
        while len(descendants(self.proc.pid)) < processes and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log that are not routine (issuances, start, stop)."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join([line for line in text.splitlines() if '"level": "info"' not in line][-lines:])


# -- what the client sends


def csr_der(key: ec.EllipticCurvePrivateKey, *, uri: str | None = None, dns: str | None = None) -> bytes:
    """A P-256 PKCS#10 request: a URI SAN (SPIFFE) or, as linkerd2-proxy sends, CN and DNS SAN."""
    builder = x509.CertificateSigningRequestBuilder()
    if uri is not None:
        builder = builder.subject_name(x509.Name([]))
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), True)
    else:
        assert dns is not None
        builder = builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def csr_pool(**name: str) -> list[bytes]:
    return [csr_der(ec.generate_private_key(ec.SECP256R1()), **name) for _ in range(CSR_POOL)]


@dataclass
class Cluster:
    """The service-account token signer of a pretend Kubernetes cluster."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def write_jwks(self, path: Path) -> Path:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        path.write_text(json.dumps({"keys": [{**jwk, "kid": "soak", "use": "sig", "alg": "RS256"}]}))
        return path

    def token(self, audience: str, lifetime: timedelta) -> str:
        now = datetime.now(UTC)
        claims = {
            "iss": K8S_ISSUER,
            "sub": "system:serviceaccount:default:web",
            "aud": audience,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + lifetime).timestamp()),
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "soak"})


@dataclass
class Tally:
    """What came back: statuses by request kind, latencies, and the ones that should not have."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    shed: int = 0

    def record(self, kind: str, code: str, latency_s: float) -> None:
        self.statuses[kind, code] += 1
        self.latencies_ms.append(latency_s * 1000)

    def unexpected(self) -> Counter[tuple[str, str]]:
        return Counter({(k, c): n for (k, c), n in self.statuses.items() if EXPECTED[k] != c})


class Load:
    """Pre-made requests over a few TLS connections; one call of any kind at a time per coroutine."""

    def __init__(self, port: int, bundle: bytes, channels: int, rng: random.Random, bad_fraction: float) -> None:
        credentials = grpc.ssl_channel_credentials(bundle)
        # A local subchannel pool gives each channel its own connection, so the kernel spreads them over workers.
        options = [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) for _ in range(channels)
        ]
        self.rng = rng
        self.kinds = [*MIX, *BAD]
        weights = [w * (1 - bad_fraction) for w in MIX.values()]
        self.weights = weights + [bad_fraction / len(BAD)] * len(BAD)
        self.native_csrs = csr_pool(uri=NATIVE_ID)
        self.web_csrs = csr_pool(uri=WEB_ID)
        self.other_csrs = csr_pool(uri=OTHER_ID)
        self.linkerd_csrs = csr_pool(dns=LINKERD_WEB)
        self.linkerd_api_csrs = csr_pool(dns=LINKERD_API)
        pem = serialization.Encoding.PEM
        self.web_pems = [x509.load_der_x509_csr(c).public_bytes(pem).decode() for c in self.web_csrs]
        self.join_token = ""
        self.linkerd_jwt = self.istio_jwt = b""
        self.svid: tuple[tuple[bytes, ...], ec.EllipticCurvePrivateKey] | None = None
        self._calls: dict[str, Callable[[Any, float], Coroutine[Any, Any, float | None]]] = {
            "native": self._native,
            "renew": self._renew,
            "linkerd": self._linkerd,
            "istio": self._istio,
            "watch": self._watch,
            "bad-csr": self._bad_csr,
            "bad-token": self._bad_token,
            "bad-identity": self._bad_identity,
            "bad-linkerd-identity": self._bad_linkerd_identity,
        }

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def prepare(self, join_token: str, cluster: Cluster, lifetime: timedelta) -> None:
        """Credentials for the run: the join token, JWTs per audience, and a current SVID for renewals."""
        self.join_token = join_token
        self.linkerd_jwt = cluster.token("identity.l5d.io", lifetime).encode()
        self.istio_jwt = cluster.token("istio-ca", lifetime).encode()
        key = ec.generate_private_key(ec.SECP256R1())
        stub = pb_grpc.IdentityStub(self.channels[0])
        request = self._native_request(csr_der(key, uri=NATIVE_ID), join_token)
        try:
            response = await stub.IssueSVID(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise SystemExit(f"the first issuance failed: {exc.code().name}: {exc.details()}") from None
        self.svid = ((response.leaf, *response.intermediates), key)

    def pick(self) -> str:
        return self.rng.choices(self.kinds, self.weights)[0]

    async def call(self, kind: str, tally: Tally, started: float, hold: float = 0.0) -> None:
        """One request of ``kind``; its status and latency (from ``started``, a monotonic time) go to ``tally``.

        A call returns None when the answer is its end, or the monotonic time it was answered.
        """
        channel = self.channels[self.rng.randrange(len(self.channels))]
        code, answered = "OK", None
        try:
            answered = await self._calls[kind](channel, hold)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except EOFError:
            code = "EOF"  # a WatchBundle stream ended before its first bundle
        tally.record(kind, code, (answered or time.monotonic()) - started)

    def _csr(self, pool: list[bytes]) -> bytes:
        return pool[self.rng.randrange(len(pool))]

    @staticmethod
    def _native_request(csr: bytes, join_token: str, spiffe_id: str = "") -> pb.IssueSVIDRequest:
        credential = pb.Credential(join_token=join_token)
        return pb.IssueSVIDRequest(csr=csr, credential=credential, spiffe_id=spiffe_id)

    async def _issue(self, channel: Any, request: pb.IssueSVIDRequest) -> None:
        await pb_grpc.IdentityStub(channel).IssueSVID(request, timeout=CALL_TIMEOUT)

    async def _native(self, channel: Any, hold: float) -> None:
        await self._issue(channel, self._native_request(self._csr(self.native_csrs), self.join_token))

    async def _renew(self, channel: Any, hold: float) -> None:
        assert self.svid is not None
        chain, key = self.svid
        csr = self._csr(self.native_csrs)
        proof = sign_svid_proof(chain, key, csr, datetime.now(UTC))
        signed_at = Timestamp()
        signed_at.FromDatetime(proof.signed_at)
        svid = pb.SvidProof(chain=proof.chain, signature=proof.signature, signed_at=signed_at)
        request = pb.IssueSVIDRequest(csr=csr, credential=pb.Credential(svid=svid))
        await self._issue(channel, request)

    async def _certify(self, channel: Any, identity: str, csr: bytes) -> None:
        request = lpb.CertifyRequest(identity=identity, token=self.linkerd_jwt, certificate_signing_request=csr)
        await lpb_grpc.IdentityStub(channel).Certify(request, timeout=CALL_TIMEOUT)

    async def _linkerd(self, channel: Any, hold: float) -> None:
        await self._certify(channel, LINKERD_WEB, self._csr(self.linkerd_csrs))

    async def _istio(self, channel: Any, hold: float) -> None:
        request = ipb.IstioCertificateRequest(csr=self.web_pems[self.rng.randrange(len(self.web_pems))])
        metadata = (("authorization", f"Bearer {self.istio_jwt.decode()}"),)
        stub = ipb_grpc.IstioCertificateServiceStub(channel)
        await stub.CreateCertificate(request, metadata=metadata, timeout=CALL_TIMEOUT)

    async def _watch(self, channel: Any, hold: float) -> float:
        stub = pb_grpc.IdentityStub(channel)
        stream = stub.WatchBundle(pb.WatchBundleRequest(), timeout=CALL_TIMEOUT + hold)
        try:
            async for _ in stream:
                break  # the first bundle
            else:
                raise EOFError
            answered = time.monotonic()
            if hold:
                await asyncio.sleep(hold)
        finally:
            stream.cancel()
        return answered  # the latency of a stream is that of its first bundle, not how long it was held

    async def _bad_csr(self, channel: Any, hold: float) -> None:
        garbage = self.rng.randbytes(200)
        await self._issue(channel, self._native_request(b"0\x82" + garbage, self.join_token))

    async def _bad_token(self, channel: Any, hold: float) -> None:
        unknown = self.rng.randbytes(24).hex()
        await self._issue(channel, self._native_request(self._csr(self.native_csrs), unknown))

    async def _bad_identity(self, channel: Any, hold: float) -> None:
        # The join token grants NATIVE_ID; asking for another ID is refused.
        await self._issue(channel, self._native_request(self._csr(self.other_csrs), self.join_token, OTHER_ID))

    async def _bad_linkerd_identity(self, channel: Any, hold: float) -> None:
        # The JWT is web's; the identity and CSR are api's.
        await self._certify(channel, LINKERD_API, self._csr(self.linkerd_api_csrs))


# -- the two phases


async def probe(load: Load, tally: Tally, seconds: float, concurrency: int) -> float:
    """Closed loop: ``concurrency`` callers back to back for ``seconds``; returns completions per second."""
    start = time.monotonic()
    end = start + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            await load.call(load.pick(), tally, time.monotonic())

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(tally.latencies_ms) / (time.monotonic() - start)


class OpenLoop:
    """Requests started on a fixed schedule whatever the answers do (latency counts from the schedule)."""

    def __init__(self, load: Load, rate: float) -> None:
        self.load = load
        self.interval = 1 / rate
        self.start = time.monotonic()
        self.sent = 0
        self.inflight: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def run_until(self, until: float, tally: Tally) -> None:
        load = self.load
        while True:
            due = self.start + self.sent * self.interval
            if due >= until:
                return
            if self.error is not None:
                raise self.error
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.sent += 1
            if len(self.inflight) >= MAX_INFLIGHT:
                tally.shed += 1
                continue
            kind = load.pick()
            hold = load.rng.uniform(0, WATCH_HOLD) if kind == "watch" else 0.0
            task = asyncio.create_task(load.call(kind, tally, due, hold))
            self.inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    async def drain(self) -> None:
        """Waits for the calls still running; each is bounded by its deadline."""
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=CALL_TIMEOUT + WATCH_HOLD + 5)
        for task in set(self.inflight):
            task.cancel()
        if self.error is not None:
            raise self.error


# -- reporting


def interval_report(
    elapsed: float, seconds: float, tally: Tally, procs: ProcSample, unexpected: int, client_cpu: float
) -> dict[str, Any]:
    latencies = tally.latencies_ms
    return {
        "elapsed_s": round(elapsed, 1),
        "requests": len(latencies),
        "rate": round(len(latencies) / seconds, 1),
        "p50_ms": round(pct(latencies, 0.50), 2) if latencies else None,
        "p99_ms": round(pct(latencies, 0.99), 2) if latencies else None,
        "rss_kib": procs.rss_kib,
        "threads": procs.threads,
        "fds": procs.fds,
        "processes": len(procs.pids),
        "shed": tally.shed,
        "unexpected_so_far": unexpected,
        "client_cpu": round(client_cpu / seconds, 2),  # the load generator's share of a core: near 1, it limits
    }


def format_interval(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    return (
        f"{r['elapsed_s']:7.0f} s  {r['rate']:8.1f}/s  p50 {ms(r['p50_ms']):>10}  p99 {ms(r['p99_ms']):>10}  "
        f"rss {r['rss_kib'] / 1024:7.1f} MiB  threads {r['threads']:4d}  fds {r['fds']:4d}  "
        f"procs {r['processes']}  client cpu {r['client_cpu']:.2f}  shed {r['shed']}  "
        f"unexpected {r['unexpected_so_far']}"
    )


def growth(intervals: list[dict[str, Any]]) -> tuple[int, dict[str, float | None]]:
    """Last interval over the first one after warm-up (the first, when the run is too short to have one)."""
    base_index = 1 if len(intervals) >= 3 else 0
    base, last = intervals[base_index], intervals[-1]
    out: dict[str, float | None] = {}
    for key in ("rss_kib", "fds", "threads", "p99_ms"):
        out[key] = round(last[key] / base[key] - 1, 4) if base[key] and last[key] is not None else None
    return base_index, out


def statuses_json(tally: Tally) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, code), n in sorted(tally.statuses.items()):
        out.setdefault(kind, {})[code] = n
    return out


# -- main


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    say = functools.partial(log, args.json)
    rng = random.Random(args.seed)
    cluster = Cluster()
    trust = str(work / "trust")
    meshca_cli("init", "--trust-domain", TD, "--dir", trust)
    token = meshca_cli(
        "token", "create", "--dir", trust, "--spiffe-id", NATIVE_ID, "--uses", str(args.token_uses), "--ttl", "24h"
    )
    server = Server(work, args.workers, cluster.write_jwks(work / "jwks.json"))
    total = Tally()
    failures: list[str] = []
    report: dict[str, Any] = {}
    try:
        server.wait_ready()
        load = Load(server.port, (server.dir / "bundle.pem").read_bytes(), args.channels, rng, args.bad_fraction)
        try:
            run_seconds = args.minutes * 60
            await load.prepare(token, cluster, timedelta(seconds=args.probe_seconds + run_seconds + 600))
            first = sample_procs(server.proc.pid)
            names_first = thread_names(server.proc.pid)
            say(f"meshca serve --workers {args.workers}: {len(first.pids)} processes, pid {server.proc.pid}")
            if args.rate:
                maximum, rate = None, args.rate
            else:
                probe_tally = Tally()
                maximum = await probe(load, probe_tally, args.probe_seconds, args.concurrency)
                total.statuses.update(probe_tally.statuses)
                rate = maximum * args.fraction
                say(f"max rate {maximum:.1f}/s ({args.concurrency} callers, {args.probe_seconds:g} s closed loop)")
            say(f"soak at {rate:.1f}/s for {run_seconds:g} s, a line every {args.interval:g} s")

            intervals: list[dict[str, Any]] = []
            loop = OpenLoop(load, rate)
            count = max(1, round(run_seconds / args.interval))
            for i in range(count):
                tally = Tally()
                cpu = time.process_time()
                await loop.run_until(loop.start + (i + 1) * run_seconds / count, tally)
                if i == count - 1:
                    await loop.drain()
                total.statuses.update(tally.statuses)
                total.shed += tally.shed
                r = interval_report(
                    time.monotonic() - loop.start,
                    run_seconds / count,
                    tally,
                    sample_procs(server.proc.pid),
                    sum(total.unexpected().values()),
                    time.process_time() - cpu,
                )
                intervals.append(r)
                say(format_interval(r))
                if not server.alive():
                    failures.append(f"meshca serve exited with {server.proc.returncode} during the soak")
                    break
        finally:
            await load.close()

        base_index, grown = growth(intervals)
        if server.alive() and sample_procs(server.proc.pid).pids != first.pids:
            failures.append("a server process died or was replaced during the soak")
        for key in ("rss_kib", "fds", "threads"):
            value = grown[key]
            if value is not None and value >= GROWTH_LIMIT:
                failures.append(f"{key} grew by {value:.1%} (limit {GROWTH_LIMIT:.0%})")
        unexpected = total.unexpected()
        if unexpected:
            failures.append(f"{sum(unexpected.values())} unexpected statuses")
        report = {
            "max_rate": None if maximum is None else round(maximum, 1),
            "rate": round(rate, 1),
            "fraction": None if maximum is None else args.fraction,
            "workers": args.workers,
            "seconds": run_seconds,
            "interval_s": args.interval,
            "intervals": intervals,
            "baseline_interval": base_index,
            "growth": grown,
            "statuses": statuses_json(total),
            "expected": EXPECTED,
            "unexpected": {f"{kind} {code}": n for (kind, code), n in sorted(unexpected.items())},
            "shed": total.shed,
            "thread_names": {"start": names_first, "end": thread_names(server.proc.pid)},
            "failures": failures,
        }
    finally:
        code = server.stop()
        if not failures and report and code != 0:
            failures.append(f"meshca serve exited with {code} after SIGTERM")
        if failures and server.log_path.exists():
            say("the server's last warnings and errors:\n" + server.log_tail())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10, help="length of the soak (default 10)")
    p.add_argument("--rate", type=float, help="requests per second; skips the max-rate probe")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the measured max rate (default 0.7)")
    p.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    p.add_argument("--interval", type=float, default=60, help="seconds between report lines (default 60)")
    p.add_argument("--probe-seconds", type=float, default=20, help="length of the max-rate probe (default 20)")
    p.add_argument("--concurrency", type=int, default=32, help="callers in the max-rate probe (default 32)")
    p.add_argument("--channels", type=int, default=8, help="TLS connections to the server (default 8)")
    p.add_argument("--bad-fraction", type=float, default=0.01, help="share of bad requests (default 0.01)")
    p.add_argument(
        "--token-uses",
        type=int,
        default=1_000_000_000,
        help="issuances the join token pays for (default 1e9; fewer makes later native requests unexpected)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="meshca serve --workers (default: cores)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object on stdout (lines on stderr)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or not 0 < args.fraction <= 1 or not 0 <= args.bad_fraction <= 1:
        p.error("--minutes and --interval must be positive, --fraction in (0, 1], --bad-fraction in [0, 1]")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")

    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the directory removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with tempfile.TemporaryDirectory(prefix="meshca-soak-") as tmp:
        report = asyncio.run(soak(args, Path(tmp)))
    say = functools.partial(log, args.json)
    g = report["growth"]
    base = report["baseline_interval"]

    def pct_or_dash(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    say(
        f"growth (last interval / interval {base}): rss {pct_or_dash(g['rss_kib'])}, fds {pct_or_dash(g['fds'])}, "
        f"threads {pct_or_dash(g['threads'])}, p99 {pct_or_dash(g['p99_ms'])}"
    )
    counts = (" ".join(f"{code} {n}" for code, n in codes.items()) for codes in report["statuses"].values())
    say("statuses: " + "; ".join(f"{kind} {c}" for kind, c in zip(report["statuses"], counts, strict=True)))
    say("unexpected: " + (", ".join(f"{k} x{n}" for k, n in report["unexpected"].items()) or "none"))
    say("PASS" if not report["failures"] else "FAIL: " + "; ".join(report["failures"]))
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
