"""SPIFFE trust domains and IDs, parsed strictly.

The rules are those of the SPIFFE ID specification: lower-case ``spiffe``
scheme, a trust domain of ``[a-z0-9._-]``, path segments of
``[a-zA-Z0-9._-]`` with no empty, ``.`` or ``..`` segment and no trailing
slash, nothing else (port, userinfo, query, fragment, percent-encoding), and
at most 2048 bytes in all. Nothing is normalised: input that is not already
canonical is rejected with a message saying why.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from meshca.pki._errors import InvalidSpiffeId

__all__ = ["AGENT_PATH", "RESERVED_PATH", "SpiffeId", "TrustDomain"]

RESERVED_PATH = "/meshca"
AGENT_PATH = RESERVED_PATH + "/agent"  # spiffe://TD/meshca/agent/NAME: a node agent

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _bad_char_reason(ch: str, where: str) -> str:
    if ch in string.ascii_uppercase and where == "trust domain":
        return f"trust domain has an upper-case letter {ch!r}; trust domains are lower case"
    named = {
        ":": "a port",
        "@": "userinfo",
        "?": "a query",
        "#": "a fragment",
        "%": "percent-encoding",
    }
    if ch in named:
        return f"{where} has {named[ch]} ({ch!r}), which SPIFFE IDs do not allow"
    return f"{where} has the character {ch!r}; allowed are letters, digits, '.', '-' and '_'"


def _check_trust_domain_name(name: str, text: str) -> None:
    if not name:
        raise InvalidSpiffeId(f"trust domain is empty in {text!r}")
    if _utf8_len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    for ch in name:
        if ch not in _TD_CHARS:
            raise InvalidSpiffeId(_bad_char_reason(ch, "trust domain") + f" in {text!r}")


def _check_path(path: str, text: str) -> None:
    """Checks a non-empty path that starts with '/'."""
    for segment in path[1:].split("/"):
        if segment == "":
            if path.endswith("/"):
                raise InvalidSpiffeId(f"path has a trailing slash in {text!r}")
            raise InvalidSpiffeId(f"path has an empty segment in {text!r}")
        if segment in (".", ".."):
            raise InvalidSpiffeId(f"path has a {segment!r} segment in {text!r}")
        for ch in segment:
            if ch not in _PATH_CHARS:
                raise InvalidSpiffeId(_bad_char_reason(ch, "path") + f" in {text!r}")


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate (argv decoded with surrogateescape) is counted, then refused as a character
    return len(text.encode("utf-8", "surrogatepass"))


def _require_str(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise InvalidSpiffeId(f"{what} must be a str, not {type(text).__name__}")
    return text


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain, such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(_require_str(self.name, "trust domain"), self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parses ``example.org`` or ``spiffe://example.org`` (no path)."""
        text = _require_str(text, "trust domain")
        if text.startswith(SCHEME_PREFIX) or "://" in text:
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidSpiffeId(f"a trust domain has no path, got {text!r}")
            return sid.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def spiffe_id(self, path: str) -> SpiffeId:
        """The SPIFFE ID with this trust domain and ``path`` (which starts with '/')."""
        return SpiffeId(self, path)

    def agent_id(self, name: str) -> SpiffeId:
        """The node agent ``name``'s ID, ``spiffe://TD/meshca/agent/NAME`` (``name`` is one path segment)."""
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidSpiffeId(f"an agent name is one non-empty path segment, got {name!r}")
        return SpiffeId(self, f"{AGENT_PATH}/{name}")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TrustDomain({self.name!r})"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: ``spiffe://<trust domain><path>``; the path is empty or starts with '/'."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidSpiffeId("trust_domain must be a TrustDomain")
        path = _require_str(self.path, "path")
        text = f"{SCHEME_PREFIX}{self.trust_domain.name}{path}"
        if path:
            if not path.startswith("/"):
                raise InvalidSpiffeId(f"path must start with '/', got {path!r}")
            _check_path(path, text)
        if _utf8_len(text) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parses ``spiffe://example.org/ns/default/sa/web``."""
        text = _require_str(text, "SPIFFE ID")
        if not text:
            raise InvalidSpiffeId("SPIFFE ID is empty")
        if _utf8_len(text) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            scheme, sep, _ = text.partition("://")
            if sep and scheme.lower() == "spiffe":
                raise InvalidSpiffeId(f"scheme must be lower-case 'spiffe', got {scheme!r}")
            if sep:
                raise InvalidSpiffeId(f"scheme must be 'spiffe', got {scheme!r}")
            raise InvalidSpiffeId(f"SPIFFE ID must start with 'spiffe://', got {text!r}")
        rest = text[len(SCHEME_PREFIX) :]
        name, slash, path = rest.partition("/")
        _check_trust_domain_name(name, text)
        return cls(TrustDomain(name), slash + path)

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    @property
    def reserved(self) -> bool:
        """True for ``spiffe://TD/meshca`` and every ID under it: meshca's own components.

        The identity service and node agents hold these; no workload credential
        can obtain one (docs/architecture.md, Reserved identities).
        """
        return self.path == RESERVED_PATH or self.path.startswith(RESERVED_PATH + "/")

    @property
    def is_agent(self) -> bool:
        """True for a node agent's ID, ``spiffe://TD/meshca/agent/NAME`` (one segment after ``agent``)."""
        prefix = AGENT_PATH + "/"
        return self.path.startswith(prefix) and "/" not in self.path[len(prefix) :]

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"

    def __repr__(self) -> str:
        return f"SpiffeId({str(self)!r})"
