"""Queue tables made by hand before the server starts, as setup guides create them (#18).

The MySQL guide most users of persistent queues follow creates the table itself,
with PRIMARY KEY (unique_key) where C's own table keys rows by (unique_key,
function_name), and NOT NULL columns; then it starts gearmand with
`--queue-type=MySQL --mysql-host=localhost --mysql-port=3306 --mysql-user=... -w 2`.
gearmand 0.x created the same narrow key on PostgreSQL and SQLite
(`unique_key ... PRIMARY KEY`), so tables kept from it look alike there.

With such a key a unique can be used by one function at a time: the server says so
once at start (WARNING), refuses the second job with QUEUE_ERROR and a message that
names both jobs and the key, and keeps everything else it acknowledged across kill -9.
"""
import re
import sqlite3
import time

import pytest

import gearproto as gp

pytest.register_assert_rewrite("storetools")

from conftest import IMPL  # noqa: E402
from storetools import (MYSQL, POSTGRES, QUEUE_ERROR, Job, check_replay,  # noqa: E402
                        check_replay_any_order, drain, need_c, sample_jobs, submit_all,
                        submit_ok, submit_one, unique_prefix, wait_until, we_write_and_c_starts)

ours_only = pytest.mark.skipif(IMPL == "c", reason="what gearmand.py says and keeps; "
                               "C's behaviour is checked by the test_c_* tests")

# The guide's statement, as it is (the name is ours: tests share the database).
MYSQL_GUIDE_TABLE = """create table `{table}` (
  `unique_key` varchar(64) NOT NULL, `function_name` varchar(255) NOT NULL, `priority` int(11) NOT NULL,
  `data` LONGBLOB NOT NULL, `when_to_run` INT, PRIMARY KEY (`unique_key`))"""

# The same table in PostgreSQL's words.
POSTGRES_GUIDE_TABLE = ("CREATE TABLE {table} (unique_key VARCHAR(64) NOT NULL,"
                        " function_name VARCHAR(255) NOT NULL, priority INTEGER NOT NULL,"
                        " data BYTEA NOT NULL, when_to_run INTEGER, PRIMARY KEY (unique_key))")

# gearmand 0.x's SQLite table (when_to_run came in 0.22; both servers add it).
SQLITE_0X_TABLE = ("CREATE TABLE gearman_queue(unique_key TEXT PRIMARY KEY,"
                   " function_name TEXT, priority INTEGER, data BLOB)")

NARROW = "a unique can be used by one function at a time"


def prefix():
    return unique_prefix("hm")


def log_lines(server, level, since=0):
    """The server's log lines at `level`, from character `since` of its log on (a
    restarted server appends to the same log)."""
    return [line for line in server.log()[since:].splitlines() if line.split()[:1] == [level]]


def advice(line):
    """The ALTER TABLE a message gives to widen the key."""
    match = re.search(r"to key rows as C does: (ALTER TABLE [^)]*\))", line, re.I)
    assert match, line
    return match[1]


# -- MySQL --------------------------------------------------------------------------

mysql_query, mysql_rows = MYSQL.query, MYSQL.queue_rows


@pytest.fixture
def mysql_tables():
    """make(create=True) names a table (made by the guide's statement unless
    create=False); every one is dropped after the test."""
    with MYSQL.tables("gq18_") as new_table:
        yield lambda create=True: new_table(MYSQL_GUIDE_TABLE if create else None)


@pytest.fixture
def guide_table(mysql_tables):
    return mysql_tables()


def guide_command(table):
    """The guide's command line; database and table name are ours."""
    return ("--queue-type=MySQL", "--mysql-host=localhost", "--mysql-port=3306",
            "--mysql-user=root", "--mysql-db=test", f"--mysql-table={table}", "-w", "2")


@ours_only
def test_mysql_guide_table_warns_once_at_start(make_server, mysql_tables):
    table = mysql_tables()
    server = make_server(*guide_command(table), "--verbose=WARNING")
    warnings = log_lines(server, "WARNING")
    assert len(warnings) == 1, server.log()
    assert f"table {table} has PRIMARY KEY (unique_key)" in warnings[0]
    assert NARROW in warnings[0]
    alter = advice(warnings[0])
    assert alter == (f"ALTER TABLE {table} DROP PRIMARY KEY,"
                     f" ADD PRIMARY KEY (unique_key, function_name)")
    server.stop()

    # The advice is right: after it, no warning, and one unique serves two functions.
    mysql_query(alter)
    since = len(server.log())
    server.start()
    function = prefix().encode()
    submit_ok(server, [Job(function + b".a", b"same", b"1"), Job(function + b".b", b"same", b"2")])
    assert not log_lines(server, "WARNING", since), server.log()

    # C's own table (the server creates it) has nothing to warn about either.
    server = make_server(*guide_command(mysql_tables(create=False)), "--verbose=WARNING")
    assert not log_lines(server, "WARNING"), server.log()


@ours_only
def test_mysql_guide_table_keeps_jobs_across_kill_9(make_server, guide_table):
    """Every priority, binary data, an empty payload (data is NOT NULL) and jobs without
    a unique (generated uniques, unique_key is VARCHAR(64) NOT NULL) are written,
    replayed after kill -9 exactly once, and deleted when done."""
    server = make_server(*guide_command(guide_table))
    jobs = sample_jobs(prefix(), int(time.time()) + 4)
    submit_ok(server, jobs)
    stored = mysql_rows(guide_table)
    assert len(stored) == len(jobs)
    assert sorted(data for _, data, _ in stored.values()) == sorted(job.data for job in jobs)
    assert all(len(unique) <= 64 for unique, _ in stored)
    assert not log_lines(server, "ERROR"), server.log()

    server.kill()
    server.start()
    check_replay_any_order(server, jobs)        # a primary key orders InnoDB's rows
    wait_until(lambda: not mysql_rows(guide_table), 5, what="done jobs deleted from the table")


@ours_only
def test_mysql_guide_table_one_function_per_unique(make_server, guide_table):
    server = make_server(*guide_command(guide_table))
    function = prefix().encode()
    first, other = function + b".first", function + b".other"
    replies = submit_all(server, [Job(first, b"same", b"one"), Job(other, b"same", b"two")])
    assert replies[0][0] == gp.JOB_CREATED and replies[1] == QUEUE_ERROR

    # The message names both jobs, the key and how to widen it; not the collation.
    errors = log_lines(server, "ERROR")
    assert len(errors) == 1, server.log()
    assert (f"job (unique 'same', function '{other.decode()}') collides with the row of job"
            f" (unique 'same', function '{first.decode()}') on the table's PRIMARY KEY"
            f" (unique_key): with this key {NARROW}") in errors[0]
    assert advice(errors[0]) == (f"ALTER TABLE {guide_table} DROP PRIMARY KEY,"
                                 f" ADD PRIMARY KEY (unique_key, function_name)")
    assert "collation" not in errors[0]

    # A unique that only collates equal, same function: the collation is the reason.
    assert submit_one(server, Job(first, b"SAME", b"three")) == QUEUE_ERROR
    errors = log_lines(server, "ERROR")
    assert len(errors) == 2, server.log()
    assert (f"job (unique 'SAME', function '{first.decode()}') collides with the row of job"
            f" (unique 'same', function '{first.decode()}') on the table's PRIMARY KEY"
            f" (unique_key): the collation of unique_key (") in errors[1]
    assert errors[1].endswith(") compares the two equal"), errors[1]
    assert NARROW not in errors[1]
    assert mysql_rows(guide_table) == {(b"same", first): (1, b"one", 0)}

    # Two such jobs in one batch: the first is written, the second refused.
    with server.connect() as sock:
        sock.sendall(gp.pack(gp.SUBMIT_JOB_BG, first, b"batch", b"3")
                     + gp.pack(gp.SUBMIT_JOB_BG, other, b"batch", b"4"))
        assert gp.recv(sock)[0] == gp.JOB_CREATED and gp.recv(sock) == QUEUE_ERROR
    errors = log_lines(server, "ERROR")
    assert len(errors) == 3, server.log()
    assert (f"job (unique 'batch', function '{other.decode()}') collides with job (unique"
            f" 'batch', function '{first.decode()}') of the same batch on the table's PRIMARY"
            f" KEY (unique_key): with this key {NARROW}") in errors[2]

    # What was acknowledged survives kill -9; once it is done the unique is free again.
    server.kill()
    server.start()
    assert server.status().get(other.decode(), (0,))[0] == 0
    assert sorted(drain(server, [first], 2)) == [(first, b"batch", b"3"), (first, b"same", b"one")]
    wait_until(lambda: not mysql_rows(guide_table), 5, what="done job's row deleted")
    submit_ok(server, [Job(other, b"same", b"two")])
    assert mysql_rows(guide_table) == {(b"same", other): (1, b"two", 0)}


@ours_only
def test_mysql_c_table_collision_names_the_collation(make_server, mysql_tables):
    """On C's own table (the server creates it) only the collation makes keys collide."""
    table = mysql_tables(create=False)
    server = make_server(*guide_command(table))
    function = prefix().encode()
    replies = submit_all(server, [Job(function, b"abc", b"1"), Job(function + b".x", b"abc", b"2"),
                                  Job(function, b"ABC", b"3")])
    assert [reply[0] for reply in replies[:2]] == [gp.JOB_CREATED] * 2
    assert replies[2] == QUEUE_ERROR
    errors = log_lines(server, "ERROR")
    assert len(errors) == 1, server.log()
    assert (f"job (unique 'ABC', function '{function.decode()}') collides with the row of job"
            f" (unique 'abc', function '{function.decode()}') on the table's UNIQUE KEY"
            f" unique_key (unique_key, function_name): the collation of unique_key (") in errors[0]
    assert NARROW not in errors[0]


def test_c_on_guide_table(make_server, guide_table):
    """C 1.1.20 says nothing about the key at start; it refuses a job whose unique
    another function's job holds (duplicate entry) and, as it writes an empty payload
    as NULL, every job with empty data."""
    need_c()
    server = make_server(*guide_command(guide_table), "--verbose=WARNING", impl="c")
    assert "PRIMARY" not in server.log()
    function = prefix().encode()
    assert submit_all(server, [Job(function, b"same", b"one"),
                               Job(function + b".other", b"same", b"two"),
                               Job(function, b"empty", b"")])[1:] == [QUEUE_ERROR] * 2
    assert "Duplicate entry 'same' for key 'PRIMARY'" in server.log()
    assert "Column 'data' cannot be null" in server.log()


@pytest.mark.skipif(IMPL == "c", reason="C cannot write the empty payload to this table")
def test_we_write_and_c_replays_guide_table(make_server, guide_table):
    c_server, jobs = we_write_and_c_starts(make_server, guide_command(guide_table),
                                           lambda: mysql_rows(guide_table),
                                           sample_jobs(prefix(), int(time.time()) + 4))
    check_replay_any_order(c_server, jobs)      # C replays in the primary key's order
    wait_until(lambda: not mysql_rows(guide_table), 5, what="done jobs deleted by C")


# -- PostgreSQL ------------------------------------------------------------------------

pg_query, pg_rows = POSTGRES.query, POSTGRES.queue_rows


@pytest.fixture
def pg_table():
    with POSTGRES.tables("gq18_") as new_table:
        yield new_table(POSTGRES_GUIDE_TABLE)


def pg_options(table, *more):
    return POSTGRES.options(table) + more


@ours_only
def test_postgres_narrow_table_keeps_jobs_across_kill_9(make_server, pg_table):
    """The upsert on C's key would fail every write to this table: ours targets the
    table's own key, so every job is written, replayed after kill -9 and deleted."""
    server = make_server(*pg_options(pg_table))
    jobs = sample_jobs(prefix(), int(time.time()) + 4)
    submit_ok(server, jobs)
    stored = pg_rows(pg_table)
    assert len(stored) == len(jobs)
    assert sorted(data for _, data, _ in stored.values()) == sorted(job.data for job in jobs)
    server.kill()
    server.start()
    check_replay(server, jobs)
    wait_until(lambda: not pg_rows(pg_table), 5, what="done jobs deleted from the table")


@ours_only
def test_postgres_narrow_table_one_function_per_unique(make_server, pg_table):
    function = prefix().encode()
    first, other = function + b".first", function + b".other"
    # A row left over from an earlier run: a queued job, which a new job with its key joins.
    pg_query(f"INSERT INTO {pg_table} VALUES ('left', %s, 2, 'old', 0)", (first.decode(),))
    server = make_server(*pg_options(pg_table, "--verbose=WARNING"))
    warnings = log_lines(server, "WARNING")
    assert len(warnings) == 1, server.log()
    assert f"table {pg_table} has PRIMARY KEY (unique_key)" in warnings[0]
    assert NARROW in warnings[0]
    alter = advice(warnings[0])
    assert alter == (f"ALTER TABLE {pg_table} DROP CONSTRAINT {pg_table}_pkey,"
                     f" ADD PRIMARY KEY (unique_key, function_name)")

    replies = submit_all(server, [Job(first, b"same", b"one"), Job(other, b"same", b"two"),
                                  Job(first, b"left", b"new")])
    assert [reply == QUEUE_ERROR for reply in replies] == [False, True, False]
    errors = log_lines(server, "ERROR")
    assert len(errors) == 1, server.log()
    assert (f"job (unique 'same', function '{other.decode()}') collides with the row of job"
            f" (unique 'same', function '{first.decode()}') on the table's PRIMARY KEY"
            f" (unique_key): with this key {NARROW}") in errors[0]
    assert advice(errors[0]) == alter
    assert pg_rows(pg_table) == {(b"same", first): (1, b"one", 0), (b"left", first): (2, b"old", 0)}

    # Two such jobs in one batch: the first is written, the second refused.
    with server.connect() as sock:
        sock.sendall(gp.pack(gp.SUBMIT_JOB_BG, first, b"batch", b"3")
                     + gp.pack(gp.SUBMIT_JOB_BG, other, b"batch", b"4"))
        assert gp.recv(sock)[0] == gp.JOB_CREATED and gp.recv(sock) == QUEUE_ERROR

    server.kill()
    server.start()
    assert sorted(drain(server, [first, other], 3)) == [
        (first, b"batch", b"3"), (first, b"left", b"old"), (first, b"same", b"one")]

    # The advice is right: after it, no warning, and one unique serves two functions.
    server.stop()
    wait_until(lambda: not pg_rows(pg_table), 5, what="done jobs deleted")
    pg_query(alter)
    since = len(server.log())
    server.start()
    submit_ok(server, [Job(first, b"same", b"1"), Job(other, b"same", b"2")])
    assert not log_lines(server, "WARNING", since), server.log()


# -- SQLite ------------------------------------------------------------------------------

@pytest.mark.skipif(IMPL == "c", reason="C 1.1.20 lets the second job replace the first's row")
def test_sqlite_0x_table_loses_no_acknowledged_job(make_server, tmp_path):
    """gearmand 0.x made tables keyed by the unique alone: the second function's job
    with the same unique gets QUEUE_ERROR, never a JOB_CREATED whose row is lost."""
    path = tmp_path / "queue-0x.db"
    with sqlite3.connect(path) as db:
        db.execute(SQLITE_0X_TABLE)
    db.close()
    server = make_server("-q", "libsqlite3", "--libsqlite3-db", str(path))
    function = prefix().encode()
    jobs = [Job(function + b".first", b"same", b"one"), Job(function + b".other", b"same", b"two")]
    accepted = [job for job, reply in zip(jobs, submit_all(server, jobs))
                if reply[0] == gp.JOB_CREATED]
    server.kill()
    server.start()
    assert sorted(drain(server, [job.function for job in jobs], len(accepted), timeout=2)) == \
        sorted((job.function, job.unique, job.data) for job in accepted)
    assert len(accepted) == 1
