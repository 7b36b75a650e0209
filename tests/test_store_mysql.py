"""-q MySQL against a real MariaDB (root, no password, database `test`, on the
local socket and 127.0.0.1:3306), and cross-replay with C gearmand 1.1.20."""
import contextlib
import os
import secrets
import time

import pytest

pytest.register_assert_rewrite("storetools")

from conftest import IMPL, free_port  # noqa: E402
from storetools import (HIGH, MYSQL, QUEUE_ERROR, Job, check_bad_settings_exit_1,  # noqa: E402
                        check_c_writes_we_replay, check_ended_jobs_leave_the_store,
                        check_job_created_waits_for_the_commit, check_kill_9_at_a_random_instant,
                        check_outage, check_refused_writes, check_replay, check_replay_any_order,
                        check_submissions_share_commits, drain, sample_jobs, submit_ok,
                        submit_one, unique_prefix as prefix, wait_until, we_write_and_c_starts)

# C refuses a second empty-unique job of a function (duplicate key); we keep both.
EMPTY_UNIQUES = 1 if IMPL == "c" else 2

query, options, rows, keys = MYSQL.query, MYSQL.options, MYSQL.queue_rows, MYSQL.queue_keys


@pytest.fixture
def table():
    with MYSQL.tables("gq_") as new_table:
        yield new_table()


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
    wait_until(lambda: not rows(table), 5, what="done jobs deleted from the table")


@pytest.mark.parametrize("round_number", range(2))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, table, round_number):
    """storetools.check_kill_9_at_a_random_instant: no acknowledged job lost, only
    jobs running at the kill run twice."""
    server = make_server(*options(table))
    print(check_kill_9_at_a_random_instant(server, prefix().encode()))


@pytest.mark.skipif(IMPL == "c", reason="C writes in its event loop: everyone waits with it")
def test_job_created_waits_for_the_commit_and_the_loop_does_not(make_server, table):
    """While the test holds LOCK TABLES ... WRITE, the server's INSERT waits: its
    client hears nothing until then, everyone else is served. A row a trigger
    refuses then gets ERROR."""
    server = make_server(*options(table))
    function = prefix().encode()
    query(f"CREATE TRIGGER {table}_refuse BEFORE INSERT ON {table} FOR EACH ROW"
          f" IF NEW.function_name = '{function.decode()}.bad' THEN"
          f" SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused'; END IF")

    @contextlib.contextmanager
    def locked():
        connection = MYSQL.connect()
        try:
            connection.cursor().execute(f"LOCK TABLES {table} WRITE")
            yield
            connection.cursor().execute("UNLOCK TABLES")
        finally:
            connection.close()

    check_job_created_waits_for_the_commit(server, function, locked, lambda: keys(table))


@pytest.mark.skipif(IMPL == "c", reason="/metrics is ours; C commits every job on its own")
def test_pipelined_submissions_share_commits(make_server, table):
    check_submissions_share_commits(make_server, options(table), prefix().encode())
    assert len(rows(table)) == 400


def test_jobs_leave_the_table_when_they_end_and_a_dead_workers_job_stays(make_server, table):
    check_ended_jobs_leave_the_store(make_server(*options(table)), prefix().encode(),
                                     lambda: keys(table), drop_function=IMPL != "c")


def test_local_socket_and_cancel(make_server, table):
    server = make_server(*options(table, host="localhost"))
    function = prefix().encode()
    handle, = submit_ok(server, [Job(function, b"cancel-me", b"x")])
    assert (b"cancel-me", function) in rows(table)
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    wait_until(lambda: not rows(table), 5, what="cancelled job's row deleted")


def test_leftover_row_is_a_queued_job_that_new_jobs_join(make_server, table):
    """A row left over from an earlier run is a queued job: a new job with its key
    joins it (as it would join it in memory) and the row stays as it is. A key that
    only collates equal to it is another live job's: refused, as in C."""
    server = make_server(*options(table))         # makes the table
    server.stop()
    function = prefix().encode()
    # By hand, without a column list: the seq column of ours is invisible to it.
    query(f"INSERT INTO {table} VALUES ('left', %s, 2, 'old', 0)", (function,))
    server.start()
    assert server.status()[function.decode()][0] == 1
    submit_ok(server, [Job(function, b"left", b"new", HIGH)])
    assert server.status()[function.decode()][0] == 1
    assert rows(table) == {(b"left", function): (2, b"old", 0)}
    assert submit_one(server, Job(function, b"LEFT", b"other")) == QUEUE_ERROR
    assert drain(server, [function], 1) == [(function, b"left", b"old")]
    wait_until(lambda: not rows(table), 5, what="done job's row deleted")


def test_refused_writes_answer_queue_error(make_server, table):
    # Strict mode refuses a function name longer than VARCHAR(255).
    check_refused_writes(make_server(*options(table)), prefix().encode(), lambda: rows(table),
                         lambda: query(f"DROP TABLE {table}"))


def test_c_writes_and_we_replay(make_server, table):
    check_c_writes_we_replay(make_server, options(table), lambda: rows(table), prefix())


def test_we_write_and_c_replays(make_server, table):
    c_server, jobs = we_write_and_c_starts(make_server, options(table), lambda: rows(table),
                                           sample_jobs(prefix(), int(time.time()) + 4))
    check_replay(c_server, jobs)
    wait_until(lambda: not rows(table), 5, what="done jobs deleted by C")


def test_backend_outage(make_server, table):
    if IMPL == "c":
        pytest.skip("C closes a worker whose WORK_COMPLETE cannot delete the row")
    check_outage(make_server(*options(table)), MYSQL.stopped, lambda: rows(table),
                 prefix().encode(), "MariaDB")


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


@pytest.fixture
def option_file_home(table, tmp_path):
    """A MariaDB user with a password, and a HOME for ~/.my.cnf: (user, password, home, env)."""
    user, password = "gq_" + secrets.token_hex(4), secrets.token_hex(8)
    for host in ("%", "localhost"):
        query(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'")
        query(f"GRANT ALL ON test.* TO '{user}'@'{host}'")
    home = tmp_path / "home"
    home.mkdir()
    yield user, password, home, dict(os.environ, HOME=str(home))
    for host in ("%", "localhost"):
        query(f"DROP USER IF EXISTS '{user}'@'{host}'")


def connected_as(user):
    return query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s",
                 (user,))[0][0]


def check_writes_as(server, table, user):
    """A job submitted to the server gets its row, written as `user`; its function."""
    function = prefix().encode()
    submit_ok(server, [Job(function, b"u", b"x")])
    assert rows(table) == {(b"u", function): (1, b"x", 0)}
    assert connected_as(user)
    return function


def test_option_files_give_user_and_database_as_in_c(make_server, table, option_file_home):
    """libmysqlclient reads ~/.my.cnf for C gearmand ([client] and [gearmand]):
    the user and database left off the command line come from there."""
    user, password, home, env = option_file_home
    (home / ".my.cnf").write_text(f"[client]\nuser={user}\n[gearmand]\ndatabase=test\n")
    server = make_server("-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-password", password,
                         "--mysql-table", table, env=env)
    function = check_writes_as(server, table, user)
    server.kill()
    # the command line wins over the file
    server = make_server(*options(table), env=env)
    check_replay_any_order(server, [Job(function, b"u", b"x")])
    wait_until(lambda: not connected_as(user), 5, what=f"no connection as {user}")


@pytest.mark.skipif(IMPL == "c", reason="C passes an empty password, never the file's")
def test_option_file_password_goes_with_its_user(make_server, table, option_file_home):
    user, password, home, env = option_file_home
    (home / ".my.cnf").write_text(f"[gearmand]\nuser={user}\npassword={password}\n"
                                  f"database=test\n")
    server = make_server("-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-table", table,
                         env=env)
    check_writes_as(server, table, user)


def test_option_file_values_lose_their_quotes_as_in_c(make_server, table, option_file_home):
    """libmariadb (C's client library) drops the quotes around an option file's value."""
    user, password, home, env = option_file_home
    (home / ".my.cnf").write_text(f'[client]\nuser="{user}"\n[gearmand]\ndatabase = \'test\'\n')
    server = make_server("-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-password", password,
                         "--mysql-table", table, env=env)
    check_writes_as(server, table, user)


@pytest.mark.skipif(IMPL == "c", reason="C passes an empty password, never the file's")
def test_option_file_escapes_as_in_libmariadb(make_server, table, option_file_home):
    """Backslash escapes in a value are decoded as libmariadb does:
    \\s is a space, \\" a quote, \\\\ a backslash, an unknown one stays as it is."""
    user, _, home, env = option_file_home
    password = 'a b"c\\d\\e'
    for host in ("%", "localhost"):
        query(f"ALTER USER '{user}'@'{host}' IDENTIFIED BY %s", (password,))
    (home / ".my.cnf").write_text(f"[gearmand]\nuser={user}\ndatabase=test\n"
                                  f'password="a\\sb\\"c\\\\d\\e"\n')
    server = make_server("-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-table", table,
                         env=env)
    check_writes_as(server, table, user)


def test_bad_settings_exit_1(make_server, table):
    closed_port = free_port()       # nothing listens there
    check_bad_settings_exit_1(make_server, (
        options(table)[:4] + ("--mysql-port", str(closed_port), "--mysql-user", "root",
                              "--mysql-db", "test"),
        options(table)[:-4] + ("--mysql-db", "no_such_db_here", "--mysql-table", table),
        options(table)[:4] + ("--mysql-table", table)), "MySQL")
