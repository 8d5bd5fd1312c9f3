"""A service's place in the tree: its owner, its dependencies, and how they are changed.

Each service has one owner at most; a dependency is started (RUNNING) before the service
that depends on it and stopped after it. The run of a service starts and stops its
dependencies (:mod:`anyservice._core._run`); this module only keeps the tree consistent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol

from ._run import Owner, Run, open_task_group, started_dependencies
from ._state import ServiceError, ServiceState

__all__ = ["Node", "Tree"]


class Node(Owner, Protocol):
    """A service as the tree sees it."""

    @property
    def _tree(self) -> Tree: ...


#: The dependencies of every service that has none (most): never written to.
_NO_DEPENDENCIES: list[Node] = []


class Tree:
    """The owner and the dependencies of one service."""

    __slots__ = ("dependencies", "owner", "requirements", "service")

    #: The class every node must be an instance of (``Service``, set where it is defined).
    node_type: ClassVar[type] = object

    def __init__(self, service: Node, requirements: Callable[[], Iterable[object]] | None) -> None:
        self.service = service
        self.owner: Node | None = None
        # Made at the first dependency: until then the one empty list of every service
        # with none, never written to (see _writable()).
        self.dependencies: list[Node] = _NO_DEPENDENCIES
        #: Returns the ``@requirements`` services; called once, at the first start.
        self.requirements: Callable[[], Iterable[object]] | None = requirements

    def _writable(self) -> list[Node]:
        if self.dependencies is _NO_DEPENDENCIES:
            self.dependencies = []
        return self.dependencies

    def check_node(self, service: object, what: str) -> Node:
        if not isinstance(service, self.node_type):
            raise TypeError(f"{self.service.name}: a {what} must be a Service, got {service!r}")
        return service  # type: ignore[return-value]  # a Service is a Node

    def adopt(self, service: object, what: str = "dependency") -> Node:
        """Make this service the owner of ``service``.

        Raises:
            TypeError: if ``service`` is not a service.
            ValueError: if it is this service, belongs to another, or would make a cycle.
        """
        node = self.check_node(service, what)
        name = self.service.name
        if node is self.service:
            raise ValueError(f"{name}: a service cannot depend on itself")
        if node._tree.owner is not None:
            raise ValueError(f"{name}: {node.name!r} already belongs to {node._tree.owner.name!r}")
        ancestor: Node | None = self.service
        while ancestor is not None:
            if ancestor is node:
                raise ValueError(f"{name}: depending on {node.name!r} makes a cycle")
            ancestor = ancestor._tree.owner
        node._tree.owner = self.service
        return node

    def add(self, service: object) -> Node:
        """Add a dependency to a service that is not running."""
        state = self.service.state
        if state.is_active:
            raise ServiceError(
                f"{self.service.name}: add_dependency() is for services that are not running; "
                f"use 'await add_runtime_dependency(...)' while {state.name}"
            )
        node = self.adopt(service)
        self._writable().append(node)
        return node

    async def add_runtime(self, service: object) -> Node:
        """Add a dependency to a starting or running service and start it.

        Returns once the dependency is RUNNING; from ``on_start`` (mode's and faust's use),
        the service itself is not RUNNING before its dependency is.
        """
        self._check_live("add_runtime_dependency()")
        node = self.adopt(service)
        self._writable().append(node)
        try:
            await self.start_runtime(node)
        except BaseException:
            self.disown(node)
            raise
        return node

    async def start_runtime(self, node: Node) -> None:
        """Start ``node``, a dependency, in the running service's task group."""
        run = self._check_live("maybe_start()")
        group = await open_task_group(run)
        await group.start(node.run, name=f"{node.name} (of {self.service.name})")
        started_dependencies(run).append(node)

    def _check_live(self, what: str) -> Run:
        run = self.service._run
        state = self.service.state
        if (
            state not in (ServiceState.STARTING, ServiceState.RUNNING)
            or run is None
            or not run.takes_tasks
        ):
            raise ServiceError(
                f"{self.service.name}: {what} needs a STARTING or RUNNING service "
                f"(it is {state.name}); use add_dependency() before start"
            )
        return run

    async def remove(self, service: Node) -> None:
        """Stop ``service`` (if it runs) and remove it from the dependencies."""
        if service not in self.dependencies:
            raise ValueError(
                f"{self.service.name}: {service.name!r} is not one of its dependencies"
            )
        run = self.service._run
        if run is not None and service in run.started_dependencies:
            # Taken off the list first: a stop of this service meanwhile must not stop it
            # a second time, nor miss it.
            run.started_dependencies.remove(service)
        if service._run is not None:
            await service._stop()
        if service in self.dependencies:
            self.disown(service)

    def disown(self, service: Node) -> None:
        self.dependencies.remove(service)
        service._tree.owner = None

    def to_start(self) -> list[Node]:
        """The dependencies to start, in order; resolves ``@requirements`` the first time."""
        requirements, self.requirements = self.requirements, None
        if requirements is not None:
            for service in requirements():
                self._writable().append(self.adopt(service))
        return list(self.dependencies)
