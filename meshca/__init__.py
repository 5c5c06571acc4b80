"""meshca: a certificate authority and mTLS identity library for service meshes.

The public API is what ``__all__`` lists; modules with a leading underscore
are private. `meshca.testing` is a public submodule for tests.
"""

from meshca.pki._bundle import TrustBundle
from meshca.pki._csr import CheckedCsr, KeyPolicy, build_csr, check_csr, load_csr
from meshca.pki._errors import (
    AuthenticationError,
    AuthorizationError,
    BundleError,
    CsrNameMismatch,
    InvalidCsr,
    InvalidKeyUri,
    InvalidRequest,
    InvalidSpiffeId,
    IssuanceError,
    IssuerUnavailable,
    KeyCustodyError,
    KeyPolicyError,
    MeshcaError,
    PermissionDenied,
    RateLimited,
    RequestRefused,
    StoreError,
    VerificationError,
)
from meshca.pki._issuer import IssuedSvid, Issuer
from meshca.pki._keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    key_type_of,
    load_private_key,
    private_key_pem,
    write_private_key,
)
from meshca.pki._spiffe import SpiffeId, TrustDomain
from meshca.pki._time import Clock, parse_duration, system_clock
from meshca.pki._trustdir import TrustDir
from meshca.pki._verify import (
    Authorizer,
    BundleSource,
    authorize_any,
    authorize_id,
    authorize_if,
    authorize_member_of,
    authorize_one_of,
    leaf_spiffe_id,
    verify_chain,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "Authorizer",
    "BundleError",
    "BundleSource",
    "CheckedCsr",
    "Clock",
    "CsrNameMismatch",
    "InvalidCsr",
    "InvalidKeyUri",
    "InvalidRequest",
    "InvalidSpiffeId",
    "IssuanceError",
    "IssuedSvid",
    "Issuer",
    "IssuerUnavailable",
    "KeyCustodyError",
    "KeyPolicy",
    "KeyPolicyError",
    "KeyType",
    "MeshcaError",
    "PermissionDenied",
    "PrivateKey",
    "PublicKey",
    "RateLimited",
    "RequestRefused",
    "SpiffeId",
    "StoreError",
    "TrustBundle",
    "TrustDir",
    "TrustDomain",
    "VerificationError",
    "authorize_any",
    "authorize_id",
    "authorize_if",
    "authorize_member_of",
    "authorize_one_of",
    "build_csr",
    "check_csr",
    "generate_key",
    "key_type_of",
    "leaf_spiffe_id",
    "load_csr",
    "load_private_key",
    "parse_duration",
    "private_key_pem",
    "system_clock",
    "verify_chain",
    "write_private_key",
]
