import json

import numpy as np
import pytest

from common.codec import (
    HEADER_LENGTH,
    CodecError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


@pytest.mark.parametrize("binary", [True, False])
def test_roundtrip(binary):
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    route = np.array([0, 1, -1, 0, 1], dtype=np.int32)
    body, headers = encode_request({"x": x, "route": route}, outputs=["v"], binary=binary)
    msg = decode_request(body, headers.get(HEADER_LENGTH))
    assert np.array_equal(msg.tensors["x"], x) and msg.tensors["route"].dtype == np.int32
    assert msg.outputs == {"v": binary}
    body, headers = encode_response(
        {"v": x}, "a", "3", binary=binary, parameters={"compute_ms": 1.0}
    )
    resp = decode_response(body, headers.get(HEADER_LENGTH))
    assert np.array_equal(resp.tensors["v"], x) and resp.model_version == "3"
    assert resp.parameters["compute_ms"] == 1.0


def _doc(**entry):
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], **entry}]}
    ).encode()


@pytest.mark.parametrize(
    ("body", "header", "match"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b"{}", None, "'inputs' list"),
        (_doc(data=[1, 2, 3]), None, "3 values for shape"),
        (_doc(datatype="FP9", data=[1, 2, 3, 4]), None, "unknown datatype"),
        (_doc(shape=[2, -1], data=[1]), None, "non-negative"),
        (_doc(data=["a", "b", "c", "d"]), None, "numbers"),
        (_doc(), None, "neither 'data' nor binary_data_size"),
        (_doc(parameters={"binary_data_size": 16}), None, "no Inference-Header"),
        (
            _doc(shape=[1_000_000_000, 2], parameters={"binary_data_size": 8_000_000_000}),
            "X",
            "integer",
        ),
    ],
)
def test_malformed_requests_name_the_problem(body, header, match):
    with pytest.raises(CodecError, match=match):
        decode_request(body, header)


def test_declared_size_beyond_body_is_refused_without_allocating():
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1_000_000_000, 2],
                    "parameters": {"binary_data_size": 8_000_000_000},
                }
            ]
        }
    ).encode()
    with pytest.raises(CodecError, match="needs 8000000000 bytes"):
        decode_request(head + b"\0" * 16, str(len(head)))
    with pytest.raises(CodecError, match="does not match shape"):
        decode_request(head.replace(b"8000000000", b"16") + b"\0" * 16, str(len(head) - 8))
