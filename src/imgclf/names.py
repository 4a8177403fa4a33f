"""File names as other systems write them: any bytes, kept faithfully.

On Linux a file name is bytes; Python gives the bytes that are not UTF-8 as lone
surrogates (``os.fsdecode``), which cannot be encoded as UTF-8 text, so every place
that writes or hashes a name goes through here. Results keep two columns: ``path``,
valid UTF-8 text with each such byte written ``\\xNN`` (readable, what a person and
a spreadsheet see), and ``path_bytes``, the name's raw bytes in hex where it is not
UTF-8 (null otherwise), so the exact name can always be recovered (:func:`from_columns`).
"""

from __future__ import annotations

import os


def name_bytes(name: str) -> bytes:
    """The name's bytes as the file system has them."""
    return name.encode("utf-8", "surrogateescape")


def is_text(name: str) -> bool:
    """Whether the name is valid UTF-8 (no undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """Valid UTF-8 text for the name: bytes that are not UTF-8 written ``\\xNN``."""
    return name_bytes(name).decode("utf-8", "backslashreplace")


def raw_hex(name: str) -> str | None:
    """The name's bytes in hex where it is not valid UTF-8, else None."""
    return None if is_text(name) else name_bytes(name).hex()


def from_columns(path: str, path_bytes: str | None) -> str:
    """The exact name (as Python holds it) back from a result's two columns."""
    return os.fsdecode(bytes.fromhex(path_bytes)) if path_bytes else path
