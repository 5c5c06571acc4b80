"""X.509-SVID chain verification and authorizers.

Path validation (signatures, validity at the given time, CA constraints,
path length) is cryptography's RFC 5280 verifier; on top of it meshca
enforces the SPIFFE leaf and signing-certificate rules and then asks an
authorizer whether the peer's SPIFFE ID is welcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification as x509v
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshca.pki._bundle import TrustBundle
from meshca.pki._certs import fingerprint, load_certificates, uri_sans
from meshca.pki._errors import AuthorizationError, InvalidSpiffeId, VerificationError
from meshca.pki._spiffe import SpiffeId, TrustDomain

_E = TypeVar("_E", bound=x509.ExtensionType)

__all__ = [
    "MAX_CHAIN",
    "Authorizer",
    "BundleSource",
    "authorize_any",
    "authorize_id",
    "authorize_if",
    "authorize_member_of",
    "authorize_one_of",
    "check_leaf_rules",
    "leaf_spiffe_id",
    "verify_chain",
]

PeerRole = Literal["client", "server"]
MAX_CHAIN = 8  # certificates, leaf first: a meshca chain is a leaf, its issuer and perhaps an intermediate
BundleSource = TrustBundle | Mapping[TrustDomain, TrustBundle]
"""One bundle, or bundles by trust domain (federation)."""

_CA_POLICY = x509v.ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = x509v.ExtensionPolicy.permit_all()  # the SPIFFE leaf rules are checked here instead


@dataclass(frozen=True, slots=True)
class Authorizer:
    """Decides whether a verified peer's SPIFFE ID is accepted. Build one with the ``authorize_*`` functions."""

    allows: Callable[[SpiffeId], bool]
    description: str

    def __call__(self, spiffe_id: SpiffeId) -> None:
        """Raises `AuthorizationError` unless the ID is allowed."""
        if not self.allows(spiffe_id):
            raise AuthorizationError(f"peer {spiffe_id} is not authorized: expected {self.description}")


def authorize_any() -> Authorizer:
    return Authorizer(lambda _: True, "any SPIFFE ID")


def authorize_id(expected: SpiffeId) -> Authorizer:
    return Authorizer(lambda sid: sid == expected, str(expected))


def authorize_one_of(*expected: SpiffeId) -> Authorizer:
    allowed = frozenset(expected)
    return Authorizer(lambda sid: sid in allowed, "one of " + ", ".join(sorted(map(str, allowed))))


def authorize_member_of(trust_domain: TrustDomain) -> Authorizer:
    return Authorizer(lambda sid: sid.trust_domain == trust_domain, f"a member of {trust_domain}")


def authorize_if(predicate: Callable[[SpiffeId], bool], description: str = "an ID the predicate accepts") -> Authorizer:
    return Authorizer(predicate, description)


def leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID leaf: exactly one URI SAN, a SPIFFE ID with a path."""
    uris = uri_sans(leaf)
    if len(uris) != 1:
        raise VerificationError(f"leaf must have exactly one URI SAN, has {len(uris)}")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise VerificationError(f"leaf URI SAN is not a SPIFFE ID: {exc}") from exc
    if not sid.path:
        raise VerificationError(f"leaf SPIFFE ID {sid} has no path")
    return sid


def check_leaf_rules(leaf: x509.Certificate, role: PeerRole | None) -> None:
    """The X.509-SVID leaf rules other than the SPIFFE ID: CA false, keyUsage, EKU for ``role``."""
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise VerificationError("leaf is a CA certificate (basicConstraints CA true)")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise VerificationError("leaf has no keyUsage extension") from None
    if not ku.digital_signature:
        raise VerificationError("leaf keyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise VerificationError("leaf keyUsage has keyCertSign or cRLSign")
    if role is not None:
        try:
            eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return
        needed = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
        if needed not in eku:
            raise VerificationError(f"leaf extendedKeyUsage lacks {'clientAuth' if role == 'client' else 'serverAuth'}")


def _required(cert: x509.Certificate, kind: type[_E], missing: str) -> _E:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        raise VerificationError(missing) from None


def _check_signing(cert: x509.Certificate, what: str) -> None:
    if not _required(cert, x509.BasicConstraints, f"{what} has no basicConstraints, so it is not a CA").ca:
        raise VerificationError(f"{what} is not a CA (basicConstraints CA false)")
    if not _required(cert, x509.KeyUsage, f"{what} has no keyUsage, so it may not sign certificates").key_cert_sign:
        raise VerificationError(f"{what} keyUsage lacks keyCertSign")


def _check_validity(cert: x509.Certificate, what: str, at: datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise VerificationError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
    if at > cert.not_valid_after_utc:
        raise VerificationError(f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")


def _bundle_for(bundles: BundleSource, trust_domain: TrustDomain) -> TrustBundle:
    if isinstance(bundles, TrustBundle):
        if bundles.trust_domain != trust_domain:
            raise VerificationError(f"leaf is in trust domain {trust_domain}, the bundle is for {bundles.trust_domain}")
        return bundles
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise VerificationError(f"no trust bundle for trust domain {trust_domain}")
    return bundle


def _check_shape(certs: Sequence[x509.Certificate]) -> None:
    """Refuses, before any path is searched, a chain whose search would be costly.

    A chain often comes from a peer nobody has authenticated yet. Several CA
    certificates of one name and key are each a valid issuer of every other,
    and cryptography's verifier explores every path through them up to its
    depth limit: four such certificates (1.7 KB) took it 50 s. With every key
    in the chain distinct, each certificate has at most one issuer in it and
    the search is linear.
    """
    if len(certs) > MAX_CHAIN:
        raise VerificationError(f"chain has {len(certs)} certificates, at most {MAX_CHAIN}")
    keys = {c.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) for c in certs}
    if len(keys) != len(certs):
        raise VerificationError("chain holds the same public key in two certificates")


def verify_chain(
    chain: bytes | str | Sequence[bytes] | Sequence[x509.Certificate],
    bundles: BundleSource,
    *,
    at: datetime,
    authorizer: Authorizer | None = None,
    role: PeerRole | None = None,
) -> SpiffeId:
    """Verifies an X.509-SVID chain (leaf first) and returns the peer's SPIFFE ID.

    ``role`` is what the peer acts as ("client" or "server"); when given, a
    leaf with an extendedKeyUsage must allow it. Raises `VerificationError`
    (or its subclass `AuthorizationError`) naming the rule that failed.
    """
    try:
        certs = load_certificates(chain)
    except ValueError as exc:
        raise VerificationError(f"cannot read the chain: {exc}") from exc
    _check_shape(certs)
    leaf, intermediates = certs[0], certs[1:]
    sid = leaf_spiffe_id(leaf)
    check_leaf_rules(leaf, role)
    bundle = _bundle_for(bundles, sid.trust_domain)
    _check_validity(leaf, "leaf", at)
    for n, cert in enumerate(intermediates, 1):
        what = f"intermediate {n} ({fingerprint(cert)[:23]})"
        _check_signing(cert, what)
        _check_validity(cert, what, at)
    verifier = (
        x509v.PolicyBuilder()
        .store(bundle.store)
        .time(at)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except x509v.VerificationError as exc:
        raise VerificationError(f"chain does not lead to an anchor of {sid.trust_domain}: {exc}") from exc
    if authorizer is not None:
        authorizer(sid)
    return sid
