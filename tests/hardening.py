"""Helpers of the hardening tests: crafted images (decompression bombs) and the listening
sockets of a set of processes."""

from __future__ import annotations

import ipaddress
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
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def listening_sockets(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket (IPv4 and IPv6) of the
    processes `pids`, sorted."""
    import psutil

    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants: a driver that started Ray is the ancestor of the GCS,
    the raylet, the dashboard and its agents, and every worker (Serve proxy and replicas)."""
    import psutil

    root = psutil.Process(pid)
    return [root.pid] + [child.pid for child in root.children(recursive=True)]
