"""``Singleton``: a service that runs on exactly one process of the cluster at a time.

Leadership is a named lease row in the queue's broker (holder, expires_at), so the
database's guarantees are the cluster's: no home-made consensus. Every replica runs a
``Singleton`` around the same service; one takes the lease and runs the service, the
others watch the lease and take it when it is released or expires.

The holder renews the lease every third of its length. Safety rests on one rule: a holder
that cannot renew (the broker is unreachable, the lease was taken) stops its service
*before* the lease can expire. It gives up renewing at
``expiry - margin - service.shutdown_timeout`` (the margin, a tenth of the lease, covers
clock steps and scheduling delays), then stops the service gracefully and, at
``expiry - margin``, cancels whatever is left. Expiry is counted from the moment before
the renewal was asked for, so it is never later than the broker's own. A follower takes
the lease only once it is expired by the broker's clock: by then the old holder's service
has stopped. On a stop (SIGTERM) the holder stops its service and releases the lease at
once, so a follower takes over at its next look instead of after the lease.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import anyio
import anyio.abc

from .._core import Service
from .._core import task as background_task
from ._errors import BrokerError
from ._leases import Lease
from ._queue import TaskQueue

__all__ = ["Singleton"]

#: How long releasing the lease may hold a stop up; past it the lease just expires.
_RELEASE_BUDGET = 5.0
#: Backoff between failed renewals while there is still time to renew.
_RENEW_RETRY = 0.1


class Singleton(Service):
    """Run ``service`` on exactly one process of the cluster at a time, with fail-over.

    Start a ``Singleton`` around the same service in every replica (on the same queue).
    The one that holds the lease ``name`` runs the service; the others wait. When the
    holder dies, another replica takes over once the lease expires (within
    ``lease_seconds`` of the last renewal); when it stops (SIGTERM), it stops the service
    and releases the lease, so another takes over at its next look.

    Args:
        service: Any service (a ``LoopService``, a ``Supervisor``, ...). It is started each
            time this replica becomes the leader, and stopped when it stops being one.
        queue: The queue whose broker holds the lease.
        name: The lease's name, the same in every replica; the service's name by default.
        lease_seconds: How long leadership lasts without renewal; renewed every third of
            it. By default twice the service's ``shutdown_timeout``, and at least 15 s.
        poll_interval: Seconds between a follower's looks at the lease (it also wakes when
            the lease expires); a third of the lease, at most 1 s, by default.
        shutdown_timeout: This service's own grace period; by default the wrapped
            service's plus the time to release the lease.

    Attributes:
        holder: This replica's id in the lease, unique per instance.
        leading: Whether this replica runs the service now.
        terms: How many times this replica became the leader.

    Raises:
        TypeError: ``service`` is not a Service, ``queue`` is not a TaskQueue, or an option
            has the wrong type.
        ValueError: A lease that is not positive, or too short for the service to stop
            within it: its ``shutdown_timeout`` must be at most half of ``lease_seconds``.
    """

    def __init__(
        self,
        service: Service,
        queue: TaskQueue,
        *,
        name: str | None = None,
        lease_seconds: float | None = None,
        poll_interval: float | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        if not isinstance(service, Service):
            raise TypeError(f"Singleton needs a Service to run, got {service!r}")
        if not isinstance(queue, TaskQueue):
            raise TypeError(f"Singleton needs a TaskQueue for its lease, got {queue!r}")
        lease_name = service.name if name is None else name
        if not isinstance(lease_name, str):
            raise TypeError(f"Singleton name must be a str, got {name!r}")
        if not lease_name:
            raise ValueError("Singleton name must not be empty")
        grace = service.shutdown_timeout
        seconds = max(15.0, 2 * grace) if lease_seconds is None else lease_seconds
        seconds = _positive(seconds, "lease_seconds")
        if grace > seconds / 2:
            raise ValueError(
                f"Singleton {lease_name!r}: {service.name}'s shutdown_timeout ({grace:g} s) must "
                f"be at most half of lease_seconds ({seconds:g} s), so that a replica that "
                "cannot renew its lease stops the service before the lease expires"
            )
        poll = min(1.0, seconds / 3) if poll_interval is None else poll_interval
        poll = _positive(poll, "poll_interval")
        super().__init__(
            name=f"Singleton[{lease_name}]",
            shutdown_timeout=grace + _RELEASE_BUDGET
            if shutdown_timeout is None
            else shutdown_timeout,
        )
        self.service = service
        self.queue = queue
        self.lease_name = lease_name
        self.lease_seconds = seconds
        self.poll_interval = poll
        self.holder = uuid.uuid4().hex
        self.leading = False
        self.terms = 0
        # Set to end a term: a stop, a lost lease, or the service ending on its own.
        self._end_term: anyio.Event | None = None
        self._service_ended = False
        # Monotonic deadlines of the current term (see the module's docstring).
        self._stop_by = math.inf
        self._renew_until = math.inf
        self.add_context(queue.holding)

    def __repr__(self) -> str:
        role = "leading" if self.leading else "following"
        return f"<Singleton {self.lease_name!r} {self.state.name} {role}>"

    async def on_stop(self) -> None:
        if self._end_term is not None:
            self._end_term.set()

    def _deadlines(self, asked_at: float) -> None:
        """Set the term's deadlines from a renewal asked for at ``asked_at`` (monotonic)."""
        margin = self.lease_seconds / 10
        self._stop_by = asked_at + self.lease_seconds - margin
        self._renew_until = self._stop_by - self.service.shutdown_timeout

    # ------------------------------------------------------------------ following

    @background_task
    async def _follow(self) -> None:
        broker = self.queue.broker
        unreachable = False
        while True:
            asked_at = anyio.current_time()
            try:
                lease = await self._try_acquire()
            except BrokerError as exc:
                if not unreachable:
                    self.log.warning(
                        "cannot reach the broker for lease %r (retrying): %s", self.lease_name, exc
                    )
                unreachable = True
                await anyio.sleep(self.poll_interval)
                continue
            unreachable = False
            if lease is not None:
                self._deadlines(asked_at)
                await self._lead()
                if self._service_ended:
                    await self.stop(block=False)
                if self.should_stop:
                    return
                continue
            wait = self.poll_interval
            current = await self._current_lease()
            if current is not None:
                # Wake when it expires, if that comes before the next look.
                wait = min(wait, max(current.expires_at - broker.now(), 0.0) + 0.001)
            await anyio.sleep(wait)

    async def _current_lease(self) -> Lease | None:
        try:
            return await self.queue.broker.get_lease(self.lease_name)
        except BrokerError:
            return None

    async def _try_acquire(self) -> Lease | None:
        broker = self.queue.broker
        current = await broker.get_lease(self.lease_name)
        if current is not None and current.holder != self.holder and current.live(broker.now()):
            # A read first: followers looking often must not take the write lock each time.
            return None
        return await broker.acquire_lease(
            self.lease_name, self.holder, lease_seconds=self.lease_seconds
        )

    # ------------------------------------------------------------------ leading

    async def _lead(self) -> None:
        """Run the service for one term: until a stop, a lost lease or its own end."""
        end_term = self._end_term = anyio.Event()
        self._service_ended = False
        self.terms += 1
        try:
            # In flight: a stop of this Singleton gives the service its grace period.
            async with self.in_flight(), anyio.create_task_group() as group:
                await group.start(self._run_service, end_term)
                self.leading = True
                self.log.info(
                    "leading %r as %s: running %s", self.lease_name, self.holder, self.service.name
                )
                group.start_soon(self._keep_lease, end_term)
                if self.should_stop:
                    end_term.set()
                await end_term.wait()
                with anyio.move_on_at(self._stop_by):
                    await self.service.stop(block=True)
                group.cancel_scope.cancel()
        finally:
            self.leading = False
            self._end_term = None
            await self._release()

    async def _run_service(
        self,
        end_term: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.service.run(task_status=task_status)
        if not end_term.is_set():
            # The service ended on its own: so does this replica's part.
            self.log.info("%s ended on its own: stopping", self.service.name)
            self._service_ended = True
            end_term.set()

    async def _keep_lease(self, end_term: anyio.Event) -> None:
        broker = self.queue.broker
        interval = self.lease_seconds / 3
        next_renewal = anyio.current_time() + interval
        failing = False
        while True:
            await anyio.sleep_until(next_renewal)
            asked_at = anyio.current_time()
            lease: Lease | bool | None = False
            with anyio.move_on_at(self._renew_until):
                try:
                    lease = await broker.acquire_lease(
                        self.lease_name, self.holder, lease_seconds=self.lease_seconds
                    )
                except BrokerError as exc:
                    if not failing:
                        self.log.warning(
                            "cannot renew lease %r (retrying until %.1f s before it expires): %s",
                            self.lease_name,
                            self.lease_seconds / 10 + self.service.shutdown_timeout,
                            exc,
                        )
                    failing = True
            if isinstance(lease, Lease):
                failing = False
                self._deadlines(asked_at)
                next_renewal = asked_at + interval
                continue
            if lease is None:
                self.log.error(
                    "lease %r was taken by another replica: stopping %s at once",
                    self.lease_name,
                    self.service.name,
                )
                # Someone else leads already: no grace period left to give.
                self._stop_by = anyio.current_time()
                end_term.set()
                return
            if anyio.current_time() >= self._renew_until:
                self.log.error(
                    "could not renew lease %r in time: stopping %s before the lease expires",
                    self.lease_name,
                    self.service.name,
                )
                end_term.set()
                return
            next_renewal = anyio.current_time() + _RENEW_RETRY

    async def _release(self) -> None:
        with anyio.move_on_after(_RELEASE_BUDGET, shield=True):
            try:
                released = await self.queue.broker.release_lease(self.lease_name, self.holder)
            except BrokerError as exc:
                self.log.warning(
                    "could not release lease %r (it will expire): %s", self.lease_name, exc
                )
                return
            if released:
                self.log.info("released lease %r", self.lease_name)

    def status(self) -> dict[str, Any]:
        """Who this replica is, whether it leads, and how often it did."""
        return {
            "name": self.lease_name,
            "holder": self.holder,
            "leading": self.leading,
            "terms": self.terms,
            "lease_seconds": self.lease_seconds,
            "service": self.service.name,
            "service_state": self.service.state.name,
        }


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Singleton {what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Singleton {what} must be a finite number of seconds > 0, got {value!r}")
    return float(value)
