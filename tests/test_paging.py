"""Queues larger than memory: with a paging store (SQLite, MySQL, PostgreSQL) and a
small --queue-memory, a queue that grows spills its tail to the store and pages it
back in, and nothing a user sees changes: the order, the counts, coalescing, handles,
epoch times, cancel, drop, retries, restarts and kill -9. Each test runs on each
store, on a table of its own (MariaDB: root on 127.0.0.1:3306, database `test`;
PostgreSQL: 127.0.0.1:5432, trust, database `test`, user root).

The budget here is tiny (a few hundred jobs), so the same code paths run with
thousands of jobs that run with millions; bench/run.py --suite huge measures those.
"""
import random
import sqlite3
import time

import pytest

import gearproto as gp
from conftest import IMPL, wait_until
from storetools import (DATABASES, HIGH, LOW, NORMAL, SUBMIT_TYPES, need_c, priority_status,
                        status)

pytestmark = pytest.mark.skipif(IMPL == "c", reason="paging is ours: C loads every job")

BUDGET = ("--queue-memory", "64K")        # about a hundred jobs in memory


class SqliteStore:
    """A store for one test: `options` for ours and for C, rows() counts the table's rows."""
    name = "sqlite"

    def __init__(self, tmp_path):
        self.path = tmp_path / "q.db"
        self.options = ("-q", "libsqlite3", "--libsqlite3-db", str(self.path))

    def rows(self):
        with sqlite3.connect(self.path) as connection:
            return connection.execute("SELECT COUNT(*) FROM gearman_queue").fetchone()[0]


class SqlStore:
    """The same on a table of its own in one of storetools' DATABASES."""

    def __init__(self, database, table):
        self.name, self.database, self.table = database.name, database, table
        self.options = database.options(table)

    def rows(self):
        return self.database.count(self.table)


@pytest.fixture(params=["sqlite", *DATABASES])
def store(request, tmp_path):
    """A fresh table of each store. Tests name it before make_server, so that their
    servers are killed before the table is dropped."""
    if request.param == "sqlite":
        yield SqliteStore(tmp_path)
        return
    database = DATABASES[request.param]
    with database.tables("gqp_") as new_table:
        yield SqlStore(database, new_table())


def start(make_server, store, *args):
    return make_server(*store.options, *BUDGET, *args)


def pipeline(server, jobs, expect=gp.JOB_CREATED):
    """Submit (ptype, function, unique, data) packets in one go; the replies' payloads."""
    with server.connect() as sock:
        sock.sendall(b"".join(gp.pack(*job) for job in jobs))
        replies = [gp.recv(sock, 20) for _ in jobs]
    for job, (ptype, payload) in zip(jobs, replies):
        assert ptype == expect, f"{job}: {gp.show((ptype, payload))}"
    return [payload for _, payload in replies]


def grab(sock, timeout=20.0):
    """GRAB_JOB_UNIQ until a job comes (sleeping on NO_JOB): (handle, unique, data)."""
    deadline = time.monotonic() + timeout
    while True:
        ptype, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
        if ptype == gp.JOB_ASSIGN_UNIQ:
            handle, _, unique, data = body.split(b"\0", 3)
            return handle, unique, data
        assert ptype == gp.NO_JOB and time.monotonic() < deadline, gp.show((ptype, body))
        gp.send(sock, gp.PRE_SLEEP)
        assert gp.recv(sock, deadline - time.monotonic())[0] == gp.NOOP


def work(server, functions, count, timeout=30.0, fail=(), rest=0):
    """One worker runs `count` jobs of `functions` (WORK_FAIL for uniques in `fail`);
    returns [(handle, unique, data)] in the order it got them. With `rest` 0 it then
    checks that no other job is to be had."""
    ran = []
    deadline = time.monotonic() + timeout
    with server.connect() as sock:
        gp.can_do(sock, *functions)
        while len(ran) < count:
            ptype, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
            if ptype == gp.NO_JOB:
                assert time.monotonic() < deadline, f"only {len(ran)} of {count} ran"
                gp.send(sock, gp.PRE_SLEEP)
                assert gp.recv(sock, deadline - time.monotonic())[0] == gp.NOOP
                continue
            assert ptype == gp.JOB_ASSIGN_UNIQ, gp.show((ptype, body))
            handle, _, unique, data = body.split(b"\0", 3)
            ran.append((handle, unique, data))
            gp.send(sock, gp.WORK_FAIL if unique in fail else gp.WORK_COMPLETE, handle,
                    *(() if unique in fail else (b"",)))
        if not rest:
            assert gp.call(sock, gp.GRAB_JOB_UNIQ)[0] == gp.NO_JOB
    return ran


def mixed_jobs(function, count, seed, start=0):
    """(ptype, function, unique, data) of `count` background jobs of random priorities,
    and their (unique, data) in the order a worker must get them."""
    rnd = random.Random(seed)
    jobs = []
    for number in range(start, start + count):
        priority = rnd.choice([HIGH, NORMAL, NORMAL, NORMAL, LOW])
        jobs.append((SUBMIT_TYPES[priority], function, b"u%d" % number, b"d%d" % number))
    return jobs


def in_order(jobs):
    rank = {gp.SUBMIT_JOB_HIGH_BG: 0, gp.SUBMIT_JOB_BG: 1, gp.SUBMIT_JOB_LOW_BG: 2}
    return [(unique, data) for _, _, unique, data in sorted(jobs, key=lambda job: rank[job[0]])]


def expected_counts(jobs):
    counts = [0, 0, 0]
    rank = {gp.SUBMIT_JOB_HIGH_BG: 0, gp.SUBMIT_JOB_BG: 1, gp.SUBMIT_JOB_LOW_BG: 2}
    for job in jobs:
        counts[rank[job[0]]] += 1
    return tuple(counts)


def spilled(server):
    """How many jobs `show jobs` says are in the store only."""
    for line in server.admin("show jobs").split(b"\n"):
        if line.startswith(b"# and "):
            return int(line.split()[2])
    return 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spilled_queue_keeps_priority_and_fifo_order(store, make_server, seed):
    server = start(make_server, store)
    jobs = mixed_jobs(b"f", 2500, seed)
    pipeline(server, jobs)
    assert spilled(server) > 2000              # most of them are in the store only
    assert priority_status(server)[b"f"][:3] == expected_counts(jobs)
    assert status(server)[b"f"] == (2500, 0, 0)
    ran = work(server, [b"f"], len(jobs))
    assert [(unique, data) for _, unique, data in ran] == in_order(jobs)
    assert status(server)[b"f"] == (0, 0, 0)
    server.stop()
    assert store.rows() == 0


def test_jobs_submitted_while_draining_a_spilled_queue_come_after_the_stored_ones(
        store, make_server):
    server = start(make_server, store)
    first = [(gp.SUBMIT_JOB_BG, b"f", b"a%d" % n, b"") for n in range(1500)]
    second = [(gp.SUBMIT_JOB_BG, b"f", b"b%d" % n, b"") for n in range(500)]
    pipeline(server, first)
    ran = work(server, [b"f"], 700, rest=800)
    pipeline(server, second)                  # while 800 of the first are still queued
    ran += work(server, [b"f"], 1300)
    assert [unique for _, unique, _ in ran] == [job[2] for job in first + second]


def test_restart_counts_at_once_and_pages_in_in_order(store, make_server):
    server = start(make_server, store)
    jobs = mixed_jobs(b"f", 3000, 7) + mixed_jobs(b"g", 500, 8, start=3000)
    handles = pipeline(server, jobs)
    server.kill()
    server.start()
    assert priority_status(server)[b"f"][:3] == expected_counts(jobs[:3000])
    assert priority_status(server)[b"g"][:3] == expected_counts(jobs[3000:])
    assert spilled(server) > 3000 - 200       # not loaded: only the first pages are in memory
    ran = work(server, [b"g", b"f"], len(jobs))
    want = in_order(jobs[:3000]) + in_order(jobs[3000:])   # newest registration first
    assert [(unique, data) for _, unique, data in ran] == want
    # A stored job's handle is the one its client got, however it was paged in.
    by_unique = dict(zip((job[2] for job in jobs), handles))
    assert all(handle == by_unique[unique] for handle, unique, _ in ran)


def test_functions_whose_names_differ_in_case_stay_apart_after_a_restart(store, make_server):
    """MySQL's columns compare `case` and `CASE` equal: counts and pages still tell
    the two functions apart, as the protocol does."""
    server = start(make_server, store)
    lower = [(gp.SUBMIT_JOB_BG, b"case", b"l%d" % n, b"") for n in range(300)]
    upper = [(gp.SUBMIT_JOB_BG if n % 2 else gp.SUBMIT_JOB_LOW_BG, b"CASE", b"u%d" % n, b"")
             for n in range(200)]
    pipeline(server, lower + upper)
    server.kill()
    server.start()
    assert priority_status(server)[b"case"][:3] == (0, 300, 0)
    assert priority_status(server)[b"CASE"][:3] == (0, 100, 100)
    assert [unique for _, unique, _ in work(server, [b"CASE"], 200)] == \
        [unique for unique, _ in in_order(upper)]
    assert [unique for _, unique, _ in work(server, [b"case"], 300)] == [job[2] for job in lower]


def test_new_handles_after_a_restart_do_not_repeat_stored_ones(store, make_server):
    server = start(make_server, store)
    before = pipeline(server, mixed_jobs(b"f", 400, 1))
    server.kill()
    server.start()
    after = pipeline(server, mixed_jobs(b"f", 400, 2, start=400))
    assert not set(before) & set(after)


def test_background_submission_joins_a_job_that_is_in_the_store_only(store, make_server):
    server = start(make_server, store)
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"d%d" % n) for n in range(2000)]
    handles = pipeline(server, jobs)
    assert spilled(server) > 1500
    # u1900 is far down, in the store only: the new job joins it, whatever its data.
    again = pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"u1900", b"other data"),
                              (gp.SUBMIT_JOB_LOW_BG, b"f", b"u1901", b"")])
    assert again == [handles[1900], handles[1901]]
    assert status(server)[b"f"][0] == 2000
    ran = work(server, [b"f"], 2000)
    assert [unique for _, unique, _ in ran] == [job[2] for job in jobs]
    assert dict((unique, data) for _, unique, data in ran)[b"u1900"] == b"d1900"
    server.stop()
    assert store.rows() == 0


def test_foreground_submission_joins_a_stored_job_and_gets_its_result(store, make_server):
    server = start(make_server, store)
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"d%d" % n) for n in range(1500)]
    handles = pipeline(server, jobs)
    with server.connect() as client, server.connect() as worker:
        created = gp.call(client, gp.SUBMIT_JOB, b"f", b"u1400", b"x")
        assert created == (gp.JOB_CREATED, handles[1400])
        assert status(server)[b"f"][0] == 1500
        gp.can_do(worker, b"f")
        order = []
        while len(order) < 1500:
            handle, unique, data = grab(worker)
            order.append(unique)
            gp.send(worker, gp.WORK_COMPLETE, handle, data.upper())
        assert order == [job[2] for job in jobs]     # it ran once, in its place
        assert gp.recv(client) == (gp.WORK_COMPLETE, handles[1400] + b"\0D1400")


def test_unique_dash_joins_a_stored_job_with_the_same_payload(store, make_server):
    server = start(make_server, store)
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"-", b"payload %d" % n) for n in range(1200)]
    handles = pipeline(server, jobs)
    assert spilled(server) > 1000
    assert pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"-", b"payload 1100")]) == [handles[1100]]
    with server.connect() as client:
        assert gp.call(client, gp.SUBMIT_JOB, b"f", b"-", b"payload 1150") == \
            (gp.JOB_CREATED, handles[1150])
    assert status(server)[b"f"][0] == 1200
    ran = work(server, [b"f"], 1200)
    assert [data for _, _, data in ran] == [job[3] for job in jobs]


def test_joins_race_with_a_page_in_of_the_same_job(store, make_server):
    """The worker's grab asks for the next page, and in the same read a background
    and a foreground submission name a job of that page: each joins it once."""
    server = start(make_server, store)
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"d%d" % n) for n in range(1000)]
    handles = pipeline(server, jobs)
    with server.connect() as worker, server.connect() as client:
        gp.can_do(worker, b"f")
        taken = []
        for _ in range(40):                   # the window is mostly gone: a page-in is due
            handle, unique, _ = grab(worker)
            taken.append(unique)
            gp.send(worker, gp.WORK_COMPLETE, handle, b"")
        next_unique = b"u%d" % (len(taken) + 30)
        worker.sendall(gp.pack(gp.GRAB_JOB_UNIQ))
        client.sendall(gp.pack(gp.SUBMIT_JOB_BG, b"f", next_unique, b"")
                       + gp.pack(gp.SUBMIT_JOB, b"f", next_unique, b""))
        index = int(next_unique[1:])
        assert gp.recv(client) == (gp.JOB_CREATED, handles[index])
        assert gp.recv(client) == (gp.JOB_CREATED, handles[index])
        ptype, body = gp.recv(worker)
        if ptype == gp.NO_JOB:                 # the page was not in yet
            handle, unique, _ = grab(worker)
        else:
            handle, _, unique, _ = body.split(b"\0", 3)
        gp.send(worker, gp.WORK_COMPLETE, handle, b"")
        taken.append(unique)
    ran = work(server, [b"f"], 1000 - len(taken))
    assert taken + [unique for _, unique, _ in ran] == [job[2] for job in jobs]


def test_get_status_knows_stored_and_paged_in_jobs(store, make_server):
    server = start(make_server, store)
    handles = pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"") for n in range(1000)])
    with server.connect() as sock:
        assert gp.call(sock, gp.GET_STATUS, handles[900]) == \
            (gp.STATUS_RES, handles[900] + b"\x001\x000\x000\x000")
        unknown = handles[-1][:handles[-1].rindex(b":") + 1] + b"99999"
        assert gp.call(sock, gp.GET_STATUS, unknown) == \
            (gp.STATUS_RES, unknown + b"\x000\x000\x000\x000")
        work(server, [b"f"], 880, rest=120)     # now it is paged in
        assert gp.call(sock, gp.GET_STATUS, handles[900]) == \
            (gp.STATUS_RES, handles[900] + b"\x001\x000\x000\x000")
        work(server, [b"f"], 120)
        assert gp.call(sock, gp.GET_STATUS, handles[900]) == \
            (gp.STATUS_RES, handles[900] + b"\x000\x000\x000\x000")


def test_epoch_jobs_far_down_a_spilled_queue_run_when_due(store, make_server):
    server = start(make_server, store)
    pipeline(server, [(gp.SUBMIT_JOB_BG, b"busy", b"u%d" % n, b"") for n in range(1500)])
    now = int(time.time())
    due = {b"e%d" % n: now + 3 + n % 3 for n in range(300)}
    pipeline(server, [(gp.SUBMIT_JOB_EPOCH, b"later", unique, str(when).encode(), b"")
                      for unique, when in due.items()])
    assert spilled(server) > 1400 + 50         # epoch jobs due last are in the store only
    assert priority_status(server)[b"later"][:3] == (0, 300, 0)
    server.kill()                              # and a restart on the way
    server.start()
    assert priority_status(server)[b"later"][:3] == (0, 300, 0)
    ran = {}
    with server.connect() as sock:
        gp.can_do(sock, b"later")
        deadline = time.monotonic() + 20
        while len(ran) < 300:
            ptype, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
            if ptype == gp.NO_JOB:
                assert time.monotonic() < deadline, f"{len(ran)} of 300 epoch jobs ran"
                time.sleep(0.05)
                continue
            handle, _, unique, _ = body.split(b"\0", 3)
            ran[unique] = time.time()
            gp.send(sock, gp.WORK_COMPLETE, handle, b"")
    assert set(ran) == set(due)
    early = {u: round(due[u] - at, 2) for u, at in ran.items() if at < due[u] - 0.05}
    late = {u: round(at - due[u], 2) for u, at in ran.items() if at > due[u] + 1.0}
    assert not early and not late, (early, late)


def test_cancel_of_a_stored_job_and_drop_of_a_spilled_function(store, make_server):
    server = start(make_server, store, "--admin-allow", "any")
    handles = pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"") for n in range(1000)])
    pipeline(server, [(gp.SUBMIT_JOB_BG, b"gone", b"g%d" % n, b"") for n in range(1000)])
    assert server.admin("cancel job " + handles[950].decode()) == b"OK\r\n"
    assert server.admin("cancel job " + handles[950].decode()) == b"ERR UNKNOWN_JOB\r\n"
    assert status(server)[b"f"][0] == 999
    assert server.admin("drop function gone") == b"OK\r\n"
    assert b"gone" not in status(server)
    ran = work(server, [b"f", b"gone"], 999)
    assert b"u950" not in [unique for _, unique, _ in ran]
    server.stop()
    assert store.rows() == 0


def test_worker_deaths_requeue_at_the_back_of_a_spilled_queue(store, make_server):
    server = start(make_server, store, "-j", "2")
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"") for n in range(1000)]
    pipeline(server, jobs)
    for _ in range(2):                          # u0 and u1's workers die; u0's twice
        with server.connect() as worker:
            gp.can_do(worker, b"f")
            assert gp.call(worker, gp.GRAB_JOB_UNIQ)[1].split(b"\0")[2] in (b"u0", b"u1")
    wait_until(lambda: status(server)[b"f"][1] == 0, what="the dead workers' jobs requeued")
    pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"late", b"")])
    ran = [unique for _, unique, _ in work(server, [b"f"], 1001)]
    # Each went back to the end of the queue as it was then, before `late`.
    assert ran == [b"u%d" % n for n in range(2, 1000)] + [b"u0", b"u1", b"late"]
    with server.connect() as worker:
        gp.can_do(worker, b"f")
        for _ in range(2):
            pipeline(server, [(gp.SUBMIT_JOB_BG, b"f", b"doomed", b"")])
            with server.connect() as dying:
                gp.can_do(dying, b"f")
                gp.call(dying, gp.GRAB_JOB_UNIQ)
            wait_until(lambda: status(server)[b"f"][1] == 0, what="requeue")
        assert status(server)[b"f"][0] == 0      # dropped after -j 2 tries
    server.stop()
    assert store.rows() == 0


def test_kill_9_during_page_ins_loses_nothing_and_keeps_order(store, make_server):
    server = start(make_server, store)
    jobs = [(gp.SUBMIT_JOB_BG, b"f", b"u%05d" % n, b"") for n in range(4000)]
    pipeline(server, jobs)
    seen = []
    rnd = random.Random(5)
    for _ in range(6):
        segment = []
        with server.connect() as worker:
            gp.can_do(worker, b"f")
            stop_at = time.monotonic() + rnd.uniform(0.05, 0.3)
            while time.monotonic() < stop_at:
                ptype, body = gp.call(worker, gp.GRAB_JOB_UNIQ)
                if ptype != gp.JOB_ASSIGN_UNIQ:
                    break
                segment.append(body.split(b"\0")[2])
                worker.sendall(gp.pack(gp.WORK_COMPLETE, body.split(b"\0")[0], b""))
            server.kill()                      # mid-drain, page-ins on their way
        assert segment == sorted(segment)      # FIFO within a run
        seen += segment
        server.start()
    seen += [unique for _, unique, _ in work(server, [b"f"], status(server)[b"f"][0])]
    # Every job ran; a job ran twice only if its delete had not been committed at a kill.
    assert set(seen) == {job[2] for job in jobs}
    assert len(seen) - len(set(seen)) < 6 * 200


def no_unique_jobs(function, count, start=0):
    """Background jobs with an empty unique and with unique '-': ours are stored
    under generated uniques, which C replays as ordinary ones."""
    return [(gp.SUBMIT_JOB_BG, function, b"", b"no unique %d" % n)
            for n in range(start, start + count)] + \
        [(gp.SUBMIT_JOB_LOW_BG, function, b"-", b"dash %d" % n)
         for n in range(start, start + count)]


def test_c_gearmand_replays_a_spilled_store_of_ours(store, make_server):
    need_c()
    server = start(make_server, store)
    jobs = mixed_jobs(b"f", 1500, 4) + no_unique_jobs(b"f", 5)
    pipeline(server, jobs)
    assert spilled(server) > 1200
    server.kill()
    c_server = make_server(*store.options, impl="c")
    # C 1.1.20 replays every Postgres job as HIGH (it reads the priority wrongly).
    assert priority_status(c_server)[b"f"][:3] == (
        (len(jobs), 0, 0) if store.name == "postgres" else expected_counts(jobs))
    ran = work(c_server, [b"f"], len(jobs))
    assert sorted(data for _, _, data in ran) == sorted(job[3] for job in jobs)
    wait_until(lambda: store.rows() == 0, 5, what="C to delete the rows of its done jobs")


def test_c_and_we_take_turns_on_one_table_in_insertion_order(store, make_server):
    """C makes the table and queues jobs; we start on it (MySQL and PostgreSQL tables
    get their seq column now, C's rows numbered in insertion order), queue more,
    spill and are killed; C replays them all and queues more, after ours; we start
    again, and a worker gets every job in priority order, then insertion order."""
    need_c()
    c_server = make_server(*store.options, impl="c")
    first = mixed_jobs(b"f", 300, 11)
    pipeline(c_server, first)
    c_server.kill()

    server = start(make_server, store)
    assert status(server)[b"f"][0] == 300
    second = mixed_jobs(b"f", 600, 12, start=300) + no_unique_jobs(b"f", 3)
    pipeline(server, second)
    assert spilled(server) > 700
    server.kill()

    c_server = make_server(*store.options, impl="c")
    assert status(c_server)[b"f"][0] == 906
    third = mixed_jobs(b"f", 300, 13, start=1000)
    pipeline(c_server, third)
    c_server.kill()

    server.start()
    assert status(server)[b"f"][0] == 1206
    assert spilled(server) > 1000
    ran = work(server, [b"f"], 1206)
    assert [(unique, data) for _, unique, data in ran] == in_order(first + second + third)
