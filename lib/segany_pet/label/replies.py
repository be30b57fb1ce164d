"""Infer replies as the server sends them: a label file from memory, compressed for clients that accept zstd or
deflate, or MONAI Label's multipart answer (params and file) without joining the file into one copy."""

from __future__ import annotations

import functools
import json
import secrets
import struct
import zlib
from collections.abc import Mapping

import numpy as np
from backports import zstd
from fastapi import Request
from fastapi.responses import Response

# Infer replies at least this large go compressed to clients that accept it: a whole-body label is mostly
# zeros, and browsers decode it natively. zstd first: an autoPET-sized label (52 MB raw) is 2 kB in zstd
# against 243 kB in deflate, which counts on a remote annotator's link, and Python decodes it in 0.06 s
# against 0.08 s; on loopback Chromium's clicks measured alike (scripts/benchmark_server.py).
ENCODE_MINIMUM_BYTES = 64 * 1024
LABEL_BOX_HEADER = "X-Label-Box"  # "i0 j0 k0 ni nj nk" of a label_box reply (segany_pet.pet.mask_nrrd_box)
ZSTD_LEVEL = 1
# deflate_sparse: chunks of this many zero bytes are spliced in precompressed; zlib level of the others.
# 64 kB rather than 1 MB: a lesion's slab of slices then leaves fewer zeros to compress (measured: 1.0 against
# 6.0 ms on a 4 mm whole-body label, 10.8 against 22.1 ms on an autoPET-sized one, 6% larger).
ZERO_CHUNK_BYTES = 1 << 16
DEFLATE_LEVEL = 1
ADLER_MODULUS = 65521


@functools.cache
def _deflated_zero_chunk() -> bytes:
    """ZERO_CHUNK_BYTES zeros as raw deflate blocks ending in a full flush: a piece that can be spliced into
    any deflate stream at a full-flush boundary (nothing after a full flush refers to what came before)."""
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(bytes(ZERO_CHUNK_BYTES)) + compressor.flush(zlib.Z_FULL_FLUSH)


def deflate_sparse(*parts) -> bytes:
    """The concatenated ``parts`` (bytes-like) as a zlib stream (RFC 1950, HTTP's ``deflate``), fast when they
    are mostly zeros.

    All-zero chunks of ZERO_CHUNK_BYTES are not compressed again: the precompressed chunk is spliced in and the
    Adler-32 checksum advanced arithmetically (n zeros leave its sum A and add n * A to B). Timed against zlib
    over the whole body by scripts/benchmark_server.py.
    """
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [b"\x78\x01"]  # zlib header: deflate, 32 kB window, fastest level
    checksum = 1
    flushed = True  # no compressed data pending since the last full flush
    for part in parts:
        view = memoryview(part).cast("B")
        data = np.frombuffer(view, dtype=np.uint8)
        whole = len(data) // ZERO_CHUNK_BYTES
        empty = ~data[: whole * ZERO_CHUNK_BYTES].reshape(whole, ZERO_CHUNK_BYTES).any(axis=1)
        for index in range(whole):
            if empty[index]:
                if not flushed:
                    stream.append(compressor.flush(zlib.Z_FULL_FLUSH))
                stream.append(_deflated_zero_chunk())
                low, high = checksum & 0xFFFF, checksum >> 16
                checksum = ((high + ZERO_CHUNK_BYTES * low) % ADLER_MODULUS) << 16 | low
                flushed = True
            else:
                chunk = view[index * ZERO_CHUNK_BYTES:(index + 1) * ZERO_CHUNK_BYTES]
                stream.append(compressor.compress(chunk))
                checksum = zlib.adler32(chunk, checksum)
                flushed = False
        tail = view[whole * ZERO_CHUNK_BYTES:]
        if len(tail):
            stream.append(compressor.compress(tail))
            checksum = zlib.adler32(tail, checksum)
            flushed = False
    stream += [compressor.flush(zlib.Z_FINISH), struct.pack(">I", checksum)]
    return b"".join(stream)


def zstd_encode(*parts) -> bytes:
    """The concatenated ``parts`` (bytes-like) as one zstd frame (HTTP's ``zstd``) that records its size."""
    compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL)
    compressor.set_pledged_input_size(sum(memoryview(part).nbytes for part in parts))
    return b"".join([compressor.compress(part) for part in parts] + [compressor.flush()])


CONTENT_ENCODERS = {"zstd": zstd_encode, "deflate": deflate_sparse}  # in order of preference


def accepted_codings(accept_encoding: str) -> set[str]:
    """The content codings an ``Accept-Encoding`` header accepts: listed without ``q=0``."""
    accepted = set()
    for item in accept_encoding.lower().split(","):
        name, *options = (piece.strip() for piece in item.split(";"))
        weights = [option.partition("=")[2] for option in options if option.startswith("q=")]
        try:
            if name and (not weights or float(weights[0]) > 0):
                accepted.add(name)
        except ValueError:
            continue  # a malformed weight: not an acceptance
    return accepted


def label_response(parts, http_request: Request, *, media_type: str, headers: Mapping[str, str]) -> Response:
    """A reply holding a file given in parts (bytes-like), compressed when the client accepts zstd or deflate
    and the file is large and not gzip already (a .nii.gz reply)."""
    size = sum(memoryview(part).nbytes for part in parts)
    if size >= ENCODE_MINIMUM_BYTES and bytes(memoryview(parts[0])[:2]) != b"\x1f\x8b":
        accepted = accepted_codings(http_request.headers.get("accept-encoding", ""))
        for coding, encode in CONTENT_ENCODERS.items():
            if coding in accepted:
                return Response(content=encode(*parts), media_type=media_type,
                                headers={**headers, "Content-Encoding": coding, "Vary": "Accept-Encoding"})
    return Response(content=b"".join(parts), media_type=media_type, headers=dict(headers))


def disposition(filename: str) -> dict:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}


def multipart_reply(params: dict, filename: str, file_parts) -> tuple[list, str]:
    """MONAI Label's answer to a request without ``output=image`` (form fields ``params``, JSON, and ``image``,
    the label file), as (parts, media type) over the file's parts in memory: requests_toolbelt's encoder, which
    MONAI Label uses, wants one file object, and joining an autoPET-sized label into one costs a 52 MB copy."""
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
        f"{json.dumps(params)}\r\n--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return [head.encode(), *file_parts, f"\r\n--{boundary}--\r\n".encode()], \
        f"multipart/form-data; boundary={boundary}"
