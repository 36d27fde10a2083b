"""Crafted images for the hardening tests: decompression bombs (a few KB declaring 100+ Mpx)."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 11_000, height: int = 11_000) -> bytes:
    """A valid 1-bit grayscale PNG of `width` x `height` black pixels: ~15 KB on disk, and
    width * height * 3 bytes (363 MB at 11000 x 11000) once decoded to RGB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(
        b"IEND", b""
    )
