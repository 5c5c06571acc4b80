"""The issuance log's hash chains and signed checkpoints: every kind of tampering is named."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from meshca import generate_key
from meshca.server._audit import (
    GENESIS,
    LEGACY,
    ChainWriter,
    LoggedRecord,
    legacy_links,
    record_hash,
    sign_checkpoint,
    verify_log,
)
from meshca.server._store import IssuanceRecord

T0 = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
KEY = generate_key()


def _record(i: int) -> IssuanceRecord:
    at = T0 + timedelta(seconds=i, microseconds=7 * i)
    return IssuanceRecord(
        f"{i:032x}", f"spiffe://example.org/w{i}", at + timedelta(hours=24), "join-token:ab", "native", at
    )


def _chain(n: int, writer: str = "w1") -> list[LoggedRecord]:
    chain = ChainWriter(writer)
    out = []
    for i in range(1, n + 1):
        link = chain.link(_record(i))
        chain.commit(link)
        out.append(LoggedRecord(_record(i), link))
    return out


def _signed(chain: list[LoggedRecord], upto: int | None = None) -> list:
    head = chain[(upto or len(chain)) - 1].link
    return [sign_checkpoint(KEY, head.writer, head.seq, head.hash, T0 + timedelta(minutes=1))]


def _relink(item: LoggedRecord, **changes: object) -> LoggedRecord:
    return dataclasses.replace(item, link=dataclasses.replace(item.link, **changes))


def test_an_intact_log_verifies() -> None:
    chain = _chain(10)
    report = verify_log(chain, _signed(chain), KEY.public_key())
    assert report.ok, report.findings
    assert (report.records, report.writers, report.checkpoints, report.unchecked) == (10, 1, 1, 0)


def test_records_after_the_last_checkpoint_are_chained_but_unchecked() -> None:
    chain = _chain(10)
    report = verify_log(chain, _signed(chain, upto=7), KEY.public_key())
    assert report.ok and report.unchecked == 3


def test_several_writers_keep_their_own_chains() -> None:
    a, b = _chain(5, "a"), _chain(4, "b")
    report = verify_log([*a, *b], [*_signed(a), *_signed(b)], KEY.public_key())
    assert report.ok and report.writers == 2


def test_the_chain_and_a_record_survive_a_float_round_trip_of_times() -> None:
    record = _record(3)
    stored = dataclasses.replace(
        record,
        issued_at=datetime.fromtimestamp(record.issued_at.timestamp(), UTC),
        not_after=datetime.fromtimestamp(record.not_after.timestamp(), UTC),
    )
    assert record_hash(stored, "w", GENESIS) == record_hash(record, "w", GENESIS)


def _tampered(kind: str) -> list[LoggedRecord]:
    chain = _chain(10)
    if kind == "edited":
        chain[3] = dataclasses.replace(chain[3], record=dataclasses.replace(chain[3].record, principal="someone-else"))
    elif kind == "edited-and-rehashed":
        record = dataclasses.replace(chain[3].record, spiffe_id="spiffe://example.org/admin")
        chain[3] = LoggedRecord(record, _relink(chain[3], hash=record_hash(record, "w1", chain[3].link.prev)).link)
    elif kind == "deleted":
        del chain[3]
    elif kind == "inserted":  # a forged record between 4 and 5, later records renumbered
        forged = _record(99)
        link = dataclasses.replace(chain[3].link, seq=5, prev=chain[3].link.hash)
        link = dataclasses.replace(link, hash=record_hash(forged, "w1", link.prev))
        chain = [*chain[:4], LoggedRecord(forged, link), *(_relink(i, seq=i.link.seq + 1) for i in chain[4:])]
    elif kind == "inserted-at-end":
        forged = _record(99)
        prev = chain[3].link.hash
        chain.append(
            LoggedRecord(
                forged, dataclasses.replace(chain[3].link, seq=11, prev=prev, hash=record_hash(forged, "w1", prev))
            )
        )
    elif kind == "reordered":
        chain[3], chain[5] = _relink(chain[3], seq=6), _relink(chain[5], seq=4)
    return chain


@pytest.mark.parametrize(
    ("kind", "finding", "seq"),
    [
        ("edited", "edited", 4),
        ("edited-and-rehashed", "edited", 4),
        ("deleted", "deleted", 4),
        ("inserted", "inserted", 5),
        ("inserted-at-end", "inserted", 11),
        ("reordered", "reordered", 6),  # the record the signed chain puts 4th is stored as 6th
    ],
)
def test_tampering_is_named_at_the_first_damaged_record(kind: str, finding: str, seq: int) -> None:
    original = _chain(10)
    report = verify_log(_tampered(kind), _signed(original), KEY.public_key())
    assert not report.ok
    first = report.findings[0]
    assert (first.kind, first.seq) == (finding, seq), report.findings


def test_a_forged_checkpoint_is_refused() -> None:
    chain = _chain(5)
    (good,) = _signed(chain)
    opening = sign_checkpoint(KEY, "w1", 0, GENESIS, T0)  # what every writer signs before its first record
    forged = dataclasses.replace(good, seq=4, head=chain[3].link.hash)
    report = verify_log(chain, [opening, forged], KEY.public_key())
    assert [(f.kind, f.seq) for f in report.findings] == [("checkpoint", 4)]
    other_key = generate_key()
    assert not verify_log(chain, [good], other_key.public_key()).ok


def test_a_chain_whose_writer_never_signed_is_forged() -> None:
    real = _chain(3)
    made_up = _chain(4, "w2")  # anyone can hash a chain; only the key holder can sign one
    report = verify_log([*real, *made_up], _signed(real), KEY.public_key())
    assert [(f.kind, f.writer, f.seq) for f in report.findings] == [("inserted", "w2", 1)]
    assert "never signed" in report.findings[0].detail


def test_legacy_records_are_counted_and_sealed() -> None:
    records = [_record(i) for i in range(1, 6)]
    legacy = [LoggedRecord(r, ln) for r, ln in zip(records, legacy_links(records), strict=True)]
    unsealed = verify_log(legacy, [], KEY.public_key())
    assert unsealed.ok and (unsealed.legacy, unsealed.unchecked) == (5, 5)
    seal = sign_checkpoint(KEY, LEGACY, 5, legacy[-1].link.hash, T0)
    sealed = verify_log(legacy, [seal], KEY.public_key())
    assert sealed.ok and (sealed.legacy, sealed.unchecked) == (5, 0)
    # The legacy chain never grows: a record hashed onto it after the seal is forged.
    forged = _record(6)
    link = ChainWriter(LEGACY).link(forged, legacy[-1].link)
    report = verify_log([*legacy, LoggedRecord(forged, link)], [seal], KEY.public_key())
    assert [(f.kind, f.seq) for f in report.findings] == [("inserted", 6)]


def test_a_batch_links_records_one_after_another_from_the_head() -> None:
    writer = ChainWriter("w")
    first = writer.link(_record(1))
    second = writer.link(_record(2), first)
    assert (second.seq, second.prev) == (2, first.hash)
    assert (writer.seq, writer.head) == (0, GENESIS)  # nothing joined the chain before the commit
    writer.commit(second)
    assert (writer.seq, writer.head) == (2, second.hash)


def test_the_head_moves_only_on_commit() -> None:
    writer = ChainWriter("w")
    link = writer.link(_record(1))
    assert (writer.seq, writer.head) == (0, GENESIS)
    writer.commit(link)
    assert (writer.seq, writer.head) == (1, link.hash)


def test_links_that_loop_end_the_walk() -> None:
    chain = _chain(3)
    # hashes are stored text: an editor can make them point in a circle
    looped = [chain[0], _relink(chain[1], prev=chain[2].link.hash), _relink(chain[2], prev=chain[1].link.hash)]
    looped[2] = _relink(looped[2], hash=chain[1].link.hash)
    report = verify_log(looped, _signed(chain), KEY.public_key())
    assert not report.ok
