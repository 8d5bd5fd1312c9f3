from __future__ import annotations

import datetime
import inspect
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anyservice.taskqueue._records import PayloadError, RunError
from anyservice.taskqueue._serialize import (
    decode_arguments,
    decode_result,
    encode_arguments,
    encode_result,
)

WHEN = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def say(text: str, when: datetime.datetime, *rest: object, loud: bool = False) -> None:
    """A task function whose signature names the arguments in errors."""


@given(
    args=st.lists(json_values, max_size=4),
    kwargs=st.dictionaries(st.text(), json_values, max_size=4),
)
def test_json_arguments_round_trip(args: list[Any], kwargs: dict[str, Any]) -> None:
    assert decode_arguments(encode_arguments("say", args, kwargs)) == (args, kwargs)


def test_payload_is_an_object_of_args_and_kwargs() -> None:
    payload = encode_arguments("say", ("hi", 1), {"loud": True, "name": "é"})
    assert json.loads(payload) == {"args": ["hi", 1], "kwargs": {"loud": True, "name": "é"}}
    assert decode_arguments(encode_arguments("say", (), {})) == ([], {})


def test_payload_text_is_compact_ascii_json() -> None:
    # The stored text itself (not only what it decodes to) stays the same for every way
    # of encoding it: runs are compared and deduplicated by it.
    assert encode_arguments("say", ("hi", 1), {"loud": True, "name": "é"}) == (
        '{"args":["hi",1],"kwargs":{"loud":true,"name":"\\u00e9"}}'
    )
    assert encode_arguments("say", (), {}) == '{"args":[],"kwargs":{}}'


def test_tuples_come_back_as_lists() -> None:
    assert decode_arguments(encode_arguments("say", [(1, 2)], {})) == ([[1, 2]], {})


def test_keyword_argument_that_is_not_json_is_named() -> None:
    with pytest.raises(
        TypeError, match=r"^argument 'when' of task 'say' is not JSON-serialisable: datetime$"
    ):
        encode_arguments("say", ["hi"], {"when": WHEN})


def test_positional_argument_is_named_from_the_signature() -> None:
    with pytest.raises(
        TypeError, match=r"^argument 'when' of task 'say' is not JSON-serialisable: datetime$"
    ):
        encode_arguments("say", ["hi", WHEN], {}, inspect.signature(say))


def test_extra_positional_argument_is_named_by_star_parameter_and_position() -> None:
    with pytest.raises(TypeError, match=r"argument '\*rest' at position 3 of task 'say'"):
        encode_arguments("say", ["hi", "now", 1, {1, 2}], {}, inspect.signature(say))


def test_positional_argument_without_signature_is_named_by_position() -> None:
    with pytest.raises(TypeError, match=r"^positional argument 1 of task 'say' .*: datetime$"):
        encode_arguments("say", ["hi", WHEN], {})


def test_value_nested_in_an_argument_is_reported_by_type() -> None:
    with pytest.raises(TypeError, match=r"argument 'items' .*: datetime$"):
        encode_arguments("say", [], {"items": [1, {"at": WHEN}]})


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {(1, 2): "tuple key"}],
    ids=["nan", "infinity", "tuple-key"],
)
def test_values_json_cannot_represent_are_rejected(value: object) -> None:
    with pytest.raises(TypeError, match="argument 'x' of task 'say' is not JSON-serialisable"):
        encode_arguments("say", [], {"x": value})


def test_circular_value_is_rejected() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="Circular reference"):
        encode_arguments("say", [loop], {})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json{", "not valid JSON"),
        ('{"args": [NaN], "kwargs": {}}', "not valid JSON"),
        ("[1, 2]", "exactly 'args' and 'kwargs'"),
        ('{"args": []}', "exactly 'args' and 'kwargs'"),
        ('{"args": [], "kwargs": {}, "v": 2}', "exactly 'args' and 'kwargs'"),
        ('{"args": {}, "kwargs": {}}', "'args' list"),
        ('{"args": [], "kwargs": []}', "'kwargs' object"),
    ],
)
def test_undecodable_payload_raises_payload_error(payload: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_arguments(payload)


def test_payload_error_is_a_value_error_that_quotes_the_payload() -> None:
    with pytest.raises(ValueError, match=r"'not json\{'"):
        decode_arguments("not json{")


def test_long_payload_is_cut_in_the_error() -> None:
    with pytest.raises(PayloadError) as caught:
        decode_arguments("x" * 10_000)
    assert len(str(caught.value)) < 300


@given(json_values)
def test_json_results_round_trip(value: Any) -> None:
    assert decode_result(encode_result(value)) == value


def test_result_that_is_not_json_names_the_task() -> None:
    with pytest.raises(
        TypeError, match=r"^result of task 'say' is not JSON-serialisable: datetime$"
    ):
        encode_result(WHEN, task_name="say")
    with pytest.raises(TypeError, match=r"^result is not JSON-serialisable: set$"):
        encode_result({1})


def test_undecodable_result_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="run result is not valid JSON"):
        decode_result("{")


def test_run_error_round_trips_through_json() -> None:
    error = RunError(type="mypkg.Boom", message="it broke: é", traceback="Traceback ...\n")
    assert RunError.from_json(error.to_json()) == error


def test_run_error_from_exception_keeps_type_message_and_traceback() -> None:
    class Boom(Exception):
        pass

    try:
        raise Boom("it broke")
    except Boom as exc:
        error = RunError.from_exception(exc)
    assert error.type == f"{__name__}.{Boom.__qualname__}"
    assert error.message == "it broke"
    assert "raise Boom" in error.traceback
    assert RunError.from_exception(ValueError("x")).type == "ValueError"


@pytest.mark.parametrize("text", ["{", "[]", '{"type": "X"}', '{"type": 1, "message": "m"}'])
def test_undecodable_run_error_raises_payload_error(text: str) -> None:
    with pytest.raises(PayloadError, match="stored run error"):
        RunError.from_json(text)
