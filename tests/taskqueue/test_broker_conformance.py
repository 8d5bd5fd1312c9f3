"""The promises every broker keeps, checked against each kind of broker.

Time is a fake wall clock passed to the broker, so leases expire and retries fall due
exactly when a test moves the clock; only the tests of waking use real (short) time. The
last tests drive random sequences of calls through each broker and through the pure
transitions of ``_records.py``, and compare every record field by field.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyservice.taskqueue import _records as records
from anyservice.taskqueue._errors import BrokerError
from anyservice.taskqueue._records import ABANDONED_ERROR_TYPE, RunError, RunRecord, RunState
from anyservice.taskqueue.brokers import Broker, MemoryBroker, SqliteBroker, broker_from_url
from anyservice.taskqueue.brokers._base import PURGE_BATCH
from anyservice.taskqueue.brokers._options import hide_password
from tests._postgres import postgres_schema

pytestmark = pytest.mark.anyio

PAYLOAD = '{"args":["hi"],"kwargs":{}}'
LEASE = 30.0
START = 1_700_000_000.0
BOOM = RunError(type="ValueError", message="boom", traceback="Traceback ...")
#: Bound on a wait across threads in real time, generous for a loaded machine.
REAL_TIME_BOUND = 10.0


class FakeClock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        with postgres_schema(request.getfixturevalue("postgres_url")) as url:
            yield url
    else:
        yield "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture
async def broker(broker_url: str, clock: FakeClock) -> AsyncIterator[Broker]:
    broker = broker_from_url(broker_url, clock=clock)
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def real_time_broker(broker_url: str) -> AsyncIterator[Broker]:
    broker = broker_from_url(broker_url, clock=time.time)
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


async def claim(broker: Broker, owner: str, *, limit: int = 10, task: str = "say") -> list[str]:
    return [run.id for run in await broker.claim(owner, [task], limit=limit, lease_seconds=LEASE)]


async def claim_one(broker: Broker, owner: str) -> RunRecord:
    (run,) = await broker.claim(owner, ["say"], limit=1, lease_seconds=LEASE)
    return run


async def state_of(broker: Broker, run_id: str) -> RunState:
    run = await broker.get(run_id)
    assert run is not None
    return run.state


# --- submitting and reading --------------------------------------------------------------


async def test_submitted_run_reads_back_scheduled_with_its_options(broker: Broker) -> None:
    run = await broker.submit(
        "say", PAYLOAD, retries=2, retry_delay=1.5, timeout=10, max_attempts=3
    )
    assert run == await broker.get(run.id)
    assert len(run.id) == 32
    assert int(run.id, 16)
    assert (run.task, run.payload, run.state) == ("say", PAYLOAD, RunState.SCHEDULED)
    assert (run.attempts, run.max_attempts, run.retries_left) == (0, 3, 2)
    assert (run.retry_delay, run.timeout) == (1.5, 10.0)
    assert run.created_at == run.scheduled_at == START
    assert run.lease_owner is run.lease_expires_at is run.started_at is run.finished_at is None
    assert run.result is run.error is None
    assert not run.finished


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_the_trace_context_is_stored_with_the_run_and_claimed_with_it(
    broker: Broker,
) -> None:
    traced = await broker.submit("say", PAYLOAD, trace_context=TRACEPARENT)
    plain = await broker.submit("say", PAYLOAD)
    batch = await broker.submit_many("say", [PAYLOAD, PAYLOAD], trace_context=TRACEPARENT)
    assert (traced.trace_context, plain.trace_context) == (TRACEPARENT, None)
    assert [run.trace_context for run in batch] == [TRACEPARENT, TRACEPARENT]
    assert await broker.get(traced.id) == traced
    claimed = await broker.claim("w", ["say"], limit=4, lease_seconds=LEASE)
    assert {run.id: run.trace_context for run in claimed} == {
        traced.id: TRACEPARENT,
        plain.id: None,
        **{run.id: TRACEPARENT for run in batch},
    }


async def test_submit_refuses_a_trace_context_that_is_not_a_string(broker: Broker) -> None:
    with pytest.raises(TypeError, match="trace_context"):
        await broker.submit("say", PAYLOAD, trace_context=b"00-ab")  # type: ignore[arg-type]
    assert (await broker.counts())[RunState.SCHEDULED] == 0


async def test_every_run_gets_its_own_id(broker: Broker) -> None:
    ids = {(await broker.submit("say", PAYLOAD)).id for _ in range(20)}
    assert len(ids) == 20


async def test_submit_many_stores_a_batch_claimable_in_its_order(broker: Broker) -> None:
    payloads = [f'{{"args":[{number}],"kwargs":{{}}}}' for number in range(5)]
    runs = await broker.submit_many("say", payloads, retries=1, max_attempts=3)

    assert [run.payload for run in runs] == payloads
    assert [await broker.get(run.id) for run in runs] == runs
    assert {(run.state, run.retries_left, run.max_attempts) for run in runs} == {
        (RunState.SCHEDULED, 1, 3)
    }
    assert await claim(broker, "w1") == [run.id for run in runs]


async def test_get_of_unknown_run_is_none(broker: Broker) -> None:
    assert await broker.get("0" * 32) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries"),
        ({"retry_delay": -0.5}, "retry_delay"),
        ({"retry_delay": math.inf}, "retry_delay"),
        ({"timeout": 0}, "timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"scheduled_at": math.nan}, "scheduled_at"),
    ],
)
async def test_submit_rejects_out_of_range_options(
    broker: Broker, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await broker.submit("say", PAYLOAD, **options)
    assert (await broker.counts())[RunState.SCHEDULED] == 0


async def test_submit_rejects_an_empty_task_name(broker: Broker) -> None:
    with pytest.raises(ValueError, match="task name"):
        await broker.submit("", PAYLOAD)


# --- claiming ----------------------------------------------------------------------------


async def test_claim_returns_due_runs_oldest_first(broker: Broker, clock: FakeClock) -> None:
    first = await broker.submit("say", PAYLOAD)
    clock.advance(1)
    second = await broker.submit("say", PAYLOAD)
    third = await broker.submit("say", PAYLOAD)  # same time as second: submission order
    earlier = await broker.submit("say", PAYLOAD, scheduled_at=START - 10)

    claimed = await broker.claim("w1", ["say"], limit=10, lease_seconds=LEASE)

    assert [run.id for run in claimed] == [earlier.id, first.id, second.id, third.id]
    for run in claimed:
        assert run.state is RunState.RUNNING
        assert (run.attempts, run.lease_owner) == (1, "w1")
        assert (run.started_at, run.lease_expires_at) == (clock.now, clock.now + LEASE)
        assert await broker.get(run.id) == run


async def test_claim_takes_higher_priority_first_then_due_time_then_submission(
    broker: Broker, clock: FakeClock
) -> None:
    low_early = await broker.submit("say", PAYLOAD, priority=-1, scheduled_at=START - 10)
    plain = await broker.submit("say", PAYLOAD)
    urgent_late = await broker.submit("say", PAYLOAD, priority=5)
    urgent_early = await broker.submit("say", PAYLOAD, priority=5, scheduled_at=START - 5)
    urgent_same = await broker.submit("say", PAYLOAD, priority=5)  # after urgent_late
    clock.advance(1)

    claimed = await claim(broker, "w1", limit=4)
    rest = await claim(broker, "w2")

    assert claimed == [urgent_early.id, urgent_late.id, urgent_same.id, plain.id]
    assert rest == [low_early.id]


async def test_a_due_run_of_low_priority_still_goes_before_an_urgent_one_not_due(
    broker: Broker, clock: FakeClock
) -> None:
    later = await broker.submit("say", PAYLOAD, priority=9, scheduled_at=START + 10)
    low = await broker.submit("say", PAYLOAD, priority=-9)
    assert await claim(broker, "w1") == [low.id]
    clock.advance(10)
    assert await claim(broker, "w1") == [later.id]


async def test_expired_leases_are_reclaimed_in_priority_order_with_due_runs(
    broker: Broker, clock: FakeClock
) -> None:
    urgent = await broker.submit("say", PAYLOAD, priority=3)
    await claim(broker, "w1")
    clock.advance(LEASE)
    plain = await broker.submit("say", PAYLOAD)
    urgent_new = await broker.submit("say", PAYLOAD, priority=2)
    assert await claim(broker, "w2") == [urgent.id, urgent_new.id, plain.id]


async def test_priority_is_stored_with_every_kind_of_submit(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD, priority=7)
    batch = await broker.submit_many("say", [PAYLOAD, PAYLOAD], priority=-3)
    assert run.priority == 7
    assert [record.priority for record in batch] == [-3, -3]
    assert (await broker.submit("say", PAYLOAD)).priority == 0
    for record in (run, *batch):
        assert await broker.get(record.id) == record


@pytest.mark.parametrize(
    ("priority", "error"),
    [
        (1.5, TypeError),
        (True, TypeError),
        ("1", TypeError),
        (2**31, ValueError),
        (-(2**31), ValueError),
    ],
)
async def test_submit_rejects_a_priority_that_is_no_32_bit_int(
    broker: Broker, priority: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="priority"):
        await broker.submit("say", PAYLOAD, priority=priority)
    with pytest.raises(error, match="priority"):
        await broker.submit_many("say", [PAYLOAD], priority=priority)


async def claim_limited(
    broker: Broker, owner: str, limits: dict[str, int], *, limit: int = 10
) -> list[str]:
    claimed = await broker.claim(
        owner, ["say", "add"], limit=limit, lease_seconds=LEASE, concurrency=limits
    )
    return [run.id for run in claimed]


async def test_a_concurrency_limit_caps_the_runs_of_a_task_running_across_claimers(
    broker: Broker,
) -> None:
    says = [(await broker.submit("say", PAYLOAD)).id for _ in range(4)]
    add = await broker.submit("add", PAYLOAD)

    assert await claim_limited(broker, "w1", {"say": 2}) == [*says[:2], add.id]
    assert await claim_limited(broker, "w2", {"say": 2}) == []
    running = await broker.get(says[0])
    assert running is not None
    assert await broker.complete("w1", says[0], running.attempts, "null")
    assert await claim_limited(broker, "w2", {"say": 2}) == [says[2]]
    # A claimer that knows no limit is not held to one.
    assert await claim(broker, "w3") == [says[3]]


async def test_a_task_at_its_limit_does_not_crowd_out_the_others(broker: Broker) -> None:
    await broker.submit("say", PAYLOAD)
    await claim_limited(broker, "w1", {"say": 1})
    backlog = [(await broker.submit("say", PAYLOAD, priority=9)).id for _ in range(5)]
    add = await broker.submit("add", PAYLOAD)
    assert await claim_limited(broker, "w2", {"say": 1}, limit=1) == [add.id]
    assert await claim_limited(broker, "w2", {"say": 3}, limit=1) == [backlog[0]]
    assert await claim_limited(broker, "w2", {"say": 3}) == [backlog[1]]


async def test_runs_whose_lease_expired_free_their_slot_and_are_claimed_within_it(
    broker: Broker, clock: FakeClock
) -> None:
    says = [(await broker.submit("say", PAYLOAD)).id for _ in range(3)]
    assert await claim_limited(broker, "w1", {"say": 2}) == says[:2]
    clock.advance(LEASE)
    # The two expired leases come first (claim order), then the limit stops the third.
    assert await claim_limited(broker, "w2", {"say": 2}) == says[:2]
    assert await claim_limited(broker, "w2", {"say": 3}) == [says[2]]


async def test_claim_run_holds_a_run_to_its_tasks_concurrency_limit(
    broker: Broker, clock: FakeClock
) -> None:
    first, second = [await broker.submit("say", PAYLOAD) for _ in range(2)]
    limits = {"say": 1}
    claimed = await broker.claim_run("w1", first.id, lease_seconds=LEASE, concurrency=limits)
    assert claimed is not None
    assert await broker.claim_run("w2", second.id, lease_seconds=LEASE, concurrency=limits) is None
    assert await broker.claim_run("w2", second.id, lease_seconds=LEASE, concurrency={"add": 1})
    clock.advance(LEASE)  # both leases expired: neither takes a slot
    again = await broker.claim_run("w3", first.id, lease_seconds=LEASE, concurrency=limits)
    assert again is not None
    assert again.attempts == 2


@pytest.mark.parametrize(
    ("concurrency", "error", "match"),
    [
        ({"say": 0}, ValueError, r"concurrency\['say'\] must be an int >= 1, got 0"),
        ({"say": 1.5}, TypeError, r"concurrency\['say'\] must be an int, got 1\.5"),
        ({1: 2}, TypeError, "concurrency keys must be task names, got 1"),
        ([("say", 1)], TypeError, "concurrency must map task names to their limit"),
    ],
)
async def test_claim_rejects_bad_concurrency_limits(
    broker: Broker, concurrency: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await broker.claim("w1", ["say"], limit=1, lease_seconds=LEASE, concurrency=concurrency)


async def test_wait_for_work_wakes_when_a_run_of_a_task_at_its_limit_finishes(
    real_time_broker: Broker,
) -> None:
    broker = real_time_broker
    first = await broker.submit("say", PAYLOAD)
    await broker.submit("say", PAYLOAD)
    (running,) = await broker.claim(
        "w1", ["say"], limit=2, lease_seconds=LEASE, concurrency={"say": 1}
    )
    assert running.id == first.id
    assert (
        await broker.claim("w1", ["say"], limit=2, lease_seconds=LEASE, concurrency={"say": 1})
        == []
    )
    woke = anyio.Event()

    async def wait() -> None:
        await broker.wait_for_work(timeout=3600)
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.05)
        assert not woke.is_set()
        assert await broker.complete("w1", first.id, running.attempts, "null")
        with anyio.fail_after(5):
            await woke.wait()


async def test_concurrent_claimers_of_other_connections_never_exceed_a_limit(
    database_url: str,
) -> None:
    # A database broker: a memory broker is one process's, nothing else claims from it.
    brokers = [broker_from_url(database_url) for _ in range(4)]
    for each in brokers:
        await each.open()
    try:
        await brokers[0].submit_many("say", [PAYLOAD] * 20)
        claimed: list[RunRecord] = []

        async def claim_from(each: Broker, owner: str) -> None:
            for _ in range(5):
                claimed.extend(
                    await each.claim(
                        owner, ["say"], limit=3, lease_seconds=LEASE, concurrency={"say": 2}
                    )
                )

        async with anyio.create_task_group() as tg:
            for number, each in enumerate(brokers):
                tg.start_soon(claim_from, each, f"w{number}")
        assert len(claimed) == 2
        assert (await brokers[0].counts())[RunState.RUNNING] == 2
    finally:
        for each in brokers:
            await each.close()


async def test_claim_takes_at_most_limit_runs(broker: Broker) -> None:
    runs = [(await broker.submit("say", PAYLOAD)).id for _ in range(5)]
    assert await claim(broker, "w1", limit=2) == runs[:2]
    assert await claim(broker, "w2", limit=0) == []
    assert await claim(broker, "w2", limit=2) == runs[2:4]
    assert await claim(broker, "w3", limit=2) == runs[4:]


async def test_claim_takes_only_the_named_tasks(broker: Broker) -> None:
    say = await broker.submit("say", PAYLOAD)
    shout = await broker.submit("shout", PAYLOAD)
    assert await broker.claim("w1", [], limit=10, lease_seconds=LEASE) == []
    assert await claim(broker, "w1", task="shout") == [shout.id]
    claimed = await broker.claim("w2", {"say", "unknown"}, limit=10, lease_seconds=LEASE)
    assert [run.id for run in claimed] == [say.id]


async def test_claim_rejects_a_single_string_as_task_names(broker: Broker) -> None:
    with pytest.raises(TypeError, match="collection of task names"):
        await broker.claim("w1", "say", limit=1, lease_seconds=LEASE)


@pytest.mark.parametrize(("limit", "lease_seconds"), [(-1, LEASE), (1, 0.0), (1, math.nan)])
async def test_claim_rejects_bad_limits(broker: Broker, limit: int, lease_seconds: float) -> None:
    with pytest.raises(ValueError, match=r"limit|lease_seconds"):
        await broker.claim("w1", ["say"], limit=limit, lease_seconds=lease_seconds)


async def test_run_scheduled_for_later_is_claimed_once_due(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD, scheduled_at=START + 60)
    assert await claim(broker, "w1") == []
    clock.advance(59.5)
    assert await claim(broker, "w1") == []
    clock.advance(0.5)
    assert await claim(broker, "w1") == [run.id]


async def test_live_lease_keeps_the_run_from_other_owners(broker: Broker, clock: FakeClock) -> None:
    run = await broker.submit("say", PAYLOAD)
    assert await claim(broker, "w1") == [run.id]
    assert await claim(broker, "w2") == []
    clock.advance(LEASE - 0.01)
    assert await claim(broker, "w2") == []
    assert (await claim_owner(broker, run.id)) == "w1"


async def claim_owner(broker: Broker, run_id: str) -> str | None:
    run = await broker.get(run_id)
    assert run is not None
    return run.lease_owner


async def test_expired_lease_is_claimed_by_another_owner_as_a_new_attempt(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    clock.advance(LEASE)
    again = await claim_one(broker, "w2")
    assert again.id == run.id
    assert (again.state, again.attempts, again.lease_owner) == (RunState.RUNNING, 2, "w2")
    assert again.lease_expires_at == clock.now + LEASE


async def test_owner_reclaims_its_own_expired_lease_as_a_new_attempt(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    clock.advance(LEASE - 1)
    assert await claim(broker, "w1") == []
    clock.advance(1)
    again = await claim_one(broker, "w1")
    assert (again.id, again.attempts, again.lease_owner) == (run.id, 2, "w1")
    # The first attempt is fenced off by its number, though its owner is the same.
    assert not await broker.complete("w1", run.id, 1, '"late"')
    assert await broker.heartbeat("w1", {run.id: 1}, lease_seconds=LEASE) == set()
    assert await broker.heartbeat("w1", {run.id: 2}, lease_seconds=LEASE) == {run.id}
    assert await broker.complete("w1", run.id, 2, '"on time"')


async def test_claim_run_claims_that_run_only_when_claimable(
    broker: Broker, clock: FakeClock
) -> None:
    first = await broker.submit("say", PAYLOAD)
    later = await broker.submit("say", PAYLOAD, scheduled_at=clock.now + 10)
    claimed = await broker.claim_run("w1", later.id, lease_seconds=LEASE)
    assert claimed is None
    clock.advance(10)
    claimed = await broker.claim_run("w1", later.id, lease_seconds=LEASE)
    assert claimed is not None
    assert (claimed.id, claimed.attempts, claimed.lease_owner) == (later.id, 1, "w1")
    assert claimed == await broker.get(later.id)
    assert await broker.claim_run("w2", later.id, lease_seconds=LEASE) is None
    assert await broker.claim_run("w2", "0" * 32, lease_seconds=LEASE) is None
    assert await state_of(broker, first.id) is RunState.SCHEDULED
    clock.advance(LEASE)
    again = await broker.claim_run("w2", later.id, lease_seconds=LEASE)
    assert again is not None
    assert (again.attempts, again.lease_owner) == (2, "w2")
    with pytest.raises(ValueError, match="lease_seconds"):
        await broker.claim_run("w2", first.id, lease_seconds=0)


async def test_run_abandoned_on_its_last_attempt_ends_crashed(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD, max_attempts=2)
    await claim_one(broker, "w1")
    clock.advance(LEASE)
    await claim_one(broker, "w2")
    clock.advance(LEASE)

    assert await claim(broker, "w3") == []

    crashed = await broker.get(run.id)
    assert crashed is not None
    assert crashed.state is RunState.CRASHED
    assert crashed.finished
    assert (crashed.attempts, crashed.finished_at) == (2, clock.now)
    assert crashed.lease_owner is crashed.lease_expires_at is None
    assert crashed.error is not None
    assert crashed.error.type == ABANDONED_ERROR_TYPE
    assert "abandoned by a worker" in crashed.error.message
    assert "claimed 2 times" in crashed.error.message
    assert not await broker.complete("w2", run.id, 2, "null")


async def test_abandoned_runs_of_unknown_tasks_are_crashed_too(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("other", PAYLOAD, max_attempts=1)
    await broker.claim("w1", ["other"], limit=1, lease_seconds=LEASE)
    clock.advance(LEASE)
    assert await claim(broker, "w2") == []
    assert await state_of(broker, run.id) is RunState.CRASHED


# --- leases --------------------------------------------------------------------------------


async def test_heartbeat_extends_the_lease(broker: Broker, clock: FakeClock) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    clock.advance(LEASE - 1)
    assert await broker.heartbeat("w1", {run.id: 1}, lease_seconds=LEASE) == {run.id}
    clock.advance(LEASE - 1)
    assert await claim(broker, "w2") == []
    renewed = await broker.get(run.id)
    assert renewed is not None
    assert renewed.lease_expires_at == clock.now + 1
    assert renewed.attempts == 1


async def test_heartbeat_reports_only_the_leases_still_held(
    broker: Broker, clock: FakeClock
) -> None:
    lost = await broker.submit("say", PAYLOAD)
    kept = await broker.submit("say", PAYLOAD)
    done = await broker.submit("say", PAYLOAD)
    await claim(broker, "w1")
    assert await broker.complete("w1", done.id, 1, "null")
    clock.advance(LEASE)
    assert await claim(broker, "w2", limit=1) == [lost.id]

    leases = {lost.id: 1, kept.id: 1, done.id: 1, "0" * 32: 1}
    held = await broker.heartbeat("w1", leases, lease_seconds=LEASE)

    assert held == {kept.id}
    assert await broker.heartbeat("w1", {kept.id: 2}, lease_seconds=LEASE) == set()
    assert await broker.heartbeat("w1", {}, lease_seconds=LEASE) == set()


@pytest.mark.parametrize("leases", ["0" * 32, ["0" * 32], {"0" * 32}])
async def test_heartbeat_needs_the_attempt_of_each_lease(broker: Broker, leases: Any) -> None:
    with pytest.raises(TypeError, match=r"leases must map each run id to the attempt"):
        await broker.heartbeat("w1", leases, lease_seconds=LEASE)


@pytest.mark.parametrize(
    ("attempt", "error"), [(0, ValueError), ("1", TypeError), (True, TypeError)]
)
async def test_fenced_calls_refuse_a_bad_attempt(
    broker: Broker, attempt: Any, error: type[Exception]
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    with pytest.raises(error, match="attempt"):
        await broker.complete("w1", run.id, attempt, "null")
    with pytest.raises(error, match="attempt"):
        await broker.fail("w1", run.id, attempt, BOOM, retry=False)
    with pytest.raises(error, match="attempt"):
        await broker.release("w1", run.id, attempt)
    with pytest.raises(error, match="attempt"):
        await broker.heartbeat("w1", {run.id: attempt}, lease_seconds=LEASE)
    assert await state_of(broker, run.id) is RunState.RUNNING


async def test_non_owner_cannot_change_a_claimed_run(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD, retries=3)
    await claim_one(broker, "w1")
    before = await broker.get(run.id)

    assert not await broker.complete("intruder", run.id, 1, '"mine"')
    assert not await broker.fail("intruder", run.id, 1, BOOM, retry=True)
    assert not await broker.fail("intruder", run.id, 1, BOOM, retry=False)
    assert not await broker.release("intruder", run.id, 1)
    assert await broker.heartbeat("intruder", {run.id: 1}, lease_seconds=LEASE) == set()
    # The owner, naming an attempt its claim did not make, is refused as well.
    assert not await broker.complete("w1", run.id, 2, '"mine"')
    assert not await broker.release("w1", run.id, 2)

    assert await broker.get(run.id) == before


async def test_worker_that_lost_its_lease_cannot_finish_the_run(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    clock.advance(LEASE)
    await claim_one(broker, "w2")

    assert not await broker.complete("w1", run.id, 1, '"late"')
    assert not await broker.fail("w1", run.id, 1, BOOM, retry=False)
    assert not await broker.release("w1", run.id, 1)

    assert await claim_owner(broker, run.id) == "w2"
    assert await broker.complete("w2", run.id, 2, '"on time"')


async def test_runs_not_running_cannot_be_completed_failed_or_released(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD)
    assert not await broker.complete("w1", run.id, 1, "null")
    assert not await broker.fail("w1", run.id, 1, BOOM, retry=False)
    assert not await broker.release("w1", run.id, 1)
    assert not await broker.complete("w1", "0" * 32, 1, "null")
    assert await state_of(broker, run.id) is RunState.SCHEDULED


# --- finishing -----------------------------------------------------------------------------


async def test_complete_records_the_result(broker: Broker, clock: FakeClock) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    clock.advance(2)

    assert await broker.complete("w1", run.id, 1, '{"said":"hi"}')

    done = await broker.get(run.id)
    assert done is not None
    assert (done.state, done.result, done.error) == (RunState.COMPLETED, '{"said":"hi"}', None)
    assert (done.started_at, done.finished_at) == (START, START + 2)
    assert done.lease_owner is done.lease_expires_at is None
    assert not await broker.complete("w1", run.id, 1, "null")


async def test_complete_many_records_each_result_its_claim_still_holds(
    broker: Broker, clock: FakeClock
) -> None:
    first = await broker.submit("say", PAYLOAD)
    stale = await broker.submit("say", PAYLOAD)
    other = await broker.submit("say", PAYLOAD)
    await claim(broker, "w1", limit=3)
    clock.advance(LEASE)
    # The lease of every run expired; w2 claims them all again (attempt 2).
    await claim(broker, "w2", limit=3)
    clock.advance(1)

    done = await broker.complete_many(
        "w2",
        {first.id: (2, '"one"'), stale.id: (1, '"late"'), "0" * 32: (2, "null")},
    )

    assert done == {first.id}
    finished = await broker.get(first.id)
    assert finished is not None
    assert (finished.state, finished.result, finished.finished_at) == (
        RunState.COMPLETED,
        '"one"',
        START + LEASE + 1,
    )
    for unchanged in (stale, other):
        assert await state_of(broker, unchanged.id) is RunState.RUNNING
    assert await broker.complete_many("w1", {other.id: (1, "null")}) == set()
    assert await broker.complete_many("w2", {stale.id: (2, '"two"'), other.id: (2, "3")}) == {
        stale.id,
        other.id,
    }
    assert await broker.complete_many("w2", {}) == set()


async def test_complete_and_claim_records_what_each_claim_holds_then_claims_the_next(
    broker: Broker, clock: FakeClock
) -> None:
    first, stale, other = [await broker.submit("say", PAYLOAD) for _ in range(3)]
    await claim(broker, "w1", limit=3)
    clock.advance(LEASE)
    await claim(broker, "w2", limit=3)  # every lease expired: attempt 2 is w2's
    backlog = [(await broker.submit("say", PAYLOAD)).id for _ in range(3)]
    clock.advance(1)

    done, claimed = await broker.complete_and_claim(
        "w2",
        {first.id: (2, '"one"'), stale.id: (1, '"late"'), "0" * 32: (2, "null")},
        ["say"],
        limit=2,
        lease_seconds=LEASE,
    )

    # Fenced per run, as complete_many fences: only the claim that holds a run records it.
    assert done == {first.id}
    finished = await broker.get(first.id)
    assert finished is not None
    assert (finished.state, finished.result, finished.finished_at) == (
        RunState.COMPLETED,
        '"one"',
        START + LEASE + 1,
    )
    for unchanged in (stale, other):
        assert await state_of(broker, unchanged.id) is RunState.RUNNING
    # Then claimed as claim() claims: in claim order, each with its own fencing token.
    assert [(run.id, run.attempts, run.lease_owner) for run in claimed] == [
        (backlog[0], 1, "w2"),
        (backlog[1], 1, "w2"),
    ]
    assert [run.lease_expires_at for run in claimed] == [START + 2 * LEASE + 1] * 2
    assert not await broker.complete("w1", stale.id, 1, "null")
    # limit=0 only completes; nothing left to claim is an empty claim.
    done, claimed = await broker.complete_and_claim(
        "w2", {stale.id: (2, '"two"')}, ["say"], limit=0, lease_seconds=LEASE
    )
    assert (done, claimed) == ({stale.id}, [])
    assert await state_of(broker, backlog[2]) is RunState.SCHEDULED
    done, claimed = await broker.complete_and_claim("w2", {}, ["say"], limit=5, lease_seconds=LEASE)
    assert (done, [run.id for run in claimed]) == (set(), [backlog[2]])


async def test_complete_and_claim_frees_the_slot_of_a_limited_task_for_its_own_claim(
    broker: Broker,
) -> None:
    says = [(await broker.submit("say", PAYLOAD)).id for _ in range(3)]
    assert await claim_limited(broker, "w1", {"say": 1}) == says[:1]
    assert await claim_limited(broker, "w2", {"say": 1}) == []

    done, claimed = await broker.complete_and_claim(
        "w1",
        {says[0]: (1, "null")},
        ["say", "add"],
        limit=10,
        lease_seconds=LEASE,
        concurrency={"say": 1},
    )

    assert (done, [run.id for run in claimed]) == ({says[0]}, [says[1]])
    assert await claim_limited(broker, "w2", {"say": 1}) == []


@pytest.mark.parametrize(
    ("tasks", "limit", "error", "match"),
    [
        ("say", 1, TypeError, "tasks must be a collection of task names"),
        (["say"], -1, ValueError, "limit"),
    ],
)
async def test_complete_and_claim_checks_its_claim_before_recording_anything(
    broker: Broker, tasks: Any, limit: int, error: type[Exception], match: str
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    with pytest.raises(error, match=match):
        await broker.complete_and_claim(
            "w1", {run.id: (1, "null")}, tasks, limit=limit, lease_seconds=LEASE
        )
    not_a_pair: Any = {"x": 1}
    with pytest.raises(TypeError, match=r"results\['x'\] must be an \(attempt, result\) pair"):
        await broker.complete_and_claim("w1", not_a_pair, ["say"], limit=1, lease_seconds=LEASE)
    assert await state_of(broker, run.id) is RunState.RUNNING


@pytest.mark.parametrize(
    ("results", "error", "match"),
    [
        ([("x", (1, "null"))], TypeError, "results must map each run id"),
        ({"x": 1}, TypeError, r"results\['x'\] must be an \(attempt, result\) pair"),
        ({"x": (0, "null")}, ValueError, r"results\['x'\] \(the attempt of that run\)"),
        ({"x": (1, None)}, TypeError, r"results\['x'\]: the result must be JSON text"),
    ],
)
async def test_complete_many_rejects_bad_results(
    broker: Broker, results: Any, error: type[Exception], match: str
) -> None:
    run = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    with pytest.raises(error, match=match):
        await broker.complete_many("w1", results)
    assert await state_of(broker, run.id) is RunState.RUNNING


async def test_failure_with_retries_left_is_retried_after_its_delay(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD, retries=2, retry_delay=10)
    await claim_one(broker, "w1")
    clock.advance(1)

    assert await broker.fail("w1", run.id, 1, BOOM, retry=True)

    retried = await broker.get(run.id)
    assert retried is not None
    assert (retried.state, retried.retries_left, retried.attempts) == (RunState.SCHEDULED, 1, 1)
    assert retried.scheduled_at == clock.now + 10
    assert retried.error == BOOM
    assert retried.lease_owner is retried.started_at is retried.finished_at is None
    assert await claim(broker, "w2") == []
    clock.advance(9.9)
    assert await claim(broker, "w2") == []
    clock.advance(0.1)
    assert (await claim_one(broker, "w2")).attempts == 2


async def test_a_failure_may_give_its_retry_a_delay_of_its_own(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD, retries=2, retry_delay=10)
    await claim_one(broker, "w1")
    assert await broker.fail("w1", run.id, 1, BOOM, retry=True, retry_delay=2.5)
    retried = await broker.get(run.id)
    assert retried is not None
    # The given delay, this once; the stored one is left for the next failure.
    assert (retried.scheduled_at, retried.retry_delay) == (clock.now + 2.5, 10.0)
    clock.advance(2.5)
    await claim_one(broker, "w1")
    assert await broker.fail("w1", run.id, 2, BOOM, retry=True, retry_delay=0)
    retried = await broker.get(run.id)
    assert retried is not None
    assert (retried.state, retried.scheduled_at) == (RunState.SCHEDULED, clock.now)


@pytest.mark.parametrize(
    ("delay", "error"), [(-1.0, ValueError), (math.inf, ValueError), ([], TypeError)]
)
async def test_fail_rejects_a_bad_retry_delay(
    broker: Broker, delay: Any, error: type[Exception]
) -> None:
    run = await broker.submit("say", PAYLOAD, retries=1)
    await claim_one(broker, "w1")
    with pytest.raises(error, match="retry_delay"):
        await broker.fail("w1", run.id, 1, BOOM, retry=True, retry_delay=delay)
    assert await state_of(broker, run.id) is RunState.RUNNING


async def test_failure_with_no_retries_left_ends_failed(broker: Broker, clock: FakeClock) -> None:
    run = await broker.submit("say", PAYLOAD, retries=1)
    await claim_one(broker, "w1")
    assert await broker.fail("w1", run.id, 1, RunError("KeyError", "first"), retry=True)
    await claim_one(broker, "w1")

    assert await broker.fail("w1", run.id, 2, BOOM, retry=True)

    failed = await broker.get(run.id)
    assert failed is not None
    assert (failed.state, failed.retries_left, failed.error) == (RunState.FAILED, 0, BOOM)
    assert failed.finished_at == clock.now
    assert failed.lease_owner is None
    assert await claim(broker, "w1") == []


async def test_failure_without_retry_ends_failed_whatever_retries_are_left(
    broker: Broker,
) -> None:
    run = await broker.submit("say", PAYLOAD, retries=5)
    await claim_one(broker, "w1")
    assert await broker.fail("w1", run.id, 1, BOOM, retry=False)
    failed = await broker.get(run.id)
    assert failed is not None
    assert (failed.state, failed.retries_left) == (RunState.FAILED, 5)


async def test_released_run_is_claimable_at_once_without_counting_the_attempt(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD, max_attempts=1)
    await claim_one(broker, "w1")

    assert await broker.release("w1", run.id, 1)

    released = await broker.get(run.id)
    assert released is not None
    assert (released.state, released.attempts) == (RunState.SCHEDULED, 0)
    assert released.lease_owner is released.lease_expires_at is released.started_at is None
    assert (await claim_one(broker, "w2")).attempts == 1
    # Its one allowed attempt is the second claim, so abandoning that one crashes it.
    clock.advance(LEASE)
    assert await claim(broker, "w3") == []
    assert await state_of(broker, run.id) is RunState.CRASHED


async def test_cancel_stops_a_scheduled_run_from_being_claimed(
    broker: Broker, clock: FakeClock
) -> None:
    run = await broker.submit("say", PAYLOAD)
    assert await broker.cancel(run.id)
    cancelled = await broker.get(run.id)
    assert cancelled is not None
    assert (cancelled.state, cancelled.finished_at) == (RunState.CANCELLED, clock.now)
    assert await claim(broker, "w1") == []
    assert not await broker.cancel(run.id)


async def test_cancel_leaves_claimed_finished_and_unknown_runs_alone(broker: Broker) -> None:
    running = await broker.submit("say", PAYLOAD)
    await claim_one(broker, "w1")
    assert not await broker.cancel(running.id)
    assert await broker.complete("w1", running.id, 1, "null")
    assert not await broker.cancel(running.id)
    assert not await broker.cancel("0" * 32)
    assert await state_of(broker, running.id) is RunState.COMPLETED


async def test_counts_reports_every_state(broker: Broker, clock: FakeClock) -> None:
    assert await broker.counts() == dict.fromkeys(RunState, 0)
    crashed = await broker.submit("say", PAYLOAD, max_attempts=1)
    await claim_one(broker, "w0")
    clock.advance(LEASE)
    completed, failed, cancelled, running = [
        (await broker.submit("say", PAYLOAD)).id for _ in range(4)
    ]
    await broker.submit("say", PAYLOAD)  # stays SCHEDULED
    assert await claim(broker, "w1", limit=3) == [completed, failed, cancelled]
    await broker.complete("w1", completed, 1, "null")
    await broker.fail("w1", failed, 1, BOOM, retry=False)
    await broker.release("w1", cancelled, 1)
    assert await broker.cancel(cancelled)
    assert await claim(broker, "w2", limit=1) == [running]

    assert await broker.counts() == dict.fromkeys(RunState, 1)
    assert await state_of(broker, crashed.id) is RunState.CRASHED


# --- waiting -------------------------------------------------------------------------------


async def test_wait_for_work_wakes_when_a_run_is_submitted(broker: Broker) -> None:
    woke = anyio.Event()

    async def wait_for_work() -> None:
        await broker.wait_for_work(timeout=5)
        woke.set()

    assert await claim(broker, "w1") == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_work)
        await anyio.sleep(0.05)
        assert not woke.is_set()
        await broker.submit("say", PAYLOAD)
        with anyio.fail_after(4):  # before wait_for_work's own timeout
            await woke.wait()


async def test_wait_for_work_returns_at_once_for_work_submitted_since_the_last_claim(
    broker: Broker,
) -> None:
    assert await claim(broker, "w1") == []
    await broker.submit("say", PAYLOAD)
    with anyio.fail_after(4):
        await broker.wait_for_work(timeout=5)


async def test_wait_for_work_returns_after_its_timeout(broker: Broker) -> None:
    assert await claim(broker, "w1") == []
    with anyio.fail_after(4):
        await broker.wait_for_work(timeout=0.02)


async def test_wait_for_work_wakes_when_a_retry_falls_due(real_time_broker: Broker) -> None:
    broker = real_time_broker
    # Long enough that the claim right after the failure comes before it on a busy machine.
    run = await broker.submit("say", PAYLOAD, retries=1, retry_delay=0.5)
    await claim_one(broker, "w1")
    assert await broker.fail("w1", run.id, 1, BOOM, retry=True)
    assert await claim(broker, "w1") == []
    with anyio.fail_after(4):
        while not (claimed := await claim(broker, "w1")):
            await broker.wait_for_work(timeout=5)
    assert claimed == [run.id]


async def test_wait_for_work_wakes_when_another_owners_lease_expires(
    real_time_broker: Broker,
) -> None:
    broker = real_time_broker
    run = await broker.submit("say", PAYLOAD)
    await broker.claim("w1", ["say"], limit=1, lease_seconds=0.05)
    with anyio.fail_after(4):
        while not (claimed := await claim(broker, "w2")):
            await broker.wait_for_work(timeout=5)
    assert claimed == [run.id]


async def test_wait_until_finished_returns_the_finished_run(broker: Broker) -> None:
    run = await broker.submit("say", PAYLOAD)
    finished: list[RunRecord | None] = []

    async def wait_until_finished() -> None:
        finished.append(await broker.wait_until_finished(run.id, timeout=5))

    with anyio.fail_after(4):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_until_finished)
            await claim_one(broker, "w1")
            await anyio.sleep(0.02)
            assert not finished
            await broker.complete("w1", run.id, 1, '"ok"')

    (done,) = finished
    assert done is not None
    assert (done.state, done.result) == (RunState.COMPLETED, '"ok"')


async def test_wait_until_finished_gives_the_latest_record_after_its_timeout(
    broker: Broker,
) -> None:
    run = await broker.submit("say", PAYLOAD)
    latest = await broker.wait_until_finished(run.id, timeout=0.02)
    assert latest == run
    assert await broker.wait_until_finished("0" * 32, timeout=5) is None


# --- opening and closing -------------------------------------------------------------------


async def test_calls_before_open_raise_broker_error(broker_url: str) -> None:
    broker = broker_from_url(broker_url)
    with pytest.raises(BrokerError, match="not open"):
        await broker.get("0" * 32)
    await broker.close()


async def test_open_and_close_are_idempotent_and_runs_survive_reopening(
    broker_url: str,
) -> None:
    broker = broker_from_url(broker_url)
    await broker.open()
    await broker.open()
    run = await broker.submit("say", PAYLOAD)
    await broker.close()
    await broker.close()
    with pytest.raises(BrokerError):
        await broker.get(run.id)
    await broker.open()
    try:
        assert await broker.get(run.id) == run
    finally:
        await broker.close()


# --- broker URLs ---------------------------------------------------------------------------


def test_memory_url_makes_a_memory_broker() -> None:
    broker = broker_from_url("memory://")
    assert isinstance(broker, MemoryBroker)
    assert broker.url == "memory://"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative.db", "relative.db"),
        ("sqlite:///data/runs.db", "data/runs.db"),
        ("sqlite:///{here}/abs.db", "abs.db"),
        ("SQLite:///{here}/abs.db", "abs.db"),
    ],
)
def test_sqlite_url_names_a_relative_or_absolute_file(
    url: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    url = url.format(here=tmp_path)
    broker = broker_from_url(url)
    assert isinstance(broker, SqliteBroker)
    assert broker.path == broker.location == str(tmp_path / path)
    assert broker.url.lower() == url.lower()


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("redis://localhost", "redis"), ("mysql://user:secret@host/db", "mysql")],
)
def test_unsupported_scheme_lists_the_supported_ones(url: str, scheme: str) -> None:
    with pytest.raises(
        ValueError,
        match=f"^unsupported scheme '{scheme}'; supported: sqlite, memory, postgresql, postgres$",
    ):
        broker_from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "anyservice.db",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/runs.db",
        "sqlite:///:memory:",
        "sqlite:///runs.db?mode=ro",
        "memory://somewhere",
    ],
)
def test_malformed_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=r"broker URL|unsupported scheme"):
        broker_from_url(url)


# --- the same as the pure transitions ---------------------------------------------------------

OWNERS = ("w1", "w2")
TASKS = ("say", "add")
#: How many claims behind the run's current attempt a fenced call names (0: the current).
STALENESS = st.sampled_from([0, 0, 1])


def fence(run: RunRecord, staleness: int) -> int:
    return max(run.attempts - staleness, 1)


steps = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from(TASKS),
        st.integers(0, 2),
        st.sampled_from([0.0, 5.0]),
        st.integers(1, 3),
        st.none() | st.sampled_from([0.0, 10.0, 40.0]),
        st.sampled_from([0, 0, 1, -1]),
    ),
    st.tuples(
        st.just("claim"),
        st.sampled_from(OWNERS),
        st.sampled_from([TASKS, TASKS[:1]]),
        st.integers(0, 3),
        st.sampled_from([None, None, {"say": 1}, {"say": 2, "add": 1}]),
    ),
    st.tuples(
        st.just("heartbeat"),
        st.sampled_from(OWNERS),
        st.lists(st.integers(0, 9), max_size=3),
        STALENESS,
    ),
    st.tuples(
        st.sampled_from(["complete", "fail", "retry", "release"]),
        st.sampled_from(OWNERS),
        st.integers(0, 9),
        STALENESS,
        st.sampled_from([None, None, 0.0, 7.5]),
    ),
    st.tuples(
        st.just("complete_many"),
        st.sampled_from(OWNERS),
        st.lists(st.tuples(st.integers(0, 9), STALENESS), max_size=4),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 9)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 10.0, 31.0])),
)


class PureModel:
    """The runs as the pure transitions of ``_records.py`` make them, in submission order."""

    def __init__(self) -> None:
        self.runs: list[RunRecord] = []

    def claim(
        self,
        owner: str,
        tasks: tuple[str, ...],
        limit: int,
        now: float,
        concurrency: dict[str, int] | None,
    ) -> list[str]:
        for index, run in enumerate(self.runs):
            self.runs[index] = records.abandon(run, now) or run
        due = sorted(
            (i for i, run in enumerate(self.runs) if run.task in tasks),
            key=lambda i: records.claim_order(self.runs[i], i),
        )
        limits = {task: cap for task, cap in (concurrency or {}).items() if task in tasks}
        free = records.free_slots(self.runs, limits, now)
        picked = records.pick_claims(
            (self.runs[i] for i in due if records.claimable(self.runs[i], now)), limit, free
        )
        position = {run.id: i for i, run in enumerate(self.runs)}
        for run in picked.runs:
            i = position[run.id]
            self.runs[i] = records.claim(run, owner, now, LEASE) or run
        return [run.id for run in picked.runs]

    def apply(self, index: int, changed: RunRecord | None) -> bool:
        if changed is not None:
            self.runs[index] = changed
        return changed is not None


async def drive(url: str, script: list[tuple[Any, ...]]) -> None:
    """Run ``script`` through the broker and the model, comparing every result and record."""
    clock = FakeClock()
    model = PureModel()
    # Runs to act on from the first step: a script rarely submits before it claims.
    script = [("submit", task, 1, 5.0, 2, None, 0) for task in (*TASKS, *TASKS)] + script
    async with broker_from_url(url, clock=clock) as broker:  # type: ignore[attr-defined]
        for step in script:
            kind, *args = step
            runs = model.runs
            if kind == "submit":
                task, retries, delay, max_attempts, later, priority = args
                scheduled = None if later is None else clock.now + later
                run = await broker.submit(
                    task,
                    PAYLOAD,
                    retries=retries,
                    retry_delay=delay,
                    max_attempts=max_attempts,
                    scheduled_at=scheduled,
                    priority=priority,
                )
                expected = records.new_run(
                    run.id,
                    task,
                    PAYLOAD,
                    retries=retries,
                    retry_delay=delay,
                    timeout=None,
                    max_attempts=max_attempts,
                    scheduled_at=scheduled,
                    now=clock.now,
                    priority=priority,
                )
                assert run == expected, step
                runs.append(expected)
            elif kind == "advance":
                clock.advance(args[0])
            elif kind == "claim":
                owner, tasks, limit, concurrency = args
                claimed = await broker.claim(
                    owner, tasks, limit=limit, lease_seconds=LEASE, concurrency=concurrency
                )
                expected_ids = model.claim(owner, tasks, limit, clock.now, concurrency)
                assert [run.id for run in claimed] == expected_ids, step
            elif not runs:
                continue
            elif kind == "heartbeat":
                owner, indices, staleness = args
                leases = {
                    runs[i % len(runs)].id: fence(runs[i % len(runs)], staleness) for i in indices
                }
                held = await broker.heartbeat(owner, leases, lease_seconds=LEASE)
                expected_held = set()
                for i, run in enumerate(runs):
                    if run.id in leases and model.apply(
                        i, records.renew(run, owner, leases[run.id], clock.now, LEASE)
                    ):
                        expected_held.add(run.id)
                assert held == expected_held, step
            elif kind == "complete_many":
                owner, picks = args
                results = {
                    runs[i % len(runs)].id: (fence(runs[i % len(runs)], staleness), f'"{i}"')
                    for i, staleness in picks
                }
                done_ids = await broker.complete_many(owner, results)
                expected_done = set()
                for i, run in enumerate(runs):
                    if run.id in results:
                        attempt, result = results[run.id]
                        changed = records.complete(run, owner, attempt, result, clock.now)
                        if model.apply(i, changed):
                            expected_done.add(run.id)
                assert done_ids == expected_done, step
            elif kind == "cancel":
                i = args[0] % len(runs)
                done = await broker.cancel(runs[i].id)
                assert done == model.apply(i, records.cancel(runs[i], clock.now)), step
            else:
                owner, i = args[0], args[1] % len(runs)
                run = runs[i]
                attempt = fence(run, args[2])
                if kind == "complete":
                    done = await broker.complete(owner, run.id, attempt, '"ok"')
                    changed = records.complete(run, owner, attempt, '"ok"', clock.now)
                elif kind == "release":
                    done = await broker.release(owner, run.id, attempt)
                    changed = records.release(run, owner, attempt)
                else:
                    retry, delay = kind == "retry", args[3]
                    done = await broker.fail(
                        owner, run.id, attempt, BOOM, retry=retry, retry_delay=delay
                    )
                    changed = records.fail(
                        run, owner, attempt, BOOM, clock.now, retry=retry, retry_delay=delay
                    )
                assert done == model.apply(i, changed), step
            for expected in runs:
                assert await broker.get(expected.id) == expected, step


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(steps, min_size=10, max_size=40))
def test_any_sequence_of_calls_leaves_the_records_the_pure_transitions_give(
    kind: str, backend: str, script: list[tuple[Any, ...]]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = "memory://" if kind == "memory" else f"sqlite:///{Path(directory) / 'runs.db'}"
        anyio.run(drive, url, script, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(steps, min_size=10, max_size=40))
def test_any_sequence_of_calls_on_postgresql_leaves_the_records_the_pure_transitions_give(
    postgres_url: str, backend: str, script: list[tuple[Any, ...]]
) -> None:
    # Fewer examples than the embedded brokers: each makes (and drops) a schema.
    with postgres_schema(postgres_url) as url:
        anyio.run(drive, url, script, backend=backend)


async def test_only_a_retried_failure_counts_as_new_work(broker: Broker) -> None:
    notifier = broker._notifier  # type: ignore[attr-defined]
    await broker.submit("say", PAYLOAD, retries=1)
    await broker.submit("say", PAYLOAD, retries=1)
    first, second = await broker.claim("w1", ["say"], limit=2, lease_seconds=LEASE)
    work = notifier.generation(work=True)
    assert await broker.fail("w1", first.id, 1, BOOM, retry=False)
    assert notifier.generation(work=True) == work
    assert await broker.fail("w1", second.id, 1, BOOM, retry=True)
    assert notifier.generation(work=True) == work + 1


async def test_a_wait_in_another_event_loop_sees_a_finish_notified_in_this_one() -> None:
    # A sync caller's short-lived event loop in a thread of its own (result_sync() from
    # plain code) waits through the same notifier, whose notify() sets only the events of
    # the notifying thread: the waiter must compare generations again by itself.
    broker = MemoryBroker()
    async with broker:
        run = await broker.submit("say", PAYLOAD)
        assert await claim(broker, "w1") == [run.id]
        seen: list[RunRecord | None] = []

        def wait_in_own_loop() -> None:
            seen.append(anyio.run(broker.wait_until_finished, run.id, 60.0))

        thread = threading.Thread(target=wait_in_own_loop, daemon=True)
        thread.start()
        notifier = broker._notifier
        with anyio.fail_after(REAL_TIME_BOUND):
            while not notifier._waiters:  # noqa: ASYNC110 - another thread's wait, no event
                await anyio.sleep(0.005)
        assert await broker.complete("w1", run.id, 1, "null")
        with anyio.fail_after(REAL_TIME_BOUND):
            while not seen:  # noqa: ASYNC110 - the other thread's result, no event
                await anyio.sleep(0.005)
        await anyio.to_thread.run_sync(thread.join)
        (record,) = seen
        assert record is not None
        assert record.state is RunState.COMPLETED


# --- purging -------------------------------------------------------------------------------


async def test_purge_deletes_only_runs_finished_before_the_cutoff(
    broker: Broker, clock: FakeClock
) -> None:
    completed, failed, cancelled, running, recent = [
        (await broker.submit("say", PAYLOAD)).id for _ in range(5)
    ]
    assert await claim(broker, "w1", limit=2) == [completed, failed]
    assert await broker.complete("w1", completed, 1, "null")
    assert await broker.fail("w1", failed, 1, BOOM, retry=False)
    assert await broker.cancel(cancelled)
    clock.advance(100)
    assert await claim(broker, "w1", limit=2) == [running, recent]
    assert await broker.complete("w1", recent, 1, "null")

    assert await broker.purge(older_than=50) == 3

    for gone in (completed, failed, cancelled):
        assert await broker.get(gone) is None
    for kept in (running, recent):
        assert await broker.get(kept) is not None
    assert await broker.purge(older_than=50) == 0
    clock.advance(LEASE + 1)
    assert await broker.purge(older_than=0) == 1
    # Its lease expired, but it never finished: only a claim may end it.
    assert await state_of(broker, running) is RunState.RUNNING


async def test_purge_goes_on_past_one_batch(broker: Broker, clock: FakeClock) -> None:
    ids = [(await broker.submit("say", PAYLOAD)).id for _ in range(PURGE_BATCH + 3)]
    for run_id in ids:
        assert await broker.cancel(run_id)
    clock.advance(1)
    assert await broker.purge(older_than=0.5) == PURGE_BATCH + 3
    assert await broker.counts() == dict.fromkeys(RunState, 0)


@pytest.mark.parametrize(
    ("older_than", "error"),
    [(-1, ValueError), (math.nan, ValueError), ("soon", ValueError), ([1], TypeError)],
)
async def test_purge_rejects_a_bad_age(
    broker: Broker, older_than: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="older_than"):
        await broker.purge(older_than=older_than)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app:secret@db.example:5432/runs",
            "postgresql://app:***@db.example:5432/runs",
        ),
        ("postgresql://app@db.example/runs", "postgresql://app@db.example/runs"),
        ("memory://", "memory://"),
    ],
)
def test_a_location_never_shows_a_password(url: str, shown: str) -> None:
    assert hide_password(url) == shown
