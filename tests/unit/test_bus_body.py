"""Bus bodies: zstd frames for large Bundles, plain JSON for small ones, and one decoder for both."""
from __future__ import annotations

import orjson
import pytest
import zstandard

from vigil import bus


def bundle(n: int) -> bytes:
    return bus.encode_bundle([{"resourceType": "Observation", "id": f"o{i}", "status": "final",
                               "valueQuantity": {"value": 70 + i, "unit": "/min"}} for i in range(n)])


def test_large_bodies_become_a_zstd_frame_and_decode_back():
    body = bundle(100)
    wire = bus.wire_body(body)
    assert wire[:4] == bus.ZSTD_MAGIC
    assert len(wire) * 5 < len(body)
    assert bus.plain_body(wire) == body
    assert bus.decode_bundle(wire) == [e["resource"] for e in orjson.loads(body)["entry"]]
    assert [e["resource"]["id"] for e in orjson.loads(body)["entry"]] == [r["id"] for r in bus.decode_bundle(wire)]


def test_small_bodies_and_compression_none_stay_plain_json():
    small = bundle(1)
    assert len(small) < bus.COMPRESS_MIN_BYTES
    assert bus.wire_body(small) is small
    big = bundle(100)
    assert bus.wire_body(big, "none") is big
    assert bus.decode_bundle(big)[99]["id"] == "o99"


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="VIGIL_BUS_COMPRESSION"):
        bus.wire_body(bundle(100), "gzip")


def test_corrupt_or_oversized_frames_are_refused_with_a_clear_error():
    wire = bytearray(bus.wire_body(bundle(100)))
    wire[len(wire) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="bus message"):
        bus.decode_bundle(bytes(wire))
    # A frame announcing more than MAX_BODY_BYTES is refused before anything is decompressed.
    bomb = zstandard.ZstdCompressor(level=1).compress(b" " * (bus.MAX_BODY_BYTES + 1))
    with pytest.raises(ValueError, match="more than"):
        bus.plain_body(bomb)
    # A streamed frame carries no content size: refused as well.
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bundle(100))
    with pytest.raises(ValueError, match="no content size"):
        bus.plain_body(streamed)
