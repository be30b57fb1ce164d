"""The infer reply's encodings: whatever the body, a standard zlib or zstd decoder gets it back exactly."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from backports import zstd

from segany_pet.label.replies import ZERO_CHUNK_BYTES, accepted_codings, deflate_sparse, zstd_encode


def bodies():
    rng = np.random.default_rng(0)
    label = np.zeros(3 * ZERO_CHUNK_BYTES + 1234, np.uint8)
    label[:300] = 78  # an NRRD header's worth of text
    label[ZERO_CHUNK_BYTES + 5: ZERO_CHUNK_BYTES + 9000] = 1  # a lesion in the second chunk
    label[-1] = 2  # and the very last voxel
    noise = rng.integers(0, 256, 2 * ZERO_CHUNK_BYTES + 7, dtype=np.uint8)
    return {"empty": b"", "short": b"NRRD0004", "one zero chunk": bytes(ZERO_CHUNK_BYTES),
            "zeros and a tail": bytes(2 * ZERO_CHUNK_BYTES + 17), "sparse label": label.tobytes(),
            "incompressible": noise.tobytes()}


@pytest.mark.parametrize("name", list(bodies()))
def test_deflate_sparse_round_trips(name):
    body = bodies()[name]
    encoded = deflate_sparse(body)
    assert zlib.decompress(encoded) == body  # checks the Adler-32 too
    if name == "sparse label":
        assert len(encoded) < len(body) / 50


@pytest.mark.parametrize("name", list(bodies()))
def test_zstd_encode_round_trips_from_parts(name):
    body = bodies()[name]
    parts = [body[:100], memoryview(np.frombuffer(body[100:], np.uint8))]  # as the NRRD reply: header, voxels
    encoded = zstd_encode(*parts)
    assert zstd.decompress(encoded) == body
    if name == "sparse label":
        assert len(encoded) < len(body) / 50


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip, deflate, br, zstd", {"gzip", "deflate", "br", "zstd"}),
    ("ZSTD;q=0.5 , deflate", {"zstd", "deflate"}),
    ("zstd;q=0, deflate;q=1.0", {"deflate"}),
    ("zstd;q=zero, deflate", {"deflate"}),
    ("", set()),
    ("identity", {"identity"}),
])
def test_accepted_codings(header, expected):
    assert accepted_codings(header) == expected
