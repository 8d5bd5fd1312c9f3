"""The public names are exactly those ``__all__`` lists, and each is importable."""

from __future__ import annotations

import anyservice
import anyservice.testing


def test_all_lists_every_public_name_and_only_those() -> None:
    public = {name for name in vars(anyservice) if not name.startswith("_")}
    submodules = {"testing", "taskqueue"}
    assert public - submodules == set(anyservice.__all__)


def test_public_names_come_from_private_modules() -> None:
    for name in anyservice.__all__:
        module = getattr(getattr(anyservice, name), "__module__", "anyservice")
        assert module.startswith("anyservice"), name


def test_testing_exports() -> None:
    public = {name for name in vars(anyservice.testing) if not name.startswith("_")}
    assert set(anyservice.testing.__all__) <= public
    assert {"VirtualTimeEventLoop", "run", "backend_options"} <= set(anyservice.testing.__all__)
