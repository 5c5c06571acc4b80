"""``meshca simulate``: a rotation policy tried on a simulated clock before production.

A discrete-event simulation (a heap of timed events, no sleeping) that runs
meshca's real code, not a model of it:

- the identity service mints, prepares, activates and drops issuers with
  `IssuerSlots` and `mint_issuer` (pki/_lifecycle.py), checks each request with
  `check_csr` and `verify_svid_proof` and signs with `Issuer.sign`;
- each workload is a `SourceMachine` (client/_state.py) whose renewal and
  bundle-watch flows are driven step by step, so renewal times, jitter and
  backoff are the client's own;
- an anchor rotation really makes a new anchor, publishes a bundle with both,
  switches issuance over with `IssuerSlots.replace` and drops the old anchor;
- every handshake round, and whenever a workload's SVID or bundle changes or
  its SVID expires, workloads dial each other and both sides verify the peer's current chain
  against their own current bundle with `verify_chain` at the simulated time.

An outage is the identity service being down: no issuance, no bundle stream,
no issuer step; an anchor step due in an outage is taken when it ends. A
workload whose SVID has expired falls back to its bootstrap credential (a
projected service-account token), which the simulation takes as always
valid. See docs/architecture.md, Simulation.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca._proto import meshca_identity_pb2 as pb
from meshca.client._core import Credentials, X509Svid
from meshca.client._state import (
    Failure,
    Fetch,
    Flow,
    GiveUp,
    NextBundle,
    Publish,
    Reconnect,
    RenewNow,
    Reply,
    Sleep,
    SourceConfig,
    SourceMachine,
)
from meshca.pki._anchors import activation_allowed_at, chains_to, retire_check
from meshca.pki._bundle import TrustBundle
from meshca.pki._check import lifetime_findings
from meshca.pki._csr import check_csr, load_csr
from meshca.pki._errors import MeshcaError, VerificationError
from meshca.pki._issuer import Issuer
from meshca.pki._keys import PrivateKey, generate_key
from meshca.pki._lifecycle import MIN_ISSUER_TTL, IssuerSlots, handover_room, mint_issuer
from meshca.pki._profiles import ANCHOR_LIFETIME, LEAF_TTL, build_anchor
from meshca.pki._proof import SvidProof, verify_svid_proof
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import format_duration, parse_duration
from meshca.pki._verify import PeerRole, verify_chain

__all__ = ["BUNDLE_DELAY", "DEFAULT_ISSUER_TTL", "HANDSHAKE_EVERY", "START", "Outage", "Policy", "Report", "simulate"]

DEFAULT_ISSUER_TTL = timedelta(days=7)
HANDSHAKE_EVERY = timedelta(hours=1)
MAX_HANDSHAKES = 20_000_000  # in rounds: about ten minutes here; a default year has 788,400
MAX_LEAVES = 200_000  # renewals, each a key, a CSR, a signature and its checks: about ten minutes here too;
# a default year has 7,300 (10 workloads renewing 24 h leaves at half life)
BUNDLE_DELAY = timedelta(seconds=30)
"""A bundle change reaches each workload after a delay drawn up to this (the stream, a proxy's reload)."""
START = datetime(2026, 1, 1, tzinfo=UTC)
"""Day 0 of every simulation, so a report reads the same on every run."""

_DER = Encoding.DER
_DAY = timedelta(days=1)
_RETRY_STEP = timedelta(hours=1)  # how soon a failed issuer step (the anchor expired) is tried again
_MIN_STEP = timedelta(minutes=1)
_POLL = timedelta(seconds=1)  # serve's --reload-interval: how late an issuer step may come
_SECOND = timedelta(seconds=1)
_TRUST_DOMAIN = TrustDomain.parse("sim.example")


# -- the policy


@dataclass(frozen=True, slots=True)
class Outage:
    """The identity service is down from ``day`` (days after day 0) for ``duration``."""

    day: float
    duration: timedelta

    @classmethod
    def parse(cls, text: str) -> Outage:
        """``DAY:DURATION``, as ``--outage 30:13h``."""
        day, sep, length = text.partition(":")
        if not sep:
            raise ValueError(f"invalid outage {text!r}: use DAY:DURATION, as 30:13h")
        try:
            start = float(day)
        except ValueError:
            raise ValueError(f"invalid outage {text!r}: the day {day!r} is not a number") from None
        if not 0 <= start < 1e6:
            raise ValueError(f"invalid outage {text!r}: the day must be 0 or more")
        return cls(start, parse_duration(length))

    def __str__(self) -> str:
        return f"{self.day:g}:{format_duration(self.duration)}"


@dataclass(frozen=True, slots=True)
class Policy:
    """What to simulate. `ValueError` names the first setting that cannot be simulated."""

    days: int
    anchor_lifetime: timedelta = ANCHOR_LIFETIME
    issuer_ttl: timedelta = DEFAULT_ISSUER_TTL
    leaf_ttl: timedelta = LEAF_TTL
    workloads: int = 10
    rotate_anchor_on_day: float | None = None
    activate_anchor_after: timedelta | None = None  # after prepare; None: as soon as pki/_anchors allows
    retire_anchor_after: timedelta | None = None  # after activation; None: as soon as pki/_anchors allows
    bundle_delay: timedelta = BUNDLE_DELAY
    outages: tuple[Outage, ...] = ()
    handshake_every: timedelta = HANDSHAKE_EVERY
    seed: int = 0
    renewal: RenewalPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        if not 1 <= self.days <= 3650:
            raise ValueError(f"--days must be between 1 and 3650, got {self.days}")
        if not 2 <= self.workloads <= 100:
            raise ValueError(f"--workloads must be between 2 and 100, got {self.workloads}")
        if self.handshake_every < timedelta(minutes=1):
            raise ValueError("--handshake-every must be at least 1m")
        if self.issuer_ttl < MIN_ISSUER_TTL:
            raise ValueError(f"--issuer-ttl must be at least {format_duration(MIN_ISSUER_TTL)}, as serve requires")
        day = self.rotate_anchor_on_day
        if day is not None and not 0 <= day < self.days:
            raise ValueError(f"--rotate-anchor-on-day {day:g} is outside the {self.days} simulated days")
        for outage in self.outages:
            if outage.day >= self.days:
                raise ValueError(f"--outage {outage} starts after the {self.days} simulated days")
        rounds = self.days * _DAY // self.handshake_every
        if (planned := rounds * self.workloads * (self.workloads - 1)) > MAX_HANDSHAKES:
            raise ValueError(
                f"{planned} handshakes would take too long (at most {MAX_HANDSHAKES}): "
                "fewer --workloads or --days, or a longer --handshake-every"
            )
        renewals = self.days * _DAY / (self.leaf_ttl * (self.renewal.fraction - self.renewal.jitter))
        if (leaves := int(renewals) * self.workloads) > MAX_LEAVES:
            raise ValueError(
                f"about {leaves} leaves would take too long (at most {MAX_LEAVES}): "
                "a longer --leaf-ttl, or fewer --workloads or --days"
            )
        if day is None and (self.activate_anchor_after or self.retire_anchor_after):
            raise ValueError("--activate-anchor-after and --retire-anchor-after need --rotate-anchor-on-day")

    def as_json(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "anchor_lifetime": format_duration(self.anchor_lifetime),
            "issuer_ttl": format_duration(self.issuer_ttl),
            "leaf_ttl": format_duration(self.leaf_ttl),
            "workloads": self.workloads,
            "rotate_anchor_on_day": self.rotate_anchor_on_day,
            "activate_anchor_after": _opt_duration(self.activate_anchor_after),
            "retire_anchor_after": _opt_duration(self.retire_anchor_after),
            "outages": [str(o) for o in self.outages],
            "handshake_every": format_duration(self.handshake_every),
            "bundle_delay": format_duration(self.bundle_delay),
            "seed": self.seed,
            "renew_at": self.renewal.fraction,
            "renew_jitter": self.renewal.jitter,
        }

    @property
    def outage_budget(self) -> timedelta:
        """The least life a leaf has left when its renewal falls due: an outage longer may outlast it."""
        return self.leaf_ttl * (1 - self.renewal.fraction - self.renewal.jitter)


def _opt_duration(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(at: datetime) -> int:
    return (at - START) // _DAY


# -- the report


@dataclass(frozen=True, slots=True)
class Incident:
    """The first thing that went wrong: a failed handshake (``pair`` "A->B": A dialled B), or a policy error."""

    at: datetime
    kind: str  # "handshake" or "policy"
    why: str
    pair: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"day": _day(self.at), "time": _iso(self.at), "kind": self.kind, "pair": self.pair, "why": self.why}


@dataclass(slots=True)
class Report:
    policy: Policy
    handshakes: int = 0
    failed_handshakes: int = 0
    leaves_issued: int = 0
    leaves_cut_short: int = 0
    fetch_failures: int = 0
    issuer_rotations: int = 0
    issuer_mint_failures: int = 0
    anchor_rotations: int = 0
    anchor_steps: list[tuple[str, datetime]] = field(default_factory=list)
    findings: list[dict[str, str]] = field(default_factory=list)
    first_failure: Incident | None = None
    first_cut_short: Incident | None = None

    @property
    def policy_errors(self) -> bool:
        return any(f["severity"] == "error" for f in self.findings)

    @property
    def ok(self) -> bool:
        """Exit 0: no handshake failed and the policy breaks none of the lifetime rules."""
        return self.failed_handshakes == 0 and not self.policy_errors

    @property
    def failure(self) -> Incident | None:
        """The first failed handshake; failing that, the first leaf a policy error cut short."""
        if self.first_failure is not None:
            return self.first_failure
        if self.policy_errors:
            return self.first_cut_short or Incident(START, "policy", self._first_error())
        return None

    def _first_error(self) -> str:
        return next(f["message"] for f in self.findings if f["severity"] == "error")

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.ok,
            "policy": self.policy.as_json(),
            "handshakes": self.handshakes,
            "failed_handshakes": self.failed_handshakes,
            "leaves_issued": self.leaves_issued,
            "leaves_cut_short": self.leaves_cut_short,
            "fetch_failures": self.fetch_failures,
            "issuer_rotations": self.issuer_rotations,
            "issuer_mint_failures": self.issuer_mint_failures,
            "anchor_rotations": self.anchor_rotations,
            "anchor_steps": [{"step": s, "day": _day(at), "time": _iso(at)} for s, at in self.anchor_steps],
            "findings": self.findings,
        }
        if (failure := self.failure) is not None:
            data["first_failure"] = failure.as_json()
        return data

    def summary(self) -> str:
        p = self.policy
        lines = [
            f"simulated {p.days} days: {p.workloads} workloads, issuer TTL {format_duration(p.issuer_ttl)}, "
            f"leaf TTL {format_duration(p.leaf_ttl)}, anchor lifetime {format_duration(p.anchor_lifetime)}",
            f"handshakes: {self.handshakes}, failed: {self.failed_handshakes}",
            f"leaves issued: {self.leaves_issued} ({self.leaves_cut_short} cut short by the issuer chain), "
            f"failed fetches: {self.fetch_failures}",
            f"issuer rotations: {self.issuer_rotations}, anchor rotations: {self.anchor_rotations}",
        ]
        lines += [f"  anchor {step} on day {_day(at)} at {_iso(at)}" for step, at in self.anchor_steps]
        lines += [f"{f['severity']}: {f['message']}" for f in self.findings if f["severity"] != "ok"]
        if (failure := self.failure) is not None:
            where = f" {failure.pair}" if failure.pair else ""
            lines.append(f"first failure: day {_day(failure.at)} {_iso(failure.at)}{where}: {failure.why}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


# -- the identity service


class _Service:
    """One replica of the identity service with managed issuers, on the simulated clock."""

    def __init__(self, policy: Policy, now: datetime, report: Report) -> None:
        self.policy = policy
        self.report = report
        self.anchor_key = generate_key()
        self.anchor = build_anchor(self.anchor_key, _TRUST_DOMAIN, now=now, lifetime=policy.anchor_lifetime)
        self.bundle = TrustBundle(_TRUST_DOMAIN, (self.anchor,))
        self.sequence = 1
        self.slots = IssuerSlots(max_leaf_ttl=policy.leaf_ttl)
        self.down = False
        # the issuance log, as far as anchor retirement needs it: (issued at, NotAfter) of each leaf
        self.leaves: list[tuple[datetime, datetime]] = []
        self._message: pb.Bundle | None = None

    def mint(self, now: datetime) -> Issuer:
        return mint_issuer(self.anchor, self.anchor_key, self.bundle, now=now, ttl=self.policy.issuer_ttl)

    def set_bundle(self, bundle: TrustBundle) -> None:
        self.bundle, self.sequence, self._message = bundle, self.sequence + 1, None

    def bundle_message(self) -> pb.Bundle:
        if self._message is None:
            self._message = pb.Bundle(
                trust_domain=self.bundle.trust_domain.name,
                anchors=[a.public_bytes(_DER) for a in self.bundle.anchors],
                sequence=self.sequence,
            )
        return self._message

    def issue(self, request: pb.IssueSVIDRequest, now: datetime) -> pb.IssueSVIDResponse | Failure:
        """What IssueSVID answers: a leaf from the active issuer, or the failure the client would classify."""
        if self.down:
            return Failure("UNAVAILABLE: the identity service is down (simulated outage)", reconnect=True)
        spiffe_id = SpiffeId.parse(request.spiffe_id)
        try:
            if request.credential.WhichOneof("kind") == "svid":
                cred = request.credential.svid
                signed_at = cred.signed_at.ToDatetime(tzinfo=UTC)
                proof = SvidProof(tuple(cred.chain), cred.signature, signed_at)
                if verify_svid_proof(proof, request.csr, self.bundle, now=now) != spiffe_id:
                    return Failure("PERMISSION_DENIED: the proof is for another SPIFFE ID")
            checked = check_csr(load_csr(request.csr), spiffe_id)
            issuer = self.slots.active
            if issuer is None:
                return Failure("UNAVAILABLE: no issuer", reconnect=True)
            svid = issuer.sign(checked.public_key, spiffe_id, now=now, ttl=self.policy.leaf_ttl)
        except MeshcaError as exc:
            # AuthenticationError and the like: after its first SVID a client retries them all
            return Failure(f"{type(exc).__name__}: {exc}")
        self.report.leaves_issued += 1
        self.leaves.append((now, svid.not_after))
        if svid.not_after < now + self.policy.leaf_ttl - timedelta(seconds=1):  # NotAfter is in whole seconds
            self._cut_short(now, spiffe_id, svid.not_after - now)
        return pb.IssueSVIDResponse(
            spiffe_id=str(spiffe_id), leaf=svid.leaf_der(), intermediates=svid.intermediates_der
        )

    def _cut_short(self, now: datetime, spiffe_id: SpiffeId, got: timedelta) -> None:
        self.report.leaves_cut_short += 1
        if self.report.first_cut_short is None:
            why = (
                f"the leaf for {spiffe_id} was cut to {format_duration(got)} by the issuer chain "
                f"(leaf TTL {format_duration(self.policy.leaf_ttl)})"
            )
            self.report.first_cut_short = Incident(now, "policy", why, spiffe_id.path.lstrip("/"))


# -- the workloads


@dataclass(slots=True)
class _Workload:
    name: str
    machine: SourceMachine
    renewal: Flow
    watch: Flow
    stream_open: bool = False  # the watch has a WatchBundle stream open
    seen: int = 0  # the bundle sequence the stream last delivered
    parked: bool = False  # the watch waits on its stream for the next bundle
    bundle_delay: timedelta = timedelta()  # how long a bundle change takes to reach it
    naps: int = 0  # the renewal flow's current sleep: an older wake-up is stale
    watched: X509Svid | None = None  # the SVID whose expiry is on the heap


class _Verdicts:
    """`verify_chain`, asked once per chain, bundle, role and time region.

    Within the validity window of a chain (the latest NotBefore to the
    earliest NotAfter of its certificates) the verdict does not depend on
    the time: an issuer never outlives its anchor, so the anchor is valid
    throughout. Before the window and after it, verification fails on the
    leaf's validity, whose message names the leaf's own time (a leaf never
    outlives its issuer, nor precedes it). So the real verifier runs once per
    region; tests/test_simulate.py checks the memo against direct calls.
    """

    def __init__(self) -> None:
        Chain = tuple[x509.Certificate, ...]
        self._memo: dict[tuple[int, int, str, int], tuple[Chain, TrustBundle, str | None]] = {}
        self._seen: dict[tuple[int, int, str], tuple[Chain, TrustBundle, datetime, datetime, str | None]] = {}
        self._bundles: dict[int, tuple[TrustBundle, TrustBundle]] = {}
        self._by_anchors: dict[frozenset[bytes], TrustBundle] = {}

    def _canonical(self, bundle: TrustBundle) -> TrustBundle:
        # Each workload reads its own copy of a bundle off the stream: one verdict serves all equal copies.
        seen = self._bundles.get(id(bundle))
        if seen is None or seen[0] is not bundle:
            anchors = frozenset(a.tbs_certificate_bytes for a in bundle.anchors)
            seen = self._bundles[id(bundle)] = (bundle, self._by_anchors.setdefault(anchors, bundle))
        return seen[1]

    def check(
        self, chain: tuple[x509.Certificate, ...], bundle: TrustBundle, role: PeerRole, at: datetime
    ) -> str | None:
        """None if the chain verifies against ``bundle`` at ``at``; otherwise why not."""
        key = (id(chain), id(bundle), role)
        hit = self._seen.get(key)  # the common case, asked every round: one lookup
        if hit is not None and hit[0] is chain and hit[1] is bundle and hit[2] <= at <= hit[3]:
            return hit[4]
        lo = max(c.not_valid_before_utc for c in chain)
        hi = min(c.not_valid_after_utc for c in chain)
        region = -1 if at < lo else 1 if at > hi else 0
        same = self._canonical(bundle)
        memo_key = (id(chain), id(same), role, region)
        memo = self._memo.get(memo_key)
        if memo is not None and memo[0] is chain and memo[1] is same:
            verdict = memo[2]
        else:
            verdict = self._verify(chain, same, role, at)
            self._memo[memo_key] = (chain, same, verdict)
        if region == 0:
            self._seen[key] = (chain, bundle, lo, hi, verdict)
        return verdict

    @staticmethod
    def _verify(chain: tuple[x509.Certificate, ...], bundle: TrustBundle, role: PeerRole, at: datetime) -> str | None:
        try:
            verify_chain(list(chain), bundle, at=at, role=role)
        except VerificationError as exc:
            return str(exc)
        return None


# -- the simulation


class _Simulation:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.report = Report(policy, findings=self._policy_findings(policy))
        self.rng = random.Random(policy.seed)  # noqa: S311 - jitter and order, not keys
        self.now = START
        self.end = START + policy.days * _DAY
        self.service = _Service(policy, START, self.report)
        self.verdicts = _Verdicts()
        self._events: list[tuple[datetime, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.workloads = [self._workload(i) for i in range(policy.workloads)]
        self.new_anchor: tuple[x509.Certificate, PrivateKey] | None = None
        self.old_anchor: x509.Certificate | None = None
        self.activated_at: datetime | None = None
        self.outage_end: datetime | None = None
        self._deferred: list[Callable[[], None]] = []
        self._issuer_due: datetime | None = None

    @staticmethod
    def _policy_findings(policy: Policy) -> list[dict[str, str]]:
        """The lifetime rules `meshca init` applies, and the room a managed issuer leaves at its handover."""
        found = lifetime_findings(
            anchor_lifetime=policy.anchor_lifetime, issuer_lifetime=policy.issuer_ttl, leaf_ttl=policy.leaf_ttl
        )
        findings = [{"severity": f.level, "rule": f.check, "message": f.message} for f in found]
        room = handover_room(policy.issuer_ttl)
        if policy.leaf_ttl > room:
            message = (
                f"leaf TTL {format_duration(policy.leaf_ttl)} does not fit an issuer TTL of "
                f"{format_duration(policy.issuer_ttl)}: an active issuer hands over with {format_duration(room)} "
                "of its life left, so the leaves it signs last are cut short"
            )
            findings.append({"severity": "error", "rule": "issuer handover", "message": message})
        rotate = None if policy.rotate_anchor_on_day is None else policy.rotate_anchor_on_day * _DAY
        first_end = START + policy.anchor_lifetime
        if rotate is None or START + rotate >= first_end:
            expires = first_end
            message = "no anchor rotation is planned before it (--rotate-anchor-on-day)"
        else:
            expires = START + rotate + policy.anchor_lifetime
            message = "the simulation plans no rotation of the anchor that replaces it"
        if expires < START + policy.days * _DAY:
            message = f"the trust anchor expires on day {_day(expires)} and {message}: no chain verifies after it"
            findings.append({"severity": "error", "rule": "anchor lifetime", "message": message})
        budget, renewal = policy.outage_budget, policy.renewal
        for outage in policy.outages:
            if outage.duration > budget:
                message = (
                    f"the outage {outage} is longer than the {format_duration(budget)} a leaf is sure to have left "
                    f"when its renewal falls due (at {renewal.fraction:.0%} +/- {renewal.jitter:.0%} of "
                    f"{format_duration(policy.leaf_ttl)}): a workload whose renewal falls due as it begins loses "
                    "its SVID before it ends"
                )
                findings.append({"severity": "warning", "rule": "outage", "message": message})
        return findings

    def _workload(self, n: int) -> _Workload:
        name = f"w{n}"
        config = SourceConfig(
            server="identity.sim.example:8443",
            spiffe_id=SpiffeId.parse(f"spiffe://{_TRUST_DOMAIN.name}/{name}"),
            credentials=Credentials(join_token="mtok_simulated-bootstrap-credential"),  # noqa: S106 - not a secret
            renewal=self.policy.renewal,
        )
        machine = SourceMachine(
            config,
            self.service.bundle,
            clock=lambda: self.now,
            rng=random.Random(self.rng.getrandbits(64)),  # noqa: S311 - the client's jitter
        )
        delay = self.policy.bundle_delay * self.rng.random()
        return _Workload(name, machine, machine.renewal(), machine.watch(), bundle_delay=delay)

    # -- the event heap

    def at(self, when: datetime, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self) -> Report:
        self.at(START, self.issuer_step)
        for w in self.workloads:
            start = START + timedelta(seconds=self.rng.uniform(0, 10))
            self.at(start, partial(self.drive, w, w.renewal, None))
            self.at(start, partial(self.drive, w, w.watch, None))
        first_round = START + timedelta(minutes=1)
        self.at(first_round, self.handshake_round)
        for outage in self.policy.outages:
            begin = START + outage.day * _DAY
            self.at(begin, partial(self.outage_starts, begin + outage.duration))
        if (day := self.policy.rotate_anchor_on_day) is not None:
            self.at(START + day * _DAY, self.anchor_prepare)
        while self._events and self._events[0][0] <= self.end:
            self.now, _, action = heapq.heappop(self._events)
            action()
        report = self.report
        if report.leaves_cut_short and not report.policy_errors:  # an anchor near its end cut the issuers
            message = f"{report.leaves_cut_short} leaves were cut short by their issuer chain"
            report.findings.append({"severity": "warning", "rule": "leaf lifetime", "message": message})
        return report

    # -- the workloads' flows

    def drive(self, w: _Workload, flow: Flow, reply: Reply) -> None:
        """Runs ``flow`` until it sleeps, waits for a bundle, or ends."""
        blocked: datetime | None = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration:
                return
            reply = None
            match step:
                case Sleep(delay):
                    wake = self.now + delay
                    if blocked is not None and wake < blocked:
                        # every retry before then fails the same way: skip them, wake as late as the last one would
                        wake = blocked + delay
                    self.wake(w, flow, wake)
                    return
                case RenewNow():  # the renewal flow sleeps (flows run one step at a time here): wake it
                    self.wake(w, w.renewal, self.now)
                case Reconnect():
                    if w.parked:  # a new channel ends the stream open on the old one
                        w.parked = w.stream_open = False
                        self.at(self.now, lambda: self.drive(w, w.watch, Failure("CANCELLED: channel replaced")))
                case Fetch(request):
                    reply = self.service.issue(request, self.now)
                    if isinstance(reply, Failure):
                        self.report.fetch_failures += 1
                        blocked = self.unavailable_until()
                case NextBundle():
                    if self.service.down:
                        w.stream_open = False
                        reply = Failure("UNAVAILABLE: the identity service is down (simulated outage)", reconnect=True)
                        blocked = self.outage_end
                    elif not w.stream_open or w.seen < self.service.sequence:
                        w.stream_open, w.seen = True, self.service.sequence
                        reply = self.service.bundle_message()
                    else:
                        w.parked = True
                        return
                case Publish(snapshot):
                    self.handshakes_with(w)
                    if snapshot.svid is not None and snapshot.svid is not w.watched:
                        # and the moment it expires, should it still be in use
                        w.watched = svid = snapshot.svid
                        self.at(svid.not_after + _SECOND, partial(self.expired, w, svid))
                case GiveUp(error):
                    raise AssertionError(f"{w.name} gave up: {error}")  # only refusals before a first SVID

    def wake(self, w: _Workload, flow: Flow, when: datetime) -> None:
        if flow is not w.renewal:
            self.at(when, lambda: self.drive(w, flow, None))
            return
        w.naps += 1
        nap = w.naps
        self.at(when, lambda: self.drive(w, flow, None) if w.naps == nap else None)

    def unavailable_until(self) -> datetime | None:
        """Until when every IssueSVID fails whatever the client does: the end of an outage, or the next issuer
        step while no issuer can sign (the anchor expired); None when the failure was the client's own."""
        if self.service.down:
            return self.outage_end
        active = self.service.slots.active
        if active is None or self.now >= active.not_after:
            return self._issuer_due
        return None

    def bundle_changed(self) -> None:
        for w in self.workloads:
            if w.parked:
                w.parked, w.seen = False, self.service.sequence
                message = self.service.bundle_message()
                self.at(self.now + w.bundle_delay, partial(self.drive, w, w.watch, message))

    # -- the service's steps

    def issuer_step(self) -> None:
        if self.service.down:
            return  # taken again when the outage ends
        slots = self.service.slots
        had_active = slots.active is not None
        for rotation in slots.advance(self.now, self.service.mint):
            self._count(rotation.step, rotation.ok, had_active)
            had_active = True
        due = slots.next_step()
        if due is None or due <= self.now:
            due = self.now + _RETRY_STEP
        self.at(max(due, self.now + _POLL), self.issuer_step_if(due))

    def issuer_step_if(self, due: datetime) -> Callable[[], None]:
        # an anchor activation or an outage reschedules the step: a stale event does nothing
        self._issuer_due = due
        return lambda: self.issuer_step() if self._issuer_due == due else None

    def _count(self, step: str, ok: bool, had_active: bool) -> None:
        if not ok:
            self.report.issuer_mint_failures += 1
        elif step == "activate" and had_active:
            self.report.issuer_rotations += 1

    def outage_starts(self, end: datetime) -> None:
        service = self.service
        if service.down:  # overlapping outages: the later end wins
            self.outage_end = max(self.outage_end or end, end)
            return
        service.down, self.outage_end = True, end
        for w in self.workloads:
            w.stream_open = False
            if w.parked:
                w.parked = False
                self.at(
                    self.now, partial(self.drive, w, w.watch, Failure("UNAVAILABLE: stream broken", reconnect=True))
                )
        self.at(end, self.outage_ends)

    def outage_ends(self) -> None:
        assert self.outage_end is not None
        if self.now < self.outage_end:
            self.at(self.outage_end, self.outage_ends)
            return
        self.service.down, self.outage_end = False, None
        self.issuer_step()
        for step in self._deferred:
            step()
        self._deferred = []

    def _when_up(self, step: Callable[[], None]) -> bool:
        """False (and ``step`` kept for the end of the outage) while the service is down."""
        if self.service.down:
            self._deferred = [*self._deferred, step]
            return False
        return True

    # -- the anchor rotation: prepare, activate, retire

    def anchor_prepare(self) -> None:
        if not self._when_up(self.anchor_prepare):
            return
        service = self.service
        key = generate_key()
        anchor = build_anchor(key, _TRUST_DOMAIN, now=self.now, lifetime=self.policy.anchor_lifetime)
        self.new_anchor = anchor, key
        service.set_bundle(service.bundle.with_anchor(anchor))
        self.report.anchor_steps.append(("prepare", self.now))
        self.bundle_changed()
        delay = self.policy.activate_anchor_after
        # the rule's min_age is the longest leaf the service hands out (meshca serve --max-leaf-ttl)
        when = self.now + delay if delay is not None else activation_allowed_at(self.now, self.policy.leaf_ttl)
        self.at(when, self.anchor_activate)

    def anchor_activate(self) -> None:
        if not self._when_up(self.anchor_activate):
            return
        service = self.service
        assert self.new_anchor is not None
        previous = service.anchor, service.anchor_key
        service.anchor, service.anchor_key = self.new_anchor
        if not all(r.ok for r in service.slots.replace(self.now, service.mint)):  # the new anchor expired already
            service.anchor, service.anchor_key = previous
            self.report.issuer_mint_failures += 1
            self.report.anchor_steps.append(("activate failed", self.now))
            return
        self.old_anchor = previous[0]
        self.report.issuer_rotations += 1
        self.activated_at = self.now
        self.report.anchor_steps.append(("activate", self.now))
        self.issuer_step()  # the new issuer has its own schedule
        delay = self.policy.retire_anchor_after
        if delay is not None:
            self.at(self.now + delay, self.anchor_retire)
        else:
            self.anchor_retire()

    def anchor_retire(self) -> None:
        if not self._when_up(self.anchor_retire):
            return
        old, activated = self.old_anchor, self.activated_at
        assert old is not None and activated is not None
        if self.policy.retire_anchor_after is None:  # as `meshca anchor retire` without --force
            active = self.service.slots.active
            check = retire_check(
                activated_at=activated,
                issuer_on_old_anchor=active is not None and chains_to(active.intermediates, old),
                leaves=[leaf for leaf in self.service.leaves if leaf[1] > self.now],
            )
            if not check.allows(self.now):
                assert check.safe_at is not None and not check.never
                self.at(max(check.safe_at, self.now + _MIN_STEP), self.anchor_retire)
                return
        self.service.set_bundle(self.service.bundle.without_anchor(old))
        self.report.anchor_rotations += 1
        self.report.anchor_steps.append(("retire", self.now))
        self.bundle_changed()

    # -- the handshakes

    def handshake_round(self) -> None:
        """Every workload dials every other one."""
        for client, server in itertools.permutations(self.workloads, 2):
            self.handshake(client, server)
        self.at(self.now + self.policy.handshake_every, self.handshake_round)

    def expired(self, w: _Workload, svid: X509Svid) -> None:
        if w.machine.snapshot.svid is svid:
            self.handshakes_with(w)

    def handshakes_with(self, w: _Workload) -> None:
        """``w`` changed its SVID or bundle: it dials every peer and every peer dials it (once all have started)."""
        if all(peer.machine.snapshot.svid is not None for peer in self.workloads):
            for peer in self.workloads:
                if peer is not w:
                    self.handshake(w, peer)
                    self.handshake(peer, w)

    def handshake(self, client: _Workload, server: _Workload) -> None:
        """Mutual TLS as SpiffeSSLContext does it: each side verifies the other's chain against its own bundle."""
        report = self.report
        report.handshakes += 1
        why = self._refusal(client, server)
        if why is not None:
            report.failed_handshakes += 1
            if report.first_failure is None:
                report.first_failure = Incident(self.now, "handshake", why, f"{client.name}->{server.name}")

    def _refusal(self, client: _Workload, server: _Workload) -> str | None:
        mine, theirs = client.machine.snapshot, server.machine.snapshot
        if mine.svid is None or theirs.svid is None:
            return f"{client.name if mine.svid is None else server.name} has no SVID"
        why = self.verdicts.check(theirs.svid.chain, mine.bundle, "server", self.now)
        if why is not None:
            return f"{client.name} refused {server.name}'s SVID: {why}"
        why = self.verdicts.check(mine.svid.chain, theirs.bundle, "client", self.now)
        if why is not None:
            return f"{server.name} refused {client.name}'s SVID: {why}"
        return None


def simulate(policy: Policy) -> Report:
    """Runs ``policy`` for its days on a simulated clock and reports what happened."""
    return _Simulation(policy).run()
