"""The run transitions as pure functions: properties over any record, no database."""

from __future__ import annotations

import functools
import itertools
import operator
import re
import traceback
import uuid
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anyservice.taskqueue import _records as records
from anyservice.taskqueue._records import ABANDONED_ERROR_TYPE, RunError, RunRecord, RunState

OWNERS = ("w1", "w2", "w3")
BOOM = RunError(type="ValueError", message="boom", traceback="Traceback ...")

times = st.floats(min_value=0.0, max_value=1_000.0, allow_nan=False)
seconds = st.floats(min_value=0.001, max_value=100.0, allow_nan=False)
owners = st.sampled_from(OWNERS)


@st.composite
def run_records(draw: st.DrawFn, *states: RunState) -> RunRecord:
    """Any record a broker may hold, in one of ``states`` if any are given."""
    state = draw(st.sampled_from(states or tuple(RunState)))
    running = state is RunState.RUNNING
    finished = state.finished
    max_attempts = draw(st.integers(1, 5))
    return RunRecord(
        id=draw(st.sampled_from(["a" * 32, "b" * 32])),
        task=draw(st.sampled_from(["say", "add"])),
        payload='{"args":[],"kwargs":{}}',
        state=state,
        attempts=draw(st.integers(1 if running else 0, 7)),
        max_attempts=max_attempts,
        retries_left=draw(st.integers(0, 3)),
        retry_delay=draw(st.floats(0.0, 10.0)),
        timeout=draw(st.none() | seconds),
        created_at=0.0,
        scheduled_at=draw(times),
        priority=draw(st.integers(-2, 2)),
        started_at=draw(times) if running or finished else None,
        finished_at=draw(times) if finished else None,
        lease_owner=draw(owners) if running else None,
        lease_expires_at=draw(times) if running else None,
        result='"ok"' if state is RunState.COMPLETED else None,
        error=BOOM if state in (RunState.FAILED, RunState.CRASHED) else None,
    )


def submitted(
    *, max_attempts: int, now: float, retries: int = 0, retry_delay: float = 0.0
) -> RunRecord:
    """A run just submitted, due at once."""
    return records.new_run(
        "a" * 32,
        "say",
        "{}",
        retries=retries,
        retry_delay=retry_delay,
        timeout=None,
        max_attempts=max_attempts,
        scheduled_at=None,
        now=now,
    )


def fenced_transitions(
    run: RunRecord, owner: str, attempt: int, now: float
) -> dict[str, RunRecord | None]:
    """Every transition that only the claim ``(owner, attempt)`` holding the run may make."""
    return {
        "renew": records.renew(run, owner, attempt, now, 30.0),
        "complete": records.complete(run, owner, attempt, '"ok"', now),
        "fail with retry": records.fail(run, owner, attempt, BOOM, now, retry=True),
        "fail without retry": records.fail(run, owner, attempt, BOOM, now, retry=False),
        "release": records.release(run, owner, attempt),
    }


# --- fencing ------------------------------------------------------------------------------


@given(run_records(), owners, st.integers(1, 8), times)
def test_only_the_claim_that_holds_a_running_run_changes_it(
    run: RunRecord, owner: str, attempt: int, now: float
) -> None:
    held = run.state is RunState.RUNNING and run.lease_owner == owner and run.attempts == attempt
    assert records.held(run, owner, attempt) == held
    for name, changed in fenced_transitions(run, owner, attempt, now).items():
        assert (changed is not None) == held, name


@given(run_records(RunState.RUNNING), owners, times)
def test_a_claim_whose_lease_expired_and_was_claimed_again_changes_nothing(
    run: RunRecord, new: str, now: float
) -> None:
    # Once the lease expired anyone may claim the run, the stale owner itself included:
    # the attempt number tells the two claims apart.
    assert run.lease_owner is not None
    old = (run.lease_owner, run.attempts)
    taken = records.claim(replace(run, lease_expires_at=now), new, now, 30.0)
    assert taken is not None or run.attempts >= run.max_attempts
    if taken is not None:
        assert taken.attempts == run.attempts + 1
        assert all(value is None for value in fenced_transitions(taken, *old, now).values())
        assert all(
            value is not None
            for value in fenced_transitions(taken, new, taken.attempts, now).values()
        )


@given(run_records(*records.FINISHED_STATES), owners, st.integers(0, 8), times)
def test_a_finished_run_never_changes(run: RunRecord, owner: str, attempt: int, now: float) -> None:
    assert run.finished
    assert records.claim(run, owner, now, 30.0) is None
    assert records.abandon(run, now) is None
    assert records.cancel(run, now) is None
    assert not records.claimable(run, now)
    assert records.due_at(run) is None
    assert all(value is None for value in fenced_transitions(run, owner, attempt, now).values())


# --- claiming -----------------------------------------------------------------------------


@given(run_records(), owners, times, seconds)
def test_claim_leases_exactly_the_claimable_runs(
    run: RunRecord, owner: str, now: float, lease: float
) -> None:
    claimed = records.claim(run, owner, now, lease)
    assert (claimed is not None) == records.claimable(run, now)
    if claimed is not None:
        assert claimed == replace(
            run,
            state=RunState.RUNNING,
            attempts=run.attempts + 1,
            started_at=now,
            lease_owner=owner,
            lease_expires_at=now + lease,
        )


@given(run_records(RunState.SCHEDULED), times)
def test_a_scheduled_run_is_claimable_once_due(run: RunRecord, now: float) -> None:
    assert records.claimable(run, now) == (run.scheduled_at <= now)
    assert records.due_at(run) == run.scheduled_at
    assert records.abandon(run, now) is None


@given(run_records(RunState.RUNNING), times)
def test_an_expired_lease_is_either_claimable_or_abandoned(run: RunRecord, now: float) -> None:
    claimable = records.claimable(run, now)
    abandoned = records.abandon(run, now)
    assert records.due_at(run) == run.lease_expires_at
    assert run.lease_expires_at is not None
    if run.lease_expires_at > now:
        # A live lease: it is still being worked on.
        assert not claimable
        assert abandoned is None
    elif run.attempts < run.max_attempts:
        assert claimable
        assert abandoned is None
    else:
        assert not claimable
        assert abandoned == replace(
            run,
            state=RunState.CRASHED,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error=records.abandoned_error(run.id, run.task, run.attempts, run.max_attempts),
        )
        assert abandoned.error is not None
        assert abandoned.error.type == ABANDONED_ERROR_TYPE
        assert f"claimed {run.attempts} times (max_attempts={run.max_attempts})" in (
            abandoned.error.message
        )


def test_a_running_record_without_an_expiry_is_not_held_by_anyone_alive() -> None:
    run = replace(
        submitted(max_attempts=2, now=5.0),
        state=RunState.RUNNING,
        attempts=1,
        lease_owner="w1",
    )
    assert records.claimable(run, 5.0)
    assert records.abandon(replace(run, attempts=2), 5.0) is not None


def test_the_owner_of_an_expired_lease_may_claim_the_run_again() -> None:
    run = replace(
        submitted(max_attempts=3, now=0.0),
        state=RunState.RUNNING,
        attempts=1,
        lease_owner="w1",
        lease_expires_at=10.0,
    )
    assert records.claim(run, "w1", 9.0, 30.0) is None
    again = records.claim(run, "w1", 10.0, 30.0)
    assert again is not None
    assert (again.lease_owner, again.attempts) == ("w1", 2)
    # The first attempt's late verdict is refused; the second one's is taken.
    assert records.complete(again, "w1", 1, '"late"', 11.0) is None
    assert records.complete(again, "w1", 2, '"ok"', 11.0) is not None


# --- a worker's verdicts ------------------------------------------------------------------


@given(run_records(RunState.RUNNING), times, seconds)
def test_renew_moves_only_the_lease_expiry(run: RunRecord, now: float, lease: float) -> None:
    assert run.lease_owner is not None
    assert records.renew(run, run.lease_owner, run.attempts, now, lease) == replace(
        run, lease_expires_at=now + lease
    )


@given(run_records(RunState.RUNNING), times)
def test_complete_keeps_the_result_and_drops_the_lease(run: RunRecord, now: float) -> None:
    assert run.lease_owner is not None
    assert records.complete(run, run.lease_owner, run.attempts, "[1]", now) == replace(
        run,
        state=RunState.COMPLETED,
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
        result="[1]",
        error=None,
    )


@given(run_records(RunState.RUNNING), times, st.booleans(), st.none() | st.floats(0.0, 50.0))
def test_fail_retries_while_retries_are_left_and_asked_for(
    run: RunRecord, now: float, retry: bool, delay: float | None
) -> None:
    assert run.lease_owner is not None
    failed = records.fail(
        run, run.lease_owner, run.attempts, BOOM, now, retry=retry, retry_delay=delay
    )
    unleased = replace(run, lease_owner=None, lease_expires_at=None, error=BOOM)
    if retry and run.retries_left > 0:
        assert failed == replace(
            unleased,
            state=RunState.SCHEDULED,
            retries_left=run.retries_left - 1,
            scheduled_at=now + (run.retry_delay if delay is None else delay),
            started_at=None,
        )
    else:
        assert failed == replace(unleased, state=RunState.FAILED, finished_at=now)


@given(run_records(RunState.RUNNING))
def test_release_hands_the_run_back_without_counting_the_attempt(run: RunRecord) -> None:
    assert run.lease_owner is not None
    assert records.release(run, run.lease_owner, run.attempts) == replace(
        run,
        state=RunState.SCHEDULED,
        attempts=run.attempts - 1,
        started_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )


@given(run_records(RunState.SCHEDULED), owners, times, seconds)
def test_release_undoes_a_claim(run: RunRecord, owner: str, now: float, lease: float) -> None:
    run = replace(run, started_at=None, scheduled_at=now)
    claimed = records.claim(run, owner, now, lease)
    assert claimed is not None
    assert records.release(claimed, owner, claimed.attempts) == run


@given(run_records(), times)
def test_only_a_scheduled_run_can_be_cancelled(run: RunRecord, now: float) -> None:
    cancelled = records.cancel(run, now)
    if run.state is RunState.SCHEDULED:
        assert cancelled == replace(run, state=RunState.CANCELLED, finished_at=now)
    else:
        assert cancelled is None


# --- any sequence of operations -----------------------------------------------------------


def apply(operation: str, run: RunRecord, owner: str, attempt: int, now: float) -> RunRecord | None:
    """Apply the named transition as the claim ``(owner, attempt)`` at ``now``."""
    match operation:
        case "claim":
            return records.claim(run, owner, now, 30.0)
        case "abandon":
            return records.abandon(run, now)
        case "renew":
            return records.renew(run, owner, attempt, now, 30.0)
        case "complete":
            return records.complete(run, owner, attempt, '"ok"', now)
        case "fail" | "retry":
            return records.fail(run, owner, attempt, BOOM, now, retry=operation == "retry")
        case "release":
            return records.release(run, owner, attempt)
        case _:
            return records.cancel(run, now)


operations = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "advance",
                "claim",
                "abandon",
                "renew",
                "complete",
                "fail",
                "retry",
                "release",
                "cancel",
            ]
        ),
        owners,
        st.integers(1, 5),
        st.floats(0.0, 50.0),
    ),
    max_size=40,
)


@given(
    st.integers(0, 3),
    st.integers(1, 4),
    st.floats(0.0, 20.0),
    operations,
)
def test_any_sequence_keeps_the_record_consistent(
    retries: int,
    max_attempts: int,
    retry_delay: float,
    steps: list[tuple[str, str, int, float]],
) -> None:
    now = 0.0
    run = submitted(max_attempts=max_attempts, now=now, retries=retries, retry_delay=retry_delay)
    claims = 0
    for operation, owner, attempt, amount in steps:
        if operation == "advance":
            now += amount
            continue
        before = run
        changed = apply(operation, run, owner, attempt, now)
        if changed is None:
            continue
        run = changed
        claims += operation == "claim"
        claims -= operation == "release"
        assert not before.finished
        # The fields that say who holds the run agree with its state.
        running = run.state is RunState.RUNNING
        assert (run.lease_owner is not None) == running
        assert (run.lease_expires_at is not None) == running
        assert (run.finished_at is not None) == run.finished
        assert (run.result is not None) == (run.state is RunState.COMPLETED)
        assert run.attempts == claims
        assert 0 <= run.retries_left <= retries
        assert (run.id, run.task, run.max_attempts, run.created_at) == (
            before.id,
            before.task,
            before.max_attempts,
            before.created_at,
        )


@pytest.mark.parametrize("state", sorted(set(RunState) - {RunState.SCHEDULED}))
def test_only_scheduled_and_running_runs_can_ever_become_due(state: RunState) -> None:
    run = replace(
        submitted(max_attempts=1, now=0.0),
        state=state,
        lease_owner="w1" if state is RunState.RUNNING else None,
        lease_expires_at=1.0 if state is RunState.RUNNING else None,
    )
    assert records.due_at(run) == (1.0 if state is RunState.RUNNING else None)


# ------------------------------------------------------------------ run errors, as stored


def test_stored_text_is_shown_whole_up_to_the_limit_then_cut() -> None:
    assert records.describe_stored("x" * 78) == repr("x" * 78)
    assert records.describe_stored("x" * 79) == repr("x" * 79)[:77] + "..."
    assert len(records.describe_stored("x" * 79)) == 80
    assert records.describe_stored("abcdef", limit=6) == "'ab..."


def test_a_run_error_is_stored_as_compact_json() -> None:
    error = RunError(type="T", message="m", traceback="")
    assert error.to_json() == '{"type":"T","message":"m","traceback":""}'


def test_a_run_error_keeps_the_whole_formatted_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        caught = exc
    expected = "".join(traceback.format_exception(caught))
    assert RunError.from_exception(caught).traceback == expected


def test_a_stored_run_error_without_traceback_has_an_empty_one() -> None:
    assert RunError.from_json('{"type":"T","message":"m"}') == RunError("T", "m", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "stored run error is not a JSON object: '[1]'"),
        (
            '{"type":"T"}',
            "stored run error needs string 'type', 'message' and 'traceback' fields: "
            '\'{"type":"T"}\'',
        ),
    ],
)
def test_a_bad_stored_run_error_is_named_with_its_text(text: str, message: str) -> None:
    with pytest.raises(records.PayloadError, match=f"^{re.escape(message)}$"):
        RunError.from_json(text)


def test_stored_text_that_is_no_json_is_named_too() -> None:
    with pytest.raises(
        records.PayloadError, match=r"^stored run error is not valid JSON \(.*\): 'nope'$"
    ):
        RunError.from_json("nope")


def test_a_new_run_is_scheduled_with_what_was_submitted() -> None:
    run = records.new_run(
        "r" * 32,
        "say",
        '{"args":[],"kwargs":{}}',
        retries=2,
        retry_delay=1,
        timeout=5,
        max_attempts=3,
        scheduled_at=None,
        now=100.0,
    )
    assert (run.id, run.task, run.payload, run.state) == (
        "r" * 32,
        "say",
        '{"args":[],"kwargs":{}}',
        RunState.SCHEDULED,
    )
    assert (run.attempts, run.max_attempts, run.retries_left) == (0, 3, 2)
    assert (run.retry_delay, run.timeout, run.created_at, run.scheduled_at) == (
        1.0,
        5.0,
        100.0,
        100.0,
    )
    assert type(run.retry_delay) is float
    assert type(run.timeout) is float


def test_a_new_run_may_be_due_later_and_have_no_timeout() -> None:
    run = records.new_run(
        "r" * 32,
        "say",
        "{}",
        retries=0,
        retry_delay=0.0,
        timeout=None,
        max_attempts=1,
        scheduled_at=250,
        now=100.0,
    )
    assert (run.timeout, run.created_at, run.scheduled_at) == (None, 100.0, 250.0)
    assert type(run.scheduled_at) is float
    assert run.priority == 0


@given(first=run_records(RunState.SCHEDULED), second=run_records(RunState.SCHEDULED))
def test_claim_order_puts_higher_priority_first_then_earlier_due_then_earlier_submitted(
    first: RunRecord, second: RunRecord
) -> None:
    before = records.claim_order(first, 0) < records.claim_order(second, 1)
    if first.priority != second.priority:
        assert before == (first.priority > second.priority)
    elif first.scheduled_at != second.scheduled_at:
        assert before == (first.scheduled_at < second.scheduled_at)
    else:
        assert before


def test_a_run_keeps_its_priority_through_a_claim_and_a_retry() -> None:
    run = records.new_run(
        "a" * 32,
        "say",
        "{}",
        retries=1,
        retry_delay=0.0,
        timeout=None,
        max_attempts=2,
        scheduled_at=None,
        now=5.0,
        priority=4,
    )
    claimed = records.claim(run, "w1", 5.0, 10.0)
    assert claimed is not None
    retried = records.fail(claimed, "w1", 1, BOOM, 6.0, retry=True)
    assert retried is not None
    assert (claimed.priority, retried.priority) == (4, 4)


def test_a_run_completed_after_a_failed_attempt_keeps_no_error() -> None:
    run = submitted(max_attempts=2, now=5.0, retries=1)
    first = records.claim(run, "w1", 5.0, 10.0)
    assert first is not None
    retried = records.fail(first, "w1", 1, BOOM, 6.0, retry=True)
    assert retried is not None
    assert retried.error == BOOM
    second = records.claim(retried, "w1", 6.0, 10.0)
    assert second is not None
    assert second.error == BOOM
    done = records.complete(second, "w1", 2, "[1]", 7.0)
    assert done is not None
    assert (done.state, done.result, done.error) == (RunState.COMPLETED, "[1]", None)


def test_a_new_run_keeps_the_submitters_trace_context() -> None:
    context = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    run = records.new_run(
        "c" * 32,
        "say",
        "{}",
        retries=0,
        retry_delay=0.0,
        timeout=None,
        max_attempts=1,
        scheduled_at=None,
        now=1.0,
        trace_context=context,
    )
    assert run.trace_context == context


def test_a_claimed_run_takes_a_slot_until_its_lease_expires() -> None:
    claimed = records.claim(submitted(max_attempts=1, now=0.0), "w1", 0.0, 10.0)
    assert claimed is not None
    assert records.takes_a_slot(claimed, 9.0)
    assert not records.takes_a_slot(claimed, 10.0)


@given(run_records(), times)
def test_only_a_running_run_under_a_live_lease_takes_a_slot(run: RunRecord, now: float) -> None:
    live = run.lease_expires_at is not None and run.lease_expires_at > now
    assert records.takes_a_slot(run, now) is (run.state is RunState.RUNNING and live)


limits = st.dictionaries(st.sampled_from(["say", "add", "other"]), st.integers(0, 4), max_size=3)


@given(st.lists(run_records(), max_size=8), limits, times)
def test_free_slots_are_each_limit_less_its_runs_holding_a_slot(
    runs: list[RunRecord], concurrency: dict[str, int], now: float
) -> None:
    held = {
        task: sum(1 for r in runs if r.task == task and records.takes_a_slot(r, now))
        for task in concurrency
    }
    assert records.free_slots(runs, concurrency, now) == {
        task: max(limit - held[task], 0) for task, limit in concurrency.items()
    }


@given(st.lists(run_records(RunState.SCHEDULED), max_size=10), st.integers(1, 5), limits)
def test_a_claim_picks_greedily_in_order_within_its_limit_and_each_tasks_slots(
    due: list[RunRecord], limit: int, free: dict[str, int]
) -> None:
    picked = records.pick_claims(due, limit, free)
    # In claim order, and a prefix walk explains every run taken or passed over.
    taken: dict[str, int] = {}
    position = 0
    held_back = left_over = False
    for run in due:
        full = run.task in free and taken.get(run.task, 0) >= free[run.task]
        if full:
            held_back = True
            continue
        if position == limit:
            left_over = True
            break
        assert picked.runs[position] is run
        position += 1
        taken[run.task] = taken.get(run.task, 0) + 1
    assert len(picked.runs) == position <= limit
    assert (picked.held_back, picked.left_over) == (held_back, left_over)
    for task, slots in free.items():
        assert sum(1 for run in picked.runs if run.task == task) <= slots


def test_a_batch_of_new_run_ids_are_distinct_uuid4_hex_strings() -> None:
    ids = records.new_run_ids(500)
    assert len(set(ids)) == 500
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (run_id, 4, uuid.RFC_4122)
    assert records.new_run_ids(0) == []


# The hex digits of a uuid4 that are random, and which of their bits: all but the version
# digit (12, always 4) and the two high bits of the variant digit (16, binary 10xx).
RANDOM_BITS_OF_DIGIT = dict.fromkeys(range(32), 0xF) | {12: 0x0, 16: 0x3}
RANDOM_DIGITS = [digit for digit, bits in RANDOM_BITS_OF_DIGIT.items() if bits]


def test_every_random_bit_of_a_batch_of_run_ids_varies_on_its_own() -> None:
    ids = records.new_run_ids(500)
    columns = {digit: [int(run_id[digit], 16) for run_id in ids] for digit in range(32)}
    for digit, values in columns.items():
        random_bits = RANDOM_BITS_OF_DIGIT[digit]
        # Each random bit is 0 in some ids and 1 in others (2**-499 odds of failing by chance).
        assert functools.reduce(operator.and_, values) & random_bits == 0, digit
        assert functools.reduce(operator.or_, values) & random_bits == random_bits, digit
    # No random digit is a copy of another, in the same id or in the next one (the last
    # id's next being the first): sharing bytes would make ids guessable from each other.
    for digit, other in itertools.product(RANDOM_DIGITS, repeat=2):
        following = columns[other][1:] + columns[other][:1]
        assert columns[digit] != following, (digit, other)
        if digit != other:
            assert columns[digit] != columns[other], (digit, other)


def test_the_ids_of_a_batch_of_two_share_no_random_digit() -> None:
    batches = [records.new_run_ids(2) for _ in range(200)]
    for digit in RANDOM_DIGITS:
        # By chance, a digit would be the same in both ids of all 200 batches at odds of
        # 4**-200 at most.
        assert any(first[digit] != second[digit] for first, second in batches), digit


def test_a_new_run_id_is_a_fresh_uuid4_hex_string() -> None:
    ids = {records.new_run_id() for _ in range(200)}
    assert len(ids) == 200
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (run_id, 4, uuid.RFC_4122)


@pytest.mark.parametrize(
    ("timeout", "scheduled_at", "expected_timeout", "expected_due"),
    [(None, None, None, 10.0), (3, 20, 3.0, 20.0), (0.5, 9.5, 0.5, 9.5)],
)
def test_a_new_run_is_the_record_its_constructor_would_make(
    timeout: float | None,
    scheduled_at: float | None,
    expected_timeout: float | None,
    expected_due: float,
) -> None:
    run = records.new_run(
        "r1", "say", '{"a": 1}', retries=2, retry_delay=1, timeout=timeout, max_attempts=4,
        scheduled_at=scheduled_at, now=10.0, priority=-3, trace_context="00-ab-cd-01",
    )  # fmt: skip
    assert run == RunRecord(
        id="r1", task="say", payload='{"a": 1}', state=RunState.SCHEDULED, attempts=0,
        max_attempts=4, retries_left=2, retry_delay=1.0, timeout=expected_timeout,
        created_at=10.0, scheduled_at=expected_due, priority=-3, trace_context="00-ab-cd-01",
    )  # fmt: skip
    # Numbers given as ints are stored as floats, as the constructor's callers gave them.
    assert type(run.retry_delay) is float
    assert type(run.scheduled_at) is float
    assert run.timeout is None or type(run.timeout) is float


def test_record_of_makes_the_record_its_constructor_would() -> None:
    made = RunRecord(
        id="r1", task="say", payload='{"a": 1}', state=RunState.RUNNING, attempts=2,
        max_attempts=5, retries_left=3, retry_delay=1.5, timeout=9.0, created_at=10.0,
        scheduled_at=11.0, priority=4, started_at=12.0, finished_at=None, result='"x"',
        error=None, lease_owner="w1", lease_expires_at=42.0, trace_context="00-ab-cd-01",
    )  # fmt: skip
    values = [getattr(made, field) for field in RunRecord.__dataclass_fields__]
    assert records.record_of(values) == made
    with pytest.raises(ValueError, match="shorter"):
        records.record_of(values[:-1])
    with pytest.raises(ValueError, match="longer"):
        records.record_of([*values, None])


def test_a_sibling_run_has_the_first_run_s_options_and_its_own_id_and_payload() -> None:
    first = records.new_run(
        "r1", "say", '{"a": 1}', retries=2, retry_delay=0.5, timeout=3.0, max_attempts=4,
        scheduled_at=20.0, now=10.0, priority=7, trace_context="00-ab-cd-01",
    )  # fmt: skip
    siblings = records.sibling_runs(first, ["r2", "r3"], ['{"a": 2}', '{"a": 3}'])
    assert siblings == [
        replace(first, id="r2", payload='{"a": 2}'),
        replace(first, id="r3", payload='{"a": 3}'),
    ]
    assert records.sibling_runs(first, [], []) == []
    with pytest.raises(ValueError, match="shorter"):
        records.sibling_runs(first, ["r2", "r3"], ['{"a": 2}'])
    with pytest.raises(ValueError, match="longer"):
        records.sibling_runs(first, ["r2"], ['{"a": 2}', '{"a": 3}'])
