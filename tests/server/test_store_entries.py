"""Registration entries and published JWT keys in the store: the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshca import SpiffeId, StoreError, TrustDomain
from meshca.server._entries import RegistrationEntry, new_entry
from meshca.server._store import JwtPublicKey, Store, open_store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
NODE_1 = TD.agent_id("node-1")
NODE_2 = TD.agent_id("node-2")


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Store]]:
    """Two store objects on one database (two replicas); closed afterwards."""
    url = f"sqlite://{tmp_path}/meshca.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    opened = [open_store(url, tmp_path), open_store(url, tmp_path)]
    yield opened
    for store in opened:
        store.close()


def entry(path: str, *, parent: SpiffeId | None = None, at: datetime = NOW, **kwargs: object) -> RegistrationEntry:
    return new_entry(
        TD,
        TD.spiffe_id(path),
        kwargs.pop("selectors", ["unix:uid:1000"]),  # type: ignore[arg-type]
        now=at,
        parent=parent,
        max_x509_ttl=timedelta(days=90),
        **kwargs,  # type: ignore[arg-type]
    )


def test_an_entry_reads_back_as_written_on_every_replica(stores: list[Store]) -> None:
    written = entry(
        "/web",
        parent=NODE_1,
        selectors=["unix:uid:1000", "unix:path:/usr/bin/web:v2", "unix:group:www"],
        x509_ttl=timedelta(hours=2),
        jwt_ttl=timedelta(minutes=10),
        dns_names=["web.example.org", "web"],
    )
    assert written.selectors == ("unix:group:www", "unix:path:/usr/bin/web:v2", "unix:uid:1000")  # sorted
    stores[0].add_entry(written)
    assert stores[1].get_entry(written.id) == written
    assert stores[1].entries() == [written]
    assert stores[1].get_entry("no-such-entry") is None


def test_entries_by_parent_are_the_agents_own_and_those_of_no_parent(stores: list[Store]) -> None:
    mine = entry("/mine", parent=NODE_1, at=NOW)
    anyone = entry("/anyone", at=NOW + timedelta(seconds=1))
    theirs = entry("/theirs", parent=NODE_2, at=NOW + timedelta(seconds=2))
    for e in (mine, anyone, theirs):
        stores[0].add_entry(e)
    assert stores[1].entries(NODE_1) == [mine, anyone]
    assert stores[1].entries(NODE_2) == [anyone, theirs]
    assert stores[1].entries(TD.agent_id("node-3")) == [anyone]
    assert stores[1].entries() == [mine, anyone, theirs]  # oldest first


def test_delete_says_whether_the_entry_existed(stores: list[Store]) -> None:
    e = entry("/web")
    stores[0].add_entry(e)
    assert stores[1].delete_entry(e.id) is True
    assert stores[0].delete_entry(e.id) is False
    assert stores[0].entries() == []


def test_an_entry_id_is_stored_once(stores: list[Store]) -> None:
    e = entry("/web")
    stores[0].add_entry(e)
    with pytest.raises(StoreError, match="cannot store the registration entry"):
        stores[1].add_entry(e)


def key(kid: str, not_after: datetime, *, at: datetime = NOW, writer: str = "w1") -> JwtPublicKey:
    return JwtPublicKey(kid, writer, f'{{"kid": "{kid}", "use": "jwt-svid"}}', not_after, at)


def test_published_keys_of_every_replica_are_read_until_their_not_after(stores: list[Store]) -> None:
    a, b = key("a", NOW + timedelta(hours=1), writer="w1"), key("b", NOW + timedelta(hours=2), writer="w2")
    stores[0].publish_jwt_key(a)
    stores[1].publish_jwt_key(b)
    for store in stores:
        found = store.jwt_keys(NOW)
        assert [(k.kid, k.writer, k.not_after) for k in found] == [("a", "w1", a.not_after), ("b", "w2", b.not_after)]
        assert {k.kid: k.jwk for k in found}["a"].replace(" ", "") == '{"kid":"a","use":"jwt-svid"}'
    assert [k.kid for k in stores[0].jwt_keys(NOW + timedelta(hours=1))] == ["b"]  # a's not_after passed
    assert stores[0].jwt_keys(NOW + timedelta(hours=2)) == []


def test_publishing_again_extends_a_key_and_drops_expired_ones(stores: list[Store]) -> None:
    stores[0].publish_jwt_key(key("old", NOW + timedelta(minutes=1)))
    stores[0].publish_jwt_key(key("a", NOW + timedelta(hours=1)))
    later = NOW + timedelta(minutes=30)
    stores[1].publish_jwt_key(key("a", NOW + timedelta(hours=3), at=later))
    assert [(k.kid, k.not_after) for k in stores[0].jwt_keys(later)] == [("a", NOW + timedelta(hours=3))]
    # "old" is gone from the table, not just filtered: nothing is left to read even in the past
    assert [k.kid for k in stores[0].jwt_keys(NOW - timedelta(days=1))] == ["a"]
