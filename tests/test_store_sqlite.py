"""The SQLite store: acknowledged background jobs survive kill -9, and stores
written by C gearmand 1.1.20 replay in ours and ours in C."""
import contextlib
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import time

import pytest

pytest.register_assert_rewrite("storetools")

import gearproto as gp  # noqa: E402
from conftest import (C_GEARMAND, IMPL, Server, free_port, import_gearmand,  # noqa: E402
                      unavailable, wait_for_port, wait_until)
from storetools import (check_ended_jobs_leave_the_store,  # noqa: E402
                        check_job_created_waits_for_the_commit, check_kill_9_at_a_random_instant,
                        check_submissions_share_commits, store_batches)

JOB_CREATED, ERROR, NO_JOB = gp.JOB_CREATED, gp.ERROR, gp.NO_JOB
SUBMIT_JOB, SUBMIT_JOB_BG, SUBMIT_JOB_EPOCH = gp.SUBMIT_JOB, gp.SUBMIT_JOB_BG, gp.SUBMIT_JOB_EPOCH
SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG = gp.SUBMIT_JOB_HIGH_BG, gp.SUBMIT_JOB_LOW_BG
CAN_DO, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, WORK_COMPLETE = (gp.CAN_DO, gp.GRAB_JOB_UNIQ,
                                                        gp.JOB_ASSIGN_UNIQ, gp.WORK_COMPLETE)
request = gp.pack
QUEUE_ERROR = (ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")

pytestmark = pytest.mark.skipif(IMPL == "c", reason="tests of our SQLite store and its C interplay")


def submit(server, function, unique, data, ptype=SUBMIT_JOB_BG, epoch=None):
    """Submit one job on a connection of its own; the reply (type, payload)."""
    with server.connect() as sock:
        args = [function, unique] + ([str(epoch).encode()] if epoch is not None else []) + [data]
        sock.sendall(request(ptype, *args))
        return gp.recv(sock, timeout=10)


def drain(server, function, expect, timeout=15.0):
    """Run a worker that completes jobs until `expect` have run; [(unique, data)] in order."""
    done = []
    with server.connect() as sock:
        sock.sendall(request(CAN_DO, function))
        deadline = time.monotonic() + timeout
        while len(done) < expect and time.monotonic() < deadline:
            sock.sendall(request(GRAB_JOB_UNIQ))
            ptype, payload = gp.recv(sock)
            if ptype == NO_JOB:
                sock.sendall(request(gp.PRE_SLEEP))
                try:
                    gp.recv(sock, timeout=max(deadline - time.monotonic(), 0.01))   # NOOP
                except socket.timeout:
                    pass
                continue
            assert ptype == JOB_ASSIGN_UNIQ, gp.show((ptype, payload))
            handle, _, unique, data = payload.split(b"\0", 3)
            done.append((unique, data))
            sock.sendall(request(WORK_COMPLETE, handle, b""))
        # Make sure the last WORK_COMPLETE was processed before the caller looks.
        gp.sync(sock)
    return done


def rows(path, table="gearman_queue"):
    with sqlite3.connect(path) as db:
        db.text_factory = bytes
        return db.execute(f"SELECT unique_key, function_name, priority, data, when_to_run,"
                          f" typeof(unique_key), typeof(function_name), typeof(data)"
                          f" FROM {table} ORDER BY rowid").fetchall()


def keys(path):
    """{(function, unique)} of the rows."""
    return {(function, unique) for unique, function, *_ in rows(path)}


def execute(path, statement):
    """Run one statement on the database from a connection of the test's own."""
    with sqlite3.connect(path) as conn:
        conn.execute(statement)
    conn.close()


def rows_become(path, expected, timeout=10.0):
    """Deletes are committed in the background after a job ends: wait for them."""
    deadline = time.monotonic() + timeout
    while True:
        current = [row[:5] for row in rows(path)]
        if current == expected or time.monotonic() > deadline:
            return current
        time.sleep(0.02)


def sqlite_server(make_server, db, *more):
    return make_server("--queue-type=sqlite", f"--sqlite-db={db}", *more)


@contextlib.contextmanager
def write_lock(db):
    """Hold the database's write lock from a connection of the test's own: the
    server's next write waits for it (for up to its 6 s busy timeout)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_job_created_waits_for_the_commit_and_the_loop_does_not(make_server, tmp_path):
    """While the test holds the database's write lock, the server's commit cannot
    happen: JOB_CREATED (or, for a row the database refuses, ERROR) is withheld
    until the lock is released, and meanwhile the server answers everyone else."""
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    execute(db, "CREATE TRIGGER refuse BEFORE INSERT ON gearman_queue WHEN"
                " NEW.function_name = 'f.bad' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    check_job_created_waits_for_the_commit(server, b"f", lambda: write_lock(db),
                                           lambda: keys(db))
    # Stored as C stores it: TEXT unique and function, BLOB data.
    assert rows(db)[0][:5] == (b"kept", b"f", 1, b"data", 0)
    assert rows(db)[0][5:] == (b"text", b"text", b"blob")


def test_wal_journal_and_synchronous_full_by_default(make_server, tmp_path, monkeypatch):
    """README: WAL journal, synchronous=FULL unless --sqlite-sync=normal. The journal
    mode is the file's (any connection reads it); synchronous belongs to a connection
    and the server reports it nowhere, so it is read from the store's connection made
    in-process by the server's own code."""
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    assert submit(server, b"f", b"u", b"d")[0] == JOB_CREATED
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    assert (tmp_path / "q.db-wal").exists()    # the commit went to the write-ahead log

    gearmand = import_gearmand(monkeypatch)
    for more, synchronous in (((), 2), (("--sqlite-sync=normal",), 1),
                              (("--sqlite-sync", "full"), 2)):
        options = gearmand.parse_options(["-q", "sqlite", f"--sqlite-db={tmp_path / 'in.db'}",
                                          *more])
        store = gearmand.SqliteStore.open(options)
        try:
            connection = store.connection
            assert connection.execute("PRAGMA journal_mode").fetchone()[0].lower() in \
                (b"wal", "wal")
            assert connection.execute("PRAGMA synchronous").fetchone()[0] == synchronous, more
        finally:
            store.close()


def test_table_schema_is_c_gearmands(make_server, tmp_path):
    db = tmp_path / "q.db"
    make_server("--queue-type=libsqlite3", f"--libsqlite3-db={db}", "--libsqlite3-table=jobs")
    with sqlite3.connect(db) as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name='jobs'").fetchone()[0]
    assert sql == ("CREATE TABLE jobs ( unique_key TEXT, function_name TEXT, priority INTEGER,"
                   " data BLOB, when_to_run INTEGER, PRIMARY KEY (unique_key, function_name))")


def test_schema_qualified_table_is_found_again_at_the_next_start(make_server, tmp_path):
    db = tmp_path / "q.db"
    options = ("--queue-type=sqlite", f"--sqlite-db={db}", "--sqlite-table=main.jobs")
    server = make_server(*options)
    assert submit(server, b"f", b"u1", b"kept")[0] == JOB_CREATED
    assert server.stop() == 0
    server = make_server(*options)        # the table exists now: no CREATE TABLE again
    assert server.status()["f"] == (1, 0, 0)
    assert [r[:4] for r in rows(db, "jobs")] == [(b"u1", b"f", 1, b"kept")]


def test_jobs_leave_the_store_when_they_end_and_a_dead_workers_job_stays(make_server,
                                                                         tmp_path):
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    check_ended_jobs_leave_the_store(server, b"f", lambda: keys(db))


def test_pipelined_submissions_share_commits(make_server, tmp_path):
    """Group commit: 400 SUBMIT_JOB_BG on one connection go to the store in a few
    transactions, each job acknowledged."""
    db = tmp_path / "q.db"
    check_submissions_share_commits(make_server, ("--queue-type=sqlite", f"--sqlite-db={db}"),
                                    b"f")
    assert len(rows(db)) == 400


def test_deletes_share_transactions(make_server, tmp_path):
    """No client waits for a delete: deletes wait up to 50 ms (DELETE_DELAY) to share
    a commit. Jobs finished one by one make at most one commit per 50 ms however
    fast the worker is; jobs finished in one burst make one or two."""
    db = tmp_path / "q.db"
    http_port = free_port()
    server = sqlite_server(make_server, db, "--http-port", str(http_port))
    jobs = 400
    with server.connect() as sock:
        sock.sendall(b"".join(request(SUBMIT_JOB_BG, b"f", b"u%d" % i, b"d") for i in range(jobs)))
        assert all(gp.recv(sock)[0] == JOB_CREATED for _ in range(jobs))

    commits, _ = store_batches(http_port)
    started = time.monotonic()
    assert len(drain(server, b"f", jobs // 2)) == jobs // 2      # one round trip per job
    wait_until(lambda: len(rows(db)) == jobs // 2, what="the deletes of the jobs run")
    elapsed = time.monotonic() - started
    deletes = store_batches(http_port)[0] - commits
    assert deletes <= elapsed / 0.05 + 2, (f"{jobs // 2} deletes in {elapsed:.2f} s took "
                                           f"{deletes} commits: more than one per 50 ms")

    commits, rows_written = store_batches(http_port)
    with server.connect() as worker:
        gp.can_do(worker, b"f")
        worker.sendall(request(GRAB_JOB_UNIQ) * (jobs // 2))
        handles = []
        for _ in range(jobs // 2):
            ptype, payload = gp.recv(worker)
            assert ptype == JOB_ASSIGN_UNIQ, gp.show((ptype, payload))
            handles.append(payload.split(b"\0")[0])
        worker.sendall(b"".join(request(WORK_COMPLETE, handle, b"") for handle in handles))
        gp.sync(worker)
        wait_until(lambda: not rows(db), what="the deletes of the burst")
    deletes, deleted = (now - before for now, before in zip(store_batches(http_port),
                                                            (commits, rows_written)))
    assert deleted == jobs // 2
    assert deletes <= 2, f"{jobs // 2} deletes finished at once took {deletes} commits"


def test_finished_job_row_is_deleted_without_further_traffic(make_server, tmp_path):
    """The delete of a finished job's row is committed on its own: nothing more
    has to reach the server after the WORK_COMPLETE."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert submit(server, b"f", b"u", b"d")[0] == JOB_CREATED
    with server.connect() as worker:
        worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
        ptype, payload = gp.recv(worker)
        assert ptype == JOB_ASSIGN_UNIQ
        # The last packet anyone sends: the worker stays connected and silent.
        worker.sendall(request(WORK_COMPLETE, payload.split(b"\0")[0], b""))
        assert rows_become(db, [], timeout=2) == []


def running_foreground_job(server, unique, data):
    """A foreground job of function f that a worker holds: (the client, the worker,
    the handle)."""
    client, worker = server.connect(), server.connect()
    client.sendall(request(SUBMIT_JOB, b"f", unique, data))
    ptype, handle = gp.recv(client)
    assert ptype == JOB_CREATED
    worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    assert gp.recv(worker)[0] == JOB_ASSIGN_UNIQ
    return client, worker, handle


def test_dash_job_ending_while_its_row_is_written_leaves_no_row(make_server, tmp_path):
    """A "-" job ends while the row a background submission gave it is being written,
    and a new "-" job with the same payload comes in: the new job has a row of its
    own, so the old row is still deleted and does not run again after a restart."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    client, worker, first = running_foreground_job(server, b"-", b"P")
    # In one read: a background submission joins it (its row is written), it completes
    # while that write is in flight, and the same payload is submitted again.
    worker.sendall(request(SUBMIT_JOB_BG, b"f", b"-", b"P") + request(WORK_COMPLETE, first, b"done")
                   + request(SUBMIT_JOB_BG, b"f", b"-", b"P"))
    assert gp.recv(worker) == (JOB_CREATED, first)
    ptype, second = gp.recv(worker)
    assert ptype == JOB_CREATED and second != first
    assert gp.recv(client) == (WORK_COMPLETE, first + b"\0done")
    worker.sendall(request(GRAB_JOB_UNIQ))
    ptype, payload = gp.recv(worker)
    assert ptype == JOB_ASSIGN_UNIQ and payload.split(b"\0")[0] == second
    worker.sendall(request(WORK_COMPLETE, second, b"") + request(gp.ECHO_REQ, b"sync"))
    assert gp.recv(worker) == (gp.ECHO_RES, b"sync")
    assert server.stop() == 0              # a clean stop commits the pending deletes
    assert rows(db) == []


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True                       # reset: it was in the backlog when the listener closed
    return False


def test_stop_during_a_write_deletes_the_row_of_a_job_that_ended(make_server, tmp_path):
    """SIGTERM while a job's row is being written, the job having ended meanwhile:
    the server finishes the write, then deletes that row before it exits."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    client, worker, handle = running_foreground_job(server, b"u", b"d")
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")        # the server's next write waits for this lock
    # A background submission joins the job (its row is written), then the job ends.
    worker.sendall(request(SUBMIT_JOB_BG, b"f", b"u", b"d") + request(WORK_COMPLETE, handle, b"ok"))
    assert gp.recv(client) == (WORK_COMPLETE, handle + b"\0ok")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refused(server.port), what="listening socket closed")
    lock.execute("ROLLBACK")
    lock.close()
    assert server.proc.wait(15) == 0
    assert rows(db) == []


def test_replay_keeps_priority_order_data_and_epoch(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    binary = bytes(range(256)) + b"\0\0end"
    future = int(time.time()) + 3600
    jobs = [(SUBMIT_JOB_LOW_BG, b"low1", b"L1"), (SUBMIT_JOB_BG, b"n1", b"N1"),
            (SUBMIT_JOB_HIGH_BG, b"h1", b"H1"), (SUBMIT_JOB_LOW_BG, b"low2", b"L2"),
            (SUBMIT_JOB_BG, b"n2", binary), (SUBMIT_JOB_HIGH_BG, b"h2", b""),
            (SUBMIT_JOB_BG, b"", b"no unique 1"), (SUBMIT_JOB_BG, b"", b"no unique 2"),
            (SUBMIT_JOB_BG, b"-", b"by payload")]
    for ptype, unique, data in jobs:
        assert submit(server, b"f", unique, data, ptype)[0] == JOB_CREATED
    assert submit(server, b"f", b"later", b"E", SUBMIT_JOB_EPOCH, epoch=future)[0] == JOB_CREATED
    server.kill()
    server.start()
    assert server.admin("prioritystatus") == b"f\t2\t6\t2\t0\n.\n"
    done = drain(server, b"f", 9)
    assert done == [(b"h1", b"H1"), (b"h2", b""), (b"n1", b"N1"), (b"n2", binary),
                    (b"", b"no unique 1"), (b"", b"no unique 2"), (b"-", b"by payload"),
                    (b"low1", b"L1"), (b"low2", b"L2")]
    assert server.status()["f"] == (1, 0, 0)   # the epoch job waits for its time
    assert rows_become(db, [(b"later", b"f", 1, b"E", future)]) == [(b"later", b"f", 1, b"E", future)]


def test_the_first_show_jobs_after_a_restart_lists_every_stored_job(make_server, tmp_path):
    # C replays every job before it serves; we page the first window of each queue in
    # before we accept anyone, so a small queue is listed whole from the first command.
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    uniques = [b"u%d" % n for n in range(600)]   # 600 queues: their pages take a while
    with server.connect() as sock:
        for n, unique in enumerate(uniques):
            ptype = (SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG)[n % 3]
            gp.send(sock, ptype, b"f%d" % (n // 3), unique, b"d")
        assert [gp.recv(sock)[0] for _ in uniques] == [JOB_CREATED] * len(uniques)
    server.kill()
    server.start()
    listed = server.admin("show unique jobs").split(b"\n")
    assert sorted(listed[:-2]) == sorted(uniques) and listed[-2:] == [b".", b""]


def counts_in_the_table(db):
    """What the queue holds, per queue, counted from its rows: (kept counts, true counts)."""
    with sqlite3.connect(db) as conn:
        conn.text_factory = bytes
        valid = conn.execute("SELECT valid FROM gearman_queue_gearmand_counted").fetchall()
        kept = {(f, p, bool(s)): n for f, p, s, n in conn.execute(
            "SELECT * FROM gearman_queue_gearmand_counts WHERE rows != 0")}
        true = {(f, 0 if w else p, w != 0): n for f, p, w, n in conn.execute(
            "SELECT function_name, priority, when_to_run, COUNT(*) FROM gearman_queue"
            " GROUP BY 1, 2, 3")}
    conn.close()
    return valid, kept, true


def announced(server):
    """How many stored jobs the server's last start said it found."""
    ready = [line for line in server.log().splitlines() if " ready, port " in line]
    return re.search(r"\d+ jobs replayed", ready[-1]).group()


def test_the_server_keeps_each_queues_count_so_a_start_need_not_count(make_server, tmp_path):
    # A start on 100 M stored jobs spent 20-30 s counting them from the index. The
    # writer keeps the counts in the transactions that change them, so after a kill -9
    # at any moment (joins, deletes and epoch rows included) they equal the rows.
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    future = int(time.time()) + 3600
    with server.connect() as sock:
        for n in range(300):
            ptype = (SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG)[n % 3]
            gp.send(sock, ptype, b"f%d" % (n % 250 % 4), b"u%d" % (n % 250), b"d")   # 50 joins
        gp.send(sock, SUBMIT_JOB_EPOCH, b"f0", b"later", str(future).encode(), b"e")
        assert {gp.recv(sock)[0] for _ in range(301)} == {JOB_CREATED}
    assert len(drain(server, b"f1", 40)) == 40
    wait_until(lambda: len(rows(db)) == 251 - 40, what="the finished jobs' rows to go")
    server.kill()
    valid, kept, true = counts_in_the_table(db)
    assert valid == [(1,)] and kept == true and sum(true.values()) == 251 - 40
    # The start takes the kept counts as they are: seven added by hand show in the
    # count it announces (paging the queue in then finds them missing).
    execute(db, "UPDATE gearman_queue_gearmand_counts SET rows = rows + 7"
                " WHERE function_name = 'f2' AND priority = 1")
    server.start()
    assert announced(server) == f"{251 - 40 + 7} jobs replayed"
    server.kill()
    execute(db, "UPDATE gearman_queue_gearmand_counts SET rows = rows - 7"
                " WHERE function_name = 'f2' AND priority = 1")
    server.start()
    assert announced(server) == f"{251 - 40} jobs replayed"
    status = server.status()
    assert {name: status[name][0] for name in status} == {
        f.decode(): sum(n for (g, _, _), n in true.items() if g == f) for f, _, _ in true}
    assert len(drain(server, b"f0", 5)) == 5
    wait_until(lambda: len(rows(db)) == 251 - 45, what="the finished jobs' rows to go")
    server.kill()
    valid, kept, true = counts_in_the_table(db)
    assert valid == [(1,)] and kept == true and sum(true.values()) == 251 - 45


def test_counts_another_program_changed_are_counted_again(make_server, tmp_path):
    # C gearmand, or the sqlite3 shell, writes rows without keeping our counts: the
    # table's triggers mark them stale at its first row, and the next start counts.
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    for n in range(6):
        assert submit(server, b"f", b"u%d" % n, b"d")[0] == JOB_CREATED
    server.kill()
    valid, kept, true = counts_in_the_table(db)
    assert valid == [(1,)] and kept == {(b"f", 1, False): 6}
    execute(db, "DELETE FROM gearman_queue WHERE unique_key IN ('u0', 'u1', 'u2')")
    execute(db, "INSERT INTO gearman_queue VALUES ('c1', 'g', 0, 'x', 0)")
    assert counts_in_the_table(db)[0] == [(0,)]
    server.start()
    assert server.status()["f"][0] == 3 and server.status()["g"][0] == 1
    valid, kept, true = counts_in_the_table(db)
    assert valid == [(1,)] and kept == true == {(b"f", 1, False): 3, (b"g", 0, False): 1}


def test_rows_without_when_to_run_are_due_jobs(make_server, tmp_path):
    # A table of gearmand before 0.22 has no when_to_run: its rows get a NULL one,
    # which C reads as 0; so does a row another program inserts without it.
    db = tmp_path / "q.db"
    execute(db, "CREATE TABLE gearman_queue(unique_key TEXT PRIMARY KEY, function_name TEXT,"
                " priority INTEGER, data BLOB)")
    execute(db, "INSERT INTO gearman_queue VALUES ('old', 'f', 1, 'from 0.21')")
    server = sqlite_server(make_server, db)
    assert server.status()["f"][0] == 1
    assert drain(server, b"f", 1) == [(b"old", b"from 0.21")]
    wait_until(lambda: not rows(db), what="the finished job's row to go")
    server.kill()
    execute(db, "INSERT INTO gearman_queue (unique_key, function_name, priority, data)"
                " VALUES ('shell', 'f', 1, 'by hand')")
    server.start()
    assert server.status()["f"][0] == 1
    assert drain(server, b"f", 1) == [(b"shell", b"by hand")]


def test_resubmission_after_replay_joins_the_replayed_job(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    first = submit(server, b"f", b"same", b"one")
    server.kill()
    server.start()
    again = submit(server, b"f", b"same", b"two")
    assert again[0] == JOB_CREATED and first[0] == JOB_CREATED
    assert server.status()["f"] == (1, 0, 0)
    assert drain(server, b"f", 1) == [(b"same", b"one")]


def test_epoch_job_runs_when_due_after_replay(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    due = int(time.time()) + 2
    assert submit(server, b"f", b"e", b"soon", SUBMIT_JOB_EPOCH, epoch=due)[0] == JOB_CREATED
    server.kill()
    server.start()
    # A sleeping worker must be woken when the job falls due (C 1.1.20 never wakes it).
    assert drain(server, b"f", 1, timeout=10) == [(b"e", b"soon")]
    assert time.time() >= due


def test_a_clients_unique_that_reads_like_a_generated_one_comes_back_as_it_was(make_server,
                                                                              tmp_path):
    """We store a job without a unique under "gearmand.py:no-unique:RUN.N"; a client may
    use such a unique itself, and after a restart its worker must see that unique."""
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)
    own = [b"gearmand.py:no-unique:0123456789ab.5", b"gearmand.py:payload-unique:" + b"c4" * 16,
           b"gearmand.py:=marked", b"gearmand.py:other"]
    for unique in own:
        assert submit(server, b"f", unique, b"d")[0] == JOB_CREATED
    assert submit(server, b"f", b"", b"none")[0] == JOB_CREATED
    server.kill()
    server.start()
    # Joined by its unique after the restart, as a live job would be.
    assert submit(server, b"f", own[0], b"again")[0] == JOB_CREATED
    assert server.status()["f"] == (5, 0, 0)
    assert drain(server, b"f", 5) == [(unique, b"d") for unique in own] + [(b"", b"none")]


# --- kill -9 at random instants --------------------------------------------

@pytest.mark.parametrize("round_number", range(3))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, tmp_path, round_number):
    """storetools.check_kill_9_at_a_random_instant: no acknowledged job lost, only
    jobs running at the kill run twice; the counts kept in the store are its rows'."""
    db = tmp_path / "q.db"
    server = sqlite_server(make_server, db)

    def counts_are_the_rows():
        valid, kept, true = counts_in_the_table(db)
        assert valid == [(1,)] and kept == true, "the kept counts are not the rows'"

    print(f"round {round_number}:",
          check_kill_9_at_a_random_instant(server, b"crash%d" % round_number,
                                           after_kill=counts_are_the_rows))


# --- C gearmand 1.1.20 and ours read each other's stores --------------------

def c_gearmand_needed():
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed (apt-get install gearman-job-server)")


CROSS_JOBS = [(SUBMIT_JOB_LOW_BG, b"low1", b"L1"), (SUBMIT_JOB_BG, b"n1", b"N1"),
              (SUBMIT_JOB_HIGH_BG, b"h1", b"H1"), (SUBMIT_JOB_BG, b"bin", b"a\0b\xff\0"),
              (SUBMIT_JOB_HIGH_BG, b"h2", b"H2"), (SUBMIT_JOB_LOW_BG, b"low2", b"L2")]
CROSS_ORDER = [(b"h1", b"H1"), (b"h2", b"H2"), (b"n1", b"N1"), (b"bin", b"a\0b\xff\0"),
               (b"low1", b"L1"), (b"low2", b"L2")]


def test_store_written_by_c_gearmand_replays_in_ours(make_server, tmp_path):
    c_gearmand_needed()
    db = tmp_path / "q.db"
    c_server = make_server("-q", "libsqlite3", "--libsqlite3-db", str(db), impl="c")
    for ptype, unique, data in CROSS_JOBS:
        assert submit(c_server, b"f", unique, data, ptype)[0] == JOB_CREATED
    future = int(time.time()) + 3600
    assert submit(c_server, b"f", b"ep", b"E", SUBMIT_JOB_EPOCH, epoch=future)[0] == JOB_CREATED
    c_server.kill()
    ours = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert ours.admin("prioritystatus") == b"f\t2\t3\t2\t0\n.\n"
    assert drain(ours, b"f", 6) == CROSS_ORDER
    assert ours.status()["f"] == (1, 0, 0)


def test_c_written_empty_payload_row_replays_in_ours(make_server, tmp_path):
    """C stores an empty payload as NULL and then cannot start on its own file; we can."""
    c_gearmand_needed()
    db = tmp_path / "q.db"
    c_server = make_server("-q", "libsqlite3", "--libsqlite3-db", str(db), impl="c")
    assert submit(c_server, b"f", b"empty", b"")[0] == JOB_CREATED
    c_server.kill()
    assert rows(db)[0][3] is None
    ours = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert drain(ours, b"f", 1) == [(b"empty", b"")]


def test_store_written_by_ours_replays_in_c_gearmand(make_server, tmp_path):
    c_gearmand_needed()
    db = tmp_path / "q.db"
    ours = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    for ptype, unique, data in CROSS_JOBS:
        assert submit(ours, b"f", unique, data, ptype)[0] == JOB_CREATED
    assert submit(ours, b"f", b"", b"no unique A")[0] == JOB_CREATED
    assert submit(ours, b"f", b"", b"no unique B")[0] == JOB_CREATED
    assert submit(ours, b"f", b"e0", b"", SUBMIT_JOB_LOW_BG)[0] == JOB_CREATED
    # Its own function: in C a future epoch job blocks the LOW jobs of its function.
    future = int(time.time()) + 3600
    assert submit(ours, b"g", b"ep", b"E", SUBMIT_JOB_EPOCH, epoch=future)[0] == JOB_CREATED
    ours.kill()
    c_server = make_server("-q", "libsqlite3", "--libsqlite3-db", str(db), impl="c")
    assert c_server.admin("prioritystatus") in (b"f\t2\t4\t3\t0\ng\t0\t1\t0\t0\n.\n",
                                                b"g\t0\t1\t0\t0\nf\t2\t4\t3\t0\n.\n")
    done = drain(c_server, b"f", 9)
    # C runs the empty-unique jobs under the generated uniques we stored them with.
    generated = [(u, d) for u, d in done if u.startswith(b"gearmand.py:no-unique:")]
    assert [d for _, d in generated] == [b"no unique A", b"no unique B"]
    assert [job for job in done if job not in generated] == (
        CROSS_ORDER[:4] + [(b"low1", b"L1"), (b"low2", b"L2"), (b"e0", b"")])
    assert c_server.status()["f"] == (0, 0, 0)
    assert c_server.status()["g"] == (1, 0, 0)


# --- a store that cannot write ------------------------------------------------

def limit_file_size():
    # Writes past 256 KiB fail with EFBIG, which is what a full disk looks like to SQLite.
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_full_disk_gets_error_not_job_created_and_server_keeps_serving(tmp_path):
    db = tmp_path / "q.db"
    server = Server(tmp_path, ["--queue-type=sqlite", f"--sqlite-db={db}"])
    command = server.command()
    log = open(server.log_path, "wb")
    server.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=limit_file_size)
    try:
        assert wait_for_port(server.port, server.proc), server.log()
        big = b"x" * 60000
        replies = [submit(server, b"f", b"u%d" % i, big)[0] for i in range(12)]
        assert JOB_CREATED in replies and ERROR in replies
        acknowledged = [i for i, reply in enumerate(replies) if reply == JOB_CREATED]
        with server.connect() as sock:
            sock.sendall(request(gp.ECHO_REQ, b"still here"))
            assert gp.recv(sock) == (gp.ECHO_RES, b"still here")
        assert "persistent queue unavailable" in server.log()   # a full disk takes nothing
        server.kill()
        server.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        assert wait_for_port(server.port, server.proc), server.log()
        done = drain(server, b"f", len(acknowledged))
        assert sorted(done) == sorted((b"u%d" % i, big) for i in acknowledged)
    finally:
        server.kill()
        log.close()


def test_dropped_table_gets_error_then_server_goes_on(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert submit(server, b"f", b"a", b"a")[0] == JOB_CREATED
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE gearman_queue")
    reply = submit(server, b"f", b"b", b"b")
    assert reply == (ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")
    assert server.status()["f"] == (1, 0, 0)


def test_foreground_submission_joining_a_failed_write_gets_its_result(make_server, tmp_path):
    """A background submission joins a foreground job and the write of its row fails:
    that submission gets ERROR, and a foreground one that joined the job meanwhile
    gets JOB_CREATED and then the result, as the first client does."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    execute(db, "CREATE TRIGGER fail BEFORE INSERT ON gearman_queue WHEN"
                " NEW.function_name = 'bad' BEGIN SELECT RAISE(ABORT, 'injected'); END")
    client, joiner, worker = server.connect(), server.connect(), server.connect()
    client.sendall(request(SUBMIT_JOB, b"bad", b"u", b"data"))
    ptype, handle = gp.recv(client)
    assert ptype == JOB_CREATED
    joiner.sendall(request(SUBMIT_JOB_BG, b"bad", b"u", b"data")
                   + request(SUBMIT_JOB, b"bad", b"u", b"data"))
    assert gp.recv(joiner) == (ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")
    assert gp.recv(joiner) == (JOB_CREATED, handle)
    worker.sendall(request(CAN_DO, b"bad") + request(GRAB_JOB_UNIQ))
    ptype, payload = gp.recv(worker)
    assert ptype == JOB_ASSIGN_UNIQ and payload.split(b"\0")[0] == handle
    worker.sendall(request(WORK_COMPLETE, handle, b"result"))
    assert gp.recv(client) == (WORK_COMPLETE, handle + b"\0result")
    assert gp.recv(joiner) == (WORK_COMPLETE, handle + b"\0result")
    assert rows(db) == []


def test_a_delete_that_fails_does_not_fail_later_submissions(make_server, tmp_path):
    """A finished job's row cannot be deleted (a trigger refuses): later background
    submissions, retried in the same transactions as that delete, are still stored;
    the delete is retried until it succeeds."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    execute(db, "CREATE TRIGGER keep BEFORE DELETE ON gearman_queue WHEN"
                " OLD.function_name = 'bad' BEGIN SELECT RAISE(ABORT, 'injected'); END")
    assert submit(server, b"bad", b"u", b"d")[0] == JOB_CREATED
    assert drain(server, b"bad", 1) == [(b"u", b"d")]
    for i in range(3):
        assert submit(server, b"good", b"g%d" % i, b"d")[0] == JOB_CREATED
    assert [row[:2] for row in rows(db)] == [(b"u", b"bad"), (b"g0", b"good"),
                                              (b"g1", b"good"), (b"g2", b"good")]
    execute(db, "DROP TRIGGER keep")
    assert drain(server, b"good", 3) == [(b"g0", b"d"), (b"g1", b"d"), (b"g2", b"d")]
    assert rows_become(db, []) == []


def test_unopenable_database_exits_1_with_one_line(tmp_path):
    db = tmp_path / "q.db"
    db.write_bytes(b"this is not an SQLite database, it is garbage" * 100)
    server = Server(tmp_path, ["--queue-type=sqlite", f"--sqlite-db={db}"])
    result = subprocess.run(server.command(), capture_output=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(db) in lines[0], lines


def test_sqlite_queue_needs_a_database_file(tmp_path):
    server = Server(tmp_path, ["-q", "libsqlite3"])
    result = subprocess.run(server.command(), capture_output=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == \
        "gearmand: missing required --libsqlite3-db=<dbfile> argument"


def test_store_queue_on_shutdown_writes_only_at_shutdown(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--store-queue-on-shutdown")
    assert submit(server, b"f", b"a", b"A")[0] == JOB_CREATED
    assert rows(db) == []
    assert server.stop() == 0
    assert [r[:4] for r in rows(db)] == [(b"a", b"f", 1, b"A")]
    server.start()
    assert drain(server, b"f", 1) == [(b"a", b"A")]


def test_store_queue_on_shutdown_keeps_every_job_without_a_unique(make_server, tmp_path):
    """Jobs with an empty or a "-" unique each get a row of their own at shutdown."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--store-queue-on-shutdown")
    jobs = [(b"", b"empty%d" % i) for i in range(3)] + [(b"-", b"dash%d" % i) for i in range(3)]
    for unique, data in jobs:
        assert submit(server, b"f", unique, data)[0] == JOB_CREATED
    assert server.stop() == 0
    assert len(rows(db)) == len(jobs)
    server.start()
    assert drain(server, b"f", len(jobs)) == jobs


def c_rows_without_unique(db):
    """Rows as C gearmand writes jobs submitted with an empty and with a "-" unique."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE gearman_queue ( unique_key TEXT, function_name TEXT,"
                     " priority INTEGER, data BLOB, when_to_run INTEGER,"
                     " PRIMARY KEY (unique_key, function_name))")
        conn.executemany("INSERT INTO gearman_queue VALUES (?, ?, 1, ?, 0)",
                         [("", "f", b"old-empty"), ("-", "f", b"old-dash")])
    conn.close()


def test_store_queue_on_shutdown_keeps_replayed_rows_as_they_are(make_server, tmp_path):
    """Rows without a unique, replayed and stored again at each clean stop, keep their
    keys: restarts neither copy them nor lose them."""
    db = tmp_path / "q.db"
    c_rows_without_unique(db)
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--store-queue-on-shutdown")
    for _ in range(3):
        assert server.stop() == 0
        assert sorted(r[:4] for r in rows(db)) == [(b"", b"f", 1, b"old-empty"),
                                                  (b"-", b"f", 1, b"old-dash")]
        server.start()
    assert sorted(drain(server, b"f", 2)) == [(b"", b"old-empty"), (b"-", b"old-dash")]


def test_store_queue_on_shutdown_finished_new_job_leaves_replayed_rows(make_server, tmp_path):
    """A new job without a unique finishes while replayed ones with the same empty
    key wait: its delete must not take their rows."""
    db = tmp_path / "q.db"
    c_rows_without_unique(db)
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--store-queue-on-shutdown")
    worker = server.connect()
    assert submit(server, b"f", b"", b"new", SUBMIT_JOB_HIGH_BG)[0] == JOB_CREATED
    worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    ptype, payload = gp.recv(worker)
    assert ptype == JOB_ASSIGN_UNIQ and payload.endswith(b"\0new")
    worker.sendall(request(WORK_COMPLETE, payload.split(b"\0")[0], b"") + request(gp.ECHO_REQ, b"sync"))
    assert gp.recv(worker) == (gp.ECHO_RES, b"sync")
    # A delete would come within DELETE_DELAY (50 ms): watch the rows for a second.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert sorted(r[:4] for r in rows(db)) == [(b"", b"f", 1, b"old-empty"),
                                                  (b"-", b"f", 1, b"old-dash")]
        time.sleep(0.02)


def test_job_dropped_when_end_of_turn_closes_its_worker_leaves_the_store(make_server, tmp_path):
    """With -j 1, a worker closed over --max-output at the end of a loop turn drops
    its job there: the row goes without waiting for other traffic."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "-j", "1",
                         "--max-output", "1000")
    assert submit(server, b"f", b"u", b"d")[0] == JOB_CREATED
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", server.port))
    hog.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    assert gp.recv(hog)[0] == JOB_ASSIGN_UNIQ
    hog.sendall(request(gp.ECHO_REQ, b"e" * (8 << 20)))   # an ECHO whose reply it never reads
    # The last packet anyone sends.
    assert rows_become(db, [], timeout=2) == []
