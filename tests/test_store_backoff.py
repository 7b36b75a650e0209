"""The reconnect backoff of the network stores (README: "the store reconnects with
backoff (0.1 s up to 5 s)"): gearmand.Backoff, in-process, with a clock the test
moves. After a failed attempt every call fails at once for the current delay; the
delay starts at 0.1 s and doubles up to 5 s; a success starts it over."""
import pytest

from conftest import IMPL, import_gearmand

pytestmark = pytest.mark.skipif(IMPL == "c", reason="a unit test of gearmand.py's own code")

SCHEDULE = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


@pytest.fixture
def clock(monkeypatch):
    gearmand = import_gearmand(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(gearmand.time, "monotonic", lambda: now[0])
    return gearmand, now


def closed_for(gearmand, backoff, now):
    """How long after now check() keeps failing, to 1 ms."""
    start = now[0]
    try:
        for step in range(100000):
            now[0] = start + step / 1000
            try:
                backoff.check()
            except gearmand.StoreError:
                continue
            return round(now[0] - start, 3)
        raise AssertionError("closed for more than 100 s")
    finally:
        now[0] = start


def test_delays_double_from_a_tenth_of_a_second_up_to_five(clock):
    gearmand, now = clock
    backoff = gearmand.Backoff()
    backoff.check()                        # nothing failed yet: let it try
    waits = []
    for attempt in range(len(SCHEDULE)):
        error = backoff.failed(f"MySQL: down {attempt}")
        assert isinstance(error, gearmand.StoreError) and error.unavailable
        with pytest.raises(gearmand.StoreError) as refused:
            backoff.check()                # at once, without trying the backend
        assert refused.value.unavailable and str(refused.value) == f"MySQL: down {attempt}"
        waits.append(closed_for(gearmand, backoff, now))
        now[0] += waits[-1]                # the next attempt is let through, and fails
    assert waits == SCHEDULE


def test_success_starts_over(clock):
    gearmand, now = clock
    backoff = gearmand.Backoff()
    for _ in range(5):
        backoff.failed("down")
        now[0] += 10
    backoff.succeeded()
    backoff.check()
    backoff.failed("down again")
    assert closed_for(gearmand, backoff, now) == 0.1
