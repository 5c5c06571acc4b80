"""Registration entry rules (server/_entries.py): selectors, DNS names, the entry as checked once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meshca import InvalidRequest, PermissionDenied, SpiffeId, TrustDomain
from meshca.server import new_entry, parse_selector
from meshca.server._entries import MAX_SELECTORS, check_dns_name
from meshca.server._pipeline import refuse_service_names

TD = TrustDomain("example.org")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "selector",
    [
        "unix:uid:0",
        "unix:uid:4294967295",
        "unix:gid:1000",
        "unix:user:www-data",
        "unix:user:svc.web",
        "unix:group:_staff",
        "unix:user:MACHINE$",
        "unix:path:/usr/bin/web",
        "unix:path:/opt/app:v2/bin/run",  # a path may hold ':'
    ],
)
def test_known_selectors_are_kept_as_written(selector: str) -> None:
    assert parse_selector(selector) == selector


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("", "is not TYPE:KEY:VALUE"),
        ("unix:uid", "is not TYPE:KEY:VALUE"),
        ("unix:uid:", "is not TYPE:KEY:VALUE"),
        (":uid:1", "is not TYPE:KEY:VALUE"),
        ("unix:pid:1", "is of no known kind"),
        ("UNIX:uid:1", "is of no known kind"),
        ("k8s:ns:default", "is of no known kind"),
        ("unix:uid:01", "a decimal user id"),
        ("unix:uid:+1", "a decimal user id"),
        ("unix:uid:4294967296", "a decimal user id"),
        ("unix:gid:x", "a decimal group id"),
        ("unix:user:-rf", "a user name"),
        ("unix:user:a/b", "a user name"),
        ("unix:group:" + "g" * 65, "a group name"),
        ("unix:path:relative/bin", "an absolute executable path"),
        ("unix:path:/bin/\x00x", "an absolute executable path"),
        # /proc/PID/exe is always canonical: these would match no process, ever
        ("unix:path:/usr/bin/../bin/web", "an absolute executable path"),
        ("unix:path:/usr/./bin/web", "an absolute executable path"),
        ("unix:path:/usr//bin/web", "an absolute executable path"),
        ("unix:path:/usr/bin/web/", "an absolute executable path"),
        ("unix:path:/usr/bin/web (deleted)", "an absolute executable path"),
    ],
)
def test_bad_selectors_are_refused_saying_why(selector: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        parse_selector(selector)


@pytest.mark.parametrize("name", ["web", "web.example.org", "*.example.org", "a-b.c0"])
def test_dns_names(name: str) -> None:
    assert check_dns_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "-web", "web-", "a..b", "a.*.b", "web_1", "x" * 64, "é.org"])
def test_bad_dns_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="is not a lower-case host name"):
        check_dns_name(name)


def test_an_entry_has_sorted_unique_selectors_unique_names_and_zero_for_default_lifetimes() -> None:
    entry = new_entry(
        TD,
        TD.spiffe_id("/web"),
        ["unix:uid:1", "unix:gid:2", "unix:uid:1"],
        now=NOW,
        dns_names=["b.org", "a.org", "b.org"],
        max_x509_ttl=timedelta(days=1),
    )
    assert entry.selectors == ("unix:gid:2", "unix:uid:1")
    assert entry.dns_names == ("b.org", "a.org")  # the first is the leaf's CN: order kept
    assert (entry.x509_ttl, entry.jwt_ttl, entry.parent, entry.created_at) == (timedelta(), timedelta(), None, NOW)
    assert entry.served_by(TD.agent_id("any"))
    other = new_entry(TD, TD.spiffe_id("/web"), ["unix:uid:1"], now=NOW, max_x509_ttl=timedelta(days=1))
    assert other.id != entry.id and len(entry.id) == 32


def test_an_entry_with_a_parent_is_served_by_that_agent_only() -> None:
    entry = new_entry(
        TD, TD.spiffe_id("/web"), ["unix:uid:1"], now=NOW, parent=TD.agent_id("n1"), max_x509_ttl=timedelta(days=1)
    )
    assert entry.served_by(TD.agent_id("n1"))
    assert not entry.served_by(TD.agent_id("n2"))


def test_selector_and_lifetime_limits() -> None:
    many = [f"unix:uid:{n}" for n in range(MAX_SELECTORS + 1)]
    with pytest.raises(InvalidRequest, match=f"at most {MAX_SELECTORS} selectors"):
        new_entry(TD, TD.spiffe_id("/web"), many, now=NOW, max_x509_ttl=timedelta(days=1))
    with pytest.raises(InvalidRequest, match="at least one selector"):
        new_entry(TD, TD.spiffe_id("/web"), [], now=NOW, max_x509_ttl=timedelta(days=1))
    with pytest.raises(InvalidRequest, match="above the maximum 86400s"):
        new_entry(
            TD,
            TD.spiffe_id("/web"),
            ["unix:uid:1"],
            now=NOW,
            x509_ttl=timedelta(days=2),
            max_x509_ttl=timedelta(days=1),
        )


@pytest.mark.parametrize(
    ("text", "agent"),
    [
        ("spiffe://example.org/meshca/agent/n1", True),
        ("spiffe://example.org/meshca/agent", False),
        ("spiffe://example.org/meshca/agent/n1/x", False),
        ("spiffe://example.org/meshca/agents/n1", False),
        ("spiffe://example.org/meshca/identity", False),
        ("spiffe://example.org/ns/meshca/agent/n1", False),
    ],
)
def test_agent_ids(text: str, agent: bool) -> None:
    assert SpiffeId.parse(text).is_agent is agent


@pytest.mark.parametrize("name", ["", "a/b"])
def test_an_agent_name_is_one_segment(name: str) -> None:
    with pytest.raises(ValueError, match="one non-empty path segment"):
        TD.agent_id(name)


@pytest.mark.parametrize(
    ("name", "server_names", "refused"),
    [
        ("localhost", ("localhost",), True),
        ("LOCALHOST", ("localhost",), True),
        ("meshca.example.org", ("meshca.example.org.",), True),
        ("*.example.org", ("meshca.example.org",), True),
        ("meshca.example.org", ("*.example.org",), True),
        ("*.example.org", ("a.b.example.org",), False),  # a wildcard is one label
        ("*.example.org", ("example.org",), False),
        ("web.example.org", ("meshca.example.org",), False),
        ("localhost.example.org", ("localhost",), False),
    ],
)
def test_no_svid_carries_a_name_of_the_service(name: str, server_names: tuple[str, ...], refused: bool) -> None:
    if refused:
        with pytest.raises(PermissionDenied, match="the identity service's own"):
            refuse_service_names([name], server_names)
    else:
        refuse_service_names([name], server_names)
