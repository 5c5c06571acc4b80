import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentProof(_message.Message):
    __slots__ = ("chain", "signature", "signed_at")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    chain: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    signed_at: _timestamp_pb2.Timestamp
    def __init__(self, chain: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ..., signed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "selectors", "parent", "x509_ttl", "jwt_ttl", "dns_names")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    X509_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    parent: str
    x509_ttl: _duration_pb2.Duration
    jwt_ttl: _duration_pb2.Duration
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., parent: _Optional[str] = ..., x509_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., jwt_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dns_names: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("proof",)
    PROOF_FIELD_NUMBER: _ClassVar[int]
    proof: AgentProof
    def __init__(self, proof: _Optional[_Union[AgentProof, _Mapping]] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("entries", "trust_domain", "x509_anchors", "x509_sequence", "jwt_keys")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    X509_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    X509_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    JWT_KEYS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    trust_domain: str
    x509_anchors: _containers.RepeatedScalarFieldContainer[bytes]
    x509_sequence: int
    jwt_keys: bytes
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., trust_domain: _Optional[str] = ..., x509_anchors: _Optional[_Iterable[bytes]] = ..., x509_sequence: _Optional[int] = ..., jwt_keys: _Optional[bytes] = ...) -> None: ...

class X509SVIDRequest(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("proof", "requests")
    PROOF_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    proof: AgentProof
    requests: _containers.RepeatedCompositeFieldContainer[X509SVIDRequest]
    def __init__(self, proof: _Optional[_Union[AgentProof, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[X509SVIDRequest, _Mapping]]] = ...) -> None: ...

class X509SVIDResult(_message.Message):
    __slots__ = ("entry_id", "leaf", "intermediates", "valid_until", "error_code", "error")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    LEAF_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATES_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    leaf: bytes
    intermediates: _containers.RepeatedScalarFieldContainer[bytes]
    valid_until: _timestamp_pb2.Timestamp
    error_code: int
    error: str
    def __init__(self, entry_id: _Optional[str] = ..., leaf: _Optional[bytes] = ..., intermediates: _Optional[_Iterable[bytes]] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[X509SVIDResult]
    def __init__(self, results: _Optional[_Iterable[_Union[X509SVIDResult, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("proof", "entry_id", "audience", "ttl")
    PROOF_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    proof: AgentProof
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    ttl: _duration_pb2.Duration
    def __init__(self, proof: _Optional[_Union[AgentProof, _Mapping]] = ..., entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
