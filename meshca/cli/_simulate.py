"""`meshca simulate`: run a rotation policy on a simulated clock and report the handshakes that failed."""

from __future__ import annotations

import argparse

from meshca.cli._options import CliError, add_duration, add_json, add_leaf_ttl, emit
from meshca.client._simulate import BUNDLE_DELAY, DEFAULT_ISSUER_TTL, HANDSHAKE_EVERY, Outage, Policy, simulate
from meshca.pki._profiles import ANCHOR_LIFETIME
from meshca.pki._rotation import DEFAULT_POLICY, RenewalPolicy
from meshca.pki._time import Clock


def _outage(text: str) -> Outage:
    try:
        return Outage.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="try a rotation policy on a simulated clock: issuers, anchors, renewals, handshakes",
        description="Runs meshca's issuance, issuer rotation, anchor rotation and client renewal code on a "
        "simulated clock, with workloads handshaking with each other every --handshake-every and at every change. "
        "Exit 0 when no handshake failed and the lifetimes break no rule, 1 otherwise.",
    )
    p.add_argument("--days", type=int, required=True, metavar="N", help="how many days to simulate (1 to 3650)")
    add_duration(p, "--anchor-lifetime", ANCHOR_LIFETIME, "lifetime of each trust anchor")
    add_duration(p, "--issuer-ttl", DEFAULT_ISSUER_TTL, "lifetime of each managed issuer")
    add_leaf_ttl(p, "lifetime of each workload SVID")
    p.add_argument("--workloads", type=int, default=10, metavar="N", help="workloads handshaking (default 10)")
    p.add_argument(
        "--rotate-anchor-on-day",
        type=float,
        metavar="K",
        help="prepare a new trust anchor on day K (days count from 0); it is activated and the old one retired "
        "as soon as the rules allow, unless the two options below say when",
    )
    add_duration(p, "--activate-anchor-after", None, "activate the new anchor this long after preparing it")
    add_duration(p, "--retire-anchor-after", None, "retire the old anchor this long after activating the new one")
    p.add_argument(
        "--outage",
        type=_outage,
        action="append",
        default=[],
        metavar="DAY:DURATION",
        help="the identity service is down from day DAY for DURATION (repeatable), as 30:13h",
    )
    add_duration(p, "--handshake-every", HANDSHAKE_EVERY, "how often every workload dials every other one")
    add_duration(p, "--bundle-delay", BUNDLE_DELAY, "a bundle change reaches each workload within this")
    p.add_argument(
        "--renew-at",
        type=float,
        default=DEFAULT_POLICY.fraction,
        metavar="FRACTION",
        help="workloads renew at this fraction of their SVID's lifetime, ± 0.1 (SvidSource's "
        "RenewalPolicy(fraction=...); default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the workloads' jitter (default 0)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, clock: Clock) -> int:
    if not DEFAULT_POLICY.jitter < args.renew_at < 1 - DEFAULT_POLICY.jitter:
        raise CliError(f"--renew-at must be between {DEFAULT_POLICY.jitter} and {1 - DEFAULT_POLICY.jitter}", 2)
    try:
        policy = Policy(
            days=args.days,
            anchor_lifetime=args.anchor_lifetime,
            issuer_ttl=args.issuer_ttl,
            leaf_ttl=args.leaf_ttl,
            workloads=args.workloads,
            rotate_anchor_on_day=args.rotate_anchor_on_day,
            activate_anchor_after=args.activate_anchor_after,
            retire_anchor_after=args.retire_anchor_after,
            outages=tuple(args.outage),
            handshake_every=args.handshake_every,
            bundle_delay=args.bundle_delay,
            seed=args.seed,
            renewal=RenewalPolicy(fraction=args.renew_at),
        )
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    report = simulate(policy)
    emit(args, report.as_json(), report.summary())
    return 0 if report.ok else 1
