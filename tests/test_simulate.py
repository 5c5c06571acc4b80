"""`meshca simulate`: the simulation finds what a bad rotation policy breaks, and nothing in a good one."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from support.procs import Result, assert_clean_failure

from meshca.client._simulate import START, Outage, Policy, Report, _Simulation, _Verdicts, simulate
from meshca.pki._anchors import DEFAULT_RETIRE_GRACE
from meshca.pki._bundle import TrustBundle
from meshca.pki._errors import VerificationError
from meshca.pki._keys import generate_key
from meshca.pki._lifecycle import mint_issuer
from meshca.pki._profiles import build_anchor
from meshca.pki._rotation import RenewalPolicy
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._verify import verify_chain

H = timedelta(hours=1)
D = timedelta(days=1)


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _steps(report: Report) -> dict[str, datetime]:
    return dict(report.anchor_steps)


# -- the suite's year: an anchor rotation and an outage longer than half a leaf lifetime


def test_a_year_with_an_anchor_rotation_and_long_outages_fails_no_handshake() -> None:
    # Outages longer than half a leaf lifetime (the second one holds up the activation), with workloads
    # renewing at a third of the lifetime (± 0.1): a leaf has at least 13h36m left when its renewal falls
    # due, so however the outages fall against the renewals, none outlasts a leaf.
    outages = (Outage(100, 13 * H), Outage(181, 13 * H))
    renewal = RenewalPolicy(fraction=1 / 3)
    report = simulate(Policy(days=365, workloads=3, rotate_anchor_on_day=180, outages=outages, renewal=renewal))
    assert report.failed_handshakes == 0, report.failure
    assert not [f for f in report.findings if f["severity"] != "ok"]
    assert report.ok and report.failure is None
    assert report.handshakes > 365 * 24 * 6  # every hour, every ordered pair, and at every change
    assert report.anchor_rotations == 1
    assert 100 <= report.issuer_rotations <= 110  # every 3.5 days (SPIRE's schedule for a 7-day issuer)
    assert report.leaves_issued >= 3 * 2 * 364 and report.leaves_cut_short == 0
    assert report.fetch_failures > 0  # the outages were felt and ridden out
    steps = _steps(report)
    assert list(steps) == ["prepare", "activate", "retire"]
    assert steps["prepare"] == START + 180 * D
    # activation waits a whole leaf lifetime in the bundle (pki/_anchors), here also the end of the outage
    assert steps["activate"] == START + 181 * D + 13 * H
    # the old anchor goes once the last leaf that may chain to it has expired (the leaves fetched as the
    # outage ended came within the grace after activation, so the rule counts them)
    assert steps["activate"] < steps["retire"] <= steps["activate"] + 24 * H + DEFAULT_RETIRE_GRACE


def test_outages_within_the_budget_of_the_default_renewal_are_ridden_out() -> None:
    # renewal at 50% ± 10% of 24h: a leaf has at least 9h36m left when its renewal falls due
    outages = tuple(Outage(day, 9 * H) for day in (1, 2.3, 3.7, 4.45))
    report = simulate(Policy(days=6, workloads=4, outages=outages))
    assert report.ok, report.failure
    assert report.fetch_failures > 0
    assert not [f for f in report.findings if f["severity"] != "ok"]


def test_an_outage_longer_than_what_is_left_when_a_renewal_falls_due_expires_leaves() -> None:
    # Longer than half a leaf but shorter than a whole one: it begins just as the renewals fall due
    # (at exactly 60% of the lifetime here: no jitter), when the leaves have 9h36m left.
    renewal = RenewalPolicy(fraction=0.6, jitter=0.0)
    report = simulate(Policy(days=3, workloads=2, outages=(Outage(0.599, 13 * H),), renewal=renewal))
    assert not report.ok and report.failed_handshakes > 0
    warning = next(f for f in report.findings if f["rule"] == "outage")
    assert warning["severity"] == "warning" and "9h36m a leaf is sure to have left" in warning["message"]
    failure = report.as_json()["first_failure"]
    assert START + 24 * H < _time(failure["time"]) < START + 24 * H + timedelta(seconds=15)
    assert "leaf expired at" in failure["why"]


# -- bad policies


def test_an_outage_longer_than_the_remaining_leaf_lifetime_fails_handshakes() -> None:
    report = simulate(Policy(days=20, workloads=3, outages=(Outage(10, 30 * H),)))
    assert not report.ok
    assert report.failed_handshakes > 0
    failure = report.as_json()["first_failure"]
    assert failure["kind"] == "handshake"
    at = _time(failure["time"])
    # leaves renewed about every 12 h expire during the outage, at most 24 h after it began
    assert START + 10 * D + 12 * H < at <= START + 11 * D + 1 * H
    assert failure["day"] in (10, 11)
    # found the second the first leaf expired, not at the next round
    expired_at = (at - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "refused" in failure["why"] and f"leaf expired at {expired_at}" in failure["why"]
    assert "->" in failure["pair"]


def test_a_leaf_ttl_longer_than_the_issuer_ttl_fails_the_policy() -> None:
    report = simulate(Policy(days=15, workloads=2, leaf_ttl=10 * D, issuer_ttl=7 * D))
    assert not report.ok
    assert report.failed_handshakes == 0  # the issuer clamps every leaf: nothing breaks, but the TTL is a lie
    assert report.leaves_cut_short == report.leaves_issued > 0
    errors = [f for f in report.findings if f["severity"] == "error"]
    assert errors and "cut to 7d by the issuer chain (wanted 10d)" in errors[0]["message"]
    failure = report.as_json()["first_failure"]
    assert failure["kind"] == "policy"
    assert failure["day"] == 0 and failure["pair"] in ("w0", "w1")
    assert "cut to" in failure["why"] and "leaf TTL 10d" in failure["why"]


def test_leaves_longer_than_a_sixth_of_the_issuer_are_cut_at_handover_and_fail_the_policy() -> None:
    report = simulate(Policy(days=15, workloads=2, leaf_ttl=2 * D, issuer_ttl=7 * D))
    assert not report.ok and report.failed_handshakes == 0
    assert 0 < report.leaves_cut_short < report.leaves_issued  # only those signed close to a handover
    error = next(f for f in report.findings if f["severity"] == "error")
    assert error["rule"] == "issuer handover"
    assert "hands over with 28h of its life left" in error["message"]
    failure = report.as_json()["first_failure"]
    assert failure["kind"] == "policy" and failure["day"] >= 4  # the first handover comes at 5d20h
    # a sixth of the issuer TTL exactly: no leaf is cut, the policy holds
    fits = simulate(Policy(days=15, workloads=2, leaf_ttl=28 * H, issuer_ttl=7 * D))
    assert fits.ok and fits.leaves_cut_short == 0


def test_retiring_the_old_anchor_too_early_fails_handshakes() -> None:
    policy = Policy(days=20, workloads=3, rotate_anchor_on_day=10, retire_anchor_after=H)
    report = simulate(policy)
    assert not report.ok and report.failed_handshakes > 0
    steps = _steps(report)
    assert steps["retire"] == steps["activate"] + H
    failure = report.as_json()["first_failure"]
    # the workloads that get the shorter bundle first refuse the peers still holding old-anchor SVIDs,
    # until those hear of the change (within --bundle-delay) and renew under the new anchor
    assert steps["retire"] <= _time(failure["time"]) <= steps["retire"] + policy.bundle_delay
    assert "chain does not lead to an anchor of sim.example" in failure["why"]


def test_the_same_rotation_retiring_when_the_rules_allow_fails_nothing() -> None:
    report = simulate(Policy(days=20, workloads=3, rotate_anchor_on_day=10))
    assert report.ok, report.failure
    steps = _steps(report)
    assert steps["activate"] == steps["prepare"] + 24 * H
    # once every leaf issued before activation (and its grace) has expired: within a leaf lifetime
    assert steps["activate"] + 12 * H < steps["retire"] <= steps["activate"] + 24 * H + DEFAULT_RETIRE_GRACE


def test_an_anchor_outlived_fails_and_a_rotation_in_time_saves_it() -> None:
    expired = simulate(Policy(days=50, workloads=2, anchor_lifetime=40 * D))
    failure = expired.as_json()["first_failure"]
    assert failure["day"] == 40 and "expired" in failure["why"]
    assert expired.issuer_mint_failures > 0  # no issuer can be minted from an expired anchor
    rotated = simulate(Policy(days=50, workloads=2, anchor_lifetime=40 * D, rotate_anchor_on_day=20))
    assert rotated.ok, rotated.failure


def test_a_run_is_determined_by_its_seed() -> None:
    policy = Policy(days=12, workloads=3, rotate_anchor_on_day=3, outages=(Outage(5, 5 * H),), seed=7)
    assert simulate(policy).as_json() == simulate(policy).as_json()


# -- the verdict memo is the real verifier


def test_the_verdict_memo_agrees_with_verify_chain_at_every_time() -> None:
    td = TrustDomain.parse("sim.example")
    key, other_key = generate_key(), generate_key()
    anchor = build_anchor(key, td, now=START, lifetime=30 * D)
    other = build_anchor(other_key, td, now=START, lifetime=30 * D)
    bundle = TrustBundle(td, (anchor,))
    issuer = mint_issuer(anchor, key, bundle, now=START, ttl=7 * D)
    svid = issuer.sign(generate_key().public_key(), SpiffeId.parse("spiffe://sim.example/w"), now=START + D)
    chain = (svid.leaf, *svid.intermediates)
    bundles = [bundle, TrustBundle(td, (other,)), TrustBundle(td, (anchor, other)), TrustBundle(td, (anchor,))]
    verdicts = _Verdicts()
    times = [START + k * H for k in range(-2, 24 * 3, 5)] + [svid.not_after, svid.leaf.not_valid_before_utc]
    for at in times * 2:  # the second pass answers from the memo
        for b in bundles:
            for role in ("client", "server"):
                try:
                    verify_chain(list(chain), b, at=at, role=role)
                    expected = None
                except VerificationError as exc:
                    expected = str(exc)
                assert verdicts.check(chain, b, role, at) == expected, (at, b, role)


# -- the policy and the command line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "use DAY:DURATION"),
        ("x:1h", "is not a number"),
        ("-1:1h", "0 or more"),
        ("3:1x", "invalid duration"),
        ("3:0s", "must be positive"),
    ],
)
def test_outage_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Outage.parse(text)


def test_outage_parse() -> None:
    assert Outage.parse("30:13h") == Outage(30, 13 * H)
    assert str(Outage.parse("1.5:90m")) == "1.5:1h30m"


def test_json_shape(cli: Callable[..., Result]) -> None:
    result = cli("simulate", "--days", "3", "--workloads", "2", "--json")
    assert result.code == 0, result
    data = json.loads(result.stdout)
    assert {
        "ok",
        "policy",
        "handshakes",
        "failed_handshakes",
        "issuer_rotations",
        "anchor_rotations",
        "anchor_steps",
        "leaves_issued",
        "leaves_cut_short",
        "fetch_failures",
        "findings",
    } <= data.keys()
    assert "first_failure" not in data
    assert data["ok"] is True and data["failed_handshakes"] == 0 and data["handshakes"] > 0
    assert data["policy"]["issuer_ttl"] == "7d" and data["policy"]["leaf_ttl"] == "24h"
    assert data["policy"]["renew_at"] == 0.5


def test_a_failed_run_exits_1_with_its_first_failure(cli: Callable[..., Result]) -> None:
    result = cli("simulate", "--days", "4", "--workloads", "2", "--outage", "1:40h", "--json")
    assert result.code == 1, result
    failure = json.loads(result.stdout)["first_failure"]
    assert set(failure) == {"day", "time", "kind", "pair", "why"}
    assert failure["pair"] in ("w0->w1", "w1->w0")


def test_human_summary(cli: Callable[..., Result]) -> None:
    result = cli("simulate", "--days", "4", "--workloads", "2", "--leaf-ttl", "8d")
    assert result.code == 1, result
    assert "handshakes:" in result.stdout and "first failure: day 0" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--days", "30", "--outage", "400:1h"], "--outage 400:1h starts after the 30 simulated days"),
        (["--days", "30", "--outage", "soon"], "use DAY:DURATION"),
        (["--days", "0"], "--days must be between 1 and 3650"),
        (["--days", "3", "--workloads", "1"], "--workloads must be between 2 and 100"),
        (["--days", "30", "--rotate-anchor-on-day", "30"], "outside the 30 simulated days"),
        (["--days", "30", "--retire-anchor-after", "1h"], "need --rotate-anchor-on-day"),
        (["--days", "30", "--leaf-ttl", "0s"], "must be positive"),
        (["--days", "30", "--handshake-every", "10s"], "at least 1m"),
        (["--days", "30", "--renew-at", "0.95"], "--renew-at must be between 0.1 and 0.9"),
        (["--days", "3650", "--workloads", "100"], "handshakes would take too long"),
        # a day of 10 s leaves for 10 workloads ran for minutes; a year of them for hours
        (["--days", "365", "--leaf-ttl", "10s", "--issuer-ttl", "1m"], "leaves would take too long"),
        (["--days", "30", "--issuer-ttl", "30s"], "--issuer-ttl must be at least 1m"),
        ([], "--days"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli: Callable[..., Result], args: list[str], message: str) -> None:
    result = cli("simulate", *args)
    assert_clean_failure(result, 2)
    assert message in result.stderr


def test_the_installed_command(meshca_cmd: Callable[..., Result]) -> None:
    ok = meshca_cmd("simulate", "--days", "5", "--workloads", "3", "--rotate-anchor-on-day", "1", "--json")
    assert ok.code == 0, ok
    assert json.loads(ok.stdout)["anchor_rotations"] == 1
    bad = meshca_cmd(
        "simulate", "--days", "5", "--workloads", "3", "--rotate-anchor-on-day", "1", "--retire-anchor-after", "10m"
    )
    assert bad.code == 1, bad
    assert "first failure: day 2" in bad.stdout and bad.stderr == ""


def test_short_issuers_are_stepped_as_serve_steps_them() -> None:
    """Issuer steps came at least a minute apart, so 2-minute issuers (prepared at 60 s, switched at 100 s) were
    switched late and most leaves were cut short, for a policy serve keeps whole (its poll is 1 s)."""
    policy = Policy(days=1, issuer_ttl=timedelta(minutes=2), leaf_ttl=timedelta(seconds=20), workloads=2)
    sim = _Simulation(policy)
    sim.end = START + timedelta(minutes=20)
    report = sim.run()
    assert report.failed_handshakes == 0 and report.issuer_rotations >= 19
    # only a leaf issued in the second before a switch can lose that second
    assert report.leaves_cut_short <= report.leaves_issued // 10, (report.leaves_cut_short, report.leaves_issued)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "the trust anchor expires on day 2 and no anchor rotation is planned before it"),
        ({"rotate_anchor_on_day": 1}, "expires on day 3 and the simulation plans no rotation of the anchor that"),
    ],
)
def test_an_anchor_that_expires_within_the_simulation_is_a_finding(extra: dict[str, float], message: str) -> None:
    """The handshakes fail from that day on; the report now also says why, as a policy error."""
    policy = Policy(days=4, anchor_lifetime=timedelta(days=2), workloads=2, **extra)  # type: ignore[arg-type]
    report = simulate(policy)
    [finding] = [f for f in report.as_json()["findings"] if f["rule"] == "anchor lifetime"]
    assert finding["severity"] == "error" and message in finding["message"], finding
    assert not report.ok and report.failed_handshakes > 0


def test_an_anchor_that_outlives_the_simulation_is_no_finding() -> None:
    report = simulate(Policy(days=2, anchor_lifetime=timedelta(days=2), workloads=2))
    assert [f for f in report.as_json()["findings"] if f["rule"] == "anchor lifetime"] == []
