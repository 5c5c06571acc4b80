"""SPIFFE IDs and trust domains: strict parsing, no normalisation, value semantics."""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

import meshca
from meshca import InvalidSpiffeId, SpiffeId, TrustDomain

LONG_PATH = "/" + "a" * (2048 - len("spiffe://example.org/") + 1)  # one byte over the limit
EXACT_PATH = "/" + "a" * (2048 - len("spiffe://example.org/"))  # exactly 2048 bytes in all

# (input, distinctive part of the message)
MALFORMED_IDS: list[tuple[object, str]] = [
    # scheme
    ("SPIFFE://example.org/web", "lower-case 'spiffe'"),
    ("Spiffe://example.org/web", "lower-case 'spiffe'"),
    ("https://example.org/web", "scheme must be 'spiffe', got 'https'"),
    ("spiffe+tls://example.org/web", "scheme must be 'spiffe'"),
    ("example.org/web", "must start with 'spiffe://'"),
    ("//example.org/web", "must start with 'spiffe://'"),
    ("spiffe:example.org/web", "must start with 'spiffe://'"),
    ("", "SPIFFE ID is empty"),
    # trust domain
    ("spiffe:///web", "trust domain is empty"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe://Example.org/web", "upper-case letter 'E'"),
    ("spiffe://example.ORG", "upper-case letter 'O'"),
    ("spiffe://exa mple.org/web", "trust domain has the character ' '"),
    ("spiffe://example!.org/web", "trust domain has the character '!'"),
    ("spiffe://exämple.org/web", "trust domain has the character 'ä'"),
    ("spiffe://example.org:8080/web", "trust domain has a port"),
    ("spiffe://example.org:/web", "trust domain has a port"),
    ("spiffe://user@example.org/web", "trust domain has userinfo"),
    ("spiffe://example.org?x=1", "trust domain has a query"),
    ("spiffe://example.org#frag", "trust domain has a fragment"),
    ("spiffe://example%2eorg/web", "trust domain has percent-encoding"),
    ("spiffe://example.org\n", r"trust domain has the character '\n'"),
    ("spiffe://" + "a" * 256 + "/web", "trust domain is longer than 255 bytes"),
    # path
    ("spiffe://example.org//web", "empty segment"),
    ("spiffe://example.org/ns//web", "empty segment"),
    ("spiffe://example.org/./web", "'.' segment"),
    ("spiffe://example.org/ns/.", "'.' segment"),
    ("spiffe://example.org/../web", "'..' segment"),
    ("spiffe://example.org/ns/..", "'..' segment"),
    ("spiffe://example.org/", "trailing slash"),
    ("spiffe://example.org/ns/web/", "trailing slash"),
    ("spiffe://example.org/web server", "path has the character ' '"),
    ("spiffe://example.org/web*", "path has the character '*'"),
    ("spiffe://example.org/a\\b", r"path has the character '\\'"),
    ("spiffe://example.org/café", "path has the character 'é'"),
    ("spiffe://example.org/web:8080", "path has a port"),
    ("spiffe://example.org/a@b", "path has userinfo"),
    ("spiffe://example.org/web%20server", "path has percent-encoding"),
    ("spiffe://example.org/web%2F", "path has percent-encoding"),
    ("spiffe://example.org/web?x=1", "path has a query"),
    ("spiffe://example.org/web#frag", "path has a fragment"),
    ("spiffe://example.org/web\n", r"path has the character '\n'"),
    ("spiffe://example.org/web\r\n", r"path has the character '\r'"),
    (" spiffe://example.org/web", "got ' spiffe'"),
    ("spiffe://example.org/web ", "path has the character ' '"),
    # length: measured in bytes, not characters
    ("spiffe://example.org" + LONG_PATH, "longer than 2048 bytes"),
    ("spiffe://example.org/" + "é" * 1020, "longer than 2048 bytes"),
    # not a str
    (b"spiffe://example.org/web", "must be a str, not bytes"),
    (None, "must be a str, not NoneType"),
    (42, "must be a str, not int"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED_IDS, ids=[repr(t)[:60] for t, _ in MALFORMED_IDS])
def test_malformed_spiffe_ids_are_rejected_with_a_reason(text: object, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)  # type: ignore[arg-type]
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, meshca.MeshcaError)


def test_error_message_is_a_single_line_even_for_control_characters() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse("spiffe://example.org/web\n")
    assert "\n" not in str(info.value)


VALID_IDS: list[tuple[str, str, str]] = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/web", "example.org", "/web"),
    ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
    ("spiffe://a", "a", ""),
    ("spiffe://my-td_1.example.org/Svc-A_b.c/x", "my-td_1.example.org", "/Svc-A_b.c/x"),
    ("spiffe://example.org/...", "example.org", "/..."),
    ("spiffe://example.org/.hidden/..x", "example.org", "/.hidden/..x"),
    ("spiffe://1.2.3.4/web", "1.2.3.4", "/web"),
    ("spiffe://example.org" + EXACT_PATH, "example.org", EXACT_PATH),
    ("spiffe://" + "a" * 255 + "/web", "a" * 255, "/web"),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), VALID_IDS, ids=[t[:60] for t, _, _ in VALID_IDS])
def test_valid_spiffe_ids(text: str, trust_domain: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(trust_domain)
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert repr(sid) == f"SpiffeId({text!r})"


def test_exactly_2048_bytes_is_allowed_and_2049_is_not() -> None:
    ok = "spiffe://example.org" + EXACT_PATH
    assert len(ok.encode()) == 2048
    SpiffeId.parse(ok)
    with pytest.raises(InvalidSpiffeId, match="2048"):
        SpiffeId.parse(ok + "a")


# -- trust domains

VALID_TRUST_DOMAINS = [
    ("example.org", "example.org"),
    ("spiffe://example.org", "example.org"),
    ("a", "a"),
    ("my-td_1.example.org", "my-td_1.example.org"),
    ("123", "123"),
]


@pytest.mark.parametrize(("text", "name"), VALID_TRUST_DOMAINS)
def test_trust_domain_parse(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td) == name
    assert td == TrustDomain(name)
    assert td.id == SpiffeId.parse(f"spiffe://{name}")
    assert repr(td) == f"TrustDomain({name!r})"


MALFORMED_TRUST_DOMAINS: list[tuple[object, str]] = [
    ("", "trust domain is empty"),
    ("Example.org", "upper-case letter 'E'"),
    ("example.org:443", "a port"),
    ("user@example.org", "userinfo"),
    ("example.org/", "the character '/'"),
    ("example.org/web", "the character '/'"),
    ("exa mple.org", "the character ' '"),
    ("example.org\n", r"the character '\n'"),
    ("a" * 256, "longer than 255 bytes"),
    ("spiffe://example.org/web", "a trust domain has no path"),
    ("spiffe://Example.org", "upper-case letter"),
    ("SPIFFE://example.org", "lower-case 'spiffe'"),
    ("https://example.org", "scheme must be 'spiffe'"),
    ("spiffe://", "trust domain is empty"),
    (b"example.org", "must be a str, not bytes"),
    (None, "must be a str"),
]


@pytest.mark.parametrize(
    ("text", "reason"), MALFORMED_TRUST_DOMAINS, ids=[repr(t)[:40] for t, _ in MALFORMED_TRUST_DOMAINS]
)
def test_malformed_trust_domains(text: object, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        TrustDomain.parse(text)  # type: ignore[arg-type]
    assert reason in str(info.value)


@pytest.mark.parametrize("name", ["Example.org", "", "a b", "example.org:1"])
def test_trust_domain_constructor_checks_too(name: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        TrustDomain(name)


def test_spiffe_id_constructor_checks_its_parts() -> None:
    td = TrustDomain("example.org")
    assert SpiffeId(td, "/web") == SpiffeId.parse("spiffe://example.org/web")
    assert td.spiffe_id("/web") == SpiffeId.parse("spiffe://example.org/web")
    with pytest.raises(InvalidSpiffeId, match="must start with '/'"):
        SpiffeId(td, "web")
    with pytest.raises(InvalidSpiffeId, match="trailing slash"):
        SpiffeId(td, "/web/")
    with pytest.raises(InvalidSpiffeId, match=r"'\.\.' segment"):
        td.spiffe_id("/a/../b")
    with pytest.raises(InvalidSpiffeId, match="must be a TrustDomain"):
        SpiffeId("example.org", "/web")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpiffeId, match="longer than 2048"):
        SpiffeId(td, LONG_PATH)


def test_member_of() -> None:
    sid = SpiffeId.parse("spiffe://example.org/web")
    assert sid.member_of(TrustDomain("example.org"))
    assert not sid.member_of(TrustDomain("example.com"))


# -- value semantics


def test_equal_only_to_own_type() -> None:
    text = "spiffe://example.org/web"
    sid = SpiffeId.parse(text)
    assert sid != text
    assert text != sid
    assert sid.__eq__(text) is NotImplemented
    td = TrustDomain("example.org")
    assert td != "example.org"
    assert td.__eq__("example.org") is NotImplemented
    assert td != td.id
    assert td.id != td


def test_hashable_and_usable_as_keys() -> None:
    a = SpiffeId.parse("spiffe://example.org/web")
    b = SpiffeId.parse("spiffe://example.org/web")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, SpiffeId.parse("spiffe://example.org/db")}) == 2
    assert {TrustDomain("example.org"): 1}[TrustDomain.parse("spiffe://example.org")] == 1


def test_immutable() -> None:
    sid = SpiffeId.parse("spiffe://example.org/web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.path = "/db"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.trust_domain = TrustDomain("evil.org")  # type: ignore[misc]
    td = TrustDomain("example.org")
    with pytest.raises(dataclasses.FrozenInstanceError):
        td.name = "evil.org"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        sid.extra = 1  # type: ignore[attr-defined]
    assert str(sid) == "spiffe://example.org/web"
    assert str(td) == "example.org"


# -- properties

TD_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
PATH_ALPHABET = string.ascii_letters + string.digits + ".-_"

trust_domains = st.text(alphabet=TD_ALPHABET, min_size=1, max_size=63)
segments = st.text(alphabet=PATH_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=8).map(lambda segs: "".join("/" + s for s in segs))


@given(trust_domains, paths)
def test_round_trip_of_valid_ids(td: str, path: str) -> None:
    text = f"spiffe://{td}{path}"
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert hash(SpiffeId.parse(text)) == hash(sid)
    assert sid != text
    assert SpiffeId(TrustDomain(td), path) == sid


@given(trust_domains)
def test_round_trip_of_trust_domains(td: str) -> None:
    parsed = TrustDomain.parse(td)
    assert str(parsed) == td
    assert TrustDomain.parse(f"spiffe://{td}") == parsed
    assert TrustDomain.parse(str(parsed.id)) == parsed
    assert parsed != td


@given(st.text(max_size=80))
def test_anything_accepted_is_already_canonical(text: str) -> None:
    """No normalisation: whatever parses prints back exactly as given."""
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(sid) == text


@given(trust_domains, paths, st.sampled_from(list("ABCXYZ:@?#%/ \n\t\\é")))
def test_one_bad_character_in_the_trust_domain_is_rejected(td: str, path: str, bad: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(f"spiffe://{td}{bad}x{path}" if bad != "/" else f"spiffe://{bad}{td}{path}")


@given(trust_domains, paths, st.sampled_from(list(":@?#% \n\t\\é*+!~")))
def test_one_bad_character_in_the_path_is_rejected(td: str, path: str, bad: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(f"spiffe://{td}{path}/a{bad}b")


@pytest.mark.parametrize(
    ("text", "reserved"),
    [
        ("spiffe://example.org/meshca", True),
        ("spiffe://example.org/meshca/identity", True),
        ("spiffe://example.org/meshca/agent/node-1", True),
        ("spiffe://example.org/meshcax", False),
        ("spiffe://example.org/ns/meshca/sa/web", False),
        ("spiffe://example.org/Meshca/identity", False),
        ("spiffe://example.org", False),
    ],
)
def test_reserved_ids(text: str, reserved: bool) -> None:
    assert SpiffeId.parse(text).reserved is reserved
