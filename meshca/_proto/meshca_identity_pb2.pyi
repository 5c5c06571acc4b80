import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IssueSVIDRequest(_message.Message):
    __slots__ = ("csr", "credential", "spiffe_id", "ttl")
    CSR_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    credential: Credential
    spiffe_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, csr: _Optional[bytes] = ..., credential: _Optional[_Union[Credential, _Mapping]] = ..., spiffe_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("join_token", "jwt", "svid")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    SVID_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    jwt: str
    svid: SvidProof
    def __init__(self, join_token: _Optional[str] = ..., jwt: _Optional[str] = ..., svid: _Optional[_Union[SvidProof, _Mapping]] = ...) -> None: ...

class SvidProof(_message.Message):
    __slots__ = ("chain", "signature", "signed_at")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    chain: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    signed_at: _timestamp_pb2.Timestamp
    def __init__(self, chain: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ..., signed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class IssueSVIDResponse(_message.Message):
    __slots__ = ("spiffe_id", "leaf", "intermediates", "bundle", "valid_until")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    LEAF_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    leaf: bytes
    intermediates: _containers.RepeatedScalarFieldContainer[bytes]
    bundle: Bundle
    valid_until: _timestamp_pb2.Timestamp
    def __init__(self, spiffe_id: _Optional[str] = ..., leaf: _Optional[bytes] = ..., intermediates: _Optional[_Iterable[bytes]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "anchors", "sequence")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    anchors: _containers.RepeatedScalarFieldContainer[bytes]
    sequence: int
    def __init__(self, trust_domain: _Optional[str] = ..., anchors: _Optional[_Iterable[bytes]] = ..., sequence: _Optional[int] = ...) -> None: ...
