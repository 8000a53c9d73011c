"""Non-finite floats in HTTP JSON, both ways, as Triton has them (rapidjson's NaN-and-Inf
flags): a request's `data` may hold NaN, Infinity and -Infinity, and an answer writes
them as those words rather than null (which read back as NaN, losing +inf and -inf).

Over the shared tiny server: its averaging model, (a + b) / 2 on FP32 [N, classes], is
where the HTTP fuzz test first found +inf answered as NaN.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from server.errors import InferenceError
from server.inference.request_codec import WireOutput, WireResponse
from server.transport.http_codec import ResponseFormat, _all_finite, infer_response, parse_json_object
from tests.support.graphs import triton_calls
from tests.support.http import call

SPECIAL = [math.inf, -math.inf, math.nan, 1.5]


def average_body(tiny_repository, first: list[float], second: list[float]) -> bytes:
    classes = len(tiny_repository.class_names)
    pad = [0.0] * (classes - len(first))
    inputs = [{"name": f"probabilities_{index}", "datatype": "FP32", "shape": [1, classes], "data": values + pad}
              for index, values in enumerate((first, second))]  # fmt: skip
    return json.dumps({"inputs": inputs}).encode()  # the standard library writes NaN, Infinity, -Infinity


def test_non_finite_floats_go_in_and_come_back_as_written(server, tiny_repository):
    body = average_body(tiny_repository, SPECIAL, [1.0, -1.0, 0.0, 2.5])
    assert b"Infinity" in body and b"NaN" in body
    answer = call(server.http_port, "POST", f"/v2/models/{tiny_repository.average}/infer", body)
    assert answer.status == 200, answer.body
    assert b'"data":[Infinity,-Infinity,NaN,2.0,' in answer.body  # Triton's words, not null
    data = answer.json()["outputs"][0]["data"][:4]
    assert data[:2] == [math.inf, -math.inf] and math.isnan(data[2]) and data[3] == 2.0


def test_finite_answers_stay_on_the_fast_path_unchanged(server, tiny_repository):
    answer = call(server.http_port, "POST", f"/v2/models/{tiny_repository.average}/infer",
                  average_body(tiny_repository, [0.25], [0.75]))  # fmt: skip
    assert answer.status == 200 and b'"data":[0.5,0.0,' in answer.body


@pytest.mark.parametrize("text, words", [
    (b'{"inputs": [1e999]}', "not valid JSON"),  # overflows a double: refused, as rapidjson refuses it
    (b'{"inputs": [nan]}', "not valid JSON"),  # only the words as Triton writes them
    (b'{"inputs": [Infinity', "not valid JSON"),
    (b'{"x": "\\ud800", "y": NaN}', "not valid JSON"),  # a lone surrogate stays refused on the slow path too
])  # fmt: skip
def test_what_stays_invalid_json(text, words):
    with pytest.raises(InferenceError, match=words):
        parse_json_object(memoryview(text), "request JSON")


def test_the_words_inside_strings_change_nothing():
    assert parse_json_object(b'{"id": "NaN Infinity", "inputs": [-Infinity]}', "request JSON") == {
        "id": "NaN Infinity", "inputs": [-math.inf]}


def test_tritonclient_sends_and_reads_non_finite_json(server, tiny_repository, tmp_path):
    """tritonclient.http with binary_data=False both ways: what Triton answers, measured side by side."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    classes = len(tiny_repository.class_names)
    first = np.zeros((1, classes))
    first[0, :4] = SPECIAL
    inputs = [{"name": f"probabilities_{index}", "datatype": "FP32", "shape": [1, classes], "data": values.tolist(),
               "binary": False} for index, values in enumerate((first, np.ones((1, classes))))]  # fmt: skip
    answers = triton_calls("http", f"127.0.0.1:{server.http_port}", [
        {"call": "infer", "model": tiny_repository.average, "inputs": inputs,
         "outputs": [{"name": "probabilities", "binary": False}]}], tmp_path)  # fmt: skip
    row = answers[0]["value"]["probabilities"][0]
    assert row[:2] == [math.inf, -math.inf] and math.isnan(row[2]) and row[3] == 1.25


@pytest.mark.parametrize("datatype, dtype", [("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8")])
def test_every_float_width_is_written_with_the_words(datatype, dtype):
    values = np.array([np.inf, -np.inf, np.nan, 0.5], dtype=dtype)
    body, _ = infer_response(WireResponse("m", "1", "", [WireOutput("y", datatype, [4], values.tobytes())]),
                             ResponseFormat(False, {}))  # fmt: skip
    assert b'"data":[Infinity,-Infinity,NaN,0.5]' in body


def test_bf16_bit_patterns_of_infinity_and_nan_take_the_slow_path():
    """BF16 travels as its 16-bit patterns; its non-finite ones must be noticed too."""
    assert not _all_finite("BF16", np.array([0x3F80, 0x7F80], dtype="<u2").tobytes())  # 1.0, +inf
    assert not _all_finite("BF16", np.array([0xFFC0], dtype="<u2").tobytes())  # NaN
    assert _all_finite("BF16", np.array([0x3F80, 0xC000], dtype="<u2").tobytes())  # 1.0, -2.0
    assert _all_finite("INT32", np.array([-1], dtype="<i4").tobytes())
