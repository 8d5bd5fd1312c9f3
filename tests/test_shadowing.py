"""A subclass cannot hide the service's machinery by accident; the hooks stay its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from anyservice import LoopService, Service, ServiceState, Supervisor, task

pytestmark = [pytest.mark.anyio]


@pytest.mark.parametrize("name", ["run", "stop", "sleep", "spawn", "log", "state", "restart"])
def test_a_method_shadowing_the_machinery_is_refused_at_class_definition(name: str) -> None:
    async def method(self: Service) -> None: ...

    with pytest.raises(TypeError, match=rf"Shadow\.{name} hides Service\.{name}.*overrides="):
        type("Shadow", (Service,), {name: method})


def test_a_background_task_named_like_the_machinery_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Poller\.sleep hides Service\.sleep"):

        class Poller(Service):
            @task
            async def sleep(self) -> None: ...  # type: ignore[override]  # under test


def test_a_plain_attribute_shadowing_a_property_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Flagged\.should_stop hides Service\.should_stop"):
        type("Flagged", (Service,), {"should_stop": False})


def test_an_instance_attribute_shadowing_the_machinery_is_refused_at_the_assignment() -> None:
    class Recorder(Service):
        def __init__(self) -> None:
            super().__init__()
            self.log = []  # type: ignore[misc, assignment]  # the mistake under test

    with pytest.raises(TypeError, match=r"Recorder: 'self\.log = \.\.\.' would hide Service\.log"):
        Recorder()


def test_other_instance_attributes_are_set_as_usual() -> None:
    class Plain(Service):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[str] = []

    service = Plain()
    service.shutdown_timeout = 1.0
    assert service.events == []
    assert service.shutdown_timeout == 1.0


async def test_the_hooks_and_the_tree_dump_stay_overridable() -> None:
    calls: list[str] = []

    class Hooked(Service):
        async def on_first_start(self) -> None:
            calls.append("first")

        async def on_start(self) -> None:
            calls.append("start")

        async def on_started(self) -> None:
            calls.append("started")

        async def on_stop(self) -> None:
            calls.append("stop")

        async def on_shutdown(self) -> None:
            calls.append("shutdown")

        def describe(self) -> str:
            return "hooked"

    async with Hooked() as service:
        assert service.dump_tree() == "hooked"
    assert calls == ["first", "start", "started", "stop", "shutdown"]


async def test_overrides_declares_a_deliberate_replacement() -> None:
    class Counted(Service, overrides=("run",)):
        runs = 0

        async def run(
            self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            type(self).runs += 1
            await super().run(task_status=task_status)

    async with Counted() as service:
        assert service.state is ServiceState.RUNNING
    assert Counted.runs == 1


def test_overrides_naming_something_not_reserved_is_refused() -> None:
    with pytest.raises(
        ValueError, match="overrides= names what Service does not reserve: on_start"
    ):
        type("Odd", (Service,), {}, overrides=("on_start",))


def test_the_library_subclasses_are_defined_as_before() -> None:
    class Loop(LoopService):
        async def run_once(self) -> None: ...

    class Tree(Supervisor):
        pass

    assert Loop(loop_seconds=1).loop_seconds == 1
    assert Tree().children() == ()


def readme_snippet(marker: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks: list[str] = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"README has {len(found)} snippets with {marker!r}"
    return found[0]


async def test_the_readme_overrides_snippet_runs_as_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_snippet("overrides=("), namespace)
    async with namespace["Counted"]() as service:
        assert service.state is ServiceState.RUNNING
    assert capsys.readouterr().out == "run begins\n"
