"""Test helper: tiny files whose headers promise huge images.

Each costs a few hundred bytes to a few hundred KB to send, and seconds and gigabytes to
decode naively. The benchmark ``benchmarks/serve_abuse.py`` sends the same files.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# JPEG's start-of-frame markers (baseline, extended, progressive): height and width follow.
_SOF_MARKERS = (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2")


def lying_jpeg(width: int = 9000, height: int = 9000) -> bytes:
    """A small gray JPEG whose frame header claims ``width`` x ``height``; its data ends long before."""
    buf = io.BytesIO()
    Image.new("L", (16, 16), 200).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    start = min(i for i in (data.find(m) for m in _SOF_MARKERS) if i >= 0)
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)  # marker, length, precision, then H, W
    return bytes(data)


def zeros_png(width: int, height: int) -> bytes:
    """A black 8-bit gray PNG of ``width`` x ``height``, compressed row by row (no big buffer)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter type 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def hostile_files() -> dict[str, bytes]:
    """The issue's three: a lying JPEG header, a 9000x9000 PNG, an 89000x1000 PNG."""
    return {
        "lying-9000x9000.jpg": lying_jpeg(9000, 9000),
        "zeros-9000x9000.png": zeros_png(9000, 9000),
        "zeros-89000x1000.png": zeros_png(89000, 1000),
    }
