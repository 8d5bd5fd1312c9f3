"""What the status server answers, read from a tree: exact, on virtual time, both backends."""

from __future__ import annotations

import anyio
import pytest

from anyservice import Service, ServiceState, Supervisor, UnhealthyError, timer
from anyservice._status._snapshot import liveness, readiness, tree, walk

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]


class Slow(Service):
    """A 1 s timer whose body takes 1.5 s: every other tick is an overrun."""

    @timer(1.0)
    async def work(self) -> None:
        await anyio.sleep(1.5)


class Checked(Service):
    monitoring_interval = 3600.0
    healthy = True

    async def healthcheck(self) -> None:
        if not self.healthy:
            raise UnhealthyError("the disk is full")


async def test_timer_statistics_are_those_of_the_running_timer() -> None:
    async with Slow(name="slow") as slow:
        await anyio.sleep(10.2)
        node = tree(slow)
    stats = slow.timer_stats["work"]
    assert node["timers"]["work"] == {
        "interval": 1.0,
        "ticks": stats.ticks,
        "late_ticks": stats.late_ticks,
        "overruns": stats.overruns,
        "missed": stats.missed,
        "errors": 0,
        "mean_lateness": stats.mean_lateness,
        "worst_lateness": stats.worst_lateness,
        "last_duration": 1.5,
        "worst_duration": 1.5,
    }
    assert stats.overruns > 0
    assert stats.missed > 0


async def test_a_failed_check_of_a_running_service_makes_it_not_ready_but_alive() -> None:
    async with Checked(name="db") as checked:
        await checked.check_health()
        assert readiness(checked) == (True, {"ready": True})
        checked.healthy = False
        await checked.check_health()
        assert checked.state is ServiceState.RUNNING
        assert readiness(checked) == (
            False,
            {"ready": False, "reasons": ["db is unhealthy: the disk is full"]},
        )
        assert liveness(checked) == (True, {"status": "ok", "state": "RUNNING"})
        node = tree(checked)
    assert node["health"] == {"healthy": False, "reason": "the disk is full"}


async def test_the_tree_is_walked_root_first_in_the_order_of_the_children() -> None:
    left, right = Service(name="left"), Service(name="right")
    left.add_dependency(Service(name="below"))
    top = Supervisor(left, right, name="top")
    assert [service.name for service in walk(top)] == ["top", "left", "below", "right"]
    node = tree(top)
    assert [child["name"] for child in node["children"]] == ["left", "right"]
    assert [child["name"] for child in node["children"][0]["children"]] == ["below"]
    assert readiness(top)[1]["reasons"] == [
        "top is INIT",
        "left is INIT",
        "below is INIT",
        "right is INIT",
    ]
