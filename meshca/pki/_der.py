"""The little DER meshca writes by hand: a TLV, the children of a sequence, a signed certificate.

Shared by the leaf template (`pki/_template.py`) and the certificates a key
outside this process signs (`pki/_custody.py`).
"""

from __future__ import annotations

__all__ = ["certificate_der", "children", "tlv"]

SEQUENCE = 0x30
_BIT_STRING = 0x03


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + content


def children(der: bytes) -> list[bytes]:
    """The TLVs inside one constructed DER element (single-octet tags, as in every X.509 field used here)."""
    header = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    content = der[header:]
    out = []
    i = 0
    while i < len(content):
        first = content[i + 1]
        if first < 0x80:
            size, start = first, i + 2
        else:
            count = first & 0x7F
            size, start = int.from_bytes(content[i + 2 : i + 2 + count], "big"), i + 2 + count
        out.append(content[i : start + size])
        i = start + size
    return out


def certificate_der(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """RFC 5280 Certificate: SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }."""
    return tlv(SEQUENCE, tbs + signature_algorithm + tlv(_BIT_STRING, b"\x00" + signature))
