"""Interop: the Python `gear` library (gear.Client / gear.Worker) against the server."""
import socket
import threading

import pytest

from conftest import unavailable
from clients import HANDLE_PREFIX, wait_until

try:
    import gear
except ImportError:  # pragma: no cover - reported as a skip/failure below
    gear = None


def nodelay(obj):
    """gear does not set TCP_NODELAY; set it so small packets are not held back."""
    for conn in obj.active_connections:
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GearWorker:
    """A gear.Worker served by one thread; `handler(job)` must send the final result."""

    def __init__(self, port, funcs, handler, name):
        self.worker = gear.Worker(name)
        self.worker.addServer("127.0.0.1", port)
        self.worker.waitForServer(10)
        nodelay(self.worker)
        for f in funcs:
            self.worker.registerFunction(f)
        self.handler = handler
        self.seen = []          # (handle, unique, arguments) of every job received
        self.errors = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                job = self.worker.getJob()
            except gear.InterruptedError:
                return
            self.seen.append((job.handle, job.unique, job.arguments))
            try:
                self.handler(job)
            except Exception as e:  # noqa: BLE001 - surfaced by the test
                self.errors.append(e)

    def stop(self):
        # interrupt getJob() while the poll thread still runs (so that a pending
        # GRAB_JOB_UNIQ is answered), then shut down
        self.worker.stopWaitingForJobs()
        self.thread.join(10)
        self.worker.shutdown()


@pytest.fixture
def gearlib(server):
    if gear is None:
        unavailable("python package gear is not installed")
    made = []

    class Env:
        def client(self, exceptions=False):
            c = gear.Client("interop-client")
            made.append(c)
            c.addServer("127.0.0.1", server.port)
            c.waitForServer(10)
            nodelay(c)
            if exceptions:
                assert c.setOption("exceptions") is True
            return c

        def worker(self, handler, funcs=("reverse",), name="interop-worker"):
            w = GearWorker(server.port, funcs, handler, name)
            made.append(w)
            wait_until(lambda: all(server.status().get(f, (0, 0, 0))[2] >= 1 for f in funcs), 10,
                       "gear worker registered")
            return w

    yield Env()
    for obj in reversed(made):
        if isinstance(obj, GearWorker):
            obj.stop()
        else:
            obj.shutdown()


def reverse(job):
    job.sendWorkComplete(job.arguments[::-1])


def submit(client, name, data, unique=None, **kw):
    job = gear.Job(name, data, unique=unique)
    client.submitJob(job, **kw)
    return job


def finished(*jobs, timeout=10):
    wait_until(lambda: all(j.complete for j in jobs), timeout, "jobs complete")


def get_status(client, handle):
    """GET_STATUS sent over a gear client connection (gear has no API for it; its
    STATUS_RES handler fills in a Job registered under the handle).
    Returns (known, running, numerator, denominator)."""
    conn = client.active_connections[0]
    probe = gear.Job("status-probe", b"")
    probe.handle, probe.connection = handle, conn
    conn.related_jobs[handle] = probe
    try:
        client.sendPacket(gear.Packet(gear.constants.REQ, gear.constants.GET_STATUS, handle), conn)
        wait_until(lambda: probe.known is not None, 10, "STATUS_RES")
    finally:
        conn.related_jobs.pop(handle, None)
    return probe.known, probe.running, probe.numerator, probe.denominator


def test_gear_foreground_job_round_trip(server, gearlib):
    gearlib.worker(reverse)
    client = gearlib.client()
    job = submit(client, "reverse", b"gear\x00bytes\xff")
    finished(job)
    assert job.handle == f"{HANDLE_PREFIX}:1".encode()
    assert (job.failure, job.data) == (False, [b"\xffsetyb\x00raeg"])


def test_gear_background_job_runs_on_later_worker(server, gearlib):
    client = gearlib.client()
    job = submit(client, "reverse", b"later", unique="bg-1", background=True)
    assert job.handle == f"{HANDLE_PREFIX}:1".encode()
    assert server.status()["reverse"] == (1, 0, 0)
    assert get_status(client, job.handle) == (True, False, b"0", b"0")
    worker = gearlib.worker(reverse)
    wait_until(lambda: server.status()["reverse"] == (0, 0, 1), 10, "background job done")
    assert worker.seen == [(job.handle, b"bg-1", b"later")]
    assert get_status(client, job.handle) == (False, False, b"0", b"0")


def test_gear_worker_data_status_and_warning_reach_client_in_order(server, gearlib):
    def chatty(job):
        job.sendWorkData(b"part1")
        job.sendWorkStatus(1, 2)
        job.sendWorkWarning(b"careful")
        job.sendWorkStatus(2, 2)
        job.sendWorkData(b"part2")
        job.sendWorkComplete(b"final")
    gearlib.worker(chatty, funcs=("chatty",))
    client = gearlib.client()
    job = submit(client, "chatty", b"x")
    finished(job)
    assert job.data == [b"part1", b"careful", b"part2", b"final"]
    assert (job.warning, job.failure, job.numerator, job.denominator) == (True, False, b"2", b"2")


def test_gear_get_status_reports_running_job_progress(server, gearlib):
    release = threading.Event()

    def slow(job):
        job.sendWorkStatus(5, 9)
        release.wait(10)
        job.sendWorkComplete(b"done")
    gearlib.worker(slow, funcs=("slow",))
    client = gearlib.client()
    watcher = gearlib.client()
    job = submit(client, "slow", b"x")
    wait_until(lambda: job.numerator == b"5", 10, "WORK_STATUS forwarded")
    assert get_status(watcher, job.handle) == (True, True, b"5", b"9")
    release.set()
    finished(job)
    assert job.data == [b"done"]
    assert get_status(watcher, job.handle) == (False, False, b"0", b"0")


def test_gear_jobs_with_same_unique_are_coalesced(server, gearlib):
    # one client per submission: gear tracks one Job per handle and connection
    jobs = [submit(gearlib.client(), "reverse", f"payload{i}".encode(), unique="same") for i in range(3)]
    other = submit(gearlib.client(), "reverse", b"other", unique="different")
    assert len({j.handle for j in jobs}) == 1
    assert other.handle != jobs[0].handle
    assert server.status()["reverse"] == (2, 0, 0)
    worker = gearlib.worker(reverse)
    finished(*jobs, other)
    assert [j.data for j in jobs] == [[b"0daolyap"]] * 3
    assert other.data == [b"rehto"]
    assert sorted(worker.seen) == sorted([(jobs[0].handle, b"same", b"payload0"),
                                          (other.handle, b"different", b"other")])


def test_gear_exception_without_option_arrives_as_failure(server, gearlib):
    gearlib.worker(lambda job: job.sendWorkException(b"boom"), funcs=("explode",))
    client = gearlib.client()
    job = submit(client, "explode", b"x")
    finished(job)
    assert (job.failure, job.exception, job.data) == (True, None, [])


def test_gear_exception_with_option_carries_exception_data(server, gearlib):
    gearlib.worker(lambda job: job.sendWorkException(b"boom"), funcs=("explode",))
    client = gearlib.client(exceptions=True)
    job = submit(client, "explode", b"x")
    finished(job)
    assert (job.failure, job.exception) == (True, b"boom")


def test_gear_worker_fail_marks_job_failed(server, gearlib):
    gearlib.worker(lambda job: job.sendWorkFail(), funcs=("failing",))
    client = gearlib.client()
    job = submit(client, "failing", b"x")
    finished(job)
    assert (job.failure, job.data) == (True, [])


def test_gear_background_precedence_order(server, gearlib):
    client = gearlib.client()
    order = [("low", gear.PRECEDENCE_LOW), ("normal", gear.PRECEDENCE_NORMAL),
             ("high", gear.PRECEDENCE_HIGH), ("low2", gear.PRECEDENCE_LOW),
             ("high2", gear.PRECEDENCE_HIGH)]
    for data, prec in order:
        submit(client, "reverse", data.encode(), background=True, precedence=prec)
    assert server.admin("prioritystatus") == b"reverse\t2\t1\t2\t0\n.\n"
    worker = gearlib.worker(reverse)
    wait_until(lambda: len(worker.seen) == 5, 10, "all jobs run")
    assert [args for _, _, args in worker.seen] == [b"high", b"high2", b"normal", b"low", b"low2"]


def test_gear_many_jobs_over_several_workers_all_correct(server, gearlib):
    workers = [gearlib.worker(reverse, name=f"w{i}") for i in range(4)]
    clients = [gearlib.client() for _ in range(2)]
    jobs = []
    for i in range(1000):
        jobs.append(submit(clients[i % 2], "reverse", f"job-{i}-{'x' * (i % 50)}".encode()))
    finished(*jobs, timeout=30)
    for i, job in enumerate(jobs):
        assert (job.failure, job.data) == (False, [f"job-{i}-{'x' * (i % 50)}".encode()[::-1]])
    assert len({j.handle for j in jobs}) == 1000
    assert sum(len(w.seen) for w in workers) == 1000
    assert server.status()["reverse"] == (0, 0, 4)
