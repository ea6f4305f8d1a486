"""FP16 and BF16 tensors on the wire (JSON and binary); BF16 as tagged uint16 bit patterns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.codec import (
    BF16,
    HEADER_LENGTH,
    CodecError,
    bf16_to_float32,
    datatype_of,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    float32_to_bf16,
)


def test_bf16_rounding_matches_torch() -> None:
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    x[:4] = [np.inf, -np.inf, 3.4e38, 1e-40]
    ours = float32_to_bf16(x).view(np.uint16)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan], np.float32)))).all()
    back = bf16_to_float32(float32_to_bf16(x[4:]))
    assert np.allclose(back, x[4:], rtol=2**-8)


@pytest.mark.parametrize("binary", [True, False])
def test_half_datatypes_round_trip_in_any_rank(binary: bool) -> None:
    rng = np.random.default_rng(1)
    x16 = rng.standard_normal((2, 4, 8, 8)).astype(np.float16)
    xbf = float32_to_bf16(rng.standard_normal((2, 5, 16)).astype(np.float32))
    body, headers = encode_request({"x": x16, "c": xbf}, binary=binary)
    msg = decode_request(body, headers.get(HEADER_LENGTH))
    assert msg.tensors["x"].dtype == np.float16 and np.array_equal(msg.tensors["x"], x16)
    got = msg.tensors["c"]
    assert datatype_of(got) == "BF16" and got.shape == (2, 5, 16)
    assert np.array_equal(got.view(np.uint16), xbf.view(np.uint16))
    if not binary:
        head = json.loads(body)
        assert [i["datatype"] for i in head["inputs"]] == ["FP16", "BF16"]
    body, headers = encode_response({"v": xbf}, "m", "1", binary=binary)
    out = decode_response(body, headers.get(HEADER_LENGTH)).tensors["v"]
    assert datatype_of(out) == "BF16" and np.array_equal(out.view(np.uint16), xbf.view(np.uint16))


def test_plain_uint16_has_no_datatype() -> None:
    with pytest.raises(CodecError, match="no v2 datatype"):
        datatype_of(np.zeros(3, np.uint16))
    assert datatype_of(np.zeros(3, np.uint16).view(BF16)) == "BF16"
