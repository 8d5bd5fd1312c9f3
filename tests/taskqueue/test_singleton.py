"""Singleton in-process: one leader among replicas, hand-over, and stopping in time.

Replicas share one memory broker on the backend's clock, under virtual time, so leases
expire exactly on cue; a broker whose lease calls can be made to fail stands for a
database that became unreachable. How a singleton's term ends is also checked on the
SQLite and PostgreSQL brokers, in real time. (Real processes, kill -9 and SIGTERM are in
``test_cluster_processes.py``.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from anyservice import LoopService, Service, ServiceState
from anyservice.taskqueue import BrokerError, MemoryBroker, Singleton, TaskQueue
from anyservice.taskqueue._leases import Lease

pytestmark = [pytest.mark.anyio]


class FlakyBroker(MemoryBroker):
    """A memory broker whose lease calls fail while ``down`` (the database is gone)."""

    down = False

    async def acquire_lease(self, name: str, holder: str, *, lease_seconds: float) -> Lease | None:
        if self.down:
            raise BrokerError("database unreachable")
        return await super().acquire_lease(name, holder, lease_seconds=lease_seconds)


@pytest.fixture
async def queue() -> AsyncIterator[TaskQueue]:
    async with TaskQueue(broker=FlakyBroker(clock=anyio.current_time)) as queue:
        yield queue


class Recorder(LoopService):
    """Notes, every second, which replica runs it and when."""

    loop_seconds = 1.0
    shutdown_timeout = 2.0

    def __init__(self, replica: str, log: list[tuple[str, float]]) -> None:
        super().__init__(name=f"recorder-{replica}")
        self.replica = replica
        self.seen = log
        self.stopped_at: float | None = None

    async def run_once(self) -> None:
        self.seen.append((self.replica, anyio.current_time()))

    async def on_shutdown(self) -> None:
        self.stopped_at = anyio.current_time()


def replicas(queue: TaskQueue, seen: list[tuple[str, float]], count: int = 3) -> list[Singleton]:
    return [
        Singleton(Recorder(str(n), seen), queue, name="recorder", lease_seconds=9)
        for n in range(count)
    ]


def holders(seen: list[tuple[str, float]]) -> list[str]:
    """The replicas that ran the service, in order, each once per term."""
    order: list[str] = []
    for replica, _ in seen:
        if not order or order[-1] != replica:
            order.append(replica)
    return order


@pytest.mark.virtual_time
async def test_one_replica_runs_the_service_and_a_stopped_one_hands_over(queue: TaskQueue) -> None:
    seen: list[tuple[str, float]] = []
    first, second, third = replicas(queue, seen)
    async with first, second, third:
        await anyio.sleep(30.5)
        assert [s.leading for s in (first, second, third)] == [True, False, False]
        assert holders(seen) == ["0"]
        assert len(seen) == 31  # at start, then every second
        stopped = anyio.current_time()
        await first.stop()
        # Released at once: the next look (within poll_interval = 1 s) takes it.
        await anyio.sleep(1.5)
        order = holders(seen)
        assert order[0] == "0"
        assert order[1:] in (["1"], ["2"])
        took_over = next(at for replica, at in seen if replica == order[1])
        assert took_over - stopped <= second.poll_interval
        assert first.service.state is ServiceState.STOPPED
        assert sorted((second.terms, third.terms)) == [0, 1]
    lease = await queue.broker.get_lease("recorder")
    assert lease is None  # the last holder released it on its way out


@pytest.mark.virtual_time
async def test_a_holder_that_cannot_renew_stops_before_its_lease_expires(
    queue: TaskQueue,
) -> None:
    broker = queue.broker
    assert isinstance(broker, FlakyBroker)
    seen: list[tuple[str, float]] = []
    leader = Singleton(Recorder("a", seen), queue, name="recorder", lease_seconds=9)
    async with leader:
        await anyio.sleep(0.5)
        renewed = await broker.get_lease("recorder")
        assert renewed is not None
        broker.down = True
        await anyio.sleep(20)
        assert not leader.leading
        service = leader.service
        assert isinstance(service, Recorder)
        assert service.stopped_at is not None
        # Stopped, grace period included, before the last lease it got expired.
        assert service.stopped_at < renewed.expires_at
        assert seen[-1][1] < renewed.expires_at
        # Back up: it leads again once it can take the lease.
        broker.down = False
        await anyio.sleep(2)
        assert leader.leading
        assert leader.terms == 2


@pytest.mark.virtual_time
async def test_a_holder_whose_lease_was_taken_stops_at_once(queue: TaskQueue) -> None:
    seen: list[tuple[str, float]] = []
    leader = Singleton(Recorder("a", seen), queue, name="recorder", lease_seconds=9)
    async with leader:
        await anyio.sleep(1)
        # Another replica got the lease (say the holder was paused past its expiry).
        broker = queue.broker
        assert isinstance(broker, MemoryBroker)
        broker._leases["recorder"] = Lease("recorder", "someone-else", anyio.current_time() + 60)
        taken = anyio.current_time()
        await anyio.sleep(5)
        assert not leader.leading
        service = leader.service
        assert service.state is ServiceState.STOPPED
        # Noticed at the next renewal (a third of the lease), and stopped without grace.
        assert seen[-1][1] - taken <= 3
        lease = await broker.get_lease("recorder")
        assert lease is not None
        assert lease.holder == "someone-else"  # not released by the loser


# How a term ends, on every broker: the memory broker under virtual time, the databases in
# real time (the SQLite and PostgreSQL brokers do their I/O in threads).


@pytest.fixture
async def database_queue(database_url: str) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(database_url) as queue:
        yield queue


async def a_service_that_ends_on_its_own_stops_its_singleton(queue: TaskQueue) -> None:
    async def once() -> None:
        await anyio.sleep(0.2)

    singleton = Singleton(Service.from_awaitable(once, name="once"), queue, lease_seconds=60)
    with anyio.fail_after(30):
        async with singleton:
            await singleton.wait_for(ServiceState.STOPPED)
    assert singleton.terms == 1
    assert await queue.broker.get_lease("once") is None


async def a_crash_of_the_service_crashes_the_singleton_and_frees_the_lease(
    queue: TaskQueue,
) -> None:
    async def boom() -> None:
        await anyio.sleep(0.1)
        raise RuntimeError("kaput")

    singleton = Singleton(Service.from_awaitable(boom, name="boom"), queue, lease_seconds=60)
    with pytest.raises(BaseExceptionGroup) as caught, anyio.fail_after(30):
        async with singleton:
            await anyio.sleep(30)
    assert caught.group_contains(RuntimeError, match="kaput")
    assert singleton.state is ServiceState.CRASHED
    assert await queue.broker.get_lease("boom") is None


@pytest.mark.virtual_time
async def test_a_service_that_ends_on_its_own_stops_its_singleton(queue: TaskQueue) -> None:
    await a_service_that_ends_on_its_own_stops_its_singleton(queue)


async def test_a_service_that_ends_on_its_own_stops_its_singleton_on_a_database(
    database_queue: TaskQueue,
) -> None:
    await a_service_that_ends_on_its_own_stops_its_singleton(database_queue)


@pytest.mark.virtual_time
async def test_a_crash_of_the_service_crashes_the_singleton_and_frees_the_lease(
    queue: TaskQueue,
) -> None:
    await a_crash_of_the_service_crashes_the_singleton_and_frees_the_lease(queue)


async def test_a_crash_of_the_service_crashes_the_singleton_and_frees_the_lease_on_a_database(
    database_queue: TaskQueue,
) -> None:
    await a_crash_of_the_service_crashes_the_singleton_and_frees_the_lease(database_queue)


def test_singleton_options_are_checked_at_the_call() -> None:
    queue = TaskQueue("memory://")
    service = Recorder("x", [])
    with pytest.raises(TypeError, match="Singleton needs a Service to run, got 'nope'"):
        Singleton("nope", queue)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Singleton needs a TaskQueue"):
        Singleton(service, "memory://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_seconds must be a finite number of seconds > 0"):
        Singleton(service, queue, lease_seconds=0)
    with pytest.raises(TypeError, match="poll_interval must be a number of seconds, got '1'"):
        Singleton(service, queue, poll_interval="1")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"shutdown_timeout \(2 s\) must be at most half of lease_seconds \(3 s\)",
    ):
        Singleton(service, queue, lease_seconds=3)
    default = Singleton(service, queue)
    assert (default.lease_seconds, default.poll_interval, default.lease_name) == (
        15.0,
        1.0,
        "recorder-x",
    )
