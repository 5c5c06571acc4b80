"""The tamper-evident issuance log: a hash chain per writer, and signed checkpoints.

Every store writer (one per `meshca serve` supervisor or replica) keeps a
chain of its own, so replicas and workers need no global lock: record n of
writer W stores ``prev`` (the hash of W's record n-1, or `GENESIS`) and
``hash = SHA-256(canonical(record, W) || prev)``; ``seq`` numbers the
records in the order the writer claims. Periodically the writer signs a
checkpoint (writer, seq, head hash, time) with the log key, as Certificate
Transparency signs tree heads; a writer signs a first checkpoint (seq 0)
before it writes, so a chain whose writer never signed one is forged. Records
from before the chain existed were chained at migration under the writer
`LEGACY`. `verify_log` walks each chain back from its latest checkpoint and
names the first record that was edited, deleted, inserted or reordered. What
it proves and what it cannot is in SECURITY.md (docs/architecture.md,
Issuance log).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.pki._keys import PrivateKey, PublicKey, signature_hash

if TYPE_CHECKING:  # the store imports this module to chain what it writes
    from meshca.server._store import IssuanceRecord

__all__ = [
    "GENESIS",
    "LEGACY",
    "Checkpoint",
    "ChainLink",
    "ChainWriter",
    "Finding",
    "LogReport",
    "LoggedRecord",
    "legacy_links",
    "record_hash",
    "sign_checkpoint",
    "verify_log",
]

GENESIS = "0" * 64
LEGACY = "legacy"  # the writer of records logged before chains existed (schema version 1)
_CONTEXT = b"meshca-log-v1\x00"
_CHECKPOINT_CONTEXT = b"meshca-log-checkpoint-v1\x00"


def _micros(value: datetime) -> int:
    # Stores keep times as float seconds; microseconds survive that round trip exactly (2**53 > 1e16).
    return round(value.timestamp() * 1_000_000)


def record_hash(record: IssuanceRecord, writer: str, prev: str) -> str:
    """SHA-256 over the record's fields, its writer and its predecessor's hash, as lower-case hex."""
    fields = (
        record.serial,
        record.spiffe_id,
        str(_micros(record.not_after)),
        record.principal,
        record.api,
        str(_micros(record.issued_at)),
        writer,
        prev,
    )
    digest = hashlib.sha256(_CONTEXT)
    for value in fields:
        data = value.encode()
        digest.update(struct.pack(">I", len(data)) + data)  # length-prefixed: no field can run into the next
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ChainLink:
    """Where one record sits in its writer's chain."""

    writer: str
    seq: int
    prev: str
    hash: str


@dataclass(frozen=True, slots=True)
class LoggedRecord:
    """A record as stored, with its chain fields."""

    record: IssuanceRecord
    link: ChainLink


class ChainWriter:
    """One writer's chain head. Not thread-safe: the store's single writer owns it."""

    def __init__(self, writer: str | None = None) -> None:
        self.writer = writer or secrets.token_hex(8)
        self.seq = 0
        self.head = GENESIS

    def link(self, record: IssuanceRecord, after: ChainLink | None = None) -> ChainLink:
        """The chain fields of ``record`` placed after ``after`` (default: the head).

        The head moves only when `commit` is called, so a transaction links its
        records one after another and commits the last one it kept.
        """
        seq, prev = (after.seq, after.hash) if after is not None else (self.seq, self.head)
        return ChainLink(self.writer, seq + 1, prev, record_hash(record, self.writer, prev))

    def commit(self, link: ChainLink) -> None:
        """Moves the head to ``link`` once its record is durable (a rolled-back record never joins)."""
        self.seq, self.head = link.seq, link.hash

    def resume(self, seq: int, head: str) -> None:
        """Sets the head as the store holds it (after a transaction whose outcome is unknown)."""
        self.seq, self.head = seq, head


def legacy_links(records: Iterable[IssuanceRecord]) -> list[ChainLink]:
    """The chain the migration gives records that predate chains, in log order."""
    chain = ChainWriter(LEGACY)
    links = []
    for record in records:
        link = chain.link(record)
        chain.commit(link)
        links.append(link)
    return links


@dataclass(frozen=True, slots=True)
class Checkpoint:
    writer: str
    seq: int
    head: str
    at: datetime
    signature: bytes = field(repr=False)

    def message(self) -> bytes:
        return _checkpoint_message(self.writer, self.seq, self.head, self.at)


def _checkpoint_message(writer: str, seq: int, head: str, at: datetime) -> bytes:
    return _CHECKPOINT_CONTEXT + f"{writer}\n{seq}\n{head}\n{_micros(at)}".encode()


def sign_checkpoint(key: PrivateKey, writer: str, seq: int, head: str, at: datetime) -> Checkpoint:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("the log key is an EC key")
    signature = key.sign(_checkpoint_message(writer, seq, head, at), ec.ECDSA(signature_hash(key)))
    return Checkpoint(writer, seq, head, at, signature)


def _signature_ok(checkpoint: Checkpoint, public_key: PublicKey) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(checkpoint.signature, checkpoint.message(), ec.ECDSA(signature_hash(public_key)))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of tampering. ``kind`` is edited, deleted, inserted, reordered or checkpoint."""

    kind: str
    writer: str
    seq: int
    serial: str
    detail: str

    def __str__(self) -> str:
        serial = f" (serial {self.serial})" if self.serial else ""
        return f"{self.kind}: writer {self.writer or '(none)'} record {self.seq}{serial}: {self.detail}"


@dataclass(frozen=True, slots=True)
class LogReport:
    records: int
    writers: int
    checkpoints: int
    unchecked: int  # records after their writer's last checkpoint: chained, not yet signed
    findings: tuple[Finding, ...]
    legacy: int = 0  # records that predate chains (writer LEGACY)

    @property
    def ok(self) -> bool:
        return not self.findings


def verify_log(records: Iterable[LoggedRecord], checkpoints: Iterable[Checkpoint], public_key: PublicKey) -> LogReport:
    """Checks every chain and checkpoint; the findings are sorted so the first is the earliest damage."""
    chains: dict[str, list[LoggedRecord]] = {}
    for item in records:
        chains.setdefault(item.link.writer, []).append(item)
    heads: dict[str, Checkpoint] = {}
    findings: list[Finding] = []
    count = 0
    for checkpoint in checkpoints:
        count += 1
        if not _signature_ok(checkpoint, public_key):
            findings.append(
                Finding("checkpoint", checkpoint.writer, checkpoint.seq, "", "checkpoint signature does not verify")
            )
            continue
        if checkpoint.writer not in heads or checkpoint.seq > heads[checkpoint.writer].seq:
            heads[checkpoint.writer] = checkpoint
    unchecked = 0
    for writer in sorted(chains.keys() | heads.keys()):
        chain = chains.get(writer, [])
        head = heads.get(writer)
        chain_findings, chain_unchecked = _verify_chain(writer, chain, head)
        first = min(chain, key=lambda i: i.link.seq, default=None)
        if head is None and first is not None and writer != LEGACY:
            # Every writer signs a checkpoint before its first record: this chain was made without the key
            # (named before what its links show: the sort below keeps this order for one record).
            findings.append(_finding("inserted", first, "its writer never signed a checkpoint"))
        elif head is not None and writer == LEGACY:
            # The legacy chain is sealed once and never grows: anything past its checkpoint was added.
            late = min((i for i in chain if i.link.seq > head.seq), key=lambda i: i.link.seq, default=None)
            if late is not None:
                findings.append(_finding("inserted", late, "it follows the sealed legacy chain"))
        findings.extend(chain_findings)
        unchecked += chain_unchecked
    findings.sort(key=lambda f: (f.writer, f.seq))
    total = sum(len(c) for c in chains.values())
    legacy = len(chains.get(LEGACY, ()))
    return LogReport(total, len(chains), count, unchecked, tuple(findings), legacy)


def _verify_chain(writer: str, chain: list[LoggedRecord], checkpoint: Checkpoint | None) -> tuple[list[Finding], int]:
    findings: list[Finding] = []
    by_hash: dict[str, LoggedRecord] = {}
    for item in sorted(chain, key=lambda i: i.link.seq):
        if record_hash(item.record, writer, item.link.prev) != item.link.hash:
            findings.append(_finding("edited", item, "its content does not match its hash"))
        by_hash[item.link.hash] = item
    by_seq: dict[int, list[LoggedRecord]] = {}
    for item in chain:
        by_seq.setdefault(item.link.seq, []).append(item)

    # The authentic chain: from the signed head back to the genesis, along prev links.
    authentic: list[LoggedRecord] = []
    if checkpoint is not None:
        cursor = checkpoint.head
        position = checkpoint.seq
        while cursor != GENESIS:
            found = by_hash.get(cursor)
            if found is None:
                findings.append(_missing(writer, position, by_seq))
                break
            if len(authentic) > len(chain):  # stored hashes that loop back: only an edit makes that
                findings.append(_finding("edited", found, "its chain links loop"))
                break
            authentic.append(found)
            cursor = found.link.prev
            position -= 1
        else:
            if position != 0:
                findings.append(
                    Finding(
                        "inserted",
                        writer,
                        checkpoint.seq,
                        "",
                        f"the signed head is {checkpoint.seq} records "
                        f"from the start but the chain to it has {checkpoint.seq - position}",
                    )
                )
        authentic.reverse()
        for expected, item in enumerate(authentic, start=authentic[0].link.seq if authentic else 1):
            if item.link.seq != expected:
                findings.append(_finding("reordered", item, f"it is record {expected} of the signed chain"))
                break
    # Before a break, the records that link forward from the genesis are the chain's intact prefix.
    successors: dict[str, list[LoggedRecord]] = {}
    for item in chain:
        successors.setdefault(item.link.prev, []).append(item)
    on_chain = {id(item) for item in authentic} | {id(item) for item in _forward(GENESIS, successors)}
    signed_upto = checkpoint.seq if checkpoint is not None else 0
    for item in sorted(chain, key=lambda i: i.link.seq):
        if id(item) in on_chain:
            continue
        if item.link.seq <= signed_upto and not any(f.seq == item.link.seq for f in findings):
            findings.append(_finding("inserted", item, "it is not on the signed chain"))

    # After the last checkpoint the chain must still link up; it is just not signed yet.
    reached = {id(item) for item in _forward(checkpoint.head if checkpoint is not None else GENESIS, successors)}
    signed = {item.link.hash for item in authentic} | {GENESIS}
    for item in sorted(chain, key=lambda i: i.link.seq):
        if item.link.seq <= signed_upto or id(item) in reached or id(item) in on_chain:
            continue
        if item.link.prev in signed or len(successors.get(item.link.prev, ())) > 1:
            findings.append(_finding("inserted", item, "it branches off the chain"))
        else:
            findings.append(_finding("deleted", item, "the record before it is missing"))
        break
    return findings, len(reached)


def _forward(start: str, successors: dict[str, list[LoggedRecord]]) -> list[LoggedRecord]:
    """The records that follow ``start`` one by one, up to a fork or the end."""
    out = []
    cursor = start
    seen: set[int] = set()
    while len(successors.get(cursor, ())) == 1:
        item = successors[cursor][0]
        if id(item) in seen:  # stored hashes that loop: only an edit makes that
            break
        seen.add(id(item))
        out.append(item)
        cursor = item.link.hash
    return out


def _finding(kind: str, item: LoggedRecord, detail: str) -> Finding:
    return Finding(kind, item.link.writer, item.link.seq, item.record.serial, detail)


def _missing(writer: str, position: int, by_seq: dict[int, list[LoggedRecord]]) -> Finding:
    """A link of the signed chain is gone: edited in place (a record sits at its place) or deleted."""
    stand_ins = by_seq.get(position, [])
    if stand_ins:
        return _finding("edited", stand_ins[0], "its content and hash were both rewritten")
    return Finding("deleted", writer, position, "", "this record of the signed chain is missing")
