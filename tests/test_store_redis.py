"""-q redis against a real Redis on 127.0.0.1:6379: jobs survive kill -9 and
replay exactly once, records are C gearmand 1.1.20's, cross-replay with C both
ways, and a Redis outage costs only the background submissions made during it."""
import os
import secrets
import shutil
import socket
import subprocess
import json
import threading
import time
import urllib.request

import pytest

pytest.register_assert_rewrite("storetools")

import gearproto as gp  # noqa: E402
from conftest import IMPL, free_port, unavailable  # noqa: E402
from storetools import (HIGH, LOW, NORMAL, QUEUE_ERROR, Job,  # noqa: E402
                        check_ended_jobs_leave_the_store, check_kill_9_at_a_random_instant,
                        check_replay, check_replay_any_order, check_submissions_share_commits,
                        drain, foreground, need_c, run_once, sample_jobs, submit_ok, submit_one,
                        wait_until)

try:
    import redis
except ImportError:               # pragma: no cover
    redis = None

pytestmark = pytest.mark.skipif(IMPL == "c", reason="tests of our redis store and its C interplay")

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
               "--port", "6379", "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]


def client():
    return redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2, socket_connect_timeout=2)


def redis_up():
    try:
        return client().ping()
    except redis.RedisError:
        return False


def ensure_redis_running():
    if not redis_up():
        subprocess.run(REDIS_START, check=True, capture_output=True)
        wait_until(redis_up, 20, what="Redis to accept connections", interval=0.05)


@pytest.fixture
def prefix():
    """A fresh key prefix; its keys (and our index) are deleted after the test."""
    if redis is None:
        unavailable("redis-py is not installed")
    if not redis_up():
        unavailable("Redis not reachable on 127.0.0.1:6379")
    name = "gqr" + secrets.token_hex(4)
    yield name
    ensure_redis_running()
    db = client()
    keys = list(db.scan_iter(match=name + "*")) + [index_key(name)]
    db.delete(*keys)


def options(prefix):
    return ("-q", "redis", "--redis-server", "127.0.0.1", "--redis-port", "6379",
            "--redis-prefix", prefix)


def index_key(prefix):
    return b"gearmand.py-index:" + prefix.encode()


def records(prefix):
    """{key: hash} of every job record under `prefix` (a legacy record: its string)."""
    db = client()
    return {key: db.hgetall(key) if db.type(key) == b"hash" else db.get(key)
            for key in db.scan_iter(match=prefix + "*")}


def key_of(prefix, job):
    return b"%s-%s-%s" % (prefix.encode(), job.function, job.unique)


def keys(prefix):
    """{(function, unique)} of the job records under `prefix` (no `-` in functions)."""
    return {tuple(key[len(prefix) + 1:].split(b"-", 1))
            for key in client().scan_iter(match=prefix + "-*")}


@pytest.mark.parametrize("round_number", range(2))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, prefix, round_number):
    """storetools.check_kill_9_at_a_random_instant: no acknowledged job lost, only
    jobs running at the kill run twice. (Redis itself stays up: how durable its
    data is across its own restarts is its AOF/RDB settings' business.)"""
    server = make_server(*options(prefix))
    print(check_kill_9_at_a_random_instant(server, b"%s.crash%d" % (prefix.encode(),
                                                                      round_number)))


def test_pipelined_submissions_share_commits(make_server, prefix):
    """Each batch is one script call: 400 pipelined submissions make few."""
    function = prefix.encode()
    check_submissions_share_commits(make_server, options(prefix), function)
    assert len(keys(prefix)) == 400


def test_records_leave_when_jobs_end_and_a_dead_workers_job_stays(make_server, prefix):
    check_ended_jobs_leave_the_store(make_server(*options(prefix)), prefix.encode(),
                                     lambda: keys(prefix))


def test_background_jobs_survive_kill_9_and_replay_exactly_once(make_server, prefix):
    server = make_server(*options(prefix))
    jobs = sample_jobs(prefix, int(time.time()) + 4)
    # A function name with `-` and data past Redis's small-hash limit of 64 bytes.
    jobs.append(Job(f"{prefix}.my-func".encode(), b"u-1", b"y" * 100 + b"\0tail", LOW))
    submit_ok(server, jobs)

    # Each job is a hash with exactly C's two fields, under C's key.
    stored = records(prefix)
    assert len(stored) == len(jobs)
    assert all(set(fields) == {b"data", b"priority"} for fields in stored.values())
    for job in jobs:
        if job.unique not in (b"", b"-"):     # those are stored under generated uniques
            assert stored[key_of(prefix, job)] == {b"data": job.data,
                                                   b"priority": b"%d" % job.priority}
    index = client().hgetall(index_key(prefix))
    assert set(index) == set(stored)
    epoch = jobs[-2]
    assert index[key_of(prefix, epoch)].split(b"\0")[1:] == [epoch.function, epoch.unique,
                                                             b"%d" % epoch.when]

    server.kill()
    server.start()
    check_replay(server, jobs)            # in submission order within each priority
    wait_until(lambda: not records(prefix), 5, what="done jobs deleted from Redis")
    assert client().hlen(index_key(prefix)) == 0


def test_replay_scans_and_never_uses_keys(make_server, prefix):
    server = make_server(*options(prefix))
    function = prefix.encode()
    submit_ok(server, [Job(function, b"a", b"1"), Job(function, b"b", b"2", HIGH)])
    server.kill()

    def calls(command):
        stats = client().info("commandstats").get(f"cmdstat_{command}", {})
        return stats.get("calls", 0)

    keys_before, scans_before = calls("keys"), calls("scan")
    server.start()
    assert drain(server, [function], 2) == [(function, b"b", b"2"), (function, b"a", b"1")]
    assert calls("keys") == keys_before
    assert calls("scan") > scans_before


def test_cancel_deletes_the_record(make_server, prefix):
    server = make_server(*options(prefix))
    function = prefix.encode()
    job = Job(function, b"cancel-me", b"x")
    handle, = submit_ok(server, [job])
    assert key_of(prefix, job) in records(prefix)
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    wait_until(lambda: not records(prefix), 5, what="cancelled job's record deleted")


def test_c_writes_and_we_replay(make_server, prefix):
    need_c()
    # C refuses epoch jobs, and its empty-unique jobs of a function share one key.
    jobs = sample_jobs(prefix, 0, empty_uniques=1)
    c_server = make_server(*options(prefix), impl="c")
    submit_ok(c_server, jobs)
    wait_until(lambda: len(records(prefix)) == len(jobs), 5, what="C's records")
    c_server.kill()
    # gearmand <= 1.1.15 stored the data as a plain string; it replays as a normal job.
    legacy = Job(f"{prefix}.legacy".encode(), b"old", b"plain \0 string")
    client().set(key_of(prefix, legacy), legacy.data)

    server = make_server(*options(prefix), impl="py")
    check_replay_any_order(server, jobs + [legacy])   # binary data and all
    wait_until(lambda: not records(prefix), 5, what="done jobs deleted from Redis")


def test_we_write_and_c_replays(make_server, prefix):
    need_c()
    # What C can read: no epoch job, no `-` in function names, no NUL in the data.
    jobs = [job for job in sample_jobs(prefix, 0) if b"\0" not in job.data]
    # What C cannot read must not stop it from starting: an epoch job (C runs it at
    # once) and a `-` in a function name, with big data (Redis reorders such a hash).
    epoch = Job(f"{prefix}.when".encode(), b"later", b"e" * 100, NORMAL, int(time.time()) + 3600)
    dashed = Job(f"{prefix}.my-func".encode(), b"u-1", b"d" * 100, HIGH)
    server = make_server(*options(prefix), impl="py")
    submit_ok(server, jobs + [epoch, dashed])
    server.kill()

    # C replays our generated uniques (for empty and `-` uniques) as ordinary ones.
    generated = {fields[b"data"]: key.split(b"-", 2)[2]
                 for key, fields in records(prefix).items()}
    c_server = make_server(*options(prefix), impl="c")
    check_replay_any_order(c_server, [job._replace(unique=generated[job.data])
                                      if job.unique in (b"", b"-") else job for job in jobs])
    assert drain(c_server, [epoch.function], 1) == [(epoch.function, epoch.unique, epoch.data)]
    function, unique = f"{prefix}.my".encode(), b"func-u-1"      # C's split of the key
    assert drain(c_server, [function], 1) == [(function, unique, dashed.data)]
    wait_until(lambda: not records(prefix), 5, what="C deleted the done jobs")
    c_server.kill()

    # Our index still names the jobs C finished; our next start drops those entries.
    assert client().hlen(index_key(prefix)) == len(jobs) + 2
    server = make_server(*options(prefix), impl="py")
    assert foreground(server, b"fg", b"ab") == b"ba"
    assert client().hlen(index_key(prefix)) == 0


def test_redis_outage_fails_submissions_fast_then_recovers(make_server, prefix):
    if os.geteuid() != 0 or not shutil.which("redis-server") or not shutil.which("redis-cli"):
        unavailable("cannot stop and restart Redis here (needs root, redis-server, redis-cli)")
    server = make_server(*options(prefix))
    function = prefix.encode()
    submit_ok(server, [Job(function, b"before", b"1")])
    try:
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True,
                       timeout=20)
        wait_until(lambda: not redis_up(), 10, what="Redis to stop", interval=0.05)
        for unique in (b"during-1", b"during-2"):     # the second falls in the retry window
            started = time.monotonic()
            assert submit_one(server, Job(function, unique, b"2")) == QUEUE_ERROR
            assert time.monotonic() - started < 3
        # Foreground jobs and the queued job still run.
        assert foreground(server, function + b".fg", b"abc") == b"cba"
        assert drain(server, [function], 1) == [(function, b"before", b"1")]
    finally:
        ensure_redis_running()
    after = Job(function, b"after", b"3")
    wait_until(lambda: submit_one(server, after)[0] == gp.JOB_CREATED, 10,
               what="a submission to succeed after Redis came back", interval=0.2)
    assert records(prefix) == {key_of(prefix, after): {b"data": b"3", b"priority": b"1"}}
    assert drain(server, [function], 1) == [(function, b"after", b"3")]


def test_unreachable_redis_at_start_exits_1_with_one_line(make_server, prefix):
    port = free_port()
    code, lines = run_once(make_server, "-q", "redis", "--redis-port", str(port))
    assert code == 1
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines


def test_a_key_of_another_type_fails_only_its_job(make_server, prefix):
    server = make_server(*options(prefix))
    function = prefix.encode()
    taken = Job(function, b"taken", b"2")
    client().rpush(key_of(prefix, taken), b"not a job")
    replies = [submit_one(server, job) for job in (Job(function, b"a", b"1"), taken,
                                                    Job(function, b"c", b"3"))]
    assert [reply[0] for reply in replies] == [gp.JOB_CREATED, gp.ERROR, gp.JOB_CREATED]
    assert replies[1] == QUEUE_ERROR
    server.kill()
    server.start()                        # replay passes over the list
    assert sorted(drain(server, [function], 2)) == [(function, b"a", b"1"), (function, b"c", b"3")]


class SilencingProxy:
    """A TCP proxy to the Redis on 127.0.0.1:6379. Once `armed`, it passes the next
    EVALSHA on to Redis and drops Redis's reply: the write is done, but its reply is
    lost as if it came too late. `connections` counts the connections accepted."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.connections = 0
        self.down = False                     # cut(): Redis looks gone, restore() brings it back
        self.open = []
        threading.Thread(target=self.accept, daemon=True).start()

    def cut(self):
        """An outage without touching the shared Redis: every connection through the
        proxy is closed, and new ones are closed as they come."""
        self.down = True
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self):
        self.down = False

    def accept(self):
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return                        # closed
            if self.down:
                downstream.close()
                continue
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", 6379))
            self.open += [downstream, upstream]
            silenced = threading.Event()
            for source, target, requests in ((downstream, upstream, True),
                                             (upstream, downstream, False)):
                threading.Thread(target=self.pipe, args=(source, target, requests, silenced),
                                 daemon=True).start()

    def pipe(self, source, target, requests, silenced):
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if requests and self.armed and b"EVALSHA" in chunk:
                    silenced.set()            # before Redis can answer
                    self.armed = False
                if requests or not silenced.is_set():
                    target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.fixture
def proxy():
    silencer = SilencingProxy()
    yield silencer
    silencer.close()


def test_a_reply_lost_to_a_timeout_is_retried_not_an_error(make_server, prefix, proxy):
    """The write script is idempotent, so a timed-out write is sent again on a new
    connection: the client gets JOB_CREATED for the job that Redis did store."""
    server = make_server("-q", "redis", "--redis-server", "127.0.0.1",
                         "--redis-port", str(proxy.port), "--redis-prefix", prefix)
    function = prefix.encode()
    first, late = Job(function, b"first", b"1"), Job(function, b"late", b"2")
    submit_ok(server, [first])                # Redis has the script now: one EVALSHA a write
    proxy.armed = True
    reply = submit_one(server, late)
    assert not proxy.armed, "no write went through the proxy"
    assert reply[0] == gp.JOB_CREATED, gp.show(reply)
    assert proxy.connections == 2             # the retry came on a new connection
    assert set(records(prefix)) == {key_of(prefix, first), key_of(prefix, late)}
    assert drain(server, [function], 2) == [(function, b"first", b"1"), (function, b"late", b"2")]


def store_status(http_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=5) as response:
        return json.loads(response.read())["store"]


def healthy_gauge(http_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return [line for line in lines if line.startswith("gearman_store_healthy ")]


def test_health_follows_an_idle_store_and_is_logged(make_server, prefix, proxy):
    """Nothing is written while Redis is away and back: the idle store's probe (PING)
    makes /status and /metrics say so within seconds, and the log has one line for
    each change. Before, health was only ever set by a failed write and then stayed
    false for 60 s."""
    http_port = free_port()
    server = make_server("-q", "redis", "--redis-server", "127.0.0.1", "--redis-port",
                         str(proxy.port), "--redis-prefix", prefix, "--http-port", str(http_port))
    wait_until(lambda: store_status(http_port)["healthy"], what="healthy at start")
    assert healthy_gauge(http_port) == ["gearman_store_healthy 1"]

    proxy.cut()
    store = wait_until(lambda: (lambda s: not s["healthy"] and s)(store_status(http_port)),
                       timeout=15, what="unhealthy while Redis is away")
    assert store["last_error"]
    assert healthy_gauge(http_port) == ["gearman_store_healthy 0"]
    wait_until(lambda: "persistent queue unavailable" in server.log(), what="the failure line")

    proxy.restore()
    started = time.monotonic()
    wait_until(lambda: store_status(http_port)["healthy"], timeout=15, what="healthy again")
    assert time.monotonic() - started < 15
    assert healthy_gauge(http_port) == ["gearman_store_healthy 1"]
    log = server.log()
    assert log.count("persistent queue unavailable") == 1, log
    assert log.count("persistent queue recovered after") == 1, log
    # and the store takes jobs again
    submit_ok(server, [Job(prefix.encode(), b"after", b"1")])
