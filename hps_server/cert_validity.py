"""When a PEM certificate is valid: its X.509 validity period, read from the DER encoding (Certificate ->
TBSCertificate -> Validity), so the server can warn about a certificate that clients will refuse. The ssl
module decodes certificates only of live connections; this reads the few DER fields that hold the dates."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

_SEQUENCE = 0x30
_EXPLICIT_VERSION = 0xA0
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


class CertificateFormatError(ValueError):
    """The bytes are not a PEM certificate whose validity could be read."""


def validity(pem: bytes) -> tuple[datetime, datetime]:
    """(not before, not after) of the first certificate in `pem`, in UTC."""
    text = pem.decode("ascii", errors="replace")
    end = text.find(ssl.PEM_FOOTER)
    if ssl.PEM_HEADER not in text or end < 0:
        raise CertificateFormatError("no PEM certificate")
    try:
        (certificate,) = _elements(ssl.PEM_cert_to_DER_cert(text[: end + len(ssl.PEM_FOOTER)]))
        tbs = _children(_children(certificate)[0])
        if tbs[0][0] == _EXPLICIT_VERSION:
            tbs = tbs[1:]
        # serial number, signature algorithm, issuer, then validity
        not_before, not_after = _children(tbs[3])
        return _time(not_before), _time(not_after)
    except (IndexError, ValueError) as e:
        raise CertificateFormatError(f"not an X.509 certificate ({e})") from None


def _elements(data: bytes) -> list[bytes]:
    """The TLV elements (tag, length, value) of `data`, in order."""
    found = []
    while data:
        first = data[1]
        if first < 0x80:
            start, length = 2, first
        else:
            width = first & 0x7F
            if not 1 <= width <= 4:
                raise ValueError("unsupported DER length")
            start, length = 2 + width, int.from_bytes(data[2 : 2 + width], "big")
        if start + length > len(data):
            raise ValueError("truncated DER")
        found.append(data[: start + length])
        data = data[start + length :]
    return found


def _content(element: bytes) -> bytes:
    return element[2 if element[1] < 0x80 else 2 + (element[1] & 0x7F) :]


def _children(sequence: bytes) -> list[bytes]:
    """The elements inside a DER SEQUENCE."""
    if sequence[0] != _SEQUENCE:
        raise ValueError(f"expected a DER SEQUENCE, got tag {sequence[0]:#x}")
    return _elements(_content(sequence))


def _time(element: bytes) -> datetime:
    text = _content(element).decode("ascii")
    if element[0] == _UTC_TIME:  # YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif element[0] != _GENERALIZED_TIME:
        raise ValueError("validity is not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
