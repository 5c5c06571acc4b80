"""The one place that decides what a failed call means: retry it, reconnect first, or give up.

Transient (retried with backoff): UNAVAILABLE (a new channel next time),
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and every other status the server
uses for trouble that passes, a connection or TLS failure that may heal, a
response that does not verify. Permanent (before the first SVID the source
gives up and `wait_ready` raises): the server refused the request itself
(UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION,
...), or its certificate does not name the host dialled. See
docs/architecture.md, Client.
"""

from __future__ import annotations

import re
import socket
import ssl

import grpc
from cryptography import x509

from meshca.client._state import Failure, SourceConfig
from meshca.pki._bundle import TrustBundle
from meshca.pki._errors import MeshcaError, RequestRefused, VerificationError

__all__ = ["certificate_names", "classify"]

_CODE = grpc.StatusCode
_PERMANENT = frozenset(
    {
        _CODE.UNAUTHENTICATED,
        _CODE.PERMISSION_DENIED,
        _CODE.INVALID_ARGUMENT,
        _CODE.FAILED_PRECONDITION,
        _CODE.UNIMPLEMENTED,
        _CODE.NOT_FOUND,
        _CODE.ALREADY_EXISTS,
        _CODE.OUT_OF_RANGE,
    }
)
# How gRPC reports a server certificate that does not carry the name dialled (newer, then older versions).
_NAME_MISMATCH = re.compile(r"Hostname Verification Check failed|Peer name \S+ is not in peer certificate")


def classify(exc: BaseException, config: SourceConfig, bundle: TrustBundle) -> Failure:
    """What ``exc``, raised by a call to the identity service, means for the next try.

    Blocks for up to two seconds when the server's certificate names another
    host: it connects once more to read the names the certificate carries.
    """
    code = getattr(exc, "code", None)
    if not callable(code):
        if isinstance(exc, MeshcaError):
            return Failure(f"{type(exc).__name__}: {exc}")
        return Failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    status: grpc.StatusCode = code()
    details: str = getattr(exc, "details", lambda: "")() or ""
    reason = f"{status.name}: {details}"
    if status is _CODE.UNAVAILABLE and _NAME_MISMATCH.search(details):
        return Failure(reason, VerificationError(_name_mismatch(config, bundle)), reconnect=True)
    # A projected service-account token is rotated on disk by the kubelet: the next read may be good.
    rotating = status is _CODE.UNAUTHENTICATED and config.credentials.jwt_file is not None
    if status in _PERMANENT and not rotating:
        message = f"no SVID for {config.spiffe_id}: the identity service refused: {reason}"
        return Failure(reason, RequestRefused(message, status.name, details))
    # A channel that failed to connect waits out gRPC's own reconnect backoff (growing to two
    # minutes) and fails every call until then, however close the SVID is to expiry.
    return Failure(reason, reconnect=status is _CODE.UNAVAILABLE)


def _name_mismatch(config: SourceConfig, bundle: TrustBundle) -> str:
    address = _host_port(config.server)
    dialled = config.server_name or (address[0] if address else config.server)
    names = certificate_names(config.server, bundle)
    carries = f" (it names {', '.join(names)})" if names else ""
    return (
        f"no SVID for {config.spiffe_id}: the server's certificate does not name {dialled}{carries}: "
        f"dial a name it carries, or pass server_name= (meshca fetch --server-name {names[0] if names else 'NAME'})"
    )


def _host_port(target: str) -> tuple[str, int] | None:
    """Host and port of a gRPC target such as ``host:port``, ``[::1]:port`` or ``dns:///host:port``."""
    rest = target.rpartition("///")[2]
    rest = re.sub(r"^(ipv4|ipv6|dns):", "", rest)
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def certificate_names(target: str, bundle: TrustBundle, timeout: float = 2.0) -> list[str]:
    """The DNS names in the certificate of the server at ``target``, if it chains to ``bundle``; [] otherwise."""
    address = _host_port(target)
    if address is None:
        return []
    ctx = ssl.create_default_context(cadata=bundle.to_pem().decode())
    ctx.check_hostname = False  # the point is to learn which names it carries
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(address, timeout) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return []
    if der is None:
        return []
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))
