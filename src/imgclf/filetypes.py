"""What a file is, told from its first bytes, never from its name.

A model saved as ``model.onnx.bak`` or weights downloaded as ``weights.bin``
must load all the same, and a file named ``.imgclf`` that is something else
must be refused with a clear message rather than fed to the wrong parser.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

FileKind = Literal["safetensors", "onnx", "torch", "empty", "truncated", "unknown"]

#: What a file that is not the model it should be is, in words (the one table of them).
WHAT_IT_IS = {
    "empty": "the file is empty (0 bytes)",
    "torch": "it is a PyTorch file, not a safetensors model (PyTorch weights go to train --weights FILE)",
    "truncated": "it is cut short: its safetensors header promises more bytes than the file holds (an "
                 "interrupted copy or download?)",
    "unknown": "its first bytes are neither a safetensors nor an ONNX header",
}  # fmt: skip

_HEAD = 16


def sniff_bytes(head: bytes, size: int) -> FileKind:
    """The kind of a file whose first bytes are ``head`` and whose length is ``size``.

    - safetensors: an 8-byte little-endian header length, then a JSON object (``{``);
    - torch: a zip archive (``torch.save`` since 1.6) or a pickle (protocol 2+);
    - ONNX: a protobuf ``ModelProto`` starts with field 1 (``ir_version``), a varint: byte 0x08.
    """
    if size == 0:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return "safetensors"
        if 2 <= header_len < 100_000_000:  # a plausible header the file is too short for
            return "truncated"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def sniff(path: str | Path) -> FileKind:
    """The kind of the file at ``path`` (raises OSError if it cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD)
        size = f.seek(0, 2)
    return sniff_bytes(head, size)
