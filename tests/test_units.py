"""Unit tests: gearmand.py's rooms driven in-process, no subprocess, no socket.

Each collaborator has one small fake below (a clock, a log, a journal, a store, a
backend, a writer, a loop, a paging store); everything else is the real class. The
Pager's tests run the real StoreWriter in the test's thread (run_writer, turn). Expected values that
C gearmand decides (gm_hash, atoi, the order of `status` rows) were checked once
against C gearmand 1.1.20 and its source, and are written here as literals.
"""
import collections
import gc
import hashlib
import importlib.util
import queue
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import gearmand  # noqa: E402  (the checkout's copy, not an installed one: see below)

from gearmand import (  # noqa: E402
    ERROR, HIGH, JOB_CREATED, LOW, NOOP, NORMAL, STORED, WORK_COMPLETE, WORK_FAIL, WRITING,
    Batch, StoreError,
)

assert Path(gearmand.__file__).resolve() == ROOT / "gearmand.py", gearmand.__file__


# --- fakes: one per collaborator ---------------------------------------------

class Clock:
    """Stands in for the `time` module inside gearmand: time moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return 1_700_000_000.0 + self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(gearmand, "time", fake)
    return fake


class FakeLog:
    debug = False
    level_name = "ERROR"

    def __init__(self):
        self.lines = []

    def write(self, level, message, force=False):
        self.lines.append((level, message))

    def limited(self, key, level, message, burst=10, every=10.0):
        self.write(level, message)

    def error(self, message):
        self.write("ERROR", message)

    def warning(self, message):
        self.write("WARNING", message)

    def notice(self, message):
        self.write("NOTICE", message)

    def info(self, message):
        self.write("INFO", message)


class Client(gearmand.Peer):
    """A peer as the queues see it, plus what the journal reads of a Connection."""

    __slots__ = ("name", "held", "closed")

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.held = None
        self.closed = False

    def __repr__(self):
        return self.name


class Emitted(list):
    """The emit hook of the queues: records (peer, type, payload)."""

    def __call__(self, peer, ptype, payload):
        self.append((peer, ptype, payload))

    def to(self, peer):
        return [(ptype, payload) for who, ptype, payload in self if who is peer]


class FakeJournal:
    """The builtin queue's journal: nothing to write, JOB_CREATED at once."""

    def __init__(self, emit):
        self.emit = emit
        self.forgotten = []
        self.joined = []

    def add(self, job):
        job.queued = True
        return False

    def add_joined(self, job):
        self.joined.append(job)

    def acknowledge(self, peer, job):
        self.emit(peer, JOB_CREATED, job.handle)

    def forget(self, job):
        self.forgotten.append(job)


def queue_options(**changes):
    options = dict(job_handle_prefix="H:test", job_retries=0, worker_wakeup=0,
                   round_robin=False, hashtable_buckets=991)
    options.update(changes)
    return types.SimpleNamespace(**options)


def make_queues(**options):
    emitted = Emitted()
    log = FakeLog()
    queues = gearmand.Queues(queue_options(**options), emitted, gearmand.Timers(), log,
                             gearmand.Stats())
    queues.journal = FakeJournal(emitted)
    return queues, emitted


def make_job(number, unique=b"", data=b"", function=b"f", priority=NORMAL):
    return gearmand.Job(b"H:test:%d" % number, number, gearmand.FunctionQueue(function),
                        unique, data, priority, 0, None, True)


# --- protocol helpers ---------------------------------------------------------

# Computed once with C gearmand 1.1.20's _server_job_hash (libgearman-server), compiled
# from its source: signed chars, signed 32-bit arithmetic shifts, 0 becomes 1.
GM_HASHES = [
    (b"", 1),
    (b"a", 3392050242),
    (b"reverse", 4028014295),
    (b"H:host:1", 3252576002),
    (b"gearman", 2300136133),
    (b"\xff\xfe\x80", 3687448810),       # bytes >= 128 count as negative chars
    ("caf\u00e9".encode(), 531687238),
    (b"Foo Bar 123", 2377053121),
    (b"a\0b", 2348934934),               # a NUL is a byte like any other
]


@pytest.mark.parametrize("data, expected", GM_HASHES)
def test_gm_hash_matches_c(data, expected):
    assert gearmand.gm_hash(data) == expected


def test_gm_hash_buckets_order_status_as_c_does():
    # C gearmand 1.1.20 answered `status` in this order after `create function` of
    # alpha, fn76, beta, fn10, fn83, gamma, fn99: bucket gm_hash % 991, then newest.
    assert [gearmand.gm_hash(name) % 991 for name in (b"fn76", b"fn83")] == [504, 504]
    queues, _ = make_queues()
    for name in (b"alpha", b"fn76", b"beta", b"fn10", b"fn83", b"gamma", b"fn99"):
        queues.find_or_add_function(name)
    assert [f.name for f in queues.functions_in_c_order()] == [
        b"alpha", b"fn83", b"fn76", b"fn99", b"fn10", b"gamma", b"beta"]


@pytest.mark.parametrize("text, expected", [
    (b"42", 42), (b"  42", 42), (b"\t\n\x0b\x0c\r 7", 7), (b"+5", 5), (b"-12", -12),
    (b"-0", 0), (b"12abc", 12), (b"1_000", 1), (b"0x10", 0), (b"abc", 0), (b"", 0),
    (b" - 5", 0), (b"+-5", 0), (b"007", 7),
    (b"9223372036854775807", 2 ** 63 - 1), (b"-9223372036854775808", -2 ** 63),
    (b"9223372036854775808", None), (b"-9223372036854775809", None),
    (b"99999999999999999999", None),
])
def test_c_integer_is_strtol(text, expected):
    assert gearmand.c_integer(text) == expected


def test_c_integer_32_bits():
    assert gearmand.c_integer(b"2147483647", 32) == 2 ** 31 - 1
    assert gearmand.c_integer(b"-2147483648", 32) == -2 ** 31
    assert gearmand.c_integer(b"2147483648", 32) is None


@pytest.mark.parametrize("text, expected", [
    (b"2147483647", 2147483647), (b"-2147483648", -2147483648), (b" 12abc", 12),
    (b"x", 0), (b"", 0), (b"-99999999999999999999", 0),
])
def test_atoi_in_range(text, expected):
    assert gearmand.atoi(text) == expected


# glibc's atoi is (int) strtol(): a value past 32 bits wraps, a value past 64 bits is
# first clamped to LONG_MAX/LONG_MIN. Checked on C gearmand 1.1.20: WORK_STATUS with
# numerator 2147483648 and denominator 4294967295 makes GET_STATUS answer
# 2147483648/4294967295 (ours: 0/0); 4294967297/9999999999 gives 1/1410065407; a
# numerator of 99999999999999999999 gives 4294967295; and `maxqueue g 4294967298`
# limits g to 2 jobs (ours: no limit).
@pytest.mark.parametrize("text, expected", [
    (b"2147483648", -2147483648), (b"4294967295", -1), (b"4294967297", 1),
    (b"-2147483649", 2147483647), (b"9999999999", 1410065407),
    (b"99999999999999999999", -1),
])
def test_atoi_wraps_like_glibc(text, expected):
    assert gearmand.atoi(text) == expected


def test_argument_sizes_fit():
    fits = gearmand.argument_sizes_fit
    big, limit = b"x" * 100000, gearmand.ARGUMENT_MAX
    # SUBMIT_JOB's last part is opaque data: only function and unique are limited.
    assert fits(gearmand.SUBMIT_JOB, [b"f" * (limit - 1), b"u", big])
    assert not fits(gearmand.SUBMIT_JOB, [b"f" * limit, b"u", b""])
    assert not fits(gearmand.SUBMIT_JOB, [b"f", b"u" * limit, b""])
    # CAN_DO's only part is a plain argument.
    assert fits(gearmand.CAN_DO, [b"f" * (limit - 1)])
    assert not fits(gearmand.CAN_DO, [b"f" * limit])
    # ECHO_REQ carries data only.
    assert fits(gearmand.ECHO_REQ, [big])
    assert not fits(gearmand.CAN_DO_TIMEOUT, [b"f", b"1" * limit])


# --- admin tokens ---------------------------------------------------------------

@pytest.mark.parametrize("line, tokens", [
    (b"status", [b"status"]),
    (b"", [b""]),
    (b"maxqueue f 1", [b"maxqueue", b"f", b"1"]),
    (b"maxqueue  f   1", [b"maxqueue", b"f", b"1"]),      # a run of spaces is one
    (b" status", [b"", b"status"]),                          # a leading space: empty first
    (b"status ", [b"status", b""]),                          # trailing spaces: one empty last
    (b"status    ", [b"status", b""]),
    (b"show\tjobs", [b"show\tjobs"]),                        # only spaces separate
    (b"a b c d e", [b"a", b"b", b"c", b"d", b"e"]),
    (b"a b c d e f", [b"a", b"b", b"c", b"d", b"e", b"f"]),
    # C stops at TEXT_TOKENS_MAX + 1 tokens (and closes the connection): the rest is unread.
    (b"a b c d e f g h", [b"a", b"b", b"c", b"d", b"e", b"f"]),
    (b"a b c d e f ", [b"a", b"b", b"c", b"d", b"e", b"f"]),
])
def test_admin_tokens(line, tokens):
    assert gearmand.admin_tokens(line) == tokens


def test_c_string_ends_at_first_nul():
    assert gearmand.c_string(b"abc\0def\0") == b"abc"
    assert gearmand.c_string(b"\0abc") == b""
    assert gearmand.c_string(b"plain") == b"plain"


# --- Backoff ------------------------------------------------------------------------

def test_backoff_doubles_from_a_tenth_to_five_seconds(clock):
    backoff = gearmand.Backoff()
    backoff.check()                       # nothing failed yet: let through
    waits = []
    for attempt in range(8):
        error = backoff.failed(f"down {attempt}")
        assert isinstance(error, StoreError) and error.unavailable
        waits.append(round(backoff.until - clock.now, 6))
        clock.now = backoff.until
        backoff.check()                   # the wait is over: one call is let through
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_backoff_check_fails_fast_during_the_wait(clock):
    backoff = gearmand.Backoff()
    backoff.failed("db: connection refused")
    clock.advance(0.099)
    with pytest.raises(StoreError) as raised:
        backoff.check()
    assert raised.value.unavailable
    assert str(raised.value) == "db: connection refused"
    clock.advance(0.001)
    backoff.check()


def test_backoff_succeeded_resets(clock):
    backoff = gearmand.Backoff()
    for _ in range(4):
        backoff.failed("down")
    backoff.succeeded()
    backoff.check()                       # no wait left
    backoff.failed("down again")
    assert backoff.until - clock.now == pytest.approx(0.1)


# --- ReconnectingStore ------------------------------------------------------------

class DriverError(Exception):
    def __init__(self, kind):
        super().__init__(f"{kind}  error")     # describe() folds the double space
        self.kind = kind


class FakeConnection:
    def __init__(self, calls, name):
        self.calls = calls
        self.name = name

    def close(self):
        self.calls.append(("close", self.name))


class FakeBackend(gearmand.ReconnectingStore):
    """A backend whose connect() and write_batch() do what the test scripts:
    `outcomes` are, per write_batch, None (it works) or the kind of DriverError."""

    driver_error = DriverError

    def __init__(self, outcomes=(), connect_failures=0):
        super().__init__("fake db")
        self.outcomes = list(outcomes)
        self.connect_failures = connect_failures
        self.connections = 0
        self.calls = []

    def connect(self):
        if self.connect_failures:
            self.connect_failures -= 1
            self.calls.append(("connect", "failed"))
            raise DriverError("connection refused")
        self.connections += 1
        name = f"conn{self.connections}"
        self.calls.append(("connect", name))
        return FakeConnection(self.calls, name)

    def write_batch(self, adds, dones):
        self.calls.append(("write", self.connection.name))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            raise DriverError(outcome)

    def lost(self, error):
        return error.kind == "lost"

    def blocked(self, error):
        return error.kind == "locked"

    def rollback(self):
        self.calls.append(("rollback", self.connection.name if self.connection else None))


def backend_with_old_connection(**kw):
    backend = FakeBackend(**kw)
    backend.connection = FakeConnection(backend.calls, "old")
    return backend


def test_store_lost_old_connection_is_retried_once_on_a_new_one(clock):
    backend = backend_with_old_connection(outcomes=["lost", None])
    backend.write([(b"u", b"f", 1, b"d", 0)], [])
    assert backend.calls == [("write", "old"), ("close", "old"), ("connect", "conn1"),
                             ("write", "conn1")]
    assert backend.backoff.until == 0.0


def test_store_lost_fresh_connection_backs_off(clock):
    backend = FakeBackend(outcomes=["lost"])
    with pytest.raises(StoreError) as raised:
        backend.write([], [(b"u", b"f")])
    assert raised.value.unavailable
    assert str(raised.value) == "fake db: lost error"
    assert backend.calls == [("connect", "conn1"), ("write", "conn1"), ("close", "conn1")]
    # During the backoff the next write fails at once, without touching the backend.
    clock.advance(0.05)
    with pytest.raises(StoreError) as raised:
        backend.write([], [(b"u", b"f")])
    assert raised.value.unavailable and str(raised.value) == "fake db: lost error"
    assert len(backend.calls) == 3
    clock.advance(0.051)
    backend.write([], [(b"u", b"f")])     # the wait is over: it reconnects
    assert backend.calls[3:] == [("connect", "conn2"), ("write", "conn2")]


def test_store_lost_old_and_new_connection_backs_off(clock):
    backend = backend_with_old_connection(outcomes=["lost", "lost"])
    with pytest.raises(StoreError) as raised:
        backend.write([], [])
    assert raised.value.unavailable
    assert backend.calls == [("write", "old"), ("close", "old"), ("connect", "conn1"),
                             ("write", "conn1"), ("close", "conn1")]
    assert backend.backoff.until == pytest.approx(clock.now + 0.1)
    assert backend.connection is None


def test_store_blocked_error_is_unavailable_without_backoff(clock):
    backend = backend_with_old_connection(outcomes=["locked"])
    with pytest.raises(StoreError) as raised:
        backend.write([], [])
    assert raised.value.unavailable
    assert str(raised.value) == "fake db: locked error"
    assert backend.calls == [("write", "old"), ("rollback", "old")]
    backend.write([], [])                 # no backoff: the next write goes through at once
    assert backend.calls[2:] == [("write", "old")]


def test_store_refused_record_is_not_unavailable(clock):
    backend = backend_with_old_connection(outcomes=["duplicate key"])
    with pytest.raises(StoreError) as raised:
        backend.write([(b"u", b"f", 1, b"d", 0)], [])
    assert not raised.value.unavailable
    assert str(raised.value) == "fake db: duplicate key error"
    assert backend.calls == [("write", "old"), ("rollback", "old")]
    assert backend.connection is not None and backend.backoff.until == 0.0


def test_store_connect_failure_backs_off(clock):
    backend = FakeBackend(connect_failures=2)
    with pytest.raises(StoreError) as raised:
        backend.write([], [])
    assert raised.value.unavailable
    assert str(raised.value) == "fake db: connection refused error"
    with pytest.raises(StoreError):
        backend.write([], [])             # within 0.1 s: not even a connect
    assert backend.calls == [("connect", "failed")]
    clock.advance(0.1)
    with pytest.raises(StoreError):
        backend.write([], [])             # fails again: now 0.2 s
    clock.advance(0.15)
    with pytest.raises(StoreError):
        backend.write([], [])
    clock.advance(0.051)
    backend.write([], [])
    assert backend.calls == [("connect", "failed"), ("connect", "failed"),
                             ("connect", "conn1"), ("write", "conn1")]
    assert backend.backoff.delay == 0.1   # success resets the interval


@pytest.mark.parametrize("error", [StoreError("row too large"), ValueError("driver bug")])
def test_store_other_failures_roll_back_and_propagate(clock, error):
    backend = backend_with_old_connection(outcomes=[error])
    with pytest.raises(type(error)) as raised:
        backend.write([], [])
    assert raised.value is error
    assert backend.calls == [("write", "old"), ("rollback", "old")]


# --- StoreWriter ----------------------------------------------------------------------

class FakeStore(gearmand.Store):
    """Records writes; `refuse(adds, dones)` may return an exception for one to raise.
    `rows` are what replay() yields."""

    persistent = True
    durable = True

    def __init__(self, refuse=None, rows=()):
        self.refuse = refuse
        self.rows = list(rows)
        self.writes = []
        self.times = []
        self.closed = False

    def replay(self):
        return iter(self.rows)

    def write(self, adds, dones):
        self.writes.append((list(adds), list(dones)))
        self.times.append(time.monotonic())
        error = self.refuse(adds, dones) if self.refuse else None
        if error is not None:
            raise error

    def close(self):
        self.closed = True


class Writer:
    """A running StoreWriter and the batches it reported."""

    def __init__(self, store):
        self.reports = queue.Queue()
        self.log = FakeLog()
        self.stats = gearmand.Stats(self.log)
        self.joins = []
        self.thread = gearmand.StoreWriter(store, self.on_written, self.log, self.stats)

    def on_written(self, batch, failed, joins):
        self.joins.append(joins)
        self.reports.put((batch, set(failed)))

    def report(self):
        return self.reports.get(timeout=5)

    def stop(self):
        self.thread.submit(None)
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_writer_falls_back_to_rows_so_only_the_refused_job_fails():
    bad = make_job(2, b"bad", b"bad")
    good, other = make_job(1, b"a", b"ok"), make_job(3, b"c", b"ok")
    store = FakeStore(lambda adds, dones: StoreError("refused") if any(
        row[3] == b"bad" for row in adds) else None)
    writer = Writer(store)
    gone = (b"gone", b"f", 99)
    first, second = Batch([good, bad], set(), [], []), Batch([other], set(), [gone], [])
    for batch in (first, second, None):   # all in one transaction, then stop
        writer.thread.submit(batch)
    writer.thread.start()
    assert writer.report() == (first, {bad})
    assert writer.report() == (second, {bad})
    writer.thread.join(5)
    rows = [gearmand.row_record(job) for job in (good, bad, other)]
    assert store.writes == [
        (rows, [gone]),                   # the joint write fails,
        (rows, []),                       # then without its deletes,
        ([rows[0]], []), ([rows[1]], []), ([rows[2]], []),   # then row by row
    ]
    assert writer.stats.store_errors == 1
    assert writer.log.lines == [("ERROR", "persistent queue write failed: refused")]


def test_writer_one_refused_row_alone_is_not_retried():
    bad = make_job(1, b"bad", b"bad")
    store = FakeStore(lambda adds, dones: StoreError("refused"))
    writer = Writer(store)
    batch = Batch([bad], set(), [], [])
    writer.thread.submit(batch)
    writer.thread.submit(None)
    writer.thread.start()
    assert writer.report() == (batch, {bad})
    writer.thread.join(5)
    assert len(store.writes) == 1


def test_writer_unavailable_store_fails_every_job_of_the_batches():
    jobs = [make_job(number, b"u%d" % number) for number in (1, 2, 3)]
    store = FakeStore(lambda adds, dones: StoreError("db down", unavailable=True))
    writer = Writer(store)
    first = Batch(jobs[:2], set(), [(b"k", b"f", 9)], [])
    second = Batch(jobs[2:], set(), [], [])
    for batch in (first, second, None):
        writer.thread.submit(batch)
    writer.thread.start()
    assert writer.report() == (first, set(jobs))
    assert writer.report() == (second, set(jobs))
    writer.thread.join(5)
    assert len(store.writes) == 1         # no row-by-row attempts against a dead store
    assert writer.stats.store_last_error == "db down"


def test_writer_retries_failed_deletes_later_while_adds_go_through():
    failures = [2]                        # the first two writes with deletes fail

    def refuse(adds, dones):
        if dones and failures[0]:
            failures[0] -= 1
            return StoreError("delete refused")
        return None

    store = FakeStore(refuse)
    writer = Writer(store)
    a, b = make_job(1, b"a"), make_job(2, b"b")
    key = (b"old", b"f", 7)
    writer.thread.start()
    writer.thread.submit(Batch([a], set(), [key], []))
    assert writer.report()[1] == set()    # a is written although the delete failed
    writer.thread.submit(Batch([b], set(), [], []))
    assert writer.report()[1] == set()    # b too: the delete failed again alongside it
    deadline = time.monotonic() + 5
    while len(store.writes) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.stop()
    ra, rb = gearmand.row_record(a), gearmand.row_record(b)
    assert store.writes[:5] == [([ra], [key]), ([ra], []), ([rb], [key]), ([rb], []),
                                ([], [key])]
    assert all(key not in dones for _, dones in store.writes[5:])   # deleted once
    # The delete alone waits for the doubled retry delay (0.05 s doubled twice).
    assert store.times[4] - store.times[3] >= 0.15


def test_writer_drops_a_delete_that_a_row_written_since_replaced():
    good, bad = make_job(1, b"u"), make_job(2, b"bad", b"bad")
    store = FakeStore(lambda adds, dones: StoreError("refused") if any(
        row[3] == b"bad" for row in adds) else None)
    writer = Writer(store)
    # The delete of (u, f) aims at an older row that good's row has just replaced.
    old = (b"u", b"f", 0)
    writer.thread.submit(Batch([good, bad], set(), [old], []))
    writer.thread.start()
    assert writer.report()[1] == {bad}
    later = make_job(3, b"later")
    writer.thread.submit(Batch([later], set(), [], []))
    assert writer.report()[1] == set()
    writer.stop()
    assert store.writes[4] == ([gearmand.row_record(later)], [])
    assert all(old not in dones for _, dones in store.writes[1:])


def test_writer_reports_only_batches_with_jobs_or_requests_and_stops_on_none():
    store = FakeStore()
    writer = Writer(store)
    deletes = Batch([], set(), [(b"k", b"f", 5)], [])
    job = make_job(1, b"u")
    with_job = Batch([job], set(), [], [])
    answers = []
    request = gearmand.StoreRequest("close", (), answers.append)
    with_request = Batch([], set(), [], [request])
    for batch in (deletes, with_job, with_request, None):
        writer.thread.submit(batch)
    writer.thread.start()
    writer.thread.join(5)
    assert not writer.thread.is_alive()
    assert store.writes == [([gearmand.row_record(job)], [(b"k", b"f", 5)])]
    assert writer.report() == (with_job, set())
    assert writer.report() == (with_request, set())
    assert writer.reports.empty()
    assert writer.joins == [{}, {}]
    assert writer.stats.batch_sizes.counts[1] == 1     # one commit of 2 rows
    # The request ran in the writer; the loop calls its answer (not the writer).
    assert store.closed and request.result is None and answers == []


def test_writer_runs_requests_after_the_writes_of_their_batch():
    calls = []

    class Store(FakeStore):
        def write(self, adds, dones):
            calls.append(("write", [row[5] for row in adds]))
            return {2: 1} if any(row[5] == 2 for row in adds) else None

        def counts(self):
            calls.append(("counts",))
            return "the counts"

        def find(self, function, unique):
            raise StoreError("no such table")

        def find_sequence(self, seq):
            raise KeyError(seq)           # a driver may raise anything

    writer = Writer(Store())
    requests = [gearmand.StoreRequest(method, arguments, None) for method, arguments in (
        ("counts", ()), ("find", (b"f", b"u")), ("find_sequence", (7,)))]
    batch = Batch([make_job(1, b"a"), make_job(2, b"b")], set(), [], requests)
    writer.thread.submit(batch)
    writer.thread.submit(None)
    writer.thread.start()
    assert writer.report() == (batch, set())
    writer.thread.join(5)
    assert calls == [("write", [1, 2]), ("counts",)]
    assert writer.joins == [{2: 1}]       # a paging store's joins reach the loop
    counted, refused, raised = (request.result for request in requests)
    assert counted == "the counts"
    assert isinstance(refused, StoreError) and str(refused) == "no such table"
    assert isinstance(raised, StoreError) and str(raised) == "KeyError: 7"


def test_in_order_starts_a_group_where_a_batch_deletes_a_row_an_earlier_one_adds():
    in_order = gearmand.in_order
    five, six = make_job(5, b"five"), make_job(6, b"six")
    adds5 = Batch([five], set(), [], [])
    adds6 = Batch([six], set(), [(b"x", b"f", 3)], [])     # deletes an older row: no split
    deletes6 = Batch([], set(), [gearmand.row_key(six)], [])
    deletes5 = Batch([], set(), [gearmand.row_key(five)], [])
    assert in_order([]) == [[]]
    assert in_order([adds5, adds6]) == [[adds5, adds6]]
    assert in_order([adds5, adds6, deletes6, deletes5]) == [[adds5, adds6],
                                                            [deletes6, deletes5]]
    assert in_order([deletes5, adds5]) == [[deletes5, adds5]]   # deletes go first anyway
    # A key that differs only in its seq names another row: no split.
    other = Batch([], set(), [(b"five", b"f", 4)], [])
    assert in_order([adds5, other]) == [[adds5, other]]


def test_writer_writes_a_delete_of_a_row_added_in_the_same_drain_after_it():
    store = FakeStore()
    writer = Writer(store)
    job = make_job(5, b"u", b"d")
    added, deleted = Batch([job], set(), [], []), Batch([], set(), [gearmand.row_key(job)], [])
    for batch in (added, deleted, None):  # one drain: a transaction deletes before it adds
        writer.thread.submit(batch)
    writer.thread.start()
    writer.thread.join(5)
    assert store.writes == [([gearmand.row_record(job)], []), ([], [(b"u", b"f", 5)])]
    assert writer.report() == (added, set()) and writer.reports.empty()


def test_writer_stop_with_nothing_to_write_leaves_the_store_alone():
    store = FakeStore()
    writer = Writer(store)
    writer.thread.start()
    writer.stop()
    assert store.writes == []


def test_writer_tries_a_failed_delete_once_more_at_stop():
    store = FakeStore(lambda adds, dones: StoreError("locked") if dones else None)
    writer = Writer(store)
    key = (b"k", b"f", 4)
    writer.thread.start()
    writer.thread.submit(Batch([], set(), [key], []))
    deadline = time.monotonic() + 5
    while not store.writes and time.monotonic() < deadline:
        time.sleep(0.001)
    writer.stop()                         # within the retry delay of 0.1 s
    deletes = [dones for _, dones in store.writes if dones]
    assert deletes == [[key], [key]]
    assert store.times[-1] - store.times[0] < 0.1


def test_writer_failed_deletes_alone_do_not_write_an_empty_batch():
    store = FakeStore(lambda adds, dones: StoreError("locked") if dones else None)
    writer = Writer(store)
    key = (b"k", b"f", 4)
    for batch in (Batch([], set(), [key], []), None):
        writer.thread.submit(batch)
    writer.thread.start()
    writer.thread.join(5)
    assert store.writes == [([], [key])]


# --- the row-unique codec -------------------------------------------------------------

def test_name_row_gives_jobs_without_a_unique_a_row_of_their_own():
    none, dash, own = make_job(7), make_job(8, b"-", b"data"), make_job(9, b"mine")
    empty_dash = make_job(10, b"-", b"")
    for job in (none, dash, own, empty_dash):
        gearmand.name_row(job, b"run1")
    assert none.row_unique == b"gearmand.py:no-unique:run1.7"
    assert own.row_unique is None
    # Unique "-" joins by payload: its row's unique is the payload's hash, the same in
    # every run, so a stored job with that payload holds the key as a live one would.
    assert dash.row_unique == gearmand.payload_row_unique(b"data") == (
        b"gearmand.py:payload-unique:" + hashlib.blake2b(
            b"data", digest_size=16).hexdigest().encode())
    other_run = make_job(11, b"-", b"data")
    gearmand.name_row(other_run, b"run2")
    assert other_run.row_unique == dash.row_unique
    assert empty_dash.row_unique == b"gearmand.py:payload-unique:run1.10"   # nothing to join by
    assert gearmand.row_key(none) == (b"gearmand.py:no-unique:run1.7", b"f", 7)
    assert gearmand.row_key(own) == (b"mine", b"f", 9)
    assert gearmand.row_record(dash) == (dash.row_unique, b"f", NORMAL, b"data", 0, 8)
    gearmand.name_row(none, b"run2")      # a named row keeps its name
    assert none.row_unique == b"gearmand.py:no-unique:run1.7"


@pytest.mark.parametrize("stored, decoded", [
    (b"gearmand.py:no-unique:0123456789ab.7", (b"", b"gearmand.py:no-unique:0123456789ab.7")),
    (b"gearmand.py:payload-unique:0123456789ab.8",
     (b"-", b"gearmand.py:payload-unique:0123456789ab.8")),
    (b"gearmand.py:payload-unique:" + b"5f" * 16, (b"-", b"gearmand.py:payload-unique:" + b"5f" * 16)),
    # Not in the generated forms: a client's own, as it is; marked: a client's own too.
    (b"gearmand.py:no-unique:abc.7", (b"gearmand.py:no-unique:abc.7", None)),
    (b"gearmand.py:=no-unique:0123456789ab.7",
     (b"gearmand.py:no-unique:0123456789ab.7", b"gearmand.py:=no-unique:0123456789ab.7")),
    (b"x" * 63 + b"\0", (b"x" * 63, b"x" * 63 + b"\0")),     # C's truncated 64-byte unique
    (b"", (b"", b"")),                    # C's rows keep their key
    (b"-", (b"-", b"-")),
    (b"order-42", (b"order-42", None)),
    (b"x" * 64, (b"x" * 64, None)),       # 64 bytes without the NUL: ordinary
    (b"x" * 62 + b"\0", (b"x" * 62 + b"\0", None)),
    (b"gearmand.py:something-else", (b"gearmand.py:something-else", None)),
])
def test_read_row_unique(stored, decoded):
    assert gearmand.read_row_unique(stored) == decoded


@pytest.mark.parametrize("unique, data", [
    (b"", b""), (b"", b"payload"), (b"-", b"payload"), (b"-", b""), (b"u1", b"d"),
    (b"x" * 64, b"d"),
])
def test_row_unique_round_trip(unique, data):
    job = make_job(5, unique, data)
    gearmand.name_row(job, b"0123456789ab")
    stored = gearmand.row_key(job)[0]
    assert gearmand.read_row_unique(stored) == (job.unique, job.row_unique)


@pytest.mark.parametrize("unique, stored_as", [
    (b"gearmand.py:no-unique:chosen-by-a-client", b"gearmand.py:no-unique:chosen-by-a-client"),
    (b"gearmand.py:no-unique:0123456789ab.5", b"gearmand.py:=no-unique:0123456789ab.5"),
    (b"gearmand.py:payload-unique:" + b"ab" * 16, b"gearmand.py:=payload-unique:" + b"ab" * 16),
    (b"gearmand.py:=x", b"gearmand.py:==x"),
    (b"gearmand.py:", b"gearmand.py:"),
])
def test_row_unique_round_trip_of_a_clients_unique_in_our_namespace(unique, stored_as):
    """A client's unique that reads like a generated one is stored with a mark, so that
    it comes back as the client's; any other is stored as it is."""
    job = make_job(5, unique, b"d")
    gearmand.name_row(job, b"0123456789ab")
    stored = gearmand.row_key(job)[0]
    assert stored == stored_as
    assert gearmand.read_row_unique(stored)[0] == unique


# --- store_class ------------------------------------------------------------------------

@pytest.fixture
def fresh_extras():
    """store_class() loads backends into sys.modules: start without them, end as before."""
    saved = {name: module for name, module in sys.modules.items()
             if name.startswith("gearmand_extras.")}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [name for name in sys.modules if name.startswith("gearmand_extras.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.parametrize("name, cls", [
    ("builtin", gearmand.Store), ("BuiltIn", gearmand.Store),
    ("sqlite", gearmand.SqliteStore), ("libsqlite3", gearmand.SqliteStore),
    ("LibSQLite3", gearmand.SqliteStore),
])
def test_store_class_of_this_file(name, cls):
    assert gearmand.store_class(name) is cls


def test_store_class_unknown_type():
    with pytest.raises(StoreError) as raised:
        gearmand.store_class("Oracle")
    assert str(raised.value).startswith("Error while initializing the queue : Oracle (queue types: "
                                        "builtin; libsqlite3, sqlite; MySQL, libdrizzle; ")


@pytest.mark.parametrize("name, message", [
    ("MySQL", "queue type MySQL needs mysql-connector-python: pip install mysql-connector-python (or, installed with pip, "
     "pip install 'gearmand-py[mysql]')"),
    ("libdrizzle",
     "queue type MySQL needs mysql-connector-python: pip install mysql-connector-python (or, installed with pip, "
     "pip install 'gearmand-py[mysql]')"),
    ("postgres", "queue type Postgres needs psycopg2-binary: pip install psycopg2-binary (or, installed with pip, "
     "pip install 'gearmand-py[postgres]')"),
    ("Redis", "queue type redis needs redis: pip install redis (or, installed with pip, "
     "pip install 'gearmand-py[redis]')"),
    ("libmemcached",
     "queue type libmemcached needs pymemcache: pip install pymemcache (or, installed with pip, "
     "pip install 'gearmand-py[memcached]')"),
])
def test_store_class_driver_missing(monkeypatch, fresh_extras, name, message):
    real = importlib.util.find_spec
    drivers = {"mysql", "psycopg2", "redis", "pymemcache"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module in drivers else real(module, *args))
    with pytest.raises(StoreError) as raised:
        gearmand.store_class(name)
    assert str(raised.value) == message


def test_store_class_loads_a_backend_next_to_the_file(fresh_extras):
    cls = gearmand.store_class("TokyoCabinet")
    assert cls.__name__ == "TokyoCabinetStore"
    assert issubclass(cls, gearmand.Store)     # built on this very module
    assert Path(sys.modules[cls.__module__].__file__).resolve() == ROOT / "extras" / "tokyocabinet.py"


def test_store_class_without_extras(monkeypatch, tmp_path, fresh_extras):
    monkeypatch.setattr(gearmand, "__file__", str(tmp_path / "gearmand.py"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *args: None
                        if module == "gearmand_extras" else real(module, *args))
    with pytest.raises(StoreError) as raised:
        gearmand.store_class("libtokyocabinet")
    assert str(raised.value) == (
        "queue type libtokyocabinet needs extras/tokyocabinet.py next to gearmand.py: copy "
        "it there, or pip install 'gearmand-py[all]'")


def test_store_class_backend_that_does_not_load(monkeypatch, tmp_path, fresh_extras):
    (tmp_path / "extras").mkdir()
    (tmp_path / "extras" / "tokyocabinet.py").write_text(
        "raise ImportError('libtokyocabinet.so.9: cannot open shared object file')\n")
    monkeypatch.setattr(gearmand, "__file__", str(tmp_path / "gearmand.py"))
    with pytest.raises(StoreError) as raised:
        gearmand.store_class("tokyocabinet")
    # Its driver (a ctypes library, looked up when the store opens) is not to blame.
    assert str(raised.value) == (
        "queue type libtokyocabinet: cannot load gearmand_extras.tokyocabinet "
        "(libtokyocabinet.so.9: cannot open shared object file): extras/ and gearmand.py "
        "must come from the same release")
    assert "gearmand_extras.tokyocabinet" not in sys.modules   # a later try starts afresh


# --- Timers -------------------------------------------------------------------------------

def test_timers_fire_in_order_of_time_then_of_adding(clock):
    timers, fired = gearmand.Timers(), []
    for delay, name in ((0.3, "a"), (0.1, "b"), (0.2, "c"), (0.1, "d"), (5.0, "late")):
        timers.add(delay, fired.append, name)
    clock.advance(0.1)
    timers.run_due()
    assert fired == ["b", "d"]
    clock.advance(0.2)
    timers.run_due()
    assert fired == ["b", "d", "c", "a"]
    assert len(timers.heap) == 1


def test_timers_cancel(clock):
    timers, fired = gearmand.Timers(), []
    payload = object()
    timer = timers.add(0.1, fired.append, payload)
    timers.add(0.2, fired.append, "kept")
    timers.cancel(timer)
    assert timer.callback is None and timer.argument is None   # lets go of the job
    timers.cancel(timer)                  # twice is harmless
    assert timers.cancelled == 1
    clock.advance(1)
    timers.run_due()
    assert fired == ["kept"]
    assert timers.cancelled == 0 and timers.heap == []
    done = timers.add(0.1, fired.append, "x")
    clock.advance(1)
    timers.run_due()
    timers.cancel(done)                   # fired already: nothing to count
    assert timers.cancelled == 0


def test_timers_compact_when_most_are_cancelled(clock):
    timers = gearmand.Timers()
    handles = [timers.add(3600 + n, print, n) for n in range(1500)]
    for timer in handles[:1000]:
        timers.cancel(timer)
    assert len(timers.heap) == 1500       # at most 1000 cancelled: they wait their turn
    timers.cancel(handles[1000])          # 1001 of 1500: compacted
    assert len(timers.heap) == 499 and timers.cancelled == 0
    assert all(entry[2].active for entry in timers.heap)
    assert timers.heap[0][2] is handles[1001]


def test_timers_next_timeout(clock):
    timers = gearmand.Timers()
    assert timers.next_timeout() is None
    far = timers.add(7200, print, None)
    assert timers.next_timeout() == gearmand.TIMER_WAIT_MAX
    soon = timers.add(2.5, print, None)
    assert timers.next_timeout() == 2.5
    clock.advance(3)
    assert timers.next_timeout() == 0     # overdue
    timers.cancel(soon)
    assert timers.next_timeout() == gearmand.TIMER_WAIT_MAX   # the cancelled head is dropped
    timers.cancel(far)
    assert timers.next_timeout() is None and timers.cancelled == 0


# --- Queues ----------------------------------------------------------------------------

def submit(queues, peer, name=b"f", unique=b"", data=b"", priority=NORMAL, background=False,
           **kw):
    queues.submit(peer, name, unique, data, priority, background, **kw)
    return max(queues.jobs.values(), key=lambda job: job.number, default=None)


def test_grab_order_is_priority_then_fifo():
    queues, _ = make_queues()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    low = submit(queues, client, data=b"low", priority=LOW)
    normal1 = submit(queues, client, data=b"n1")
    high = submit(queues, client, data=b"high", priority=HIGH)
    normal2 = submit(queues, client, data=b"n2")
    assert [queues.grab(worker) for _ in range(5)] == [high, normal1, normal2, low, None]
    assert queues.functions[b"f"].running == 4


def test_grab_takes_the_newest_registration_first():
    queues, _ = make_queues()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"old", 0)
    queues.register(worker, b"new", 0)
    on_old = submit(queues, client, b"old", priority=HIGH)
    on_new = submit(queues, client, b"new", priority=LOW)
    assert queues.grab(worker) is on_new  # registration before priority
    assert queues.grab(worker) is on_old


def test_round_robin_moves_the_used_registration_last():
    queues, _ = make_queues(round_robin=True)
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"a", 0)
    queues.register(worker, b"b", 0)
    jobs = {name: [submit(queues, client, name), submit(queues, client, name)]
            for name in (b"a", b"b")}
    assert [queues.grab(worker) for _ in range(4)] == [
        jobs[b"b"][0], jobs[b"a"][0], jobs[b"b"][1], jobs[b"a"][1]]


def test_coalescing_by_unique():
    queues, emitted = make_queues()
    first, second, worker = Client("c1"), Client("c2"), Client("w")
    job = submit(queues, first, unique=b"u", data=b"one")
    assert submit(queues, second, unique=b"u", data=b"two") is job   # data does not matter
    assert len(queues.jobs) == 1 and job.data == b"one"
    assert emitted.to(second) == [(JOB_CREATED, job.handle)]
    other = submit(queues, first, b"g", unique=b"u")   # another function: another job
    assert other is not job
    queues.register(worker, b"f", 0)
    queues.grab(worker)
    emitted.clear()
    queues.complete(job, job.handle + b"\0done")
    assert emitted == [(second, WORK_COMPLETE, job.handle + b"\0done"),   # newest first
                       (first, WORK_COMPLETE, job.handle + b"\0done")]
    assert queues.stats.completed["foreground"] == 1
    assert submit(queues, first, unique=b"u") is not job   # a finished job is not joined


def test_coalescing_by_payload_for_unique_dash():
    queues, _ = make_queues()
    client = Client("c")
    job = submit(queues, client, unique=b"-", data=b"same")
    assert submit(queues, client, unique=b"-", data=b"same") is job
    assert submit(queues, client, unique=b"-", data=b"other") is not job
    empty = submit(queues, client, unique=b"-", data=b"")
    assert submit(queues, client, unique=b"-", data=b"") is not empty   # no payload: no join
    none = submit(queues, client, unique=b"", data=b"same")
    assert submit(queues, client, unique=b"", data=b"same") is not none
    assert len(queues.jobs) == 6


def test_max_queue_refuses_with_queue_full():
    queues, emitted = make_queues()
    client = Client("c")
    queues.find_or_add_function(b"f").max_queue = [0, 2, 0]
    submit(queues, client, unique=b"u1")
    submit(queues, client, unique=b"u2")
    emitted.clear()
    queues.submit(client, b"f", b"u3", b"", NORMAL, True)
    assert emitted == [(client, ERROR, b"QUEUE_ERROR\0Job queue is full")]
    assert len(queues.jobs) == 2 and queues.stats.submitted["background"] == 0
    queues.submit(client, b"f", b"u1", b"", NORMAL, False)   # joining needs no room
    queues.submit(client, b"f", b"u4", b"", HIGH, False)     # high has no limit
    assert len(queues.jobs) == 3 and emitted[1:] == [
        (client, JOB_CREATED, b"H:test:1"), (client, JOB_CREATED, b"H:test:3")]


def test_unique_longer_than_64_bytes_is_refused():
    queues, emitted = make_queues()
    client = Client("c")
    queues.submit(client, b"f", b"u" * 65, b"", NORMAL, False)
    assert emitted == [(client, ERROR, b"ARGUMENT_TOO_LARGE\0Unique value too large")]
    assert submit(queues, client, unique=b"u" * 64).unique == b"u" * 64
    assert submit(queues, client, unique=b"r" * 65, reducer=b"sum").unique == b"r" * 65


def test_leaving_worker_requeues_its_jobs_in_c_order():
    queues, emitted = make_queues()
    client, worker, sleeper = Client("c"), Client("w"), Client("s")
    queues.register(worker, b"f", 0)
    first, second = submit(queues, client, data=b"1"), submit(queues, client, data=b"2")
    assert (queues.grab(worker), queues.grab(worker)) == (first, second)
    queues.register(sleeper, b"f", 0)
    queues.sleep(sleeper)
    queues.peer_left(worker)
    # The most recently assigned goes back first, to the end of its queue.
    assert list(queues.functions[b"f"].queues[NORMAL]) == [second, first]
    assert (first.retries, second.retries, first.worker) == (1, 1, None)
    assert emitted.to(sleeper) == [(NOOP, b"")]
    assert queues.functions[b"f"].running == 0 and len(queues.functions[b"f"].registrations) == 1


def test_sleeping_worker_dropping_a_function_hears_its_own_jobs_noop():
    queues, emitted = make_queues()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    job = submit(queues, client)
    queues.grab(worker)
    queues.sleep(worker)
    queues.unregister(worker, list(worker.registrations))     # CANT_DO f
    assert emitted.to(worker) == [(NOOP, b"")]
    assert queues.functions[b"f"].wakeable == 0 and job.worker is None


def test_job_retries_drop_a_job_with_work_fail():
    queues, emitted = make_queues(job_retries=2)
    client = Client("c")
    job = submit(queues, client)
    for attempt in (1, 2):
        worker = Client(f"w{attempt}")
        queues.register(worker, b"f", 0)
        assert queues.grab(worker) is job
        queues.peer_left(worker)
    assert emitted.to(client) == [(JOB_CREATED, job.handle), (WORK_FAIL, job.handle)]
    assert job.handle not in queues.jobs and queues.functions[b"f"].total == 0
    assert queues.journal.forgotten == [job]
    assert queues.stats.failed["foreground"] == 1
    assert queues.log.lines == [("NOTICE", "Dropped job due to max retry count: H:test:1")]
    assert client.client_jobs == []


def test_wakeups_walk_the_ring_with_a_limit():
    queues, emitted = make_queues(worker_wakeup=1)
    client = Client("c")
    workers = [Client(f"w{n}") for n in range(3)]
    for worker in workers:
        queues.register(worker, b"f", 0)
        queues.sleep(worker)
    assert queues.functions[b"f"].wakeable == 3
    for _ in range(4):
        submit(queues, client)
    assert [(peer, ptype) for peer, ptype, _ in emitted if ptype == NOOP] == [
        (workers[0], NOOP), (workers[1], NOOP), (workers[2], NOOP)]
    assert queues.functions[b"f"].wakeable == 0
    # The walk goes on from where it stopped, not from the first worker again.
    for worker in workers + workers[:1]:
        assert queues.grab(worker) is not None
    for worker in workers:
        queues.sleep(worker)              # the queue is empty: they all sleep anew
    emitted.clear()
    submit(queues, client)
    submit(queues, client)
    assert [peer for peer, ptype, _ in emitted if ptype == NOOP] == workers[:2]
    queues.grab(workers[1])
    queues.grab(workers[0])
    queues.sleep(workers[0])              # wakeable again, and first in the ring
    queues.sleep(workers[1])
    emitted.clear()
    submit(queues, client)
    assert [peer for peer, ptype, _ in emitted if ptype == NOOP] == [workers[2]]


def test_wakeups_without_a_limit_noop_everyone_once_per_sleep():
    queues, emitted = make_queues()
    client = Client("c")
    workers = [Client(f"w{n}") for n in range(3)]
    for worker in workers:
        queues.register(worker, b"f", 0)
        queues.sleep(worker)
    submit(queues, client)
    submit(queues, client)
    assert [peer for peer, ptype, _ in emitted if ptype == NOOP] == workers
    emitted.clear()
    queues.sleep(workers[0])              # a job waits for it: a NOOP at once
    assert emitted == [(workers[0], NOOP, b"")]
    queues.grab(workers[1])
    queues.grab(workers[1])
    emitted.clear()
    queues.sleep(workers[2])              # woken already and not grabbed since: no NOOP
    submit(queues, client)
    assert emitted.to(workers[2]) == []
    assert emitted.to(workers[0]) == []   # noop_sent: it has not grabbed since its NOOP


def test_last_client_leaving_abandons_a_foreground_job():
    queues, _ = make_queues()
    client, worker = Client("c"), Client("w")
    job = submit(queues, client, unique=b"u")
    queues.peer_left(client)
    assert job.ignore and job.clients is None
    assert submit(queues, Client("c2"), unique=b"u") is not job   # unindexed
    queues.register(worker, b"f", 0)
    assert queues.grab(worker) is not job  # discarded when a worker reaches it
    assert job.handle not in queues.jobs and queues.journal.forgotten == [job]


def test_clients_leaving_do_not_abandon_a_job_a_background_submission_owns():
    queues, emitted = make_queues()
    fg, bg, worker = Client("fg"), Client("bg"), Client("w")
    job = submit(queues, fg, unique=b"u")
    queues.submit(bg, b"f", b"u", b"", NORMAL, True)
    assert job.background and queues.journal.joined == [job]
    assert emitted.to(bg) == [(JOB_CREATED, job.handle)]
    queues.peer_left(fg)
    assert not job.ignore
    background = submit(queues, bg, unique=b"v", background=True)
    other = Client("fg2")
    submit(queues, other, unique=b"v")
    queues.peer_left(other)
    assert not background.ignore
    queues.register(worker, b"f", 0)
    assert (queues.grab(worker), queues.grab(worker)) == (job, background)


def test_cancel_fails_the_clients_and_skips_the_job():
    queues, emitted = make_queues()
    client, worker = Client("c"), Client("w")
    job = submit(queues, client, unique=b"u")
    queues.cancel(job)
    assert emitted.to(client)[-1] == (WORK_FAIL, job.handle)
    assert queues.journal.forgotten == [job]
    assert submit(queues, Client("c2"), unique=b"u") is not job
    queues.register(worker, b"f", 0)
    assert queues.grab(worker).handle == b"H:test:2"
    assert job.handle not in queues.jobs


def test_remove_function_drops_its_jobs():
    queues, emitted = make_queues()
    client = Client("c")
    waited = submit(queues, client, b"f")
    queued = submit(queues, client, b"f", background=True)
    kept = submit(queues, client, b"g")
    emitted.clear()
    queues.remove_function(queues.functions[b"f"])
    assert emitted == [(client, WORK_FAIL, waited.handle)]
    assert list(queues.functions) == [b"g"] and list(queues.jobs.values()) == [kept]
    assert queues.journal.forgotten == [waited, queued]


def test_jobs_in_c_order_newest_first_within_a_bucket():
    queues, _ = make_queues(hashtable_buckets=2)
    client = Client("c")
    jobs = [submit(queues, client, data=b"%d" % n) for n in range(4)]
    order = queues.jobs_in_c_order(lambda job: job.number)    # handles 1..4: odd, even
    assert order == [jobs[3], jobs[1], jobs[2], jobs[0]]


def test_epoch_job_waits_for_its_time(clock):
    queues, emitted = make_queues()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    queues.sleep(worker)
    job = submit(queues, client, background=True, when=int(clock.time()) + 10)
    function = queues.functions[b"f"]
    assert function.scheduled == 1 and function.queued(NORMAL) == 1
    assert emitted.to(worker) == [(NOOP, b"")]     # C wakes workers at submission too
    assert queues.grab(worker) is None
    clock.advance(10)
    queues.timers.run_due()
    assert function.scheduled == 0 and queues.grab(worker) is job


def test_can_do_timeout_requeues_at_least_after_a_second(clock):
    queues, _ = make_queues()
    client, worker, other = Client("c"), Client("w"), Client("o")
    queues.register(worker, b"f", 200)    # under a second counts as one second
    job = submit(queues, client)
    queues.grab(worker)
    clock.advance(0.5)
    queues.timers.run_due()
    assert job.worker is not None
    clock.advance(0.5)
    queues.timers.run_due()
    assert job.worker is None and job.retries == 1 and not queues.timeouts
    assert worker.registrations[0].jobs == []
    queues.register(other, b"f", 0)
    assert queues.grab(other) is job


def test_job_status_and_unique_status():
    queues, _ = make_queues()
    client, worker = Client("c"), Client("w")
    job = submit(queues, client, unique=b"u")
    submit(queues, Client("c2"), unique=b"u")
    assert queues.job_status(job.handle) == (False, 0, 0)
    queues.register(worker, b"f", 0)
    queues.grab(worker)
    queues.report_progress(job, 3, 7, job.handle + b"\x003\x007")
    assert queues.job_status(job.handle) == (True, 3, 7)
    assert queues.unique_status(b"u") == (True, 3, 7, 2)
    newer = submit(queues, client, b"g", unique=b"u", background=True)
    assert queues.unique_status(b"u") == (False, 0, 0, 0)   # the newest job of any function
    assert queues.job_status(b"H:test:99") is None and queues.unique_status(b"") is None
    assert newer.handle == b"H:test:2"


# --- Journal --------------------------------------------------------------------------

class FakeLoop:
    """What the journal uses of the EventLoop: timers, emit and send (held back for a
    peer whose replies wait for a commit, as the loop does), and wake()."""

    def __init__(self):
        self.timers = gearmand.Timers()
        self.events = []
        self.woken = threading.Event()
        self.resumed = []
        self.accepting = True

    def hold_accepting(self):
        self.accepting = False

    def resume_accepting(self, _=None):
        self.accepting = True

    def pause(self, peer):
        peer.paused = True

    def resume(self, peer):
        peer.paused = False
        self.resumed.append(peer)

    def emit(self, peer, ptype, payload):
        if peer.held is not None:
            peer.held.append((ptype, payload))
        else:
            self.events.append((peer, ptype, payload))

    def send(self, peer, data):
        if peer.held is not None:
            peer.held.append(data)
        else:
            self.events.append((peer, "send", data))

    def wake(self):
        self.woken.set()

    def to(self, peer):
        return [event[1:] for event in self.events if event[0] is peer]


class FakeWriter:
    def __init__(self):
        self.batches = []

    def submit(self, batch):
        self.batches.append(batch)


def make_journal(store=None, write_at_shutdown=False, queue_memory=0, **options):
    loop = FakeLoop()
    stats = gearmand.Stats()
    queues = gearmand.Queues(queue_options(**options), loop.emit, loop.timers, FakeLog(), stats)
    journal = gearmand.Journal(store or FakeStore(), queues, loop, FakeLog(), stats,
                               write_at_shutdown, queue_memory)
    journal.writer = FakeWriter()
    return journal, queues, loop


def handed(journal):
    """The batch the journal just handed to the writer."""
    journal.end_turn()
    return journal.writer.batches[-1]


def test_journal_holds_job_created_until_the_row_is_written():
    journal, queues, loop = make_journal()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    job = submit(queues, client, unique=b"u", data=b"d", background=True)
    loop.send(client, b"an echo sent after the submission")
    assert loop.events == [] and job.row == WRITING
    assert queues.grab(worker) is None    # it runs once stored
    batch = handed(journal)
    assert (batch.jobs, batch.running, batch.dones, batch.requests) == ([job], set(), [], [])
    assert journal.adds_in_flight == 1
    journal.batch_written(batch, set(), {})
    assert loop.to(client) == [(JOB_CREATED, job.handle),
                               ("send", b"an echo sent after the submission")]
    assert client.held is None and job.row == STORED and journal.adds_in_flight == 0
    assert queues.grab(worker) is job


def test_journal_releases_only_the_peers_waiting_for_that_batch():
    journal, queues, loop = make_journal()
    first, second = Client("c1"), Client("c2")
    job1 = submit(queues, first, unique=b"u1", background=True)
    batch1 = handed(journal)
    job2 = submit(queues, second, unique=b"u2", background=True)
    batch2 = handed(journal)
    joiner = Client("c3")                 # a second submitter of job1, in the next turn
    queues.submit(joiner, b"f", b"u1", b"", NORMAL, True)
    journal.batch_written(batch1, set(), {})
    assert loop.events == [(first, JOB_CREATED, job1.handle), (joiner, JOB_CREATED, job1.handle)]
    assert second.held is not None
    journal.batch_written(batch2, set(), {})
    assert loop.to(second) == [(JOB_CREATED, job2.handle)]


def test_journal_release_stops_at_a_job_still_being_written():
    journal, queues, loop = make_journal()
    client = Client("c")
    job1 = submit(queues, client, unique=b"u1", background=True)
    batch1 = handed(journal)
    job2 = submit(queues, client, unique=b"u2", background=True)
    batch2 = handed(journal)
    journal.batch_written(batch2, set(), {})
    assert loop.events == [] and list(client.held) == [job1, job2]
    journal.batch_written(batch1, set(), {})
    assert loop.to(client) == [(JOB_CREATED, job1.handle), (JOB_CREATED, job2.handle)]


def test_journal_failed_write_answers_store_failed():
    journal, queues, loop = make_journal()
    alone, waiting, fg = Client("bg1"), Client("bg2"), Client("fg")
    dropped = submit(queues, alone, unique=b"u1", background=True)
    kept = submit(queues, waiting, unique=b"u2", background=True)
    submit(queues, fg, unique=b"u2")      # a foreground client joins it while it is written
    batch = handed(journal)
    journal.batch_written(batch, {dropped, kept}, {})
    assert loop.to(alone) == [(ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")]
    assert loop.to(waiting) == [(ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")]
    assert dropped.handle not in queues.jobs
    # The job its foreground client waits for goes on, as a foreground job.
    assert not kept.background and queues.functions[b"f"].queues[NORMAL][0] is kept
    assert kept.row == gearmand.FAILED and not kept.queued


def test_journal_deletes_the_row_of_a_job_that_ended_while_written():
    # forget() of a job whose row is being written queues its delete at once, by seq:
    # the writer deletes after it writes (in_order), and batch_written adds nothing.
    journal, queues, loop = make_journal()
    fg, bg, worker = Client("fg"), Client("bg"), Client("w")
    queues.register(worker, b"f", 0)
    job = submit(queues, fg, unique=b"u")
    queues.grab(worker)
    queues.submit(bg, b"f", b"u", b"", NORMAL, True)       # joins the running job
    batch = handed(journal)
    assert batch.running == {job}
    queues.complete(job, job.handle + b"\0r")
    assert journal.dones == [(b"u", b"f", job.number)] and job.row == WRITING
    journal.batch_written(batch, set(), {})
    assert journal.dones == [(b"u", b"f", job.number)]   # once
    assert job.row == gearmand.NO_ROW and not job.queued
    assert loop.to(bg) == [(JOB_CREATED, job.handle)]


def test_journal_forget_of_a_job_whose_add_is_not_handed_yet_hands_it_first():
    journal, queues, loop = make_journal()
    fg, bg, worker = Client("fg"), Client("bg"), Client("w")
    queues.register(worker, b"f", 0)
    job = submit(queues, fg, unique=b"u")
    queues.grab(worker)
    queues.submit(bg, b"f", b"u", b"", NORMAL, True)
    other = submit(queues, bg, unique=b"v", background=True)   # in the same turn's adds
    queues.complete(job, job.handle + b"\0r")     # before the turn ended
    assert [batch.jobs for batch in journal.writer.batches] == [[job, other]]
    assert journal.adds == [] and journal.dones == [(b"u", b"f", job.number)]
    journal.hand_to_writer()              # as DELETE_DELAY would
    adds, deletes = journal.writer.batches
    assert deletes.dones == [(b"u", b"f", job.number)]
    # The writer puts the delete in a transaction after the add, not before it.
    assert gearmand.in_order([adds, deletes]) == [[adds], [deletes]]


def test_journal_keeps_a_row_a_newer_job_has_taken():
    # Rows are deleted by seq now: the old job's delete names its own row, and a newer
    # job with the same (unique, function) writes a row of another seq, which stays.
    journal, queues, loop = make_journal()
    fg, bg, worker = Client("fg"), Client("bg"), Client("w")
    queues.register(worker, b"f", 0)
    old = submit(queues, fg, unique=b"u")
    queues.grab(worker)
    queues.submit(bg, b"f", b"u", b"", NORMAL, True)
    batch = handed(journal)
    queues.complete(old, old.handle + b"\0r")
    newer = submit(queues, bg, unique=b"u", background=True)   # same unique, being written
    journal.batch_written(batch, set(), {})
    assert journal.dones == [(b"u", b"f", old.number)] and newer.row == WRITING
    following = handed(journal)
    assert following.jobs == [newer] and following.dones == [(b"u", b"f", old.number)]
    assert gearmand.row_key(newer) == (b"u", b"f", newer.number) != following.dones[0]
    journal.batch_written(following, set(), {})
    assert newer.row == STORED and journal.dones == []


def test_journal_cancel_while_written_deletes_the_row_once_written():
    # The delete is queued at cancel (by seq, so it is written after the row); once the
    # row is written, the cancelled job is dropped rather than queued.
    journal, queues, loop = make_journal()
    client, worker = Client("c"), Client("w")
    job = submit(queues, client, unique=b"u", background=True)
    batch = handed(journal)
    queues.cancel(job)
    assert journal.dones == [(b"u", b"f", job.number)]
    journal.batch_written(batch, set(), {})
    assert journal.dones == [(b"u", b"f", job.number)] and job.row == gearmand.NO_ROW
    assert job.handle not in queues.jobs and queues.functions[b"f"].total == 0
    queues.register(worker, b"f", 0)
    assert queues.grab(worker) is None
    assert loop.to(client) == [(JOB_CREATED, job.handle)]   # its submission was stored


def test_journal_forget_of_a_stored_row_queues_its_delete(clock):
    journal, queues, loop = make_journal()
    client, worker = Client("c"), Client("w")
    job = submit(queues, client, background=True)          # no unique: a generated row key
    journal.batch_written(handed(journal), set(), {})
    key = gearmand.row_key(job)
    assert key[0].startswith(b"gearmand.py:no-unique:" + journal.run_id + b".")
    assert key[1:] == (b"f", job.number)
    queues.register(worker, b"f", 0)
    queues.grab(worker)
    queues.complete(job, job.handle + b"\0")
    assert journal.dones == [key] and job.row == gearmand.NO_ROW and not job.queued
    journal.end_turn()                    # deletes alone wait a little
    assert len(journal.writer.batches) == 1
    clock.advance(gearmand.DELETE_DELAY)
    loop.timers.run_due()
    deletes = journal.writer.batches[-1]
    assert (deletes.jobs, deletes.dones) == ([], [key])
    assert journal.adds_in_flight == 0 and journal.dones == []


def test_journal_ask_queues_a_request_for_the_turn_and_alone_ones_on_their_own():
    journal, queues, loop = make_journal()
    answers = []
    journal.ask("find", (b"f", b"u"), answers.append)
    assert journal.writer.batches == []   # it waits for the end of the turn
    job = submit(queues, Client("c"), unique=b"u", background=True)
    batch = handed(journal)
    assert batch.jobs == [job] and [r.method for r in batch.requests] == ["find"]
    request = batch.requests[0]
    assert (request.arguments, request.answer) == ((b"f", b"u"), answers.append)
    # alone: what is pending goes first, in a batch of its own, then the request alone.
    journal.dones.append((b"x", b"f", 3))
    journal.ask("counts", (), answers.append)
    journal.ask("delete_function", (b"f",), answers.append, alone=True)
    first, second = journal.writer.batches[-2:]
    assert first.dones == [(b"x", b"f", 3)] and [r.method for r in first.requests] == ["counts"]
    assert (second.jobs, second.dones) == ([], [])
    assert [r.method for r in second.requests] == ["delete_function"]
    journal.ask("delete_function", (b"g",), answers.append, alone=True)
    assert len(journal.writer.batches) == 4   # nothing pending: straight to the writer
    request.result = ("found",)
    journal.batch_written(batch, set(), {})
    assert answers == [("found",)]


def test_journal_replay(clock):
    rows = [                              # a store without an order of its own: seq 0
        (b"u1", b"f", HIGH, b"one", 0, 0),
        (b"gearmand.py:no-unique:0123456789ab.7", b"f", LOW, b"two", 0, 0),
        (b"u1", b"f", NORMAL, b"duplicate", 0, 0),         # an older server wrote it twice
        (b"-", b"g", 9, b"three", 0, 0),                    # C's row; a priority C never writes
        (b"later", b"g", NORMAL, b"four", int(clock.time()) + 60, 0),
    ]
    journal, queues, loop = make_journal(FakeStore(rows=rows))
    try:
        assert journal.replay() == 4
    finally:
        gc.unfreeze()
    assert journal.dones == [(b"u1", b"f", 0)]
    jobs = list(queues.jobs.values())
    assert [(job.unique, job.row_unique, job.priority, job.data) for job in jobs] == [
        (b"u1", None, HIGH, b"one"),
        (b"", b"gearmand.py:no-unique:0123456789ab.7", LOW, b"two"),
        (b"-", b"-", NORMAL, b"three"),
        (b"later", None, NORMAL, b"four"),
    ]
    assert [job.number for job in jobs] == [1, 2, 3, 4]
    assert [job.handle for job in jobs] == [b"H:test:1", b"H:test:2", b"H:test:3", b"H:test:4"]
    assert all(job.row == STORED and job.queued and job.background for job in jobs)
    assert queues.functions[b"g"].scheduled == 1 and queues.scheduled == 1
    assert queues.functions[b"f"].total == 2 and queues.functions[b"g"].total == 2
    assert queues.stats.replayed == 4
    assert gearmand.row_key(jobs[1]) == (b"gearmand.py:no-unique:0123456789ab.7", b"f", 2)
    assert submit(queues, Client("c"), unique=b"new").number == 5


def test_journal_replay_of_a_store_with_seqs_keeps_them_as_handle_numbers(clock):
    rows = [(b"a", b"f", NORMAL, b"1", 0, 5), (b"b", b"f", NORMAL, b"2", 0, 2),
            (b"c", b"f", NORMAL, b"3", 0, 9), (b"a", b"f", NORMAL, b"again", 0, 7)]
    journal, queues, loop = make_journal(FakeStore(rows=rows))
    try:
        assert journal.replay() == 3
    finally:
        gc.unfreeze()
    assert [job.handle for job in queues.jobs.values()] == [b"H:test:5", b"H:test:2",
                                                            b"H:test:9"]
    assert journal.dones == [(b"a", b"f", 7)]   # the duplicate's own row
    assert queues.job_count == 9          # above the highest stored seq
    assert submit(queues, Client("c"), unique=b"d").handle == b"H:test:10"


def test_journal_replay_counts_the_seq_of_a_duplicate_row_too(clock):
    rows = [(b"a", b"f", NORMAL, b"1", 0, 5), (b"a", b"f", NORMAL, b"again", 0, 9)]
    journal, queues, loop = make_journal(FakeStore(rows=rows))
    try:
        assert journal.replay() == 1
    finally:
        gc.unfreeze()
    assert journal.dones == [(b"a", b"f", 9)]
    assert queues.job_count == 9


def test_journal_with_the_writer_thread():
    store = FakeStore()
    journal, queues, loop = make_journal(store)
    journal.start()
    client = Client("c")
    job = submit(queues, client, unique=b"u", data=b"d", background=True)
    journal.end_turn()
    assert loop.woken.wait(5)
    journal.collect()
    assert loop.to(client) == [(JOB_CREATED, job.handle)]
    queues.cancel(job)                    # its row is deleted when the journal closes
    journal.close()
    assert store.writes == [([(b"u", b"f", NORMAL, b"d", 0, 1)], []), ([], [(b"u", b"f", 1)])]
    assert store.closed and journal.writer is None


def test_journal_store_queue_on_shutdown():
    store = FakeStore()
    journal, queues, loop = make_journal(store, write_at_shutdown=True)
    client = Client("c")
    job = submit(queues, client, unique=b"u", data=b"d", background=True)
    submit(queues, client, unique=b"fg")  # foreground jobs are not stored
    assert loop.to(client)[0] == (JOB_CREATED, job.handle)   # at once: nothing is written now
    journal.end_turn()
    assert journal.writer.batches == []
    journal.writer = None
    journal.close()
    assert store.writes == [([(b"u", b"f", NORMAL, b"d", 0, 1)], [])]


# --- Pager ------------------------------------------------------------------------------

class PagingStore(FakeStore):
    """A paging store over a table in memory, {seq: (unique, function, priority, data,
    when)}, as SQLite pages: rows due now have when 0, and a key a stored row holds
    already is not written again (the new job joins that row). `calls` records the
    paging methods the writer ran."""

    pages = True

    def __init__(self, rows=()):
        super().__init__()
        self.table = {seq: (unique, function, priority, data, when)
                      for unique, function, priority, data, when, seq in rows}
        self.calls = []

    def holder(self, function, unique):
        for seq, (row_unique, name, _, _, _) in self.table.items():
            if (row_unique, name) == (unique, function):
                return seq
        return None

    def write(self, adds, dones):
        super().write(adds, dones)
        for _, _, seq in dones:
            self.table.pop(seq, None)
        joins = {}
        for unique, function, priority, data, when, seq in adds:
            held = self.holder(function, unique)
            if held is None:
                self.table[seq] = (unique, function, priority, data, when)
            elif held != seq:
                joins[seq] = held
        return joins

    def ordered(self):
        return sorted(self.table.items())

    def counts(self):
        self.calls.append(("counts",))
        due, scheduled = collections.Counter(), collections.Counter()
        for _, (_, function, priority, _, when) in self.ordered():
            if when:
                scheduled[function] += 1
            else:
                due[function, priority] += 1
        return (max(self.table, default=0), [key + (count,) for key, count in due.items()],
                list(scheduled.items()))

    def page(self, function, priority, after, limit):
        self.calls.append(("page", function, priority, after, limit))
        return [(seq, unique, data) for seq, (unique, name, row_priority, data, when)
                in self.ordered() if (name, row_priority, when) == (function, priority, 0)
                and seq > after][:limit]

    def page_scheduled(self, after, limit):
        self.calls.append(("page_scheduled", after, limit))
        rows = sorted((when, seq, function, unique, priority, data) for seq, (
            unique, function, priority, data, when) in self.ordered() if when)
        return [row for row in rows if row[:2] > tuple(after)][:limit]

    def find(self, function, unique):
        self.calls.append(("find", function, unique))
        seq = self.holder(function, unique)
        if seq is None:
            return None
        _, _, priority, data, when = self.table[seq]
        return seq, priority, data, when

    def find_sequence(self, seq):
        self.calls.append(("find_sequence", seq))
        if seq not in self.table:
            return None
        unique, function, priority, data, when = self.table[seq]
        return function, unique, priority, data, when

    def delete_sequence(self, seq):
        self.calls.append(("delete_sequence", seq))
        if seq not in self.table:
            return None
        _, function, priority, _, when = self.table.pop(seq)
        return function, priority, when

    def delete_function(self, function):
        self.calls.append(("delete_function", function))
        for seq in [seq for seq, row in self.table.items() if row[1] == function]:
            del self.table[seq]


def stored_row(seq, unique=b"", function=b"f", priority=NORMAL, data=b"", when=0):
    return (unique, function, priority, data, when, seq)


def make_pager(rows=(), budget=0, **options):
    """A Journal with a Pager over a PagingStore, replayed (counted), its writer
    (not started: run_writer drives it) taking the place of the thread."""
    store = PagingStore(rows)
    journal, queues, loop = make_journal(store, queue_memory=budget, **options)
    journal.writer = gearmand.StoreWriter(store, journal.writer_finished, FakeLog(),
                                          journal.stats)
    journal.replay()
    return journal, queues, loop, store


def run_writer(journal):
    """What the writer thread does with the batches handed to it so far."""
    journal.writer.submit(None)
    journal.writer.run()                  # in this thread; it returns at the None


def turn(journal):
    """End the loop's turn, and let the writer and the loop finish everything it
    started (deletes too, as DELETE_DELAY would), until nothing is left."""
    for _ in range(100):
        journal.end_turn()
        if journal.dones:
            journal.hand_to_writer()
        if journal.writer.batches.empty():
            return
        run_writer(journal)
        journal.collect()
    raise AssertionError("the journal never settles")


def queued_numbers(function, priority=NORMAL):
    return [job.number for job in function.queues[priority]]


def grab_all(queues, journal, worker):
    """Grab and complete jobs until none is left, turning the loop between grabs;
    the numbers of the jobs, in the order they were grabbed."""
    numbers = []
    for _ in range(10000):
        job = queues.grab(worker)
        if job is None:
            turn(journal)
            job = queues.grab(worker)
            if job is None:
                return numbers
        numbers.append(job.number)
        queues.complete(job, job.handle + b"\0")
        turn(journal)
        check_counts(journal)
    raise AssertionError("endless")


def check_counts(journal):
    """The counts a spilled queue keeps (total, queued(), the Spill's) against the jobs
    in memory, and, with nothing in flight, against the rows of the store."""
    queues = journal.queues
    idle = not journal.adds and not journal.adds_in_flight
    store = None
    if not journal.dones and journal.writer.batches.empty():
        store = journal.store             # every write and delete is done
    for function in queues.functions.values():
        spill = function.spill
        mine = [job for job in queues.jobs.values() if job.function is function]
        stored = 0
        if spill is not None:
            stored = sum(spill.stored) + spill.scheduled - len(spill.pinned)
            assert all(count >= 0 for count in spill.stored) and spill.scheduled >= 0
        assert function.total == len(mine) + stored, function.name
        if idle:
            waiting = sum(function.queued(priority) for priority in (HIGH, NORMAL, LOW))
            assert waiting + function.running == function.total, function.name
        if store is not None and idle:
            rows = {seq for seq, row in store.table.items() if row[1] == function.name}
            kept = {job.number for job in mine if job.row == STORED}
            assert kept <= rows, function.name
            assert len(rows - kept) == stored, function.name
    spilled = [f for f in queues.functions.values() if f.spill is not None]
    if journal.pager is not None:
        assert journal.pager.spilled == len(spilled)


def make_admin(journal, loop):
    server = types.SimpleNamespace(loop=loop, queues=journal.queues,
                                   options=types.SimpleNamespace(admin_allow="any"),
                                   log=FakeLog())
    admin = gearmand.Admin(server)

    def command(conn, line):
        before = len(loop.events)
        admin.line(conn, line + b"\r")
        return b"".join(data for peer, kind, data in loop.events[before:]
                        if peer is conn and kind == "send")
    return command


# 256 jobs of 600 bytes: over budget past 256 jobs in memory; a queue's window is
# 256 // (4 * (spilled functions + 1)): 64 while none is spilled, 32 with one.
BUDGET = 600 * 256


def test_journal_has_a_pager_only_for_a_paging_store_written_ahead():
    journal, queues, _ = make_journal(PagingStore(), queue_memory=1000)
    assert journal.pager is queues.pager and journal.pager.budget == 1000
    assert make_journal(PagingStore(), write_at_shutdown=True)[0].pager is None
    assert make_journal(FakeStore())[0].pager is None


def test_pager_load_counts_and_spills_every_stored_queue(clock):
    later = int(clock.time()) + 100
    rows = [stored_row(1, b"a"), stored_row(2, b"b"), stored_row(3, b"c", priority=HIGH),
            stored_row(4, b"d"), stored_row(5, b"e", b"g", LOW),
            stored_row(6, b"s1", when=later), stored_row(9, b"s2", b"h", when=later + 1)]
    journal, queues, loop, store = make_pager(rows)
    pager = journal.pager
    assert store.calls == [("counts",)]   # no row is read
    assert queues.jobs == {} and journal.writer.batches.empty()
    f, g, h = (queues.functions[name] for name in (b"f", b"g", b"h"))
    assert pager.spilled == 3 and all(function.spill for function in (f, g, h))
    assert (f.spill.stored, f.spill.scheduled, f.total) == ([1, 3, 0], 1, 5)
    assert (f.queued(HIGH), f.queued(NORMAL), f.queued(LOW)) == (1, 4, 0)
    assert (g.spill.stored, g.total, g.queued(LOW)) == ([0, 0, 1], 1, 1)
    assert (h.spill.scheduled, h.total, h.queued(NORMAL)) == (1, 1, 1)
    assert (pager.scheduled_stored, pager.scheduled_cursor) == (2, (-2 ** 63, 0))
    assert journal.stats.replayed == 7 and pager.stored_count() == 7
    assert pager.log.lines == [("NOTICE", "7 jobs in the persistent queue; paging them in")]
    assert queues.job_count == 9          # above the highest stored seq
    assert submit(queues, Client("c"), b"new").number == 10
    command = make_admin(journal, loop)
    assert sorted(command(Client("admin"), b"prioritystatus").split(b"\n")) == [
        b"", b".", b"f\t1\t4\t0\t0", b"g\t0\t0\t1\t0", b"h\t0\t1\t0\t0", b"new\t0\t1\t0\t0"]
    assert command(Client("admin"), b"show jobs") == (
        b"H:test:10\t0\t0\t0\n# and 7 more in the persistent queue only\n.\n")


def test_pager_start_asks_for_first_pages_and_a_short_page_makes_the_queue_resident(clock):
    later = int(clock.time()) + 100
    rows = [stored_row(1, b"a"), stored_row(2, b"b"), stored_row(3, b"c", priority=HIGH),
            stored_row(4, b"d"), stored_row(5, b"e", b"g", LOW),
            stored_row(6, b"s1", when=later)]
    journal, queues, loop, store = make_pager(rows)
    pager = journal.pager
    pager.start(serving=False)
    f, g = queues.functions[b"f"], queues.functions[b"g"]
    assert [(r.method, r.arguments) for r in journal.requests] == [
        ("page", (b"f", HIGH, 0, 2000)), ("page", (b"f", NORMAL, 0, 2000)),
        ("page", (b"g", LOW, 0, 2000)), ("page_scheduled", ((-2 ** 63, 0), 5000)),
        ("probe", ())]
    assert f.spill.paging == [True, True, False] and pager.scheduled_paging
    assert not loop.accepting             # until the first pages are in
    turn(journal)
    assert loop.accepting
    assert (queued_numbers(f, HIGH), queued_numbers(f), queued_numbers(g, LOW)) == (
        [3], [1, 2, 4], [5])
    assert f.spill is None and g.spill is None and pager.spilled == 0
    assert pager.scheduled_cursor is None and pager.scheduled_stored == 0
    assert queues.scheduled == f.scheduled == 1
    job = queues.jobs[b"H:test:2"]
    assert (job.unique, job.row, job.queued, job.background) == (b"b", STORED, True, True)
    assert (f.total, f.queued(NORMAL), f.queued(HIGH)) == (5, 4, 1)
    check_counts(journal)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == [3, 1, 2, 4]
    clock.advance(100)
    loop.timers.run_due()
    assert grab_all(queues, journal, worker) == [6]
    assert store.table == {5: (b"e", b"g", LOW, b"", 0)} and f.total == 0


def test_pager_page_in_appends_in_seq_order_with_the_jobs_behind_merged_by_position(clock):
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"u%d" % seq) for seq in range(1, 41)], BUDGET)
    f = queues.functions[b"f"]
    client = Client("c")
    early = submit(queues, client, data=b"fg")       # a foreground job: no row
    assert early.number == 41 and list(f.spill.behind[NORMAL]) == [(41, early)]
    written = submit(queues, client, unique=b"bg", background=True)
    late = submit(queues, client, data=b"fg2")
    turn(journal)                         # written's row is stored: the store only
    assert written.handle not in queues.jobs and f.spill.stored[NORMAL] == 41
    assert [position for position, _ in f.spill.behind[NORMAL]] == [41, 43]
    assert f.queued(NORMAL) == f.total == 43
    journal.pager.start()
    turn(journal)
    assert store.calls[1:] == [("page", b"f", NORMAL, 0, 32)]
    assert queued_numbers(f) == list(range(1, 33)) and f.spill.cursor[NORMAL] == 32
    check_counts(journal)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 41)) + [41, 42, 43]
    assert store.calls[2:] == [("page", b"f", NORMAL, 32, 32)]   # when 15 were left
    assert f.spill is None and f.total == 0 and store.table == {}


def test_pager_a_full_page_that_brings_the_last_stored_job_makes_the_queue_resident():
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"u%d" % seq) for seq in range(1, 33)], BUDGET)
    f = queues.functions[b"f"]
    journal.pager.start()
    turn(journal)
    assert store.calls[1:] == [("page", b"f", NORMAL, 0, 32)]   # exactly the 32 stored
    assert queued_numbers(f) == list(range(1, 33)) and f.spill is None
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 33))
    check_counts(journal)
    client = Client("c")
    job = submit(queues, client, unique=b"new")
    assert loop.to(client) == [(JOB_CREATED, b"H:test:33")] and job.number == 33
    assert f.spill is None and journal.pager.spilled == 0


def test_pager_settle_spills_a_queue_over_budget_keeping_a_window_then_evicts(clock):
    journal, queues, loop, store = make_pager(budget=600 * 160)   # 160 jobs in memory
    pager = journal.pager
    client = Client("c")
    for n in range(160):
        submit(queues, client, unique=b"u%d" % n, background=True)
    turn(journal)
    f = queues.functions[b"f"]
    assert f.spill is None and len(f.queues[NORMAL]) == 160       # at the budget, not over
    over = submit(queues, client, unique=b"over", background=True)
    turn(journal)
    # 161 jobs: the queue keeps a window of 160 // 4 = 40 and leaves the rest in the store.
    assert queued_numbers(f) == list(range(1, 41)) and f.spill.cursor[NORMAL] == 40
    assert f.spill.stored == [0, 121, 0] and over.handle not in queues.jobs
    assert len(queues.jobs) == 40 and pager.spilled == 1
    assert (f.total, f.queued(NORMAL)) == (161, 161)
    assert ("INFO", "queue f (normal) spilled: 121 jobs in the store only, 40 in memory") in \
        pager.log.lines
    assert queues.coalesce(f, b"u100", b"") is None               # evicted: not indexed
    evicted = submit(queues, client, unique=b"next", background=True)
    turn(journal)                         # the queue is spilled: straight to the store
    assert evicted.handle not in queues.jobs and f.spill.stored[NORMAL] == 122
    assert loop.to(client)[-1] == (JOB_CREATED, evicted.handle)
    other = submit(queues, client, b"g", unique=b"g1", background=True)
    turn(journal)                         # another queue stays in memory...
    assert queues.jobs[other.handle] is other and queues.functions[b"g"].spill is None
    check_counts(journal)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 163))
    assert f.spill is None and pager.spilled == 0 and f.total == 0
    assert [page[3:] for page in store.calls if page[0] == "page"] == [
        (40, 32), (72, 32), (104, 32), (136, 32)]
    assert list(store.table) == [163]


def test_pager_spill_leaves_jobs_with_clients_or_out_of_order_in_memory_behind(clock):
    journal, queues, loop, store = make_pager(budget=600 * 160)
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    first = submit(queues, client, unique=b"first", background=True)
    turn(journal)
    assert queues.grab(worker) is first
    for n in range(120):
        submit(queues, client, unique=b"u%d" % n, background=True)
    turn(journal)
    waited = submit(queues, client, unique=b"waited", background=True)
    submit(queues, Client("fg"), unique=b"waited")                # a client waits for it
    turn(journal)
    fg = submit(queues, client, data=b"foreground")              # no row to page in from
    for n in range(37):
        submit(queues, client, unique=b"v%d" % n, background=True)
    turn(journal)
    queues.peer_left(worker)              # first goes back: to the end of the queue
    f = queues.functions[b"f"]
    assert f.spill is None and len(queues.jobs) == 160
    assert queued_numbers(f) == list(range(2, 161)) + [1]
    last = submit(queues, client, unique=b"last", background=True)
    turn(journal)                         # 161 in memory: spilled, window 160 // 4
    assert (waited.number, fg.number, last.number) == (122, 123, 161)
    assert queued_numbers(f) == list(range(2, 42))
    assert [(position, job.number) for position, job in f.spill.behind[NORMAL]] == [
        (121, 122), (121, 123), (160, 1)]
    assert f.spill.stored[NORMAL] == 161 - 40 - 3 and len(queues.jobs) == 43
    check_counts(journal)
    worker = Client("w2")
    queues.register(worker, b"f", 0)
    # 122 and 123 come where they were, before 124; 1 before 161, after 160.
    assert grab_all(queues, journal, worker) == list(range(2, 161)) + [1, 161]
    assert f.spill is None and f.total == 0 and store.table == {}


@pytest.mark.parametrize("spilled, budget, window", [
    (1, 600 * 1600, 200), (3, 600 * 1600, 100), (7, 600 * 1600, 50), (15, 600 * 1600, 32),
    (3, 0, 2000), (1, 600 * 100000, 2000),
])
def test_pager_windows_shrink_as_more_queues_are_spilled(spilled, budget, window):
    rows = [stored_row(n, b"u", b"f%d" % n) for n in range(1, spilled + 1)]
    journal, queues, loop, store = make_pager(rows, budget)
    assert journal.pager.spilled == spilled and journal.pager.window() == window
    journal.pager.start()
    assert {request.arguments[3] for request in journal.requests
            if request.method == "page"} == {window}


def test_pager_take_waits_for_a_higher_priority_being_paged_in():
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"h%d" % seq, priority=HIGH) for seq in (1, 2)])
    client, worker = Client("c"), Client("w")
    normal = submit(queues, client, data=b"normal")   # NORMAL is in memory
    f = queues.functions[b"f"]
    assert list(f.queues[NORMAL]) == [normal] and f.spill.stored == [2, 0, 0]
    queues.register(worker, b"f", 0)
    queues.sleep(worker)                  # nothing to hand out yet: no NOOP
    assert loop.to(worker) == [] and [r.method for r in journal.requests] == ["page"]
    assert queues.grab(worker) is None    # not the normal job, though it waits
    assert f.spill.paging[HIGH] and len(journal.requests) == 1   # asked once
    queues.sleep(worker)
    turn(journal)
    assert loop.to(worker) == [(NOOP, b"")]   # the page came in: a NOOP
    assert grab_all(queues, journal, worker) == [1, 2, normal.number]


def test_pager_requeue_into_a_spilled_queue_goes_behind_the_stored_jobs(clock):
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"u%d" % seq) for seq in range(1, 41)], BUDGET)
    journal.pager.start()
    turn(journal)
    f = queues.functions[b"f"]
    worker, client = Client("w"), Client("c")
    queues.register(worker, b"f", 0)
    job = queues.grab(worker)
    assert job.number == 1 and f.queued(NORMAL) == 39 and f.running == 1
    queues.peer_left(worker)              # it goes back, behind the 8 stored jobs
    assert job not in f.queues[NORMAL] and list(f.spill.behind[NORMAL]) == [(40, job)]
    assert job.retries == 1 and f.queued(NORMAL) == 40 and f.total == 40
    newer = submit(queues, client, unique=b"newer", background=True)
    turn(journal)
    assert f.spill.stored[NORMAL] == 9    # written after the requeue: after it
    check_counts(journal)
    worker = Client("w2")
    queues.register(worker, b"f", 0)
    taken = []
    while True:
        grabbed = queues.grab(worker)
        if grabbed is None:
            turn(journal)
            grabbed = queues.grab(worker)
            if grabbed is None:
                break
        taken.append(grabbed)
        queues.complete(grabbed, b"")
        turn(journal)
    assert [j.number for j in taken] == list(range(2, 41)) + [1, newer.number]
    assert taken[-2] is job               # the same job, not a copy from its row


def spilled_forty(**options):
    """f: 40 stored jobs u1..u40 (data d1..d40); after start, 1..32 are in memory."""
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"u%d" % seq, data=b"d%d" % seq) for seq in range(1, 41)], BUDGET,
        **options)
    journal.pager.start()
    turn(journal)
    f = queues.functions[b"f"]
    assert queued_numbers(f) == list(range(1, 33)) and f.spill.stored[NORMAL] == 8
    return journal, queues, loop, store, f


def test_pager_foreground_lookup_pins_the_stored_job_and_the_page_in_keeps_it(clock):
    journal, queues, loop, store, f = spilled_forty()
    client, other = Client("c"), Client("c2")
    queues.submit(client, b"f", b"u38", b"mine", NORMAL, False)
    assert client.paused and loop.to(client) == [] and queues.jobs.get(b"H:test:38") is None
    assert [(r.method, r.arguments) for r in journal.requests] == [("find", (b"f", b"u38"))]
    turn(journal)
    assert loop.to(client) == [(JOB_CREATED, b"H:test:38")]
    assert not client.paused and loop.resumed == [client]
    pinned = queues.jobs[b"H:test:38"]
    assert f.spill.pinned == {b"H:test:38": pinned} and pinned.clients == [client]
    assert (pinned.data, pinned.row, pinned.background) == (b"d38", STORED, True)
    assert pinned not in f.queues[NORMAL] and f.spill.stored[NORMAL] == 8   # still stored
    assert (f.total, f.queued(NORMAL)) == (40, 40)
    check_counts(journal)
    queues.submit(other, b"f", b"u38", b"", NORMAL, False)   # in memory now: no find
    assert loop.to(other) == [(JOB_CREATED, b"H:test:38")] and journal.requests == []
    queues.submit(other, b"f", b"nowhere", b"", NORMAL, False)
    turn(journal)                         # not stored: a new job, behind the stored ones
    created = queues.jobs[b"H:test:41"]
    assert loop.to(other)[-1] == (JOB_CREATED, b"H:test:41")
    assert list(f.spill.behind[NORMAL]) == [(41, created)]
    worker = Client("w")
    queues.register(worker, b"f", 0)
    taken = []
    for _ in range(41):
        job = queues.grab(worker)
        taken.append(job)
        queues.complete(job, job.handle + b"\0done")
        turn(journal)
        check_counts(journal)
    assert [job.number for job in taken] == list(range(1, 42))
    assert taken[37] is pinned and f.spill is None
    assert (WORK_COMPLETE, b"H:test:38\0done") in loop.to(client)
    assert (WORK_COMPLETE, b"H:test:38\0done") in loop.to(other)
    assert store.table == {} and f.total == 0


def test_pager_lookup_by_payload_for_unique_dash(clock):
    data = b"same payload"
    journal, queues, loop, store = make_pager(
        [stored_row(1, gearmand.payload_row_unique(data), data=data)])
    client = Client("c")
    queues.submit(client, b"f", b"-", data, NORMAL, False)
    assert [(r.method, r.arguments) for r in journal.requests] == [
        ("find", (b"f", gearmand.payload_row_unique(data)))]
    turn(journal)
    assert loop.to(client) == [(JOB_CREATED, b"H:test:1")]
    job = queues.jobs[b"H:test:1"]
    assert (job.unique, job.row_unique) == (b"-", gearmand.payload_row_unique(data))
    queues.submit(client, b"f", b"-", b"", NORMAL, False)    # no payload: nothing to find
    assert journal.requests == [] and loop.to(client)[-1] == (JOB_CREATED, b"H:test:2")


def test_pager_status_of_a_job_in_the_store_only(clock):
    journal, queues, loop, store, f = spilled_forty()
    client, answers = Client("c"), []

    def answer(peer, known):
        answers.append((peer, known))

    for asked, number in enumerate((39, 99)):
        journal.pager.status_of_stored(client, number, answer)
        assert client.paused and len(answers) == asked     # until the store answers
        turn(journal)
    assert answers == [(client, True), (client, False)] and not client.paused
    assert ("find_sequence", 39) in store.calls and f.total == 40


def test_pager_admin_cancel_of_a_pinned_job_and_of_a_stored_only_job(clock):
    journal, queues, loop, store, f = spilled_forty()
    command = make_admin(journal, loop)
    admin, client = Client("admin"), Client("c")
    queues.submit(client, b"f", b"u38", b"", NORMAL, False)
    turn(journal)
    assert command(admin, b"cancel job H:test:38") == b"OK\r\n"
    assert loop.to(client)[-1] == (WORK_FAIL, b"H:test:38")
    assert b"H:test:38" not in queues.jobs and f.spill.pinned == {}
    assert f.spill.cancelled == {38} and f.spill.stored[NORMAL] == 7
    assert (f.total, f.queued(NORMAL)) == (39, 39)
    assert command(admin, b"cancel job H:test:39") == b""        # the store answers later
    assert admin.paused
    turn(journal)
    assert loop.to(admin)[-1] == ("send", b"OK\r\n") and not admin.paused
    assert ("delete_sequence", 39) in store.calls and 39 not in store.table
    assert f.spill.cancelled == {38, 39} and f.spill.stored[NORMAL] == 6
    assert (f.total, f.queued(NORMAL)) == (38, 38)
    check_counts(journal)
    command(admin, b"cancel job H:test:99")
    turn(journal)
    assert loop.to(admin)[-1] == ("send", b"ERR UNKNOWN_JOB\r\n")
    assert command(admin, b"cancel job H:elsewhere:5") == b"ERR UNKNOWN_JOB\r\n"
    assert b"more in the persistent queue only" in command(admin, b"show jobs")
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 38)) + [40]
    assert f.spill is None and not store.table


def test_pager_a_page_read_before_a_pinned_job_was_cancelled_skips_its_row(clock):
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"u%d" % seq) for seq in range(1, 81)], BUDGET)
    journal.pager.start()
    turn(journal)
    f = queues.functions[b"f"]
    command = make_admin(journal, loop)
    client, worker = Client("c"), Client("w")
    queues.submit(client, b"f", b"u38", b"", NORMAL, False)
    turn(journal)
    queues.register(worker, b"f", 0)
    for _ in range(17):                   # down to 15 of 32: the next page is asked for
        queues.complete(queues.grab(worker), b"")
    assert [r.method for r in journal.requests] == ["page"]
    journal.end_turn()
    run_writer(journal)                   # the writer reads rows 33..64, 38 among them
    assert command(Client("admin"), b"cancel job H:test:38") == b"OK\r\n"
    assert f.spill.cancelled == {38} and f.spill.stored[NORMAL] == 47
    journal.collect()                     # then the loop takes the page in
    assert b"H:test:38" not in queues.jobs and f.spill.cancelled == set()
    assert queued_numbers(f) == list(range(18, 38)) + list(range(39, 65))
    assert f.spill.stored[NORMAL] == 16 and f.spill.cursor[NORMAL] == 64
    check_counts(journal)
    turn(journal)
    check_counts(journal)
    assert 38 not in store.table
    assert grab_all(queues, journal, worker) == list(range(18, 38)) + list(range(39, 81))


def test_pager_a_page_read_before_a_stored_only_job_was_cancelled_skips_its_row(clock):
    journal, queues, loop, store, f = spilled_forty()
    command = make_admin(journal, loop)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    for _ in range(17):
        queues.complete(queues.grab(worker), b"")
    page = journal.requests.pop()         # the page-in, read now but answered later
    page.run(store)
    assert [seq for seq, _, _ in page.result] == list(range(33, 41))
    command(Client("admin"), b"cancel job H:test:36")
    turn(journal)                         # the row is deleted, the counts lowered
    assert f.spill.cancelled == {36} and f.spill.stored[NORMAL] == 7 and f.total == 22
    page.answer(page.result)
    assert b"H:test:36" not in queues.jobs
    assert queued_numbers(f) == list(range(18, 36)) + list(range(37, 41))
    assert f.spill is None and f.total == 22
    check_counts(journal)


def test_pager_a_stored_only_cancel_of_a_job_paged_in_meanwhile_cancels_it_in_memory(clock):
    journal, queues, loop, store, f = spilled_forty()
    command = make_admin(journal, loop)
    admin, worker = Client("admin"), Client("w")
    queues.register(worker, b"f", 0)
    for _ in range(17):
        queues.complete(queues.grab(worker), b"")
    journal.end_turn()                    # the page-in goes to the writer first,
    command(admin, b"cancel job H:test:36")   # then the delete, alone
    turn(journal)
    assert loop.to(admin)[-1] == ("send", b"OK\r\n")
    job = queues.jobs[b"H:test:36"]       # paged in before the delete's answer came
    assert job.ignore and f.spill is None and f.total == 23
    assert grab_all(queues, journal, worker) == list(range(18, 36)) + list(range(37, 41))
    assert f.total == 0 and store.table == {}


def test_pager_drop_function_deletes_its_stored_jobs_and_ignores_pages_on_their_way(clock):
    later = int(clock.time()) + 60
    rows = [stored_row(seq, b"u%d" % seq) for seq in range(1, 41)] + [
        stored_row(41, b"s", when=later), stored_row(42, b"g1", b"g"),
        stored_row(43, b"g2", b"g", when=later)]
    journal, queues, loop, store = make_pager(rows, BUDGET)
    command = make_admin(journal, loop)
    pager = journal.pager
    client = Client("c")
    fg = submit(queues, client, data=b"waits")        # a foreground job of f, in memory
    pager.start()                         # pages of f and g, and of the epoch jobs, asked
    assert pager.spilled == 2 and pager.scheduled_stored == 2
    assert command(Client("admin"), b"drop function f") == b"OK\r\n"
    assert loop.to(client) == [(JOB_CREATED, fg.handle), (WORK_FAIL, fg.handle)]
    assert b"f" not in queues.functions and pager.spilled == 1 and pager.scheduled_stored == 1
    turn(journal)                         # the pages read before the delete come in
    assert ("delete_function", b"f") in store.calls
    assert sorted(store.table) == [42, 43]
    assert [job.number for job in queues.jobs.values()] == [42, 43]
    assert b"f" not in queues.functions and pager.stored_count() == 0
    g = queues.functions[b"g"]
    assert g.spill is None and g.total == 2 and pager.spilled == 0
    check_counts(journal)
    again = submit(queues, client, b"f", data=b"again")     # a new function f
    assert queues.functions[b"f"].spill is None and queues.functions[b"f"].total == 1
    assert again.number == 45


def test_pager_a_background_job_whose_key_a_stored_job_holds_joins_it(clock):
    journal, queues, loop, store, f = spilled_forty()
    client = Client("c")
    job = submit(queues, client, unique=b"u39", data=b"other", background=True)
    assert job.number == 41 and f.total == 41
    turn(journal)                         # the store says seq 39 holds (u39, f)
    assert loop.to(client) == [(JOB_CREATED, b"H:test:39")]
    assert b"H:test:41" not in queues.jobs and 41 not in store.table
    assert store.table[39] == (b"u39", b"f", NORMAL, b"d39", 0)
    assert (f.total, f.queued(NORMAL), f.spill.stored[NORMAL]) == (40, 40, 8)
    check_counts(journal)


def test_journal_a_write_retried_after_its_unseen_commit_keeps_the_job():
    # The connection died after COMMIT went through: the retried INSERT finds the
    # job's own row (its own seq) holding the key. That is no join: the job is stored
    # and queued, and its client hears its own handle.
    journal, queues, loop, store = make_pager()
    client, worker = Client("c"), Client("w")
    queues.register(worker, b"f", 0)
    job = submit(queues, client, unique=b"u", data=b"d", background=True)
    journal.end_turn()
    batch = journal.writer.batches.get_nowait()
    journal.batch_written(batch, set(), {job.number: job.number})
    assert loop.to(client) == [(JOB_CREATED, job.handle)]
    assert job.row == STORED and queues.jobs[job.handle] is job
    assert queues.grab(worker) is job


def test_pager_pages_epoch_jobs_in_by_when_then_seq(clock, monkeypatch):
    monkeypatch.setattr(gearmand.Pager, "scheduled_window", lambda self: 4)   # pages of 2
    t = int(clock.time())
    rows = [stored_row(1, b"a", when=t + 30), stored_row(2, b"b", when=t + 10),
            stored_row(3, b"c", when=t + 20), stored_row(4, b"d", when=t + 10),
            stored_row(5, b"e", when=t + 40)]
    journal, queues, loop, store = make_pager(rows)
    pager = journal.pager
    f = queues.functions[b"f"]
    assert (f.spill.scheduled, f.queued(NORMAL), f.total) == (5, 5, 5)
    pager.start()
    turn(journal)
    assert store.calls[1:] == [("page_scheduled", (-2 ** 63, 0), 2)]
    assert sorted(queues.jobs) == [b"H:test:2", b"H:test:4"]
    assert pager.scheduled_cursor == (t + 10, 4) and pager.scheduled_stored == 3
    assert (f.scheduled, queues.scheduled, f.spill.scheduled) == (2, 2, 3)
    assert (f.queued(NORMAL), f.total) == (5, 5)
    client = Client("c")
    later = submit(queues, client, unique=b"later", background=True, when=t + 35)
    sooner = submit(queues, client, unique=b"sooner", background=True, when=t + 5)
    turn(journal)
    # Due after the last one paged in: the store only. Before it: a timer in memory.
    assert later.handle not in queues.jobs and queues.jobs[sooner.handle] is sooner
    assert (f.spill.scheduled, pager.scheduled_stored, f.scheduled) == (4, 4, 3)
    assert (f.queued(NORMAL), f.total) == (7, 7)
    check_counts(journal)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    order = []
    for _ in range(8):
        clock.advance(5)
        loop.timers.run_due()             # fewer than half a window waits: a page-in
        turn(journal)
        check_counts(journal)
        order += grab_all(queues, journal, worker)
    assert order == [sooner.number, 2, 4, 3, 1, later.number, 5]
    # The third page brings the last two it counted: no fourth is asked for.
    assert [call[1:] for call in store.calls if call[0] == "page_scheduled"] == [
        ((-2 ** 63, 0), 2), ((t + 10, 4), 2), ((t + 30, 1), 2)]
    assert pager.scheduled_cursor is None and pager.scheduled_stored == 0
    assert f.spill is None and f.total == 0 and store.table == {}


def test_pager_keeps_epoch_jobs_due_after_a_full_window_in_the_store(clock, monkeypatch):
    monkeypatch.setattr(gearmand.Pager, "scheduled_window", lambda self: 4)
    t = int(clock.time())
    journal, queues, loop, store = make_pager()
    pager = journal.pager
    client = Client("c")
    jobs = [submit(queues, client, unique=b"e%d" % n, background=True, when=t + 10 + n)
            for n in range(1, 8)]
    turn(journal)
    # The fifth is one past the window: it is the cursor, and those due after it wait
    # in the store; one due sooner than the cursor still waits in memory.
    assert pager.scheduled_cursor == (t + 15, 5)
    assert [job.handle in queues.jobs for job in jobs] == [True] * 5 + [False] * 2
    f = queues.functions[b"f"]
    assert (f.scheduled, f.spill.scheduled, f.total, f.queued(NORMAL)) == (5, 2, 7, 7)
    sooner = submit(queues, client, unique=b"sooner", background=True, when=t + 1)
    turn(journal)
    assert queues.jobs[sooner.handle] is sooner and f.scheduled == 6
    check_counts(journal)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    order = []
    for _ in range(20):
        clock.advance(1)
        loop.timers.run_due()
        turn(journal)
        check_counts(journal)
        order += grab_all(queues, journal, worker)
    assert order == [sooner.number, 1, 2, 3, 4, 5, 6, 7]
    assert [call[1:] for call in store.calls if call[0] == "page_scheduled"] == [
        ((t + 15, 5), 2)]
    assert pager.scheduled_cursor is None and f.spill is None and store.table == {}


def test_pager_an_epoch_job_due_already_in_a_spilled_queue_still_runs(clock):
    journal, queues, loop, store, f = spilled_forty()
    client = Client("c")
    due = submit(queues, client, unique=b"due", background=True, when=int(clock.time()) - 5)
    turn(journal)
    assert (f.total, f.queued(NORMAL)) == (41, 41)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 41)) + [due.number]


def test_pager_an_epoch_job_that_fell_due_survives_a_spill(clock):
    journal, queues, loop, store = make_pager(budget=600 * 160)
    client = Client("c")
    for n in range(40):
        submit(queues, client, unique=b"u%d" % n, background=True)
    epoch = submit(queues, client, unique=b"epoch", background=True,
                   when=int(clock.time()) + 5)
    turn(journal)
    clock.advance(5)
    loop.timers.run_due()                 # due: at the end of the queue, number 41
    f = queues.functions[b"f"]
    assert queued_numbers(f)[-1] == epoch.number == 41
    for n in range(120):
        submit(queues, client, unique=b"v%d" % n, background=True)
    turn(journal)                         # 161 in memory: the queue spills
    # It has no place in the stored FIFO (its row is an epoch row): it waits behind.
    assert f.spill is not None and epoch.handle in queues.jobs
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert grab_all(queues, journal, worker) == list(range(1, 162))


def test_pager_a_foreground_job_in_the_window_does_not_lose_the_jobs_written_after_it(clock):
    journal, queues, loop, store = make_pager(budget=600 * 160)   # a first spill keeps 40
    client = Client("c")
    for n in range(10):
        submit(queues, client, unique=b"u%d" % n, background=True)
    turn(journal)
    for n in range(150):                  # being written...
        submit(queues, client, unique=b"v%d" % n, background=True)
    fg = submit(queues, Client("fg"), data=b"foreground")     # ...while this one queues
    f = queues.functions[b"f"]
    assert fg.number == 161 and queued_numbers(f) == list(range(1, 11)) + [161]
    turn(journal)                         # 161 jobs in memory: the queue spills
    assert f.spill is not None and (f.total, f.queued(NORMAL)) == (161, 161)
    worker = Client("w")
    queues.register(worker, b"f", 0)
    assert sorted(grab_all(queues, journal, worker)) == list(range(1, 162))


def test_pager_counts_stay_true_through_spill_page_in_run_and_completion(clock):
    journal, queues, loop, store = make_pager(
        [stored_row(seq, b"s%d" % seq, priority=(HIGH, NORMAL, LOW)[seq % 3])
         for seq in range(1, 91)], BUDGET)
    command = make_admin(journal, loop)
    admin = Client("admin")
    pager = journal.pager
    f = queues.functions[b"f"]

    def status():
        return command(admin, b"status"), command(admin, b"prioritystatus")

    assert status() == (b"f\t90\t0\t0\n.\n", b"f\t30\t30\t30\t0\n.\n")
    pager.start()
    turn(journal)
    assert status() == (b"f\t90\t0\t0\n.\n", b"f\t30\t30\t30\t0\n.\n")
    check_counts(journal)
    client, worker = Client("c"), Client("w")
    for n in range(300):                  # over budget: another spill
        submit(queues, client, unique=b"n%d" % n, background=True, priority=n % 3)
    turn(journal)
    check_counts(journal)
    submit(queues, client, data=b"foreground")
    check_counts(journal)
    assert status() == (b"f\t391\t0\t0\n.\n", b"f\t130\t131\t130\t0\n.\n")
    assert len(queues.jobs) <= 256 + 32
    queues.register(worker, b"f", 0)
    running = [queues.grab(worker) for _ in range(3)]
    turn(journal)
    assert status() == (b"f\t391\t3\t1\n.\n", b"f\t127\t131\t130\t1\n.\n")
    check_counts(journal)
    for job in running:
        queues.complete(job, b"")
    turn(journal)
    assert status() == (b"f\t388\t0\t1\n.\n", b"f\t127\t131\t130\t1\n.\n")
    done = grab_all(queues, journal, worker)
    assert len(done) == 388 and len(set(done)) == 388
    assert status() == (b"f\t0\t0\t1\n.\n", b"f\t0\t0\t0\t1\n.\n")
    assert f.spill is None and pager.spilled == 0 and store.table == {}


# --- parse_options ----------------------------------------------------------------------

@pytest.fixture
def no_port_env(monkeypatch):
    monkeypatch.delenv("GEARMAND_PORT", raising=False)


@pytest.mark.parametrize("argv", [
    ["-p", "4731"], ["-p4731"], ["--port=4731"], ["--port", "4731"],
])
def test_options_port_forms(no_port_env, argv):
    assert gearmand.parse_options(argv).port == "4731"


def test_options_defaults_and_c_forms(no_port_env):
    options = gearmand.parse_options(["-j3", "-w", "2", "-R", "-L", "127.0.0.1", "-L", "::1",
                                      "--verbose=INFO", "-q", "sqlite", "--sqlite-db", "q.db"])
    assert (options.port, options.job_retries, options.worker_wakeup, options.round_robin,
            options.listen, options.verbose, options.queue_type, options.sqlite_db) == (
        "4730", 3, 2, True, ["127.0.0.1", "::1"], "INFO", "sqlite", "q.db")
    assert options.job_handle_prefix.startswith("H:")
    assert options.sqlite_table == "gearman_queue" and options.hashtable_buckets == 991


def test_options_gearmand_port_environment(monkeypatch):
    monkeypatch.setenv("GEARMAND_PORT", "5999")
    assert gearmand.parse_options([]).port == "5999"
    assert gearmand.parse_options(["-p", "4731"]).port == "4731"


def test_options_config_file(no_port_env, tmp_path):
    config = tmp_path / "gearmand.conf"
    config.write_text("--port 4999\n-j 4   --verbose WARNING\n")
    options = gearmand.parse_options(["--config-file", str(config), "-p", "5000"])
    assert (options.port, options.job_retries, options.verbose) == ("5000", 4, "WARNING")
    assert gearmand.parse_options(["@" + str(config)]).port == "4999"


@pytest.mark.parametrize("queue_type", ["libdrizzle", "LibDrizzle"])
def test_options_libdrizzle_become_mysql_options(no_port_env, queue_type):
    options = gearmand.parse_options([
        "-q", queue_type, "--libdrizzle-host", "db.example", "--libdrizzle-port", "3307",
        "--libdrizzle-user", "u", "--libdrizzle-password", "pw", "--libdrizzle-db", "d",
        "--libdrizzle-table", "t", "--libdrizzle-mysql"])
    assert (options.mysql_host, options.mysql_port, options.mysql_user, options.mysql_password,
            options.mysql_db, options.mysql_table) == ("db.example", 3307, "u", "pw", "d", "t")
    socket_path = gearmand.parse_options(["-q", queue_type, "--libdrizzle-uds", "/run/m.sock"])
    assert socket_path.mysql_host == "/run/m.sock"
    defaults = gearmand.parse_options(["-q", queue_type])   # libdrizzle's own defaults
    assert (defaults.mysql_user, defaults.mysql_db, defaults.mysql_table) == (
        "root", "gearman", "queue")
    mysql = gearmand.parse_options(["-q", "mysql", "--libdrizzle-db", "ignored"])
    assert (mysql.mysql_db, mysql.mysql_table) == ("", "gearman_queue")


@pytest.mark.parametrize("argv, message", [
    (["-v"], "Option -v has been deprecated, please use --verbose"),
    (["--bogus"], "unrecognised option '--bogus'"),
    (["--por", "1"], "unrecognised option '--por'"),          # no abbreviations
    (["-p"], "argument -p/--port: expected one argument"),
    (["-j", "x"], "argument -j/--job-retries: invalid int value: 'x'"),
    (["--verbose", "LOUD"], "Invalid value for --verbose supplied"),
    (["--hashtable-buckets", "0"], "hashtable-buckets has to be greater than 0"),
    (["-r", "gear"], "Unknown protocol module : gear"),
    (["--job-handle-prefix", "x" * 64], "--job-handle-prefix must be shorter than 64 characters"),
    (["--max-output", "0"],
     "--max-packet-size, --max-input-buffer and --max-output must be positive"),
    (["--config-file", "/nonexistent/gearmand.conf"], "Could not open configuration file."),
])
def test_option_errors_are_one_line(no_port_env, argv, message):
    with pytest.raises(gearmand.OptionError) as raised:
        gearmand.parse_options(argv)
    assert str(raised.value) == message
