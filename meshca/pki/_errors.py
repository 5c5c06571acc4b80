"""The meshca exception tree.

MeshcaError
 +-- InvalidSpiffeId (also ValueError)
 +-- KeyPolicyError (also ValueError)   a key type or size the policy does not allow
 +-- KeyCustodyError  a CA key on a PKCS#11 token cannot be reached or used (names the PKCS#11 error)
 |    +-- InvalidKeyUri (also ValueError)  a PKCS#11 URI meshca cannot use
 +-- InvalidCsr (also ValueError)       unparsable CSR or bad signature
 +-- CsrNameMismatch  the CSR asks for names the caller was not granted
 +-- BundleError (also ValueError)      a trust bundle that cannot be read or written
 +-- InvalidRequest (also ValueError)   a request field missing, malformed or out of bounds
 +-- IssuanceError    the issuer cannot sign
 |    +-- IssuerUnavailable   expired, not yet valid, or not chaining to the bundle
 +-- VerificationError  a chain that does not verify, or a peer not authorized
 |    +-- AuthorizationError
 +-- StoreError       the state store failed
 |    +-- TokenUsedUp   the join token ran out before its use was recorded
 |    +-- DuplicateSerial  a record whose serial is already logged (the store itself is fine)
 +-- AuthenticationError  no credential, or a credential that does not verify
 |    +-- CredentialCheckUnavailable  the credential cannot be checked now (retry)
 +-- PermissionDenied     a valid credential that does not grant this identity
 |    +-- IdentityMismatch  the request names another identity than the credential grants
 +-- RateLimited          one principal exceeded its request rate, or a peer its open streams
 +-- RequestTooLarge      a request above the configured size
 +-- RequestRefused   the identity service refused a client's request; retrying will not help
 +-- PortTaken (also OSError)  an address another process holds
 +-- UnsafePermissions    a file or directory that other users could replace
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "BundleError",
    "CredentialCheckUnavailable",
    "CsrNameMismatch",
    "DuplicateSerial",
    "IdentityMismatch",
    "InvalidKeyUri",
    "InvalidCsr",
    "InvalidRequest",
    "InvalidSpiffeId",
    "IssuanceError",
    "IssuerUnavailable",
    "KeyCustodyError",
    "KeyPolicyError",
    "MeshcaError",
    "PermissionDenied",
    "PortTaken",
    "RateLimited",
    "RequestRefused",
    "RequestTooLarge",
    "StoreError",
    "TokenUsedUp",
    "UnsafePermissions",
    "VerificationError",
]


class MeshcaError(Exception):
    """Root of every error meshca raises on purpose."""


class InvalidSpiffeId(MeshcaError, ValueError):
    """A SPIFFE ID or trust domain that breaks the SPIFFE syntax rules."""


class KeyPolicyError(MeshcaError, ValueError):
    """A key whose type or size is not allowed, or key material that cannot be read."""


class KeyCustodyError(MeshcaError):
    """A key held by a PKCS#11 token that cannot be reached or used: no such token or key, a wrong PIN,
    or an error from the token. ``pkcs11_error`` names the PKCS#11 error (``PinIncorrect``,
    ``TokenNotPresent``, ...) when there is one. Messages never hold a PIN."""

    def __init__(self, message: str, pkcs11_error: str = "") -> None:
        super().__init__(message)
        self.pkcs11_error = pkcs11_error


class InvalidKeyUri(KeyCustodyError, ValueError):
    """A PKCS#11 URI (RFC 7512) meshca cannot use; the message names the attribute."""


class InvalidCsr(MeshcaError, ValueError):
    """A certificate signing request that cannot be parsed or whose signature is wrong."""


class CsrNameMismatch(MeshcaError):
    """A CSR that names something other than the identity being granted."""


class BundleError(MeshcaError, ValueError):
    """A trust bundle that cannot be parsed or holds something that is not an anchor."""


class IssuanceError(MeshcaError):
    """The issuer cannot sign this request."""


class IssuerUnavailable(IssuanceError):
    """No usable issuer: expired, not yet valid, or not chaining to the bundle."""


class VerificationError(MeshcaError):
    """A certificate chain that does not verify; the message names the broken rule."""


class AuthorizationError(VerificationError):
    """A chain that verifies, for a SPIFFE ID the authorizer does not accept."""


class StoreError(MeshcaError):
    """The state store failed or holds something unreadable."""


class AuthenticationError(MeshcaError):
    """No credential, or a credential that does not verify.

    ``reason`` is a short, fixed slug for metrics (``unknown_token``, ``jwt_expired``, ...).
    """

    def __init__(self, message: str, reason: str = "invalid_credential") -> None:
        super().__init__(message)
        self.reason = reason


class CredentialCheckUnavailable(AuthenticationError):
    """The credential could not be checked now (the Kubernetes API is unreachable): retry, not refuse."""


class DuplicateSerial(StoreError):
    """A record refused because its serial is already logged: the store itself is fine."""


class TokenUsedUp(StoreError):
    """The join token had no use left (or expired) when its use was to be recorded."""


class PermissionDenied(MeshcaError):
    """A valid credential that does not grant the identity asked for."""


class IdentityMismatch(PermissionDenied):
    """The request names an identity (a field, not the CSR) other than the one the credential grants."""


class InvalidRequest(MeshcaError, ValueError):
    """A request field that is missing, malformed or out of bounds."""


class RateLimited(MeshcaError):
    """One principal exceeded its request rate, or a peer (or the server) its open WatchBundle streams."""


class RequestTooLarge(MeshcaError):
    """A request above the configured size (gRPC's own limit is higher, so this one is logged)."""


class RequestRefused(MeshcaError):
    """The identity service refused a client's request for a reason that retrying will not change.

    ``code`` is the gRPC status name (``UNAUTHENTICATED``, ``PERMISSION_DENIED``, ...) and
    ``details`` the server's own message.
    """

    def __init__(self, message: str, code: str, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class PortTaken(MeshcaError, OSError):
    """An address another process holds, so `meshca serve` cannot own it; the message names it."""


class UnsafePermissions(MeshcaError):
    """A file, or a directory above it, writable by other users or owned by one: they could replace it."""
