"""CA keys on a PKCS#11 token: RFC 7512 URIs, key generation on the token, signing through it.

The only module that imports ``pkcs11`` (python-pkcs11, the optional extra
``meshca[hsm]``), and only when a token is used: meshca works without it.

A key is named the way step-ca and p11-kit users write it::

    pkcs11:token=meshca;object=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/meshca/pin

The PIN is read from the ``pin-source`` file each time a session is opened
and is never kept, logged or put in a message; ``pin-value`` is refused,
because the URI is recorded in the trust directory and printed.

Sessions: one per token per process (a PKCS#11 login belongs to the
process), opened in the process that signs: the workers of `serve --workers
N` are spawned, so each opens its own, and a forked child initializes the
module again before its first session. After an error the module is
initialized again at the next use and a new session opened: that is how a
token that went away and came back is picked up. A PIN the token refused is
not tried again until its file changes, so retries never lock the token.
"""

from __future__ import annotations

import os
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshca.pki._custody import Hash
from meshca.pki._errors import InvalidKeyUri, KeyCustodyError
from meshca.pki._keys import KeyType, PublicKey, key_type_of

if TYPE_CHECKING:
    import pkcs11

__all__ = ["Pkcs11Uri", "TokenKey"]

_TOKEN_ATTRIBUTES = ("token", "manufacturer", "serial", "model")
_PATH_ATTRIBUTES = (*_TOKEN_ATTRIBUTES, "slot-id", "object", "id", "type")
_QUERY_ATTRIBUTES = ("module-path", "pin-source")
_CURVE_OIDS = {KeyType.EC_P256: "1.2.840.10045.3.1.7", KeyType.EC_P384: "1.3.132.0.34"}
# RFC 7512 pk11-pchar: unreserved characters and these may appear unescaped in a value.
_SAFE_PATH = "-._~:[]@!$'()*+,&"
_SAFE_QUERY = "-._~:[]@!$'()*+,=/?|"


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """An RFC 7512 PKCS#11 URI naming one private key, its token and module, and where its PIN is."""

    module_path: Path
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: Path | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parses a URI; module and PIN file paths are made absolute (the URI is recorded in DIR)."""
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != "pkcs11":
            raise InvalidKeyUri("a key URI starts with 'pkcs11:' (RFC 7512)")
        path, _, query = rest.partition("?")
        attrs = _attributes(path, ";", _PATH_ATTRIBUTES, "path")
        if "pin-value" in query.lower():
            # Checked before any value is read, so no message can echo it.
            raise InvalidKeyUri(
                "pin-value puts the PIN in the URI, which meshca records and prints: use pin-source=file:PATH"
            )
        queries = _attributes(query, "&", _QUERY_ATTRIBUTES, "query")
        if "module-path" not in queries:
            raise InvalidKeyUri("the PKCS#11 URI needs module-path=<the token's PKCS#11 module>")
        if not ("object" in attrs or "id" in attrs):
            raise InvalidKeyUri("the PKCS#11 URI must name the key with object=LABEL and/or id=%XX...")
        if attrs.get("type", "private") != "private":
            raise InvalidKeyUri(f"type={attrs['type']}: a CA key URI names the private key (type=private)")
        slot_id = None
        if "slot-id" in attrs:
            if not attrs["slot-id"].isdigit():
                raise InvalidKeyUri(f"slot-id={attrs['slot-id']} is not a decimal number")
            slot_id = int(attrs["slot-id"])
        pin_source = None
        if "pin-source" in queries:
            source = queries["pin-source"]
            source = source.removeprefix("file:").removeprefix("//") if source.startswith("file:") else source
            if not source or "://" in source:
                raise InvalidKeyUri("pin-source must be a file: pin-source=file:PATH")
            pin_source = Path(source).absolute()
        return cls(
            module_path=Path(queries["module-path"]).absolute(),
            token=attrs.get("token"),
            manufacturer=attrs.get("manufacturer"),
            serial=attrs.get("serial"),
            model=attrs.get("model"),
            slot_id=slot_id,
            object=attrs.get("object"),
            id=urllib.parse.unquote_to_bytes(attrs["id"]) if "id" in attrs else None,
            pin_source=pin_source,
        )

    def describe(self) -> str:
        """The path part: which token and key, without module and PIN file (for messages and logs)."""
        parts = [
            f"{name}={urllib.parse.quote(value, safe=_SAFE_PATH)}"
            for name, value in (
                ("token", self.token),
                ("manufacturer", self.manufacturer),
                ("serial", self.serial),
                ("model", self.model),
                ("slot-id", None if self.slot_id is None else str(self.slot_id)),
                ("object", self.object),
            )
            if value is not None
        ]
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        return "pkcs11:" + ";".join(parts)

    def __str__(self) -> str:
        query = [f"module-path={urllib.parse.quote(str(self.module_path), safe=_SAFE_QUERY)}"]
        if self.pin_source is not None:
            query.append(f"pin-source=file:{urllib.parse.quote(str(self.pin_source), safe=_SAFE_QUERY)}")
        return f"{self.describe()}?{'&'.join(query)}"

    def read_pin(self) -> str | None:
        if self.pin_source is None:
            return None
        try:
            pin = self.pin_source.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise KeyCustodyError(f"cannot read the PIN file {self.pin_source}: {reason}") from None
        if not pin:
            raise KeyCustodyError(f"the PIN file {self.pin_source} is empty")
        return pin


def _attributes(text: str, separator: str, known: tuple[str, ...], part: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, text.split(separator)):
        name, equals, value = item.partition("=")
        name = name.lower()
        if not equals:
            raise InvalidKeyUri(f"PKCS#11 URI {part} attribute {name!r} has no value")
        if name not in known:
            raise InvalidKeyUri(f"PKCS#11 URI {part} attribute {name!r} is not supported here (use {', '.join(known)})")
        if name in out:
            raise InvalidKeyUri(f"PKCS#11 URI attribute {name!r} is given twice")
        out[name] = value if name == "id" else urllib.parse.unquote(value, errors="strict")
    return out


# -- the module and its sessions, once per process


@dataclass
class _Module:
    lib: Any  # pkcs11.lib
    pid: int
    generation: int = 0
    failed: bool = False  # an error since the last initialization: initialize again before the next use
    # One session per token: a PKCS#11 login belongs to the process, not the session, and
    # closing a session can log out the others, so every key on a token shares this one.
    sessions: dict[tuple[int, bytes], Any] = field(default_factory=dict)


_LOCK = threading.RLock()  # a PKCS#11 session runs one operation at a time; gRPC threads sign too
_MODULES: dict[Path, _Module] = {}
# PIN files a token refused, by their stat: a retry with the same file would only count
# towards the token's PIN lockout, so the next login waits for the file to change.
_REFUSED_PINS: dict[Path, tuple[int, int, int] | None] = {}


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def _module(path: Path) -> _Module:
    """The loaded module at ``path``, initialized in this process, and again after an error."""
    import pkcs11

    module = _MODULES.get(path)
    try:
        if module is None:
            if not path.is_file():
                raise KeyCustodyError(f"PKCS#11 module-path {path}: no such file")
            module = _MODULES[path] = _Module(pkcs11.lib(str(path)), os.getpid())
        elif module.failed or module.pid != os.getpid():
            # A forked child must initialize the module itself; after an error, initializing
            # again is what makes a module look for its tokens again (SoftHSM2 does not otherwise).
            module.sessions.clear()  # C_Finalize closed them
            module.lib.reinitialize()
            module.pid = os.getpid()
            module.generation += 1
            module.failed = False
    except pkcs11.exceptions.PKCS11Error as exc:
        raise KeyCustodyError(
            f"cannot load the PKCS#11 module {path}: {type(exc).__name__} {exc}".rstrip(), type(exc).__name__
        ) from None
    return module


def _session(uri: Pkcs11Uri) -> tuple[Any, int]:
    """The session on the token ``uri`` names, logged in with its PIN; and the module's generation."""

    module = _module(uri.module_path)
    try:
        return _logged_in(uri, module), module.generation
    except KeyCustodyError:
        module.failed = True
        raise


def _logged_in(uri: Pkcs11Uri, module: _Module) -> Any:
    import pkcs11

    token = _find_token(uri, module)
    ident = (token.slot.slot_id, token.serial)
    session = module.sessions.get(ident)
    if session is None:
        pin_stamp = _stamp(uri.pin_source)
        if uri.pin_source is not None and pin_stamp is not None and _REFUSED_PINS.get(uri.pin_source) == pin_stamp:
            raise KeyCustodyError(
                f"PKCS#11 error PinIncorrect logging in to {uri.describe()}: not tried again until "
                f"{uri.pin_source} changes (every wrong PIN counts towards the token's lockout)",
                "PinIncorrect",
            )
        try:
            try:
                session = token.open(rw=True, user_pin=uri.read_pin())
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                session = token.open(rw=True)  # logged in by an earlier session of this process
        except pkcs11.exceptions.PKCS11Error as exc:
            if isinstance(exc, pkcs11.exceptions.PinIncorrect) and uri.pin_source is not None:
                _REFUSED_PINS[uri.pin_source] = pin_stamp
            raise _failure(exc, uri, "logging in to") from None
        module.sessions[ident] = session
    return session


# -- a key on a token


class TokenKey:
    """A private key held by a PKCS#11 token: it signs there and never leaves it.

    `open` finds an existing key pair, `generate` makes one (sensitive, not
    extractable). Both open a session now, so a missing token or a wrong PIN
    fails at once, in one line.
    """

    __slots__ = ("_generation", "_key", "_key_type", "_public_key", "uri")

    def __init__(self, uri: Pkcs11Uri) -> None:
        self.uri = uri
        self._key: Any = None
        self._generation = -1
        self._public_key: PublicKey | None = None
        self._key_type: KeyType | None = None

    @classmethod
    def open(cls, uri: Pkcs11Uri) -> TokenKey:
        key = cls(uri)
        with _LOCK:
            key._connect()
        return key

    @classmethod
    def generate(cls, uri: Pkcs11Uri, key_type: KeyType) -> TokenKey:
        """Generates the key pair on the token, labelled and identified as ``uri`` names it."""
        import pkcs11
        from pkcs11 import Attribute, MechanismFlag, ObjectClass
        from pkcs11.util.ec import encode_named_curve_parameters

        if uri.pin_source is None:
            raise InvalidKeyUri("generating a key logs in to the token: add pin-source=file:PATH to the URI")
        key_id = uri.id if uri.id is not None else secrets.token_bytes(8)
        private: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
        with _LOCK:
            session, _ = _session(uri)
            try:
                for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    if list(session.get_objects(_search(uri, object_class))):
                        raise KeyCustodyError(
                            f"{uri.describe()}: the token already holds a key by that name; "
                            "name another object, or delete it with the token's own tools"
                        )
                names = {"label": uri.object, "id": key_id, "store": True, "capabilities": caps}
                if key_type.is_rsa:
                    public[Attribute.PUBLIC_EXPONENT] = (65537).to_bytes(3, "big")
                    bits = int(key_type.value.split("-")[1])
                    session.generate_keypair(
                        pkcs11.KeyType.RSA, bits, public_template=public, private_template=private, **names
                    )
                else:
                    params = session.create_domain_parameters(
                        pkcs11.KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_OIDS[key_type])},
                        local=True,
                    )
                    params.generate_keypair(public_template=public, private_template=private, **names)
            except pkcs11.exceptions.PKCS11Error as exc:
                _MODULES[uri.module_path].failed = True
                raise _failure(exc, uri, "generating a key on") from None
        return cls.open(uri)

    # -- Signer

    @property
    def key_type(self) -> KeyType:
        assert self._key_type is not None  # set by _connect, which every constructor runs
        return self._key_type

    def public_key(self) -> PublicKey:
        assert self._public_key is not None
        return self._public_key

    def sign(self, data: bytes, algorithm: Hash) -> bytes:
        import pkcs11
        from pkcs11 import Mechanism

        with _LOCK:
            module = _MODULES.get(self.uri.module_path)
            if (
                self._key is None
                or module is None
                or (module.generation, module.pid) != (self._generation, os.getpid())
            ):
                # After an error (here or with another key of the module), a new
                # initialization (or a fork): a new session.
                self._connect()
            try:
                if self.key_type.is_rsa:
                    sha384 = isinstance(algorithm, hashes.SHA384)
                    mechanism = Mechanism.SHA384_RSA_PKCS if sha384 else Mechanism.SHA256_RSA_PKCS
                    return bytes(self._key.sign(data, mechanism=mechanism))
                digest = hashes.Hash(algorithm)
                digest.update(data)
                # CKM_ECDSA on the digest: every token has it (SoftHSM2 lacks CKM_ECDSA_SHA256).
                raw = bytes(self._key.sign(digest.finalize(), mechanism=Mechanism.ECDSA))
            except pkcs11.exceptions.PKCS11Error as exc:
                self._key = None
                _MODULES[self.uri.module_path].failed = True  # initialize again, then a new session
                raise _failure(exc, self.uri, "signing with") from None
        half = len(raw) // 2  # PKCS#11 gives r || s; X.509 wants DER SEQUENCE { r, s }
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    # -- sessions

    def _connect(self) -> None:
        import pkcs11
        from pkcs11 import ObjectClass

        self._key = None
        session, generation = _session(self.uri)
        try:
            key = _one(session, self.uri, ObjectClass.PRIVATE_KEY)
            public_key = _public_key(_one(session, self.uri, ObjectClass.PUBLIC_KEY))
            if key.key_type not in (pkcs11.KeyType.EC, pkcs11.KeyType.RSA):
                raise KeyCustodyError(f"{self.uri.describe()}: an {key.key_type.name} key; meshca signs with EC or RSA")
            key_type = key_type_of(public_key)
        except (pkcs11.exceptions.PKCS11Error, KeyCustodyError, ValueError) as exc:
            if isinstance(exc, pkcs11.exceptions.PKCS11Error):
                _MODULES[self.uri.module_path].failed = True
                raise _failure(exc, self.uri, "reading the key from") from None
            if isinstance(exc, KeyCustodyError):
                raise
            raise KeyCustodyError(f"{self.uri.describe()}: {exc}") from None
        if self._public_key is not None and public_key != self._public_key:
            raise KeyCustodyError(f"{self.uri.describe()} now names another key than it did")
        self._key, self._generation = key, generation
        self._public_key, self._key_type = public_key, key_type

    def __repr__(self) -> str:
        return f"TokenKey({self.uri.describe()})"


def _find_token(uri: Pkcs11Uri, module: _Module) -> Any:
    import pkcs11

    wanted = {"label": uri.token, "manufacturer_id": uri.manufacturer, "model": uri.model, "serial": uri.serial}
    found = []
    try:
        for slot in module.lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            token = slot.get_token()
            have = {
                "label": token.label,
                "manufacturer_id": token.manufacturer_id,
                "model": token.model,
                "serial": token.serial.decode("ascii", "replace"),
            }
            if all(value is None or have[name] == value for name, value in wanted.items()):
                found.append(token)
    except pkcs11.exceptions.PKCS11Error as exc:
        raise _failure(exc, uri, "looking for") from None
    if not found:
        raise KeyCustodyError(f"{uri.describe()}: no such token is present (module {uri.module_path})", "NoSuchToken")
    if len(found) > 1:
        raise KeyCustodyError(f"{uri.describe()}: {len(found)} tokens match; add token= or serial= to the URI")
    return found[0]


def _search(uri: Pkcs11Uri, object_class: Any) -> dict[Any, Any]:
    from pkcs11 import Attribute

    template: dict[Any, Any] = {Attribute.CLASS: object_class}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    return template


def _one(session: Any, uri: Pkcs11Uri, object_class: Any) -> Any:
    found = list(session.get_objects(_search(uri, object_class)))
    what = "private" if object_class.name == "PRIVATE_KEY" else "public"
    if not found:
        raise KeyCustodyError(f"{uri.describe()}: the token holds no {what} key by that name", "NoSuchKey")
    if len(found) > 1:
        raise KeyCustodyError(f"{uri.describe()}: {len(found)} {what} keys match; add id= to the URI")
    return found[0]


def _public_key(obj: Any) -> PublicKey:
    from pkcs11 import Attribute
    from pkcs11 import KeyType as P11KeyType
    from pkcs11.util.ec import encode_ec_public_key

    if obj.key_type == P11KeyType.RSA:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    loaded = serialization.load_der_public_key(encode_ec_public_key(obj))
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise KeyCustodyError("the token's public key is of an unsupported type")
    return loaded


def _failure(exc: pkcs11.exceptions.PKCS11Error, uri: Pkcs11Uri, doing: str) -> KeyCustodyError:
    name = type(exc).__name__
    hint = ""
    if name == "PinIncorrect" and uri.pin_source is not None:
        hint = f" (the PIN in {uri.pin_source} is wrong)"
    elif name in ("PinLocked", "PinExpired"):
        hint = " (the token's security officer must reset the user PIN)"
    return KeyCustodyError(f"PKCS#11 error {name} {doing} {uri.describe()}{hint}", name)
