"""JSON encoding of task arguments and results.

Runs live in a database that several processes (maybe several machines) share, so what
is stored must not be able to run code when it is read back: JSON only, never pickle.
Encoding checks every argument on its own, so a bad one is named at the call that passed
it (``say.delay(when=datetime.now())``), not found later by a worker.

JSON has no tuples and only string keys: tuples come back as lists and ``int`` dict keys
as strings, as with any JSON task queue. ``NaN`` and infinities are rejected, since other
JSON readers (PostgreSQL's ``jsonb``) refuse them.

The stored payload is ``{"args": [...], "kwargs": {...}}``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from ._records import PayloadError, describe_stored

__all__ = [
    "PayloadError",
    "decode_arguments",
    "decode_result",
    "encode_arguments",
    "encode_result",
]


class _NotSerialisable(Exception):
    def __init__(self, value: object) -> None:
        super().__init__(type(value).__name__)
        self.type_name = type(value).__name__


def _refuse(value: object) -> NoReturn:
    raise _NotSerialisable(value)


def _dumps(value: object, what: str) -> str:
    """JSON text of ``value``.

    Raises:
        TypeError: ``value`` (or something inside it) has no JSON form; the message starts
            with ``what``.
    """
    try:
        return _ENCODER.encode(value)
    except _NotSerialisable as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc.type_name}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        # Non-string dict keys, NaN/infinity, circular references.
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


# Made once: json.dumps and json.loads with options build a new coder on every call, which
# costs more than coding a no-op run's payload and result.
_ENCODER = json.JSONEncoder(default=_refuse, allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


#: The payload of a call without arguments, as :func:`encode_arguments` writes it.
NO_ARGUMENTS = '{"args":[],"kwargs":{}}'


def _loads(text: str | bytes, what: str) -> Any:
    try:
        if isinstance(text, str):
            return _DECODER.decode(text)
        return json.loads(text, parse_constant=_reject_constant)
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
            not JSON-serialisable: datetime".
    """
    if not args and not kwargs:
        return NO_ARGUMENTS
    if all(type(name) is str for name in kwargs):
        try:
            # The whole payload at once; the same text as the parts joined below.
            return _ENCODER.encode({"args": args, "kwargs": kwargs})
        except (_NotSerialisable, TypeError, ValueError, RecursionError):
            pass  # encoded again below, argument by argument, to name the one at fault
    parts = [
        _dumps(value, f"{label} of task {task_name!r}")
        for label, value in zip(_positional_labels(signature, len(args)), args, strict=True)
    ]
    items = []
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise TypeError(f"keyword argument names of task {task_name!r} must be strings")
        items.append(
            f"{json.dumps(name)}:{_dumps(value, f'argument {name!r} of task {task_name!r}')}"
        )
    return f'{{"args":[{",".join(parts)}],"kwargs":{{{",".join(items)}}}}}'


def decode_arguments(payload: str) -> tuple[list[Any], dict[str, Any]]:
    """Decode a run's payload into positional and keyword arguments.

    Raises:
        PayloadError: The payload is not JSON, or not an object with exactly an ``args``
            list and a ``kwargs`` object (a corrupt row, or one written by a newer
            version).
    """
    if payload == NO_ARGUMENTS:
        return [], {}
    data = _loads(payload, "run arguments")
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
            JSON-serialisable: datetime".
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
    return _loads(text, "run result")
