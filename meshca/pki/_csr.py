"""CSRs: built by workloads, checked by the identity service before it signs.

A checked CSR has a valid self-signature, a key the policy allows, and no
name the caller was not granted. A name that disagrees is an error, never
silently dropped: the certificate carries what the credential grants.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from meshca.pki._errors import CsrNameMismatch, InvalidCsr, KeyPolicyError
from meshca.pki._keys import KeyType, PrivateKey, PublicKey, key_type_of, signature_hash
from meshca.pki._spiffe import SpiffeId

__all__ = ["CheckedCsr", "KeyPolicy", "build_csr", "check_csr", "load_csr"]

MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Which workload key types the issuer accepts."""

    allowed: frozenset[KeyType] = frozenset(KeyType)

    def check(self, public_key: object) -> KeyType:
        key_type = key_type_of(public_key)
        if key_type not in self.allowed:
            allowed = ", ".join(sorted(k.value for k in self.allowed))
            raise KeyPolicyError(f"key type {key_type} is not allowed; allowed: {allowed}")
        return key_type


@dataclass(frozen=True, slots=True)
class CheckedCsr:
    """What a CSR contributes to a certificate once it has passed the checks."""

    public_key: PublicKey
    key_type: KeyType
    dns_names: tuple[str, ...]


def build_csr(key: PrivateKey, spiffe_id: SpiffeId | None = None, dns_names: Sequence[str] = ()) -> bytes:
    """A DER CSR with the SPIFFE ID as URI SAN and optional DNS SANs (the first also as CN)."""
    names: list[x509.GeneralName] = []
    if spiffe_id is not None:
        names.append(x509.UniformResourceIdentifier(str(spiffe_id)))
    names.extend(x509.DNSName(n) for n in dns_names)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])] if dns_names else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not dns_names)
    return builder.sign(key, signature_hash(key)).public_bytes(Encoding.DER)


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """Parses a PEM or DER CSR; `InvalidCsr` if it is neither or too large."""
    raw = data.encode() if isinstance(data, str) else data
    if not raw:
        raise InvalidCsr("CSR is empty")
    if len(raw) > MAX_CSR_BYTES:
        raise InvalidCsr(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw)
        return x509.load_der_x509_csr(raw)
    except (ValueError, x509.InvalidVersion) as exc:
        raise InvalidCsr("CSR is not a valid PEM or DER PKCS#10 request") from exc


def check_csr(
    csr: x509.CertificateSigningRequest | bytes | str,
    spiffe_id: SpiffeId,
    *,
    allowed_dns: Collection[str] = (),
    policy: KeyPolicy = KeyPolicy(),
) -> CheckedCsr:
    """Checks a CSR for the identity being granted.

    - the request parses, its key is in its canonical encoding (a named
      curve, never explicit EC parameters) and its self-signature verifies
      (`InvalidCsr` otherwise);
    - the key is of a type the policy allows (`KeyPolicyError`);
    - URI SANs, if any, are exactly ``spiffe_id``; DNS SANs and a CN are in
      ``allowed_dns`` (or the CN is the SPIFFE ID); no other SAN type
      (`CsrNameMismatch`).
    """
    if not isinstance(csr, x509.CertificateSigningRequest):
        csr = load_csr(csr)
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # an unknown key algorithm is UnsupportedAlgorithm
        raise InvalidCsr(f"CSR public key cannot be read: {exc}") from exc
    # cryptography reads explicit EC parameters as the named curve they match; RFC 5480 allows only
    # the name, so the key must appear in the request exactly as its canonical encoding.
    if public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) not in csr.tbs_certrequest_bytes:
        raise InvalidCsr("CSR public key is not in its canonical encoding (an EC key must name its curve)")
    key_type = policy.check(public_key)
    # With the key already read: `is_signature_valid` would read it again (about 7 us per request).
    try:
        params, digest = csr.signature_algorithm_parameters, csr.signature_hash_algorithm
        data, signature = csr.tbs_certrequest_bytes, csr.signature
        if isinstance(public_key, rsa.RSAPublicKey) and isinstance(params, AsymmetricPadding) and digest:
            public_key.verify(signature, data, params, digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            public_key.verify(signature, data, params)
        else:
            raise InvalidCsr("CSR signature algorithm does not fit its key")
    except InvalidSignature:
        raise InvalidCsr("CSR signature is invalid") from None
    except (UnsupportedAlgorithm, TypeError, ValueError) as exc:
        raise InvalidCsr(f"CSR signature cannot be checked: {exc}") from exc
    dns: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # x400Address and ediPartyName SANs are unsupported by cryptography, so unparsable here.
        raise InvalidCsr(f"CSR extensions cannot be parsed: {exc}") from exc
    if san is not None:
        for name in san:
            if isinstance(name, x509.UniformResourceIdentifier):
                if name.value != str(spiffe_id):
                    raise CsrNameMismatch(f"CSR asks for URI {name.value!r}, the credential grants {spiffe_id}")
            elif isinstance(name, x509.DNSName):
                if name.value not in allowed_dns:
                    raise CsrNameMismatch(f"CSR asks for DNS name {name.value!r}, which is not granted")
                dns.append(name.value)
            else:
                raise CsrNameMismatch(f"CSR asks for a {type(name).__name__}, which meshca never grants")
    try:
        subject = list(csr.subject)
    except ValueError as exc:  # a name attribute of the wrong string type
        raise InvalidCsr(f"CSR subject cannot be parsed: {exc}") from exc
    for attr in subject:
        if attr.oid != NameOID.COMMON_NAME:
            continue
        cn = attr.value if isinstance(attr.value, str) else attr.value.decode(errors="replace")
        if cn != str(spiffe_id) and cn not in allowed_dns:
            raise CsrNameMismatch(f"CSR common name {cn!r} is neither {spiffe_id} nor a granted DNS name")
    return CheckedCsr(public_key, key_type, tuple(dict.fromkeys(dns)))
