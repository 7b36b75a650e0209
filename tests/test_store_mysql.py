"""-q MySQL against a real MariaDB (root, no password, database `test`, on the
local socket and 127.0.0.1:3306), and cross-replay with C gearmand 1.1.20."""
import contextlib
import os
import secrets
import signal
import subprocess
import time

import pytest

pytest.register_assert_rewrite("storetools")

import gearproto as gp  # noqa: E402
from conftest import C_GEARMAND, IMPL, free_port, unavailable  # noqa: E402
from storetools import (HIGH, LOW, Job, check_replay, drain, foreground,  # noqa: E402
                        sample_jobs, submit_all, submit_ok, submit_one, wait_until)

try:
    import mysql.connector as mysql_connector
except ImportError:               # pragma: no cover
    mysql_connector = None

MARIADBD = "/usr/sbin/mariadbd"
PID_FILE = "/run/mysqld/mysqld.pid"
QUEUE_ERROR = (gp.ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")
# C refuses a second empty-unique job of a function (duplicate key); we keep both.
EMPTY_UNIQUES = 1 if IMPL == "c" else 2


def connect_db():
    return mysql_connector.connect(host="127.0.0.1", port=3306, user="root", database="test",
                                   autocommit=True, use_unicode=False, connection_timeout=2)


def query(sql, params=()):
    connection = connect_db()
    try:
        cursor = connection.cursor()
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.with_rows else None
    finally:
        connection.close()


@pytest.fixture
def table():
    if mysql_connector is None:
        unavailable("mysql-connector-python is not installed")
    try:
        connect_db().close()
    except mysql_connector.Error as error:
        unavailable(f"MariaDB is not reachable on 127.0.0.1:3306: {error}")
    name = "gq_" + secrets.token_hex(4)
    yield name
    ensure_mariadb_running()
    query(f"DROP TABLE IF EXISTS {name}")


def options(table, host="127.0.0.1"):
    return ("-q", "MySQL", "--mysql-host", host, "--mysql-user", "root",
            "--mysql-db", "test", "--mysql-table", table)


def rows(table):
    """The table's rows as {(unique, function): (priority, data, when_to_run)}."""
    return {(bytes(u), bytes(f)): (p, None if d is None else bytes(d), w)
            for u, f, p, d, w in query(f"SELECT unique_key, function_name, priority, data,"
                                       f" when_to_run FROM {table}")}


def prefix():
    return "gq" + secrets.token_hex(3)


# -- MariaDB outages ------------------------------------------------------------

def mariadb_pid():
    try:
        with open(PID_FILE) as pid_file:
            pid = int(pid_file.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def mariadb_up():
    try:
        connect_db().close()
        return True
    except mysql_connector.Error:
        return False


def ensure_mariadb_running():
    if mariadb_up():
        return
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background",
                    "--exec", MARIADBD], check=True, capture_output=True)
    wait_until(mariadb_up, 60, 0.1, "MariaDB to accept connections")


@contextlib.contextmanager
def mariadb_stopped():
    pid = mariadb_pid()
    if pid is None or os.geteuid() != 0 or not os.path.exists(MARIADBD):
        unavailable("cannot stop and restart MariaDB here (needs root and its pid file)")
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 60, 0.05, "MariaDB to stop")
        yield
    finally:
        ensure_mariadb_running()


# -- tests ------------------------------------------------------------------------

def test_background_jobs_survive_kill_and_replay_exactly_once(make_server, table):
    server = make_server(*options(table))
    epoch_at = int(time.time()) + 4
    jobs = sample_jobs(prefix(), epoch_at, EMPTY_UNIQUES)
    submit_ok(server, jobs)

    # Each job is in the table before its JOB_CREATED, with C's columns and values.
    stored = rows(table)
    assert len(stored) == len(jobs)
    for job in jobs:
        if job.unique in (b"", b"-"):
            continue                     # we store them under generated uniques
        data = None if IMPL == "c" and not job.data else job.data    # C stores b"" as NULL
        assert stored[job.unique, job.function] == (job.priority, data, job.when)
    assert query(f"SHOW CREATE TABLE {table}")[0][1].count(b"UNIQUE KEY") == 1

    server.kill()
    server.start()
    check_replay(server, jobs)
    wait_until(lambda: not rows(table), 5, message="done jobs deleted from the table")


def test_local_socket_and_cancel(make_server, table):
    server = make_server(*options(table, host="localhost"))
    function = prefix().encode()
    handle, = submit_ok(server, [Job(function, b"cancel-me", b"x")])
    assert (b"cancel-me", function) in rows(table)
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    wait_until(lambda: not rows(table), 5, message="cancelled job's row deleted")


def test_leftover_row_is_replaced(make_server, table):
    if IMPL == "c":
        pytest.skip("fixed on purpose: C refuses a job whose key a leftover row holds")
    server = make_server(*options(table))
    function = prefix().encode()
    # A row left over from an earlier run does not refuse a new job with its key...
    query(f"INSERT INTO {table} VALUES ('left', %s, 2, 'old', 0)", (function,))
    submit_ok(server, [Job(function, b"left", b"new", HIGH)])
    assert rows(table)[b"left", function] == (HIGH, b"new", 0)
    # ...but a key that only collates equal to a live job's is refused, as in C.
    assert submit_one(server, Job(function, b"LEFT", b"other")) == QUEUE_ERROR
    assert drain(server, [function], 1) == [(function, b"left", b"new")]
    wait_until(lambda: not rows(table), 5, message="done job's row deleted")


def test_refused_writes_answer_queue_error(make_server, table):
    server = make_server(*options(table))
    function = prefix().encode()
    # Strict mode refuses a function name longer than VARCHAR(255).
    long_name = b"f" * 300
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
    check_replay(server, jobs)
    wait_until(lambda: not rows(table), 5, message="done jobs deleted from the table")


def test_we_write_and_c_replays(make_server, table):
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed")
    jobs = sample_jobs(prefix(), int(time.time()) + 4)
    server = make_server(*options(table), impl="py")
    submit_ok(server, jobs)
    server.kill()
    c_server = make_server(*options(table), impl="c")
    # C replays our generated uniques (for empty and `-` uniques) as ordinary ones.
    generated = {data: unique for (unique, _), (_, data, _) in rows(table).items()}
    check_replay(c_server, [job._replace(unique=generated[job.data])
                            if job.unique in (b"", b"-") else job for job in jobs])
    wait_until(lambda: not rows(table), 5, message="done jobs deleted by C")


def test_backend_outage(make_server, table):
    if IMPL == "c":
        pytest.skip("C closes a worker whose WORK_COMPLETE cannot delete the row")
    server = make_server(*options(table))
    function = prefix().encode()
    submit_ok(server, [Job(function, b"before1", b"1"), Job(function, b"before2", b"2")])

    with mariadb_stopped():
        started = time.monotonic()
        assert submit_one(server, Job(function, b"during", b"x")) == QUEUE_ERROR
        assert submit_one(server, Job(function, b"during2", b"y", LOW)) == QUEUE_ERROR
        assert time.monotonic() - started < 3, "the store blocked while MariaDB was down"
        assert foreground(server, function + b".fg", b"abc") == b"cba"
        # Queued work is still handed out; its delete waits for MariaDB.
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
    """A connection the server dropped (wait_timeout, KILL, restart) costs no ERROR."""
    server = make_server(*options(table))
    function = prefix().encode()
    submit_ok(server, [Job(function, b"one", b"1")])
    ids = query("SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE DB = 'test' AND ID != CONNECTION_ID()")
    assert ids
    for (connection_id,) in ids:
        query(f"KILL {connection_id}")
    submit_ok(server, [Job(function, b"two", b"2")])
    assert set(rows(table)) == {(b"one", function), (b"two", function)}


def test_bad_settings_exit_1(make_server, table):
    closed_port = free_port()       # nothing listens there
    for args in (options(table)[:4] + ("--mysql-port", str(closed_port), "--mysql-user", "root",
                                       "--mysql-db", "test"),
                 options(table)[:-4] + ("--mysql-db", "no_such_db_here", "--mysql-table", table),
                 options(table)[:4] + ("--mysql-table", table)):
        server = make_server(*args, start=False)
        started = time.monotonic()
        server.start(expect_ready=False)
        assert server.proc.wait(15) == 1, server.log()
        assert time.monotonic() - started < 10
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert IMPL == "c" or len(lines) == 1 and "MySQL" in lines[0], server.log()
