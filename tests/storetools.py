"""Helpers shared by the persistent-store tests (any backend, ours or C's).

Everything talks to the job server over raw sockets (tests/gearproto.py):
submit background jobs, drain them with a worker, read `status` and
`prioritystatus`, run a foreground job, poll a condition with a deadline,
check a replay; the checks the SQL stores (MySQL, Postgres) share; and the test
databases themselves (MYSQL, POSTGRES): queries, per-test tables, outages.
"""
import collections
import contextlib
import importlib
import os
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import conftest
import gearproto as gp
from conftest import C_GEARMAND, IMPL, unavailable, wait_until

QUEUE_ERROR = (gp.ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")

HIGH, NORMAL, LOW = 0, 1, 2
SUBMIT_TYPES = {HIGH: gp.SUBMIT_JOB_HIGH_BG, NORMAL: gp.SUBMIT_JOB_BG, LOW: gp.SUBMIT_JOB_LOW_BG}

# One background job: `when` > 0 makes it a SUBMIT_JOB_EPOCH (always NORMAL).
Job = collections.namedtuple("Job", "function unique data priority when")
Job.__new__.__defaults__ = (NORMAL, 0)


def submit_packet(job):
    if job.when:
        return gp.pack(gp.SUBMIT_JOB_EPOCH, job.function, job.unique, str(job.when), job.data)
    return gp.pack(SUBMIT_TYPES[job.priority], job.function, job.unique, job.data)


def submit_all(server, jobs, timeout=10.0):
    """Submit `jobs` in order on one connection; return one (type, payload) per job."""
    with server.connect() as sock:
        replies = []
        for job in jobs:          # one at a time, so the store sees them in this order
            sock.sendall(submit_packet(job))
            replies.append(gp.recv(sock, timeout))
        return replies


def submit_ok(server, jobs):
    """Submit `jobs` and assert every one got JOB_CREATED; return the handles."""
    replies = submit_all(server, jobs)
    for job, reply in zip(jobs, replies):
        assert reply[0] == gp.JOB_CREATED, f"{job}: {gp.show(reply)}"
    return [payload for _, payload in replies]


def submit_one(server, job):
    return submit_all(server, [job])[0]


def drain(server, functions, count, timeout=10.0, poll=0.05):
    """Work as one worker for `functions` until `count` jobs ran, then check that
    no other job is runnable. Returns [(function, unique, data)] in the order run."""
    ran = []
    deadline = time.monotonic() + timeout
    with server.connect() as sock:
        gp.can_do(sock, *functions)
        while True:
            ptype, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
            if ptype == gp.JOB_ASSIGN_UNIQ:
                handle, function, unique, data = body.split(b"\0", 3)
                ran.append((function, unique, data))
                gp.send(sock, gp.WORK_COMPLETE, handle, b"")
                continue
            assert ptype == gp.NO_JOB, gp.show((ptype, body))
            if len(ran) >= count:
                return ran
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(ran)} of {count} jobs ran: {ran}")
            time.sleep(poll)      # C sends no wakeup when an epoch job falls due


def runnable(server, functions):
    """True if a worker for `functions` would be given a job now (nothing is taken)."""
    with server.connect() as sock:
        gp.can_do(sock, *functions)
        gp.send(sock, gp.PRE_SLEEP)
        try:
            ptype, _ = gp.recv(sock, timeout=0.3)
        except OSError:
            return False
        return ptype == gp.NOOP


def foreground(server, function, data=b"fg"):
    """Run one foreground job through a worker; return the client's WORK_COMPLETE data."""
    with server.connect() as client, server.connect() as worker:
        gp.can_do(worker, function)
        ptype, handle = gp.call(client, gp.SUBMIT_JOB, function, b"", data)
        assert ptype == gp.JOB_CREATED, gp.show((ptype, handle))
        ptype, body = gp.call(worker, gp.GRAB_JOB)
        assert ptype == gp.JOB_ASSIGN, gp.show((ptype, body))
        gp.send(worker, gp.WORK_COMPLETE, handle, data[::-1])
        ptype, body = gp.recv(client)
        assert ptype == gp.WORK_COMPLETE, gp.show((ptype, body))
        return body.split(b"\0", 1)[1]


def admin_rows(server, command, width):
    rows = {}
    for line in server.admin(command).split(b"\n"):
        parts = line.split(b"\t")
        if len(parts) == width:
            rows[parts[0]] = tuple(int(p) for p in parts[1:])
    return rows


def status(server):
    """{function: (total, running, workers)}"""
    return admin_rows(server, "status", 4)


def priority_status(server):
    """{function: (high, normal, low, workers)}"""
    return admin_rows(server, "prioritystatus", 5)


def sample_jobs(prefix, epoch_at, empty_uniques=2):
    """A set of background jobs that exercises a store: every priority (submitted
    interleaved), binary data with NULs, an empty payload, `empty_uniques` jobs with
    an empty unique, a `-` unique, and an epoch job due at `epoch_at`.
    Functions: <prefix>.prio, <prefix>.misc, <prefix>.epoch."""
    prio, misc, epoch = (f"{prefix}.{name}".encode() for name in ("prio", "misc", "epoch"))
    jobs = [Job(prio, b"l1", b"low 1", LOW), Job(prio, b"n1", b"normal 1", NORMAL),
            Job(prio, b"h1", b"high 1", HIGH), Job(prio, b"l2", b"low 2", LOW),
            Job(prio, b"n2", b"normal 2", NORMAL), Job(prio, b"h2", b"high 2", HIGH),
            Job(misc, b"bin", b"\0\xff\0bin\x00\r\n'\"\\%s\0"),
            Job(misc, b"empty", b""),
            Job(misc, b"dash-unique", b"for -"),
            Job(misc, b"-", b"payload keyed")]
    jobs += [Job(misc, b"", b"no unique %d" % i) for i in range(empty_uniques)]
    jobs.append(Job(epoch, b"later", b"epoch job", NORMAL, int(epoch_at)))
    return jobs


def functions_of(jobs):
    return sorted({job.function for job in jobs})


def expected_priority_status(jobs):
    counts = {}
    for job in jobs:
        row = counts.setdefault(job.function, [0, 0, 0])
        row[job.priority] += 1
    return {function: tuple(row) for function, row in counts.items()}


def in_priority_order(jobs):
    """(function, unique, data) of `jobs` (one function) in the order a worker gets them."""
    return [(j.function, j.unique, j.data) for p in (HIGH, NORMAL, LOW)
            for j in jobs if j.priority == p]


def check_replay(server, jobs, priorities=True, epoch_waits=True, timeout=15.0):
    """After a restart: `jobs` (from sample_jobs) are all queued and each runs exactly
    once with its data, in submission order within a priority (README: "in insertion
    order within each priority"); with `priorities`, higher priorities first (else in
    submission order whatever the priority); with `epoch_waits`, an epoch job is not
    runnable before it is due and runs once it is. Call it at once after the start:
    the epoch check needs the job's time still ahead."""
    epochs = [job for job in jobs if job.when]
    if epoch_waits:
        for job in epochs:
            # runnable() takes 0.3 s; a slow start leaves no time to check: say so.
            assert time.time() + 0.5 < job.when, (
                f"the replay was checked {time.time() - job.when + 0.5:.1f} s too late to see "
                f"the epoch job wait: give it a later time")
            assert not runnable(server, [job.function]), "epoch job runnable too early"
    if priorities:
        assert {f: row[:3] for f, row in priority_status(server).items()
                if f in functions_of(jobs)} == expected_priority_status(jobs)
    totals = collections.Counter(job.function for job in jobs)
    assert {f: row[0] for f, row in status(server).items() if f in totals} == dict(totals)

    others = [job for job in jobs if not job.when]
    by_function = collections.defaultdict(list)
    for job in others:
        by_function[job.function].append(job)
    for function, group in by_function.items():
        ran = drain(server, [function], len(group))
        if priorities:
            assert ran == in_priority_order(group)
        else:
            assert ran == [(j.function, j.unique, j.data) for j in group]
    for job in epochs:
        ran = drain(server, [job.function], 1, timeout=timeout + max(0, job.when - time.time()))
        assert ran == [(job.function, job.unique, job.data)]
        if epoch_waits:
            assert time.time() >= job.when - 1


def check_replay_any_order(server, jobs):
    """Like check_replay, for a server that replays in no particular order within a
    priority: each job runs exactly once with its data, higher priorities first."""
    functions = {job.function for job in jobs}
    assert {f: row[:3] for f, row in priority_status(server).items()
            if f in functions} == expected_priority_status(jobs)
    epochs = [job for job in jobs if job.when]
    if epochs:
        check_replay(server, epochs)      # first: it checks they wait while still due later
    by_function = collections.defaultdict(list)
    for job in jobs:
        if not job.when:
            by_function[job.function].append(job)
    for function, group in by_function.items():
        ran = drain(server, [function], len(group))
        assert sorted(ran) == sorted((j.function, j.unique, j.data) for j in group)
        priority = {(j.function, j.unique, j.data): j.priority for j in group}
        order = [priority[job] for job in ran]
        assert order == sorted(order), ran


def need_c():
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed")


def run_once(make_server, *args):
    """Run a server with `args` to its exit; return (exit code, its stderr lines)."""
    server = make_server(*args, start=False)
    result = subprocess.run(server.command(), capture_output=True, timeout=30)
    return result.returncode, result.stderr.decode().strip().splitlines()


# -- the test databases: MariaDB and PostgreSQL -------------------------------------------

POSTGRES_CONNINFO = "host=127.0.0.1 port=5432 dbname=test user=root"


def unique_prefix(tag="gq"):
    """A function-name prefix of a test's own: tests share the databases."""
    return tag + secrets.token_hex(3)


class Database:
    """One of the databases the tests use (MariaDB: root, no password, database `test`
    on 127.0.0.1:3306; PostgreSQL: POSTGRES_CONNINFO): statements on a connection of
    their own, per-test tables, the server's queue options for them, and stopping and
    starting the database for the outage tests."""
    name = label = module = package = where = ""
    port = 0

    def driver(self):
        """The driver module; unavailable() if it is not installed."""
        try:
            return importlib.import_module(self.module)
        except ImportError:
            unavailable(f"{self.package} is not installed")

    def require(self):
        """unavailable() unless the driver is installed and the database answers."""
        driver = self.driver()
        try:
            self.query("SELECT 1")
        except driver.Error as error:
            unavailable(f"{self.label} is not reachable {self.where}: {error}")

    def query(self, sql, params=()):
        """Run `sql` (autocommit) on a connection of its own: its rows, or None."""
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None
        finally:
            connection.close()

    def count(self, table):
        return self.query(f"SELECT COUNT(*) FROM {table}")[0][0]

    def queue_rows(self, table):
        """A queue table's rows as {(unique, function): (priority, data, when_to_run)}."""
        return {(self.text(u), self.text(f)): (p, None if d is None else bytes(d), w)
                for u, f, p, d, w in self.query(f"SELECT unique_key, function_name, priority,"
                                                f" data, when_to_run FROM {table}")}

    def queue_keys(self, table):
        """{(function, unique)} of a queue table's rows."""
        return {(function, unique) for unique, function in self.queue_rows(table)}

    def drop_table(self, table):
        self.query(f"DROP TABLE IF EXISTS {table}")

    @contextlib.contextmanager
    def tables(self, prefix):
        """For a fixture: unavailable() unless the database answers, then
        new(create=None) names a table of the test's own (`prefix` and random hex),
        made by the statement `create` (with {table} in it) if given. Every one is
        dropped at the end, with the database running again if the test stopped it."""
        self.require()
        names = []

        def new(create=None):
            name = prefix + secrets.token_hex(4)
            names.append(name)
            if create:
                self.query(create.format(table=name))
            return name
        try:
            yield new
        finally:
            self.ensure_running()
            for name in names:
                self.drop_table(name)

    def up(self):
        try:
            self.connect().close()
            return True
        except self.driver().Error:
            return False

    def ensure_running(self):
        if not self.up():
            self.start()
            wait_until(self.up, 60, what=f"{self.label} to accept connections", interval=0.1)

    @contextlib.contextmanager
    def stopped(self):
        """Holds the database down (unavailable() where it cannot be stopped and started
        here), then starts it again."""
        try:
            self.stop()
            yield
        finally:
            self.ensure_running()


class MariaDB(Database):
    name, label, module, package = "mysql", "MariaDB", "mysql.connector", \
        "mysql-connector-python"
    port = 3306
    where = "on 127.0.0.1:3306"
    program, pid_file = "/usr/sbin/mariadbd", "/run/mysqld/mysqld.pid"
    text = bytes      # use_unicode=False: strings come as bytearray

    def connect(self):
        return self.driver().connect(host="127.0.0.1", port=self.port, user="root",
                                     database="test", autocommit=True, use_unicode=False,
                                     connection_timeout=2)

    def options(self, table, host="127.0.0.1", port=None):
        """The server's options for `table` (with --mysql-port if `port` is given)."""
        return (("-q", "MySQL", "--mysql-host", host)
                + (("--mysql-port", str(port)) if port else ())
                + ("--mysql-user", "root", "--mysql-db", "test", "--mysql-table", table))

    def pid(self):
        try:
            with open(self.pid_file) as pid_file:
                pid = int(pid_file.read().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        pid = self.pid()
        if pid is None or os.geteuid() != 0 or not os.path.exists(self.program):
            unavailable("cannot stop and restart MariaDB here (needs root and its pid file)")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 60, what="MariaDB to stop",
                   interval=0.05)

    def start(self):
        subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background",
                        "--exec", self.program], check=True, capture_output=True)


class PostgreSQL(Database):
    name, label, module, package = "postgres", "PostgreSQL", "psycopg2", "psycopg2"
    port = 5432
    where = f"({POSTGRES_CONNINFO})"

    @staticmethod
    def text(value):
        return value.encode()

    def connect(self, autocommit=True):
        connection = self.driver().connect(POSTGRES_CONNINFO, connect_timeout=2)
        connection.autocommit = autocommit
        return connection

    def options(self, table, conninfo=POSTGRES_CONNINFO):
        return ("-q", "Postgres", "--libpq-conninfo", conninfo, "--libpq-table", table)

    def pg_ctlcluster(self, action):
        versions = os.listdir("/etc/postgresql")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main",
                        action], check=True, capture_output=True, timeout=60)

    def stop(self):
        if (not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql")
                or os.geteuid() != 0):
            unavailable("cannot stop and restart PostgreSQL here (needs root and pg_ctlcluster)")
        self.pg_ctlcluster("stop")
        assert not self.up()

    def start(self):
        self.pg_ctlcluster("start")


MYSQL, POSTGRES = MariaDB(), PostgreSQL()
DATABASES = {db.name: db for db in (MYSQL, POSTGRES)}


# -- SQL stores: the same checks for MySQL and Postgres -------------------------------
# `options` are the server's queue options, `rows()` reads the table as
# {(unique, function): (priority, data, when_to_run)}.

def check_refused_writes(server, function, rows, drop_table):
    """A row the database refuses (a function name longer than VARCHAR(255)) and a
    missing table answer QUEUE_ERROR; the rest keeps working."""
    long_name = b"f" * 300
    replies = submit_all(server, [Job(function, b"a", b"1"), Job(long_name, b"b", b"2"),
                                  Job(function, b"c", b"3")])
    assert [r[0] for r in replies] == [gp.JOB_CREATED, gp.ERROR, gp.JOB_CREATED]
    assert replies[1] == QUEUE_ERROR
    assert set(rows()) == {(b"a", function), (b"c", function)}
    assert server.status().get("f" * 300, (0,))[0] == 0

    # Without its table the store can write nothing; the rest keeps working.
    drop_table()
    assert submit_one(server, Job(function, b"d", b"4")) == QUEUE_ERROR
    assert foreground(server, function + b".fg", b"abc") == b"cba"
    if IMPL == "c":
        return      # C closes a worker whose WORK_COMPLETE cannot delete the row
    assert sorted(drain(server, [function], 2)) == [(function, b"a", b"1"), (function, b"c", b"3")]


def check_c_writes_we_replay(make_server, options, rows, prefix):
    """C queues sample jobs and is killed; we replay them all (C stores priority and
    when_to_run correctly), then delete every row."""
    need_c()
    # C refuses a second empty-unique job of a function (duplicate key), so one only.
    jobs = sample_jobs(prefix, int(time.time()) + 4, empty_uniques=1)
    c_server = make_server(*options, impl="c")
    submit_ok(c_server, jobs)
    assert len(rows()) == len(jobs)
    c_server.kill()
    server = make_server(*options, impl="py")
    check_replay(server, jobs)
    wait_until(lambda: not rows(), 5, what="done jobs deleted from the table")


def we_write_and_c_starts(make_server, options, rows, jobs):
    """We queue `jobs` and are killed; C starts on the same table. Returns C's server
    and `jobs` as C sees them: our generated uniques (for empty and `-` uniques) are
    ordinary ones to it."""
    need_c()
    server = make_server(*options, impl="py")
    submit_ok(server, jobs)
    server.kill()
    generated = {data: unique for (unique, _), (_, data, _) in rows().items()}
    c_server = make_server(*options, impl="c")
    return c_server, [job._replace(unique=generated[job.data])
                      if job.unique in (b"", b"-") else job for job in jobs]


def check_outage(server, backend_stopped, rows, function, backend):
    """While the `backend_stopped()` context holds the database down, background
    submissions fail at once with QUEUE_ERROR and foreground and queued work still
    runs; when it is back, submissions succeed again by themselves, the failed delete
    is retried and nothing acknowledged is lost. `backend` names it in messages."""
    submit_ok(server, [Job(function, b"before1", b"1"), Job(function, b"before2", b"2")])

    with backend_stopped():
        started = time.monotonic()
        assert submit_one(server, Job(function, b"during", b"x")) == QUEUE_ERROR
        assert submit_one(server, Job(function, b"during2", b"y", LOW)) == QUEUE_ERROR
        assert time.monotonic() - started < 3, f"the store blocked while {backend} was down"
        assert foreground(server, function + b".fg", b"abc") == b"cba"
        # Queued work is still handed out; its delete waits for the database.
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

    after = wait_until(submitted, 20, what="a background submission to succeed again",
                       interval=0.1)
    wait_until(lambda: set(rows()) == {(b"before2", function), (after, function)}, 10,
               what="the failed delete to be retried")

    # Nothing acknowledged was lost.
    server.kill()
    server.start()
    assert sorted(drain(server, [function], 2)) == [(function, after, after),
                                                    (function, b"before2", b"2")]


def check_bad_settings_exit_1(make_server, arg_sets, store):
    """Each of `arg_sets` makes the server exit 1 within 10 s; ours logs one line
    naming the `store`."""
    for args in arg_sets:
        server = make_server(*args, start=False)
        started = time.monotonic()
        server.start(expect_ready=False)
        assert server.proc.wait(15) == 1, server.log()
        assert time.monotonic() - started < 10
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert IMPL == "c" or len(lines) == 1 and store in lines[0], server.log()


# -- kill -9 at a random instant, under load: the same rounds for every backend --------

class Load:
    """What the load threads saw, filled in as they go (list appends and dict
    stores are atomic): when each submission was sent (monotonic time taken just
    before its bytes left, so the server saw it later), which were acknowledged,
    what the worker took, which WORK_COMPLETEs it sent, and when each one was
    confirmed processed (a reply to a GRAB sent after it arrived), and any reply
    that should not have come."""

    def __init__(self):
        self.sent_at = {}
        self.acked = []
        self.taken = []
        self.completing = []
        self.confirmed = {}
        self.wrong = []


def _submitter(port, function, prefix, load, stop, window=64):
    """Pipeline SUBMIT_JOB_BG of `function` until the server dies or `stop` is set."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), 5)
    except OSError:
        return
    in_flight = collections.deque()
    number = 0
    try:
        while not stop.is_set():
            batch = []
            sent_at = time.monotonic()
            while len(in_flight) < window:
                unique = b"%s-%d" % (prefix, number)
                number += 1
                in_flight.append(unique)
                load.sent_at[unique] = sent_at
                batch.append(gp.pack(gp.SUBMIT_JOB_BG, function, unique, unique))
            sock.sendall(b"".join(batch))
            while len(in_flight) > window // 2:
                try:
                    reply = gp.recv(sock, timeout=10)
                except gp.Closed:
                    return                # killed
                except socket.timeout:
                    load.wrong.append((in_flight[0], "no reply within 10 s"))
                    return
                unique = in_flight.popleft()
                if reply[0] == gp.JOB_CREATED:
                    load.acked.append(unique)
                else:
                    load.wrong.append((unique, gp.show(reply)))
    except OSError:
        return                            # killed while sending
    finally:
        sock.close()


def _worker(port, function, load, stop, window=16):
    """Run jobs of `function` until the server dies or `stop` is set, asking for
    `window` at a time (a thread sharing the GIL with busy submitters would run
    few jobs one round trip at a time)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), 5)
    except OSError:
        return
    completing = []
    try:
        gp.send(sock, gp.CAN_DO, function)
        while not stop.is_set():
            load.completing.extend(unique for _, unique in completing)
            sock.sendall(b"".join(packet for packet, _ in completing)
                         + gp.pack(gp.GRAB_JOB_UNIQ) * window)
            confirming, completing, empty = [unique for _, unique in completing], [], 0
            for _ in range(window):
                while True:
                    ptype, body = gp.recv(sock, timeout=10)
                    if ptype != gp.NOOP:  # a wake-up left over from a PRE_SLEEP
                        break
                if confirming:
                    now = time.monotonic()
                    for unique in confirming:
                        load.confirmed[unique] = now
                    confirming = []
                if ptype == gp.NO_JOB:
                    empty += 1
                    continue
                if ptype != gp.JOB_ASSIGN_UNIQ:
                    load.wrong.append((None, gp.show((ptype, body))))
                    return
                handle, _, unique, _ = body.split(b"\0", 3)
                load.taken.append(unique)
                completing.append((gp.pack(gp.WORK_COMPLETE, handle, b""), unique))
            if empty == window:
                gp.send(sock, gp.PRE_SLEEP)
                try:
                    gp.recv(sock, timeout=0.5)  # the NOOP
                except socket.timeout:
                    pass
    except (gp.Closed, OSError):
        return
    finally:
        sock.close()


def drain_fast(server, function, count, timeout=60.0, window=100):
    """Like drain() for one function, for many jobs: the worker asks for `window`
    jobs at a time. Returns [(unique, data)] in the order run; checks that nothing
    else is runnable at the end."""
    ran = []
    deadline = time.monotonic() + timeout
    with server.connect() as sock:
        gp.can_do(sock, function)
        while True:
            sock.sendall(gp.pack(gp.GRAB_JOB_UNIQ) * window)
            completions, empty = [], 0
            for _ in range(window):
                ptype, body = gp.recv(sock, timeout=10)
                if ptype == gp.NO_JOB:
                    empty += 1
                    continue
                assert ptype == gp.JOB_ASSIGN_UNIQ, gp.show((ptype, body))
                handle, _, unique, data = body.split(b"\0", 3)
                ran.append((unique, data))
                completions.append(gp.pack(gp.WORK_COMPLETE, handle, b""))
            sock.sendall(b"".join(completions))
            if empty == window and len(ran) >= count:
                gp.sync(sock)
                return ran
            assert time.monotonic() < deadline, f"only {len(ran)} of {count} jobs ran"


def check_kill_9_at_a_random_instant(server, function, submitters=3, instant=(0.3, 1.2),
                                     after_kill=None):
    """Clients pipeline background submissions of `function` as fast as the server
    takes them and a worker runs them, until the server is killed with SIGKILL at a
    random instant; then it is started again and every job it replays is run.

    What must hold, as README's "Persistence" section promises:
    - every reply during the load is JOB_CREATED (an ERROR fails the round);
    - no acknowledged job is lost: each one whose WORK_COMPLETE the worker had not
      sent runs after the restart;
    - no job runs twice after the restart, none was handed out twice before the
      kill, and only jobs that were submitted are replayed, with their data;
    - only jobs running at the kill may run twice: a job's delete goes along with
      any later job's commit, so a job whose WORK_COMPLETE the server had processed
      before some acknowledged submission was sent must not come back. Others (the
      job running, or completed after the last acknowledged submission was sent)
      may.
    Returns a summary line."""
    load = Load()
    stop = threading.Event()
    threads = [threading.Thread(target=_submitter, daemon=True,
                                args=(server.port, function, b"c%d" % i, load, stop))
               for i in range(submitters)]
    threads.append(threading.Thread(target=_worker, daemon=True,
                                    args=(server.port, function, load, stop)))
    for thread in threads:
        thread.start()
    # The round proves something once a job completed before a later submission
    # was acknowledged (a slow store takes a while): then kill at a random instant.
    started = time.monotonic()

    def fenced_once():
        first = min(list(load.confirmed.values()), default=None)
        return first is not None and load.acked and load.sent_at[load.acked[-1]] > first

    wait_until(lambda: fenced_once() or load.wrong or time.monotonic() - started > 20, 30,
               what="a job to complete before a later submission was acknowledged")
    time.sleep(random.uniform(*instant))  # the random instant of the crash
    server.kill()
    stop.set()
    for thread in threads:
        thread.join(15)
        assert not thread.is_alive(), "a client thread hangs after the kill"
    if after_kill is not None:
        after_kill()                      # the store as the crash left it

    assert not load.wrong, f"unexpected replies during the load: {load.wrong[:5]}"
    sent, acked, taken = load.sent_at, set(load.acked), load.taken
    completing, confirmed = set(load.completing), load.confirmed
    assert len(acked) > 100, f"the clients hardly got to submit anything: {len(acked)}"
    assert len(taken) == len(set(taken)), "a job was handed out twice before the kill"
    # The last submission sent that was acknowledged: every WORK_COMPLETE the server
    # processed before it was sent has had its delete committed by then.
    fence = max(sent[unique] for unique in acked)
    fenced = {unique for unique, at in confirmed.items() if at < fence}
    assert fenced, "no job was completed before the last acknowledged submission"

    server.start()
    total = status(server).get(function, (0, 0, 0))[0]
    ran = drain_fast(server, function, total)
    after = [unique for unique, _ in ran]
    assert all(unique == data for unique, data in ran), "a replayed job lost its data"
    assert len(after) == len(set(after)), "a replayed job ran twice after the restart"
    assert set(after) <= set(sent), "a job nobody submitted was replayed"
    lost = (acked - completing) - set(after)
    assert not lost, f"{len(lost)} acknowledged jobs lost, e.g. {sorted(lost)[:5]}"
    twice = set(taken) & set(after)
    wrongly = twice & fenced
    assert not wrongly, (f"{len(wrongly)} jobs ran again although their WORK_COMPLETE was "
                         f"processed before a later job was acknowledged, e.g. "
                         f"{sorted(wrongly)[:5]}")
    return (f"{len(acked)} acknowledged, {len(taken)} ran before the kill ({len(fenced)} "
            f"of them fenced by a later acknowledgement), {len(after)} after, "
            f"{len(twice)} ran twice")


def store_batches(http_port):
    """(commits, jobs added and deleted) the store has done, from /metrics:
    gearman_store_batch_size's _count and _sum."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("gearman_store_batch_size_count", "gearman_store_batch_size_sum"):
            values[name] = int(float(value))
    return values["gearman_store_batch_size_count"], values["gearman_store_batch_size_sum"]


def check_submissions_share_commits(make_server, options, function, jobs=400, commits=10):
    """Group commit of submissions: `jobs` SUBMIT_JOB_BG pipelined on one connection
    reach the store in at most `commits` transactions (one per loop turn at most,
    however many jobs it read), and every one is acknowledged."""
    http_port = conftest.free_port()
    server = make_server(*options, "--http-port", str(http_port))
    before = store_batches(http_port)
    with server.connect() as sock:
        sock.sendall(b"".join(gp.pack(gp.SUBMIT_JOB_BG, function, b"g%d" % i, b"d")
                              for i in range(jobs)))
        for i in range(jobs):
            reply = gp.recv(sock, timeout=20)
            assert reply[0] == gp.JOB_CREATED, f"job {i}: {gp.show(reply)}"
    count, size = store_batches(http_port)
    assert size - before[1] == jobs, f"{size - before[1]} rows written for {jobs} jobs"
    assert count - before[0] <= commits, (f"{jobs} pipelined submissions took "
                                          f"{count - before[0]} store commits")
    return server


# -- what a client hears while the store writes ------------------------------------------

def nothing_to_read(sock, seconds):
    """True if `sock` receives nothing (and is not closed) for `seconds`: a negative
    check that gives a wrong packet that long to show up."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def check_job_created_waits_for_the_commit(server, function, locked, stored, hold=0.5):
    """README: "JOB_CREATED ... is held back until the writer reports the record
    committed. The loop never waits". `locked()` is a context manager during which
    the store's writes wait for a lock the test holds; `stored()` returns the
    store's {(function, unique)}. A trigger the caller installed makes the store
    refuse every row of `function + b".bad"`.

    While the lock is held, after the server has taken the submission (`status`
    counts it): the client hears nothing for `hold` seconds, while other
    connections are answered. Once released: JOB_CREATED with the row already
    stored, or for the refused row ERROR and no row."""
    bad = function + b".bad"
    for name, unique, expected in ((function, b"kept", gp.JOB_CREATED),
                                   (bad, b"refused", gp.ERROR)):
        with server.connect() as client:
            with locked():
                gp.send(client, gp.SUBMIT_JOB_BG, name, unique, b"data")
                wait_until(lambda: status(server).get(name, (0,))[0] == 1,
                           what="the server to take the submission")
                with server.connect() as other:
                    gp.sync(other)        # the loop serves others while the write waits
                assert nothing_to_read(client, hold), \
                    f"{gp.show(gp.recv(client))} came before the write was committed"
                with server.connect() as other:
                    gp.sync(other)
            reply = gp.recv(client, timeout=15)
            if expected == gp.JOB_CREATED:
                assert reply[0] == gp.JOB_CREATED, gp.show(reply)
                assert (name, unique) in stored(), "JOB_CREATED came before the row was stored"
            else:
                assert reply == QUEUE_ERROR, gp.show(reply)
                assert (name, unique) not in stored()
                assert status(server).get(name, (0,))[0] == 0


# -- which jobs leave the store ------------------------------------------------------------

def check_ended_jobs_leave_the_store(server, function, stored, drop_function=True):
    """README: a job leaves the store when it completes, fails, throws an exception,
    is cancelled, or its function is dropped; a worker that dies requeues its job
    and the row stays. One function per way to end (`function`.done, .fail, ...);
    `stored()` returns the store's {(function, unique)}. `drop_function=False` for
    C, which leaves the rows of a dropped function behind."""
    def name(kind):
        return function + b"." + kind
    kinds = [b"done", b"fail", b"exception", b"cancel", b"died", b"waits"]
    if drop_function:
        kinds.append(b"dropped")
    handles = dict(zip(kinds, submit_ok(server, [Job(name(kind), kind, b"data " + kind)
                                                 for kind in kinds])))
    assert stored() >= {(name(kind), kind) for kind in kinds}

    # A worker dies holding its job: the job is requeued, its row stays.
    with server.connect() as dying:
        gp.can_do(dying, name(b"died"))
        ptype, body = gp.call(dying, gp.GRAB_JOB)
        assert ptype == gp.JOB_ASSIGN, gp.show((ptype, body))
    wait_until(lambda: status(server)[name(b"died")][:2] == (1, 0),
               what="the dead worker's job to be requeued")

    with server.connect() as worker:
        for kind, ptype, args in ((b"done", gp.WORK_COMPLETE, [b"result"]),
                                  (b"fail", gp.WORK_FAIL, []),
                                  (b"exception", gp.WORK_EXCEPTION, [b"it broke"])):
            gp.can_do(worker, name(kind))
            ptype_got, body = gp.call(worker, gp.GRAB_JOB)
            assert ptype_got == gp.JOB_ASSIGN and body.split(b"\0")[0] == handles[kind]
            gp.send(worker, ptype, handles[kind], *args)
            gp.sync(worker)
    assert server.admin(f"cancel job {handles[b'cancel'].decode()}") == b"OK\r\n"
    if drop_function:
        assert server.admin(f"drop function {name(b'dropped').decode()}") == b"OK\r\n"
    # The deletes go in order: once the last one is done, a wrong delete of the
    # dead worker's row, made before them, would be done as well.
    kept = {(name(b"died"), b"died"), (name(b"waits"), b"waits")}
    ours = {(name(kind), kind) for kind in kinds}
    wait_until(lambda: stored() & ours == kept, what=f"only {sorted(kept)} left in the store")
    # And the dead worker's job still runs, once.
    assert drain(server, [name(b"died")], 1) == [(name(b"died"), b"died", b"data died")]
