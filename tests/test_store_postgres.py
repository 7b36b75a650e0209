"""-q Postgres against a real PostgreSQL (127.0.0.1:5432, trust, database `test`,
user root), and cross-replay with C gearmand 1.1.20."""
import contextlib
import os
import secrets
import shutil
import subprocess
import time

import pytest

pytest.register_assert_rewrite("storetools")

import gearproto as gp  # noqa: E402
from conftest import C_GEARMAND, IMPL, free_port, unavailable  # noqa: E402
from storetools import (HIGH, LOW, Job, check_replay, drain, foreground,  # noqa: E402
                        priority_status, sample_jobs, submit_all, submit_ok, submit_one, wait_until)

try:
    import psycopg2
except ImportError:               # pragma: no cover
    psycopg2 = None

CONNINFO = "host=127.0.0.1 port=5432 dbname=test user=root"
QUEUE_ERROR = (gp.ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")


def query(sql, params=()):
    connection = psycopg2.connect(CONNINFO, connect_timeout=2)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


@pytest.fixture
def table():
    if psycopg2 is None:
        unavailable("psycopg2 is not installed")
    try:
        query("SELECT 1")
    except psycopg2.Error as error:
        unavailable(f"PostgreSQL is not reachable ({CONNINFO}): {error}")
    name = "gq_" + secrets.token_hex(4)
    yield name
    ensure_postgres_running()
    query(f"DROP TABLE IF EXISTS {name}")


def options(table, conninfo=CONNINFO):
    return ("-q", "Postgres", "--libpq-conninfo", conninfo, "--libpq-table", table)


def rows(table):
    """The table's rows as {(unique, function): (priority, data, when_to_run)}."""
    return {(u.encode(), f.encode()): (p, None if d is None else bytes(d), w)
            for u, f, p, d, w in query(f"SELECT unique_key, function_name, priority, data,"
                                       f" when_to_run FROM {table}")}


def prefix():
    return "gq" + secrets.token_hex(3)


# -- PostgreSQL outages -----------------------------------------------------------

def pg_ctlcluster(action):
    versions = os.listdir("/etc/postgresql")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", action],
                   check=True, capture_output=True, timeout=60)


def postgres_up():
    try:
        query("SELECT 1")
        return True
    except psycopg2.Error:
        return False


def ensure_postgres_running():
    if not postgres_up():
        pg_ctlcluster("start")
        wait_until(postgres_up, 60, 0.1, "PostgreSQL to accept connections")


@contextlib.contextmanager
def postgres_stopped():
    if (not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql")
            or os.geteuid() != 0):
        unavailable("cannot stop and restart PostgreSQL here (needs root and pg_ctlcluster)")
    try:
        pg_ctlcluster("stop")
        assert not postgres_up()
        yield
    finally:
        ensure_postgres_running()


# -- tests ------------------------------------------------------------------------

def test_background_jobs_survive_kill_and_replay_exactly_once(make_server, table):
    if IMPL == "c":
        pytest.skip("fixed on purpose: C replays every Postgres job as HIGH, due now")
    server = make_server(*options(table))
    epoch_at = int(time.time()) + 4
    jobs = sample_jobs(prefix(), epoch_at)
    submit_ok(server, jobs)

    # Each job is in the table before its JOB_CREATED, with C's columns and values.
    stored = rows(table)
    assert len(stored) == len(jobs)
    for job in jobs:
        if job.unique in (b"", b"-"):
            continue                     # stored under generated uniques
        assert stored[job.unique, job.function] == (job.priority, job.data, job.when)
    assert query("SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass"
                 " AND contype = 'u'", (table,)) == [(1,)]

    server.kill()
    server.start()
    check_replay(server, jobs)           # unlike C, priorities and epoch times survive
    wait_until(lambda: not rows(table), 5, message="done jobs deleted from the table")


def test_cancel_quotes_and_leftover_row(make_server, table):
    if IMPL == "c":
        pytest.skip("fixed on purpose: C's DELETE fails on a quote; C refuses a leftover key")
    server = make_server(*options(table))
    function = prefix().encode()
    handle, = submit_ok(server, [Job(function, b"it's \\ me", b"x")])
    assert (b"it's \\ me", function) in rows(table)
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    wait_until(lambda: not rows(table), 5, message="cancelled job's row deleted")

    # A row left over from an earlier run does not refuse a new job with its key.
    query(f"INSERT INTO {table} VALUES ('left', %s, 2, 'old', 0)", (function.decode(),))
    submit_ok(server, [Job(function, b"left", b"new", HIGH), Job(function, b"LEFT", b"other")])
    assert rows(table)[b"left", function] == (HIGH, b"new", 0)
    assert sorted(drain(server, [function], 2)) == [(function, b"LEFT", b"other"),
                                                    (function, b"left", b"new")]
    wait_until(lambda: not rows(table), 5, message="done jobs' rows deleted")


def test_refused_writes_answer_queue_error(make_server, table):
    server = make_server(*options(table))
    function = prefix().encode()
    long_name = b"f" * 300               # longer than VARCHAR(255)
    replies = submit_all(server, [Job(function, b"a", b"1"), Job(long_name, b"b", b"2"),
                                  Job(function, b"c", b"3")])
    assert [r[0] for r in replies] == [gp.JOB_CREATED, gp.ERROR, gp.JOB_CREATED]
    assert replies[1] == QUEUE_ERROR
    assert set(rows(table)) == {(b"a", function), (b"c", function)}
    assert server.status().get("f" * 300, (0,))[0] == 0

    # Without its table the store can write nothing; the rest keeps working.
    query(f"DROP TABLE {table}")
    assert submit_one(server, Job(function, b"d", b"4")) == QUEUE_ERROR
    assert foreground(server, function + b".fg", b"abc") == b"cba"
    if IMPL == "c":
        return      # C closes a worker whose WORK_COMPLETE cannot delete the row
    assert sorted(drain(server, [function], 2)) == [(function, b"a", b"1"), (function, b"c", b"3")]


def test_c_writes_and_we_replay(make_server, table):
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed")
    # C refuses a second empty-unique job of a function (duplicate key), so one only.
    jobs = sample_jobs(prefix(), int(time.time()) + 4, empty_uniques=1)
    c_server = make_server(*options(table), impl="c")
    submit_ok(c_server, jobs)
    assert len(rows(table)) == len(jobs)
    c_server.kill()
    server = make_server(*options(table), impl="py")
    check_replay(server, jobs)           # C stored priority and when_to_run correctly
    wait_until(lambda: not rows(table), 5, message="done jobs deleted from the table")


def test_we_write_and_c_replays(make_server, table):
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed")
    jobs = sample_jobs(prefix(), int(time.time()) + 30)
    server = make_server(*options(table), impl="py")
    submit_ok(server, jobs)
    server.kill()
    # C replays our generated uniques (for empty and `-` uniques) as ordinary ones.
    generated = {data: unique for (unique, _), (_, data, _) in rows(table).items()}
    c_server = make_server(*options(table), impl="c")
    # C 1.1.20 reads priority and when_to_run wrongly: every job comes back HIGH, due now.
    assert {f: row[:3] for f, row in priority_status(c_server).items()} == {
        job.function: (sum(j.function == job.function for j in jobs), 0, 0) for job in jobs}
    check_replay(c_server, [job._replace(unique=generated[job.data])
                            if job.unique in (b"", b"-") else job for job in jobs],
                 priorities=False, epoch_waits=False)
    wait_until(lambda: not rows(table), 5, message="done jobs deleted by C")


def test_backend_outage(make_server, table):
    if IMPL == "c":
        pytest.skip("C closes a worker whose WORK_COMPLETE cannot delete the row")
    server = make_server(*options(table))
    function = prefix().encode()
    submit_ok(server, [Job(function, b"before1", b"1"), Job(function, b"before2", b"2")])

    with postgres_stopped():
        started = time.monotonic()
        assert submit_one(server, Job(function, b"during", b"x")) == QUEUE_ERROR
        assert submit_one(server, Job(function, b"during2", b"y", LOW)) == QUEUE_ERROR
        assert time.monotonic() - started < 3, "the store blocked while PostgreSQL was down"
        assert foreground(server, function + b".fg", b"abc") == b"cba"
        # Queued work is still handed out; its delete waits for PostgreSQL.
        with server.connect() as worker:
            gp.can_do(worker, function)
            ptype, body = gp.call(worker, gp.GRAB_JOB_UNIQ)
            assert ptype == gp.JOB_ASSIGN_UNIQ
            handle, _, unique, _ = body.split(b"\0", 3)
            assert unique == b"before1"
            gp.send(worker, gp.WORK_COMPLETE, handle, b"")
            gp.sync(worker)
        assert server.status()[function.decode()][0] == 1

    # Back up: submissions succeed again by themselves, and the delete is retried.
    attempt = iter(range(10 ** 6))

    def submitted():
        unique = b"after%d" % next(attempt)
        reply = submit_one(server, Job(function, unique, unique))
        return unique if reply[0] == gp.JOB_CREATED else None

    after = wait_until(submitted, 20, 0.1, "a background submission to succeed again")
    wait_until(lambda: set(rows(table)) == {(b"before2", function), (after, function)}, 10,
               message="the failed delete to be retried")

    # Nothing acknowledged was lost.
    server.kill()
    server.start()
    assert sorted(drain(server, [function], 2)) == [(function, after, after),
                                                    (function, b"before2", b"2")]


def test_lost_connection_is_replaced_at_once(make_server, table):
    """A connection the server dropped (terminated, restart) costs no ERROR."""
    if IMPL == "c":
        pytest.skip("fixed on purpose: C never reconnects to PostgreSQL, every later "
                    "background job gets QUEUE_ERROR until it is restarted")
    server = make_server(*options(table))
    function = prefix().encode()
    submit_ok(server, [Job(function, b"one", b"1")])
    assert query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'test'"
                 " AND backend_type = 'client backend' AND pid != pg_backend_pid()")
    submit_ok(server, [Job(function, b"two", b"2")])
    assert set(rows(table)) == {(b"one", function), (b"two", function)}


def test_bad_settings_exit_1(make_server, table):
    closed_port = free_port()            # nothing listens there
    for conninfo in (f"host=127.0.0.1 port={closed_port} dbname=test user=root",
                     "host=127.0.0.1 dbname=no_such_db_here user=root",
                     "host=127.0.0.1 nonsense"):
        server = make_server(*options(table, conninfo), start=False)
        started = time.monotonic()
        server.start(expect_ready=False)
        assert server.proc.wait(15) == 1, server.log()
        assert time.monotonic() - started < 10
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert IMPL == "c" or len(lines) == 1 and "Postgres" in lines[0], server.log()
