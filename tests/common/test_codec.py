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


def test_repeated_request_header_decodes_like_the_first():
    """The second request with the same header comes from the cached layout: same tensors and
    fields, its own bytes, and its own parameters and outputs dicts."""
    rng = np.random.default_rng(1)
    x1, x2 = (rng.standard_normal((4, 2)).astype(np.float32) for _ in range(2))
    t = np.zeros(4, dtype=np.float32)
    params = {"policy": "label", "anchor": True}
    body1, h1 = encode_request({"x": x1, "t": t}, outputs=["v", "teacher"], parameters=params)
    body2, h2 = encode_request({"x": x2, "t": t}, outputs=["v", "teacher"], parameters=params)
    assert body1[: int(h1[HEADER_LENGTH])] == body2[: int(h2[HEADER_LENGTH])]
    first = decode_request(body1, h1[HEADER_LENGTH])
    first.parameters["policy"] = "changed by a caller"
    first.outputs.clear()
    second = decode_request(body2, h2[HEADER_LENGTH])
    assert np.array_equal(second.tensors["x"], x2) and np.array_equal(second.tensors["t"], t)
    assert second.parameters == params and second.outputs == {"v": True, "teacher": True}
    assert second.id is None and second.binary_output is False


def test_repeated_header_with_wrong_body_length_is_still_refused():
    x = np.zeros((4, 2), dtype=np.float32)
    body, headers = encode_request({"x": x})
    decode_request(body, headers[HEADER_LENGTH])  # cached now
    with pytest.raises(CodecError, match="needs 32 bytes"):
        decode_request(body[:-4], headers[HEADER_LENGTH])
    with pytest.raises(CodecError, match="4 bytes after the last binary tensor"):
        decode_request(body + b"\0" * 4, headers[HEADER_LENGTH])


def test_repeated_request_encodes_like_the_first():
    """A binary request's header is reused for the same names, shapes and outputs only."""
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    first, h1 = encode_request({"x": a}, outputs=["v"])
    again, h2 = encode_request({"x": a + 1}, outputs=["v"])
    assert h1 == h2 and len(first) == len(again)
    assert np.array_equal(decode_request(again, h2[HEADER_LENGTH]).tensors["x"], a + 1)
    other, h3 = encode_request({"x": a[:2]}, outputs=["v", "teacher"])
    msg = decode_request(other, h3[HEADER_LENGTH])
    assert msg.tensors["x"].shape == (2, 2) and msg.outputs == {"v": True, "teacher": True}
    # a non-contiguous view encodes its values, not its buffer
    strided, h4 = encode_request({"x": a.T.copy().T}, outputs=["v"])
    assert np.array_equal(decode_request(strided, h4[HEADER_LENGTH]).tensors["x"], a)


@pytest.mark.parametrize(
    "doc, says",
    [
        ({"id": 5}, "'id' must be a string"),
        ({"parameters": [1]}, "'parameters' must be a JSON object"),
        ({"outputs": {"name": "v"}}, "'outputs' must be a list"),
        ({"outputs": [{"name": "v", "parameters": 3}]}, "'parameters' of 'v'"),
    ],
)
def test_request_fields_the_schema_forbids_are_refused(doc: dict, says: str) -> None:
    """The OIP REST schema's types for id, parameters and outputs: a lenient read would accept
    these (and echo a non-string id into the response)."""
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], **doc}
    with pytest.raises(CodecError, match=says):
        decode_request(json.dumps(body).encode(), None)
