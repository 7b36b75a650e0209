"""The SQLite store: acknowledged background jobs survive kill -9, and stores
written by C gearmand 1.1.20 replay in ours and ours in C."""
import collections
import os
import random
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import C_GEARMAND, IMPL, Server, free_port, unavailable, wait_for_port, wait_until

REQ = b"\0REQ"
SUBMIT_JOB = 7
SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG, SUBMIT_JOB_EPOCH = 18, 32, 34, 36
JOB_CREATED, ERROR, NO_JOB, NOOP = 8, 19, 10, 6
CAN_DO, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, WORK_COMPLETE, PRE_SLEEP = 1, 30, 31, 13, 4

pytestmark = pytest.mark.skipif(IMPL == "c", reason="tests of our SQLite store and its C interplay")


def request(ptype, *args):
    payload = b"\0".join(args)
    return REQ + struct.pack(">II", ptype, len(payload)) + payload


class PacketReader:
    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def next(self, timeout=10.0):
        """The next packet as (type, payload), or None if the connection closed."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buffer) >= 12:
                ptype, size = struct.unpack(">II", self.buffer[4:12])
                if len(self.buffer) >= 12 + size:
                    payload = self.buffer[12:12 + size]
                    self.buffer = self.buffer[12 + size:]
                    return ptype, payload
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            self.buffer += chunk


def submit(server, function, unique, data, ptype=SUBMIT_JOB_BG, epoch=None):
    with server.connect() as sock:
        args = [function, unique] + ([str(epoch).encode()] if epoch is not None else []) + [data]
        sock.sendall(request(ptype, *args))
        return PacketReader(sock).next()


def drain(server, function, expect, timeout=15.0):
    """Run a worker that completes jobs until `expect` have run; [(unique, data)] in order."""
    done = []
    with server.connect() as sock:
        reader = PacketReader(sock)
        sock.sendall(request(CAN_DO, function))
        deadline = time.monotonic() + timeout
        while len(done) < expect and time.monotonic() < deadline:
            sock.sendall(request(GRAB_JOB_UNIQ))
            ptype, payload = reader.next()
            if ptype == NO_JOB:
                sock.sendall(request(PRE_SLEEP))
                reader.next(timeout=max(deadline - time.monotonic(), 0.01))
                continue
            assert ptype == JOB_ASSIGN_UNIQ
            handle, _, unique, data = payload.split(b"\0", 3)
            done.append((unique, data))
            sock.sendall(request(WORK_COMPLETE, handle, b""))
        # Make sure the last WORK_COMPLETE was processed before the caller looks.
        sock.sendall(request(16, b"sync"))
        assert reader.next() == (17, b"sync")
    return done


def rows(path, table="gearman_queue"):
    with sqlite3.connect(path) as db:
        db.text_factory = bytes
        return db.execute(f"SELECT unique_key, function_name, priority, data, when_to_run,"
                          f" typeof(unique_key), typeof(function_name), typeof(data)"
                          f" FROM {table} ORDER BY rowid").fetchall()


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


def test_background_job_is_committed_before_job_created(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert submit(server, b"f", b"u1", b"payload")[0] == JOB_CREATED
    # JOB_CREATED came back, so the row must already be on disk, visible to another reader.
    assert [r[:5] for r in rows(db)] == [(b"u1", b"f", 1, b"payload", 0)]
    # Stored as C stores it: TEXT unique and function, BLOB data.
    assert rows(db)[0][5:] == (b"text", b"text", b"blob")


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


def test_completed_failed_and_cancelled_jobs_leave_the_store(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    for unique in (b"a", b"b", b"c"):
        assert submit(server, b"f", unique, unique)[0] == JOB_CREATED
    handle = submit(server, b"g", b"x", b"x")[1]
    assert server.admin("cancel job " + handle.decode()) == b"OK\r\n"
    assert drain(server, b"f", 3) == [(b"a", b"a"), (b"b", b"b"), (b"c", b"c")]
    assert rows_become(db, []) == []


def store_commits(http_port):
    """How many store transactions the server has committed, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("gearman_store_batch_size_count "):
                return int(float(line.split()[1]))
    raise AssertionError("no gearman_store_batch_size_count in /metrics")


def test_deletes_of_jobs_finished_one_by_one_share_transactions(make_server, tmp_path):
    db = tmp_path / "q.db"
    http_port = free_port()
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--http-port", str(http_port))
    jobs = 400
    with server.connect() as sock:
        sock.sendall(b"".join(request(SUBMIT_JOB_BG, b"f", b"u%d" % i, b"d") for i in range(jobs)))
        reader = PacketReader(sock)
        assert all(reader.next()[0] == JOB_CREATED for _ in range(jobs))
    before = store_commits(http_port)
    assert len(drain(server, b"f", jobs)) == jobs      # one round trip per job
    assert rows_become(db, []) == []
    deletes = wait_until(lambda: store_commits(http_port) - before, what="the delete commits")
    # One commit per DELETE_DELAY (50 ms) at most: 80 would mean 10 ms per round trip.
    assert deletes <= jobs // 5, f"{jobs} deletes took {deletes} transactions"


def test_finished_job_row_is_deleted_without_further_traffic(make_server, tmp_path):
    """The delete of a finished job's row is committed on its own: nothing more
    has to reach the server after the WORK_COMPLETE."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    assert submit(server, b"f", b"u", b"d")[0] == JOB_CREATED
    with server.connect() as worker:
        reader = PacketReader(worker)
        worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
        ptype, payload = reader.next()
        assert ptype == JOB_ASSIGN_UNIQ
        # The last packet anyone sends: the worker stays connected and silent.
        worker.sendall(request(WORK_COMPLETE, payload.split(b"\0")[0], b""))
        assert rows_become(db, [], timeout=2) == []


def running_foreground_job(server, unique, data):
    """A foreground job of function f that a worker holds: (the client's reader,
    the worker, the worker's reader, the handle)."""
    client, worker = server.connect(), server.connect()
    client_reader, worker_reader = PacketReader(client), PacketReader(worker)
    client.sendall(request(SUBMIT_JOB, b"f", unique, data))
    ptype, handle = client_reader.next()
    assert ptype == JOB_CREATED
    worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    assert worker_reader.next()[0] == JOB_ASSIGN_UNIQ
    return client_reader, worker, worker_reader, handle


def test_dash_job_ending_while_its_row_is_written_leaves_no_row(make_server, tmp_path):
    """A "-" job ends while the row a background submission gave it is being written,
    and a new "-" job with the same payload comes in: the new job has a row of its
    own, so the old row is still deleted and does not run again after a restart."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    client_reader, worker, worker_reader, first = running_foreground_job(server, b"-", b"P")
    # In one read: a background submission joins it (its row is written), it completes
    # while that write is in flight, and the same payload is submitted again.
    worker.sendall(request(SUBMIT_JOB_BG, b"f", b"-", b"P") + request(WORK_COMPLETE, first, b"done")
                   + request(SUBMIT_JOB_BG, b"f", b"-", b"P"))
    assert worker_reader.next() == (JOB_CREATED, first)
    ptype, second = worker_reader.next()
    assert ptype == JOB_CREATED and second != first
    assert client_reader.next() == (WORK_COMPLETE, first + b"\0done")
    worker.sendall(request(GRAB_JOB_UNIQ))
    ptype, payload = worker_reader.next()
    assert ptype == JOB_ASSIGN_UNIQ and payload.split(b"\0")[0] == second
    worker.sendall(request(WORK_COMPLETE, second, b"") + request(16, b"sync"))
    assert worker_reader.next() == (17, b"sync")
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
    client_reader, worker, worker_reader, handle = running_foreground_job(server, b"u", b"d")
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")        # the server's next write waits for this lock
    # A background submission joins the job (its row is written), then the job ends.
    worker.sendall(request(SUBMIT_JOB_BG, b"f", b"u", b"d") + request(WORK_COMPLETE, handle, b"ok"))
    assert client_reader.next() == (WORK_COMPLETE, handle + b"\0ok")
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


# --- kill -9 at random instants --------------------------------------------

def submitter(port, function, prefix, acked, stop, window=64):
    """Pipeline SUBMIT_JOB_BG until the server dies; record each acknowledged unique."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), 5)
    except OSError:
        return
    reader = PacketReader(sock)
    sent = collections.deque()
    number = 0
    try:
        while not stop.is_set():
            batch = []
            while len(sent) < window:
                unique = b"%s-%d" % (prefix, number)
                number += 1
                sent.append(unique)
                batch.append(request(SUBMIT_JOB_BG, function, unique, unique))
            sock.sendall(b"".join(batch))
            while len(sent) >= window // 2:
                reply = reader.next(timeout=5)
                if reply is None:
                    return
                unique = sent.popleft()
                if reply[0] == JOB_CREATED:
                    acked.add(unique)
    except OSError:
        return
    finally:
        sock.close()


@pytest.mark.parametrize("round_number", range(3))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, tmp_path, round_number):
    """Clients submit as fast as they can; the server is kill -9'ed at a random
    instant while a worker is also running jobs; every acknowledged job must run
    after the restart unless the worker already completed it, and only jobs that
    were running or completing when the server died may run twice."""
    db = tmp_path / "q.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}")
    function = b"crash%d" % round_number
    acked = set()
    stop = threading.Event()
    threads = [threading.Thread(target=submitter, args=(server.port, function, b"c%d" % i, acked, stop))
               for i in range(3)]
    before = []
    worker_stop = threading.Event()

    def worker():
        try:
            sock = server.connect()
        except OSError:
            return
        reader = PacketReader(sock)
        try:
            sock.sendall(request(CAN_DO, function))
            while not worker_stop.is_set():
                sock.sendall(request(GRAB_JOB_UNIQ))
                reply = reader.next(timeout=5)
                if reply is None:
                    return
                if reply[0] == NO_JOB:
                    continue
                handle, _, unique, _ = reply[1].split(b"\0", 3)
                before.append(unique)
                sock.sendall(request(WORK_COMPLETE, handle, b""))
        except OSError:
            return
        finally:
            sock.close()

    worker_thread = threading.Thread(target=worker)
    for thread in threads:
        thread.start()
    worker_thread.start()
    time.sleep(random.uniform(0.3, 1.2))   # the random instant of the crash
    server.kill()
    stop.set()
    worker_stop.set()
    for thread in threads + [worker_thread]:
        thread.join(10)
    assert len(acked) > 100, "the clients hardly got to submit anything"

    server.start()
    total = server.status().get(function.decode(), (0, 0, 0))[0]
    after = [unique for unique, _ in drain(server, function, total)]
    assert len(after) == len(set(after)), "a replayed job ran twice after the restart"
    ran = set(before) | set(after)
    lost = acked - ran
    assert not lost, f"{len(lost)} acknowledged jobs lost, e.g. {sorted(lost)[:5]}"
    twice = set(before) & set(after)
    # Only jobs the worker had taken before the crash may come back: their delete
    # may not have been committed yet. Report how many did.
    print(f"round {round_number}: {len(acked)} acknowledged, {len(before)} ran before the "
          f"crash, {len(after)} after, {len(twice)} ran twice (running or completing at the kill)")
    assert twice <= set(before)


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
            sock.sendall(request(16, b"still here"))
            assert PacketReader(sock).next() == (17, b"still here")
        assert "persistent queue write failed" in server.log()
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
    client_reader, joiner_reader = PacketReader(client), PacketReader(joiner)
    client.sendall(request(SUBMIT_JOB, b"bad", b"u", b"data"))
    ptype, handle = client_reader.next()
    assert ptype == JOB_CREATED
    joiner.sendall(request(SUBMIT_JOB_BG, b"bad", b"u", b"data")
                   + request(SUBMIT_JOB, b"bad", b"u", b"data"))
    assert joiner_reader.next() == (ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")
    assert joiner_reader.next() == (JOB_CREATED, handle)
    worker_reader = PacketReader(worker)
    worker.sendall(request(CAN_DO, b"bad") + request(GRAB_JOB_UNIQ))
    ptype, payload = worker_reader.next()
    assert ptype == JOB_ASSIGN_UNIQ and payload.split(b"\0")[0] == handle
    worker.sendall(request(WORK_COMPLETE, handle, b"result"))
    assert client_reader.next() == (WORK_COMPLETE, handle + b"\0result")
    assert joiner_reader.next() == (WORK_COMPLETE, handle + b"\0result")
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
    reader = PacketReader(worker)
    assert submit(server, b"f", b"", b"new", SUBMIT_JOB_HIGH_BG)[0] == JOB_CREATED
    worker.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    ptype, payload = reader.next()
    assert ptype == JOB_ASSIGN_UNIQ and payload.endswith(b"\0new")
    worker.sendall(request(WORK_COMPLETE, payload.split(b"\0")[0], b"") + request(16, b"sync"))
    assert reader.next() == (17, b"sync")
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
    reader = PacketReader(hog)
    hog.sendall(request(CAN_DO, b"f") + request(GRAB_JOB_UNIQ))
    assert reader.next()[0] == JOB_ASSIGN_UNIQ
    hog.sendall(request(16, b"e" * (8 << 20)))   # an ECHO whose reply it never reads
    # The last packet anyone sends.
    assert rows_become(db, [], timeout=2) == []
