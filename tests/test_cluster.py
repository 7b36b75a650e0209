"""--cluster: servers on one database (PostgreSQL or MariaDB), each with its own table,
adopt each other's stored jobs when one dies or hangs, hand them back when it returns,
and never hand out a stored job another member may have adopted.

Every test starts real servers and talks to them over the wire; the failures are real
ones: kill -9, SIGSTOP and SIGCONT, a TCP proxy of the test's own between a member and
its database that stalls or cuts the connection, and (in the outage test) a restart of
the database itself.
"""
import contextlib
import json
import secrets
import select
import signal
import socket
import threading
import time
import urllib.request

import pytest

import gearproto as gp
from conftest import IMPL, free_port, wait_until
from storetools import DATABASES

pytestmark = pytest.mark.skipif(IMPL == "c", reason="--cluster is ours")

LEASE = "1.5"


def member_options(backend, table, cluster, port=None):
    """A member's options: its table on `backend` (through `port`, a proxy's, if given)."""
    port = port or backend.port
    if backend.name == "postgres":
        store = backend.options(table, f"host=127.0.0.1 port={port} dbname=test user=root"
                                       f" connect_timeout=2")
    else:
        store = backend.options(table, port=port)
    return store + ("--cluster", cluster, "--cluster-lease", LEASE, "--verbose", "NOTICE")


@pytest.fixture(params=["postgres", "mysql"])
def backend(request):
    """The database engine the members share (storetools.DATABASES)."""
    return DATABASES[request.param]


@pytest.fixture
def tables(backend):
    """new() names a member's table; every one is dropped once the members are gone."""
    with backend.tables("cl_") as new:
        yield new


@pytest.fixture
def cluster(backend, tables, make_server):
    """cluster(n) starts n members; each is given (server, table)."""
    name = "t" + secrets.token_hex(4)
    members = []

    def start(count, proxy_first=None):
        for number in range(count):
            table = tables()
            port = proxy_first.port if (proxy_first and number == 0) else None
            server = make_server(*member_options(backend, table, name, port),
                                 "--http-port", str(free_port()))
            server.table = table
            members.append(server)
        for server in members:
            wait_until(lambda: holds_its_table(server), 15, what=f"{server.table} to be served")
        return members

    yield start
    with contextlib.suppress(Exception):
        backend.query("DELETE FROM gearmand_cluster WHERE cluster = %s", (name,))


def cluster_rows(server):
    """`cluster`: {member: (owner, epoch, lease left, wants it back)}."""
    rows = {}
    for line in server.admin("cluster").decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 5:
            rows[parts[0]] = (parts[1], int(parts[2]), float(parts[3]), parts[4] != "-")
    return rows


def status_json(server):
    port = server.args[server.args.index("--http-port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.loads(response.read())


def holds_its_table(server):
    return status_json(server)["cluster"]["holds_its_table"]


def submit(server, function, count, tag=b"u"):
    with server.connect() as sock:
        sock.sendall(b"".join(gp.pack(gp.SUBMIT_JOB_BG, function, b"%s%d" % (tag, n), b"d")
                              for n in range(count)))
        replies = [gp.recv(sock, 30) for _ in range(count)]
    assert all(kind == gp.JOB_CREATED for kind, _ in replies), replies[:3]


def work(server, function, count, timeout):
    """A worker on `server` runs up to `count` jobs within `timeout` s: their uniques."""
    ran = []
    deadline = time.monotonic() + timeout
    with server.connect() as sock:
        gp.can_do(sock, function)
        while len(ran) < count and time.monotonic() < deadline:
            kind, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
            if kind == gp.NO_JOB:
                time.sleep(0.02)
                continue
            handle, _, unique, _ = body.split(b"\0", 3)
            ran.append(unique)
            gp.send(sock, gp.WORK_COMPLETE, handle, b"")
    return ran


def grabs_nothing(server, function, seconds):
    """A worker on `server` asks for `seconds`: True if it never got a job."""
    deadline = time.monotonic() + seconds
    with server.connect() as sock:
        gp.can_do(sock, function)
        while time.monotonic() < deadline:
            if gp.call(sock, gp.GRAB_JOB_UNIQ)[0] != gp.NO_JOB:
                return False
            time.sleep(0.05)
    return True


def test_a_killed_members_jobs_run_on_another_at_once_and_once(cluster, backend):
    a, b = cluster(2)
    submit(a, b"f", 5000)
    a.kill()
    killed = time.monotonic()
    ran = work(b, b"f", 5000, timeout=float(LEASE) + 5)
    took = time.monotonic() - killed
    assert len(ran) == 5000 and len(set(ran)) == 5000
    assert took < float(LEASE) + 5, took
    print(f"{backend.name}: 5,000 jobs of the killed member ran on the other within {took:.2f} s")
    assert status_json(b)["cluster"]["adoptions_total"] == 1
    assert "adopted" in b.log()
    # It comes back: its table is handed back, none of the adopted jobs runs again,
    # and what is submitted to it runs once.
    a.start()
    wait_until(lambda: holds_its_table(a), 15, what="the table handed back")
    wait_until(lambda: status_json(b)["cluster"]["adopted"] == [], 10, what="b lets go")
    assert grabs_nothing(a, b"f", 1.0)
    submit(a, b"g", 1000)
    ran = work(a, b"g", 1000, timeout=20) + work(b, b"g", 1, timeout=0.5)
    assert sorted(ran) == sorted(b"u%d" % n for n in range(1000))


def test_three_members_one_dies_the_others_share_nothing_twice(cluster):
    a, b, c = cluster(3)
    submit(b, b"f", 2000)
    b.kill()
    ran = []
    threads = [threading.Thread(target=lambda s=s: ran.extend(work(s, b"f", 2000, 6)))
               for s in (a, c)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ran) == sorted(b"u%d" % n for n in range(2000))
    adopters = [s for s in (a, c) if status_json(s)["cluster"]["adoptions_total"]]
    assert len(adopters) == 1


def test_a_paused_member_is_fenced_and_its_jobs_run_elsewhere(cluster):
    a, b = cluster(2)
    submit(a, b"f", 3000)
    with a.connect() as waiting:                 # a worker of a's, asleep
        gp.can_do(waiting, b"f")
        a.proc.send_signal(signal.SIGSTOP)
        try:
            ran = work(b, b"f", 3000, timeout=3 * float(LEASE) + 10)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert len(ran) == 3000 and len(set(ran)) == 3000
        # Resumed, a hands out nothing it may have lost, though the worker asks.
        kind, _ = gp.call(waiting, gp.GRAB_JOB_UNIQ)
        assert kind == gp.NO_JOB
        assert grabs_nothing(a, b"f", 1.0)
    wait_until(lambda: holds_its_table(a), 20, what="a to get its table back")
    assert grabs_nothing(a, b"f", 0.5)
    assert "no stored job is handed out" in a.log()


class Proxy:
    """A TCP proxy on loopback between a member and its database: pass, stall (hold
    every byte) or cut (close every connection and refuse new ones)."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self.pairs = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self.pump, args=(client, upstream), daemon=True).start()

    def pump(self, client, upstream):
        sockets = [client, upstream]
        try:
            while True:
                if self.mode == "cut":
                    break
                readable, _, _ = select.select(sockets, [], [], 0.05)
                if self.mode == "stall":
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self):
        self.mode = "cut"
        self.listener.close()


@pytest.mark.parametrize("mode", ["stall", "cut"])
def test_a_member_cut_off_from_its_database_is_fenced_and_adopted(cluster, backend, mode):
    proxy = Proxy(backend.port)
    try:
        a, b = cluster(2, proxy_first=proxy)
        submit(a, b"f", 1000)
        with a.connect() as waiting:
            gp.can_do(waiting, b"f")
            proxy.mode = mode
            ran = work(b, b"f", 1000, timeout=3 * float(LEASE) + 10)
            assert sorted(ran) == sorted(b"u%d" % n for n in range(1000))
            assert not holds_its_table(a)
            assert gp.call(waiting, gp.GRAB_JOB_UNIQ)[0] == gp.NO_JOB
            # Cut off, it refuses background jobs: it cannot store them.
            with a.connect() as client:
                assert gp.call(client, gp.SUBMIT_JOB_BG, b"f", b"late", b"")[0] == gp.ERROR
            proxy.mode = "pass"
            wait_until(lambda: holds_its_table(a), 30, what="a back once its database is")
            assert grabs_nothing(a, b"f", 0.5)
    finally:
        proxy.close()


def test_a_member_that_holds_its_table_again_takes_in_each_job_once(cluster, backend):
    """Fenced and back, a member reads its table afresh: the jobs it had queued come
    back once each, a foreground job waits on, and the jobs its worker held through
    the fence (one finished while fenced, one after) do not come back at all."""
    proxy = Proxy(backend.port)
    try:
        a, = cluster(1, proxy_first=proxy)
        submit(a, b"f", 300)
        with a.connect() as client, a.connect() as worker:
            # Without a row, it stays in memory, and so does its queue.
            kind, foreground = gp.call(client, gp.SUBMIT_JOB, b"f", b"fg", b"")
            assert kind == gp.JOB_CREATED
            gp.can_do(worker, b"f")
            held = []
            for _ in range(2):
                kind, body = gp.call(worker, gp.GRAB_JOB_UNIQ)
                assert kind == gp.JOB_ASSIGN_UNIQ
                held.append(body.split(b"\0", 3))
            assert [unique for _, _, unique, _ in held] == [b"u0", b"u1"]
            proxy.mode = "cut"
            wait_until(lambda: not holds_its_table(a), 30, what="a fenced")
            gp.send(worker, gp.WORK_COMPLETE, held[0][0], b"")
            proxy.mode = "pass"
            wait_until(lambda: holds_its_table(a), 30, what="a back on its table")
            gp.send(worker, gp.WORK_COMPLETE, held[1][0], b"")
            ran = work(a, b"f", 299, timeout=30)
            assert len(ran) == len(set(ran)), "a job ran twice"
            assert sorted(ran) == sorted([b"fg"] + [b"u%d" % n for n in range(2, 300)])
            assert gp.recv(client, 10) == (gp.WORK_COMPLETE, foreground + b"\0")
            assert grabs_nothing(a, b"f", 0.5)
    finally:
        proxy.close()


def test_a_database_restart_in_a_submit_storm_loses_nothing_and_adopts_nothing_outage(
        cluster, backend):
    """Every member loses its database at once: none may take that for a dead peer.
    Clients get ERROR while it is down; every JOB_CREATED'd job runs once after."""
    members = cluster(2)
    acknowledged = {server.table: [] for server in members}
    refused = set()       # ERROR: perhaps stored all the same (a commit whose answer was lost)
    storming = True

    def storm(server):
        number = 0
        while storming:
            try:
                with server.connect(timeout=15) as sock:
                    while storming:
                        unique = b"s%d" % number
                        number += 1
                        kind, _ = gp.call(sock, gp.SUBMIT_JOB_BG, b"storm", unique, b"")
                        if kind == gp.JOB_CREATED:
                            acknowledged[server.table].append(unique)
                        else:
                            refused.add(unique)
            except OSError:
                time.sleep(0.05)

    threads = [threading.Thread(target=storm, args=(server,)) for server in members]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        with backend.stopped():
            time.sleep(2 * float(LEASE))
        for server in members:
            wait_until(lambda: holds_its_table(server), 60, what="members back on their tables")
        time.sleep(1)
    finally:
        storming = False
        for thread in threads:
            thread.join()
    for server in members:
        assert status_json(server)["cluster"]["adoptions_total"] == 0
        count = status_json(server)["functions"]
        queued = sum(f["jobs"] for f in count if f["name"] == "storm")
        ran = work(server, b"storm", queued, timeout=30)
        assert len(ran) == len(set(ran)), "a job ran twice"
        assert set(acknowledged[server.table]) <= set(ran)
        assert set(ran) - set(acknowledged[server.table]) <= refused
        assert grabs_nothing(server, b"storm", 0.3)
