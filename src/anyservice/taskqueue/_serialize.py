"""JSON encoding of task arguments and results.

Runs live in a database that several processes (maybe several machines) share, so what
is stored must not be able to run code when it is read back: JSON only, never pickle.
Encoding checks every argument on its own, so a bad one is named at the call that passed
it (``say.delay(when=datetime.now())``), not found later by a worker.

JSON has no tuples and only string keys: tuples come back as lists and ``int`` dict keys
as strings, as with any JSON task queue. ``NaN`` and infinities are rejected, since other
JSON readers (PostgreSQL's ``jsonb``) refuse them.

An argument or a result may nest lists and objects at most :data:`MAX_NESTING` deep, a
limit both sides keep: what the encoder accepts, the decoder reads back wherever it runs
(a worker's stack is not the submitter's, and Python's own limit is a count of frames).

The stored payload is ``{"args": [...], "kwargs": {...}}``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from ._records import PayloadError, describe_stored

__all__ = [
    "MAX_NESTING",
    "PayloadError",
    "decode_arguments",
    "decode_result",
    "encode_arguments",
    "encode_result",
]


#: The deepest an argument or a result may nest lists and objects (``[[]]`` is 2 deep).
MAX_NESTING = 200
#: A payload nests two levels more: its object, then its ``args`` list or ``kwargs`` object.
_PAYLOAD_NESTING = MAX_NESTING + 2

#: What is not a bracket of a list or an object: a string (brackets inside it included),
#: or a run of other characters.
_NOT_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+')
_INNERMOST = re.compile(r"\[\]|\{\}")


def _nested_deeper(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests lists and objects deeper than ``limit``."""
    # Each level takes two characters: shorter text cannot be deeper (a fast path: the
    # check below gives the same answer).
    if len(text) <= 2 * limit:  # pragma: no mutate
        return False
    brackets = _NOT_BRACKETS.sub("", text)
    # Each pass takes away the innermost level.
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _INNERMOST.sub("", brackets)
    return bool(brackets)


class _TooDeep(ValueError):
    """A value nested deeper than :data:`MAX_NESTING`."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_NESTING} lists and objects")


class _NotSerialisable(Exception):
    """A value JSON has no form for; the one argument is the name of its type."""


def _refuse(value: object) -> NoReturn:
    raise _NotSerialisable(type(value).__name__)


#: What the encoder raises for a value with no JSON form: a type it does not know, a
#: non-string dict key, NaN or infinity, a circular reference, nesting too deep.
_UNENCODABLE = (_NotSerialisable, TypeError, ValueError, RecursionError)


def _refuse_encoding(what: str, error: Exception) -> NoReturn:
    """Raise the ``TypeError`` for ``error`` (one of ``_UNENCODABLE``), naming ``what``."""
    cause = None if isinstance(error, _NotSerialisable) else error
    raise TypeError(f"{what} is not JSON-serialisable: {error}") from cause


def _dumps(value: object, what: str) -> str:
    """JSON text of ``value``.

    Raises:
        TypeError: ``value`` (or something inside it) has no JSON form; the message starts
            with ``what``.
    """
    try:
        text = _ENCODER.encode(value)
    except _UNENCODABLE as exc:
        _refuse_encoding(what, exc)
    return _shallow_enough(text, what)


def _shallow_enough(text: str, what: str) -> str:
    """``text``, unless it nests deeper than :data:`MAX_NESTING` (a ``TypeError`` then)."""
    if _nested_deeper(text, MAX_NESTING):
        _refuse_encoding(what, _TooDeep())
    return text


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


# Made once: json.dumps and json.loads with options build a new coder on every call, which
# costs more than coding a no-op run's payload and result.
_ENCODER = json.JSONEncoder(default=_refuse, allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


#: The payload of a call without arguments, as :func:`encode_arguments` writes it.
NO_ARGUMENTS = '{"args":[],"kwargs":{}}'


def _loads(text: str, what: str, limit: int) -> Any:
    try:
        if _nested_deeper(text, limit):
            raise _TooDeep()
        return _DECODER.decode(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{what} is not valid JSON ({exc}): {describe_stored(text)}") from exc


def _positional_labels(signature: inspect.Signature | None, count: int) -> list[str]:
    """How to name each positional argument in an error message."""
    if signature is None:
        return [f"positional argument {index}" for index in range(count)]
    parameters = list(signature.parameters.values())
    named = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    star = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    labels = []
    for index in range(count):
        if index < len(named):
            labels.append(f"argument {named[index]!r}")
        elif star is not None:
            labels.append(f"argument '*{star}' at position {index}")
        else:
            labels.append(f"positional argument {index}")
    return labels


def encode_arguments(
    task_name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    signature: inspect.Signature | None = None,
) -> str:
    """Encode a call's arguments as the JSON payload of a run.

    Args:
        task_name: The task's name, for error messages.
        args: Positional arguments.
        kwargs: Keyword arguments.
        signature: The task function's signature, to name positional arguments in errors
            by their parameter name instead of their position.

    Returns:
        ``{"args": [...], "kwargs": {...}}`` as compact JSON text.

    Raises:
        TypeError: An argument has no JSON form, e.g. "argument 'when' of task 'say' is
            not JSON-serialisable: datetime", or nests deeper than :data:`MAX_NESTING`.
    """
    if not args and not kwargs:
        return NO_ARGUMENTS
    for name in kwargs:
        if not isinstance(name, str):
            raise TypeError(
                f"keyword argument names of task {task_name!r} must be strings, not {name!r}"
            )
    payload = {"args": args, "kwargs": kwargs}
    try:
        text = _ENCODER.encode(payload)
    except _UNENCODABLE as exc:
        whole: Exception = exc
    else:
        if not _nested_deeper(text, _PAYLOAD_NESTING):
            return text
        # Not mutated: a payload is too deep only when an argument is, which the loop
        # below names; the whole is never refused for this.
        whole = _TooDeep()  # pragma: no mutate
    # Something has no JSON form: encode each argument alone (in this frame, as the whole
    # was) to name the one at fault.
    labels = _positional_labels(signature, len(args))
    named = [(labels[index], value) for index, value in enumerate(args)]
    named += [(f"argument {name!r}", value) for name, value in kwargs.items()]
    for label, value in named:
        what = f"{label} of task {task_name!r}"
        # Encoded in this frame, as the whole was: not refused for a deeper stack alone.
        try:
            text = _ENCODER.encode(value)
        except _UNENCODABLE as exc:
            _refuse_encoding(what, exc)
        _shallow_enough(text, what)
    # Each argument has a JSON form alone, but not the whole: the caller's stack is so deep
    # that the two levels the payload adds are too many for Python.
    _refuse_encoding(f"arguments of task {task_name!r}", whole)


def decode_arguments(payload: str) -> tuple[list[Any], dict[str, Any]]:
    """Decode a run's payload into positional and keyword arguments.

    Raises:
        PayloadError: The payload is not JSON, or not an object with exactly an ``args``
            list and a ``kwargs`` object (a corrupt row, or one written by a newer
            version).
    """
    if payload == NO_ARGUMENTS:
        return [], {}
    data = _loads(payload, "run arguments", _PAYLOAD_NESTING)
    if not isinstance(data, dict) or set(data) != {"args", "kwargs"}:
        raise PayloadError(
            "run arguments must be a JSON object with exactly 'args' and 'kwargs': "
            f"{describe_stored(payload)}"
        )
    args, kwargs = data["args"], data["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise PayloadError(
            f"run arguments need an 'args' list and a 'kwargs' object: {describe_stored(payload)}"
        )
    return args, kwargs


def encode_result(value: object, *, task_name: str | None = None) -> str:
    """Encode a task's return value as JSON text.

    Raises:
        TypeError: The value has no JSON form, e.g. "result of task 'say' is not
            JSON-serialisable: datetime", or nests deeper than :data:`MAX_NESTING`.
    """
    if value is None:
        return "null"  # most tasks return nothing: skip the encoder
    what = "result" if task_name is None else f"result of task {task_name!r}"
    return _dumps(value, what)


def decode_result(text: str) -> Any:
    """Decode what :func:`encode_result` produced.

    Raises:
        PayloadError: ``text`` is not valid JSON.
    """
    return _loads(text, "run result", MAX_NESTING)
