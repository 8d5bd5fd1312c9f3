from __future__ import annotations

import datetime
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyservice.taskqueue._records import PayloadError, RunError
from anyservice.taskqueue._serialize import (
    MAX_NESTING,
    decode_arguments,
    decode_result,
    encode_arguments,
    encode_result,
)

WHEN = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
T = TypeVar("T")

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


def plain(text: str, when: datetime.datetime) -> None:
    """A task function without ``*args``."""


def test_positional_argument_is_named_from_a_signature_without_star_parameter() -> None:
    with pytest.raises(
        TypeError, match=r"^argument 'when' of task 'plain' is not JSON-serialisable: datetime$"
    ):
        encode_arguments("plain", ["hi", WHEN], {}, inspect.signature(plain))


def test_positional_argument_beyond_the_signature_is_named_by_position() -> None:
    with pytest.raises(
        TypeError, match=r"^positional argument 2 of task 'plain' is not JSON-serialisable: set$"
    ):
        encode_arguments("plain", ["hi", "now", {1}], {}, inspect.signature(plain))


def test_keyword_argument_name_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"^keyword argument names of task 'say' must be strings, not 1$"
    ):
        encode_arguments("say", ["hi"], {1: "one"})  # type: ignore[dict-item]


def test_payload_text_is_the_same_when_a_keyword_name_is_a_string_subclass() -> None:
    class Name(str):
        pass

    assert encode_arguments("say", [1], {Name("loud"): True}) == (
        '{"args":[1],"kwargs":{"loud":true}}'
    )


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _at_stack_depth(frames: int, call: Callable[[], T]) -> T:
    """``call()``, ``frames`` frames deeper than here."""
    if frames <= 0:
        return call()
    return _at_stack_depth(frames - 1, call)


def _stack_depth() -> int:
    depth, frame = 0, inspect.currentframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


@settings(max_examples=50, deadline=None)
@given(depth=st.integers(min_value=1, max_value=MAX_NESTING), as_kwarg=st.booleans())
def test_what_the_encoder_accepts_up_to_the_limit_decodes(depth: int, as_kwarg: bool) -> None:
    # From deep in a stack (the submitter's) to a shallow one (the worker's) and back.
    value = _nested(depth - 1)
    args, kwargs = ([], {"x": value}) if as_kwarg else ([value], {})
    payload = _at_stack_depth(400, lambda: encode_arguments("say", args, kwargs))
    assert decode_arguments(payload) == (args, kwargs)
    assert _at_stack_depth(400, lambda: decode_arguments(payload)) == (args, kwargs)
    result = encode_result(value)
    assert decode_result(result) == value
    assert result == "[" * depth + "]" * depth


def test_the_limit_is_the_documented_one() -> None:
    assert MAX_NESTING == 200  # docs/taskqueue.md says so


def test_one_level_past_the_limit_is_refused_naming_the_argument() -> None:
    too_deep = _nested(MAX_NESTING)
    nested = f"nested deeper than {MAX_NESTING} lists and objects"
    with pytest.raises(TypeError) as caught:
        encode_arguments("say", ["hi", 1], {"loud": too_deep}, inspect.signature(say))
    assert str(caught.value) == f"argument 'loud' of task 'say' is not JSON-serialisable: {nested}"
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(TypeError, match=rf"^argument 'when' of task 'say' .*: {nested}$"):
        encode_arguments("say", ["hi", too_deep], {}, inspect.signature(say))
    with pytest.raises(
        TypeError, match=rf"^result of task 'say' is not JSON-serialisable: {nested}$"
    ):
        encode_result(too_deep, task_name="say")
    # Brackets inside strings are text, not nesting.
    text = ["[" * (3 * MAX_NESTING), "{" * MAX_NESTING, '"]\\[' * MAX_NESTING]
    assert decode_result(encode_result(text)) == text
    assert decode_arguments(encode_arguments("say", text, {})) == (text, {})


def test_the_decoder_refuses_what_the_encoder_would_have() -> None:
    deep = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    nested = rf"\(nested deeper than {MAX_NESTING} lists and objects\)"
    with pytest.raises(PayloadError, match=rf"^run result is not valid JSON {nested}: '\[\[\["):
        decode_result(deep)
    assert decode_result(deep[1:-1]) == _nested(MAX_NESTING - 1)
    payload = '{"args":[' + deep + '],"kwargs":{}}'
    with pytest.raises(PayloadError, match=r"^run arguments is not valid JSON \(nested deeper"):
        decode_arguments(payload)
    shallower = '{"args":[' + deep[1:-1] + '],"kwargs":{}}'
    assert decode_arguments(shallower) == ([_nested(MAX_NESTING - 1)], {})


def test_arguments_each_encodable_but_too_deep_together_name_the_task() -> None:
    # From a stack so deep that Python's recursion limit comes first: an argument that
    # encodes alone is two levels too deep inside the payload, so no single argument is
    # at fault and the error names the task's arguments. The search spans the frames
    # where that happens.
    value = _nested(MAX_NESTING - 1)
    limit = sys.getrecursionlimit() - _stack_depth()
    refused: list[TypeError] = []
    for frames in range(limit - MAX_NESTING - 40, limit - MAX_NESTING + 40):
        try:
            _at_stack_depth(frames, lambda: encode_arguments("say", [value], {}))
        except TypeError as exc:
            refused.append(exc)
        except RecursionError:
            break  # deeper than the encoder itself can be called
    whole = "arguments of task 'say' is not JSON-serialisable: "
    one = "positional argument 0 of task 'say' is not JSON-serialisable: "
    whole_refused = [error for error in refused if str(error).startswith(whole)]
    assert whole_refused
    assert all(str(error).startswith((whole, one)) for error in refused)
    for error in whole_refused:
        assert isinstance(error.__cause__, RecursionError)
        assert str(error) == whole + str(error.__cause__)


def test_unknown_type_error_hides_the_encoder_internals() -> None:
    with pytest.raises(TypeError) as caught:
        encode_arguments("say", [WHEN], {})
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_value_error_of_the_encoder_is_the_cause() -> None:
    with pytest.raises(TypeError) as caught:
        encode_result(float("nan"))
    assert isinstance(caught.value.__cause__, ValueError)
    assert str(caught.value) == f"result is not JSON-serialisable: {caught.value.__cause__}"


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


EXACTLY = r"^run arguments must be a JSON object with exactly 'args' and 'kwargs': "
NEEDS = r"^run arguments need an 'args' list and a 'kwargs' object: "


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json{", r"^run arguments is not valid JSON \(Expecting value: .*\): 'not json\{'$"),
        (
            '{"args": [NaN], "kwargs": {}}',
            r"^run arguments is not valid JSON \(NaN is not valid JSON\): ",
        ),
        ("[1, 2]", EXACTLY + r"'\[1, 2\]'$"),
        ('{"args": []}', EXACTLY + r"""'\{"args": \[\]\}'$"""),
        ('{"args": [], "kwargs": {}, "v": 2}', EXACTLY + "'"),
        ('{"args": {}, "kwargs": {}}', NEEDS + r"""'\{"args": \{\}, "kwargs": \{\}\}'$"""),
        ('{"args": [], "kwargs": []}', NEEDS + r"""'\{"args": \[\], "kwargs": \[\]\}'$"""),
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
