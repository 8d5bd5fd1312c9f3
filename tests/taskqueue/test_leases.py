"""Named leases as pure transitions: who may take, renew and give up a lease, and when."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from anyservice.taskqueue._leases import Lease, acquire_lease, release_lease

HELD = Lease(name="beat", holder="w1", expires_at=10.0)


def test_a_lease_is_live_until_the_instant_it_expires() -> None:
    assert HELD.live(9.999)
    assert not HELD.live(10.0)
    assert not HELD.live(11.0)


def test_nobody_holding_the_lease_lets_anyone_take_it() -> None:
    assert acquire_lease(None, "beat", "w2", 5.0, 3.0) == Lease("beat", "w2", 8.0)


def test_another_holder_s_live_lease_is_refused_until_it_expires() -> None:
    assert acquire_lease(HELD, "beat", "w2", 9.5, 3.0) is None
    assert acquire_lease(HELD, "beat", "w2", 10.0, 3.0) == Lease("beat", "w2", 13.0)


def test_the_holder_renews_its_lease_live_or_expired() -> None:
    assert acquire_lease(HELD, "beat", "w1", 9.5, 3.0) == Lease("beat", "w1", 12.5)
    assert acquire_lease(HELD, "beat", "w1", 20.0, 3.0) == Lease("beat", "w1", 23.0)


def test_only_the_holder_may_release_expired_or_not() -> None:
    assert release_lease(HELD, "w1")
    assert not release_lease(HELD, "w2")
    assert not release_lease(None, "w1")


holders = st.sampled_from(["w1", "w2", "w3"])
instants = st.floats(0, 100, allow_nan=False)


@given(
    st.none() | st.builds(Lease, st.just("beat"), holders, instants),
    holders,
    instants,
    st.floats(0.001, 50, allow_nan=False),
)
def test_acquiring_succeeds_exactly_when_nobody_else_holds_a_live_lease(
    current: Lease | None, holder: str, now: float, lease_seconds: float
) -> None:
    taken = acquire_lease(current, "beat", holder, now, lease_seconds)
    someone_else_holds_it = (
        current is not None and current.holder != holder and current.expires_at > now
    )
    if someone_else_holds_it:
        assert taken is None
    else:
        assert taken == Lease("beat", holder, now + lease_seconds)
