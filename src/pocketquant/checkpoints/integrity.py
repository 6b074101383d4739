"""Checksums of a packed file, so that a damaged file is refused instead of generating garbage.

The writer stores two metadata entries (format 1.1 on):
    tensor_crc32   {tensor name: CRC-32 of its bytes, 8 hex digits}
    header_sha256  SHA-256 of the header: every other metadata entry and the tensor table (names, dtypes,
                   shapes, offsets), as canonical JSON
and the header's bytes must be exactly those the writer makes of its content, so that an edit which keeps the
meaning (an escape spelled differently) is caught too. The header's checksum is verified whenever a file is
read; the tensors' on load (two threads: about 0.2 s per GB here) unless the caller opts out, and by
`inspect --verify`. They catch damage (flipped bits, truncated or zeroed
regions, a header edited by hand), not a forger, who can recompute both: the loaders' own checks are still
there for that."""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pocketquant.errors import PocketQuantError

HEADER_KEY, TENSORS_KEY = "header_sha256", "tensor_crc32"
MAX_HEADER = 100 << 20  # bytes of a safetensors header, at most (the safetensors library's own limit)


def crc32_hex(data) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def header_digest(metadata: dict[str, str], table: dict[str, dict]) -> str:
    """SHA-256 of a header: its metadata less this digest, and its tensor table, as canonical JSON."""
    body = {"metadata": {k: v for k, v in metadata.items() if k != HEADER_KEY}, "tensors": table}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(metadata: dict[str, str], table: dict[str, dict], crcs: dict[str, str]) -> dict[str, str]:
    """The metadata with the tensors' CRC-32s and the header's digest added."""
    metadata = {**metadata, TENSORS_KEY: json.dumps(crcs, sort_keys=True)}
    return {**metadata, HEADER_KEY: header_digest(metadata, table)}


def header_bytes(header: dict) -> bytes:
    """The bytes the writer stores for a header: compact JSON, padded with spaces to a multiple of 8."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # so that the data starts 8-byte aligned


def raw_header(path: Path) -> tuple[dict, int, bytes]:
    """A safetensors file's header as JSON data, where its tensor data starts, and the header's bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= MAX_HEADER:
                raise PocketQuantError(f"{path}: not a readable safetensors file (header size {n})")
            raw = f.read(n)
            header = json.loads(raw)
    except OSError as e:
        raise PocketQuantError(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:
        raise PocketQuantError(f"{path}: not a readable safetensors file (damaged header: {e})") from e
    if not isinstance(header, dict):
        raise PocketQuantError(f"{path}: not a readable safetensors file (the header is not an object)")
    return header, 8 + n, raw


def verify_header(path: Path):
    """Refuse a file whose header's digest does not match (or that has none), or whose header bytes are not
    those the writer makes of its content."""
    header, _, raw = raw_header(path)
    metadata = header.get("__metadata__") or {}
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    if metadata.get(HEADER_KEY) != header_digest(metadata, table) or raw != header_bytes(header):
        raise PocketQuantError(f"{path}: the header is damaged (its SHA-256 does not match what was written); "
                               "make the file again or copy it again")


def verify_tensors(path: Path, threads: int = 2) -> int:
    """Refuse a file any of whose tensors' bytes do not match their CRC-32 (its header already verified); return
    how many tensors were checked."""
    header, start, _ = raw_header(path)
    try:
        crcs = json.loads(header["__metadata__"][TENSORS_KEY])
    except (KeyError, TypeError, ValueError) as e:
        raise PocketQuantError(f"{path}: the tensors' checksums are missing or damaged") from e
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    if not isinstance(crcs, dict) or set(crcs) != set(table):
        raise PocketQuantError(f"{path}: the checksums name other tensors than the file holds")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = start + max((v["data_offsets"][1] for v in table.values()), default=0)
            if len(m) != end:
                raise PocketQuantError(f"{path}: the file has {len(m):,} bytes where its header says {end:,} (cut "
                                       "short or added to); make the file again or copy it again")
            view = memoryview(m)
            try:
                def check(name: str) -> str | None:
                    lo, hi = (start + o for o in table[name]["data_offsets"])
                    if not start <= lo <= hi <= len(m) or crc32_hex(view[lo:hi]) != crcs[name]:
                        return name
                    return None
                with ThreadPoolExecutor(max(1, threads)) as pool:  # zlib lets go of the GIL while it sums
                    damaged = [n for n in pool.map(check, sorted(table)) if n is not None]
            finally:
                view.release()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PocketQuantError(f"{path}: cannot verify its tensors ({type(e).__name__}: {e})") from e
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise PocketQuantError(f"{path}: damaged tensor data: {', '.join(damaged[:3])}{more} do not match their "
                               "CRC-32; make the file again or copy it again")
    return len(table)
