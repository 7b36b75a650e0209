"""-q libmemcached against a real memcached on 127.0.0.1:11211: jobs survive
kill -9 of the job server and replay exactly once, items are C gearmand 1.1.20's,
and cross-replay with C both ways. (memcached itself keeps nothing across its
own restarts and may evict: see extras/memcached.py.)"""
import hashlib
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse

import pytest

pytest.register_assert_rewrite("storetools")

import gearproto as gp  # noqa: E402
from conftest import IMPL, free_port, unavailable  # noqa: E402
from storetools import (HIGH, LOW, QUEUE_ERROR, Job, check_ended_jobs_leave_the_store,  # noqa: E402
                        check_kill_9_at_a_random_instant, check_replay_any_order,
                        check_submissions_share_commits, drain, need_c, run_once, sample_jobs,
                        submit_all, submit_ok, wait_until)

try:
    from pymemcache.client.base import Client
except ImportError:               # pragma: no cover
    Client = None

pytestmark = pytest.mark.skipif(IMPL == "c",
                                reason="tests of our memcached store and its C interplay")

ADDRESS = ("127.0.0.1", 11211)


class FlagsSerde:
    def serialize(self, key, value):
        return value

    def deserialize(self, key, value, flags):
        return value, flags


def client(address=ADDRESS):
    return Client(address, serde=FlagsSerde(), connect_timeout=2, timeout=2,
                  default_noreply=False)


def command(line, address=ADDRESS):
    """Send one text command; return the reply's lines up to END."""
    with socket.create_connection(address, 2) as sock:
        sock.settimeout(10)
        sock.sendall(line + b"\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    return reply.replace(b"\r\n", b"\n").split(b"\n")[:-2]


def all_keys(address=ADDRESS):
    return {urllib.parse.unquote_to_bytes(line.split(b" ", 1)[0][4:])
            for line in command(b"lru_crawler metadump all", address)
            if line.startswith(b"key=")}


def cachedump_keys(address=ADDRESS):
    """The keys C gearmand's replay sees: `stats cachedump` of every slab class."""
    slabs = {line.split(b":")[1] for line in command(b"stats items", address)
             if line.startswith(b"STAT items:")}
    return {line.split(b" ")[1] for slab in slabs
            for line in command(b"stats cachedump %s 0" % slab, address)
            if line.startswith(b"ITEM ")}


def extra_namespace(prefix):
    return b"gearmand.py-extra:" + prefix.encode() + b":"


def ours(prefix):
    """Our keys under `prefix`: job items and their companions."""
    return {key for key in all_keys()
            if key.startswith(prefix.encode()) or key.startswith(extra_namespace(prefix))}


@pytest.fixture
def prefix():
    if Client is None:
        unavailable("pymemcache is not installed")
    try:
        client().version()
    except OSError:
        unavailable("memcached not reachable on 127.0.0.1:11211")
    name = "gqm" + secrets.token_hex(4) + "_"
    yield name
    keys = ours(name)
    if keys:
        client().delete_many(keys)


def options(prefix):
    return ("-q", "libmemcached", "--libmemcached-servers", "127.0.0.1:11211",
            "--libmemcached-prefix", prefix)


def key_of(prefix, job):
    return (prefix.encode() + job.function + b"-" + job.unique)[:250]


def job_keys(prefix):
    """{(function, unique)} of the job items under `prefix` (no `-` in uniques)."""
    return {tuple(key[len(prefix):].rsplit(b"-", 1)) for key in all_keys()
            if key.startswith(prefix.encode())}


@pytest.mark.parametrize("round_number", range(2))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, prefix, round_number):
    """memcached is not durable: it loses every item when it restarts and evicts
    items under memory pressure, silently. What it does promise, and what this
    checks, is the job server's part while memcached stays up and has room (these
    few MB): storetools.check_kill_9_at_a_random_instant, no acknowledged job lost
    to a kill -9 of the job server, and only jobs running at the kill run twice."""
    server = make_server(*options(prefix))
    print(check_kill_9_at_a_random_instant(server, b"%s.crash%d" % (prefix.encode(),
                                                                      round_number)))


def test_pipelined_submissions_share_commits(make_server, prefix):
    """Each batch is one round trip: 400 pipelined submissions make few."""
    check_submissions_share_commits(make_server, options(prefix), prefix.encode())
    assert len(job_keys(prefix)) == 400


def test_items_leave_when_jobs_end_and_a_dead_workers_job_stays(make_server, prefix):
    check_ended_jobs_leave_the_store(make_server(*options(prefix)), prefix.encode(),
                                     lambda: job_keys(prefix))


def test_background_jobs_survive_kill_9_and_replay_exactly_once(make_server, prefix):
    server = make_server(*options(prefix))
    jobs = sample_jobs(prefix, int(time.time()) + 4)
    dashed = Job(f"{prefix}.my-func".encode(), b"u-1", b"dash", LOW)
    long_name = Job(prefix.encode() + b"." + b"f" * 240, b"long", b"key cut at 250 bytes", HIGH)
    jobs += [dashed, long_name]
    submit_ok(server, jobs)

    # Items as C writes them: the data, with the priority in the flags.
    db = client()
    for job in jobs:
        if job.unique not in (b"", b"-"):       # stored under generated uniques
            assert db.get(key_of(prefix, job)) == (job.data, job.priority)
    # What C's key cannot say is in a companion item, outside the prefix.
    epoch = jobs[-3]
    companions = {key for key in ours(prefix) if key.startswith(extra_namespace(prefix))}
    assert len(companions) == 3
    key = key_of(prefix, epoch)
    assert db.get(extra_namespace(prefix) + hashlib.sha1(key).hexdigest().encode()) == \
        (b"%s\0%s\0%d" % (epoch.function, epoch.unique, epoch.when), 0)

    server.kill()
    server.start()
    check_replay_any_order(server, jobs)
    wait_until(lambda: not ours(prefix), 5, what="done jobs deleted from memcached")


def test_cancel_deletes_the_item(make_server, prefix):
    server = make_server(*options(prefix))
    function = prefix.encode()
    handle, = submit_ok(server, [Job(function, b"cancel-me", b"x")])
    assert ours(prefix) == {key_of(prefix, Job(function, b"cancel-me", b""))}
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    wait_until(lambda: not ours(prefix), 5, what="cancelled job's item deleted")


def test_key_memcached_refuses_gets_queue_error(make_server, prefix):
    server = make_server(*options(prefix))
    function = prefix.encode()
    replies = submit_all(server, [Job(function, b"a", b"1"), Job(function, b"with space", b"2"),
                                  Job(function, b"c", b"3")])
    assert [reply[0] for reply in replies] == [gp.JOB_CREATED, gp.ERROR, gp.JOB_CREATED]
    assert replies[1] == QUEUE_ERROR               # as in C
    assert sorted(drain(server, [function], 2)) == [(function, b"a", b"1"), (function, b"c", b"3")]


def test_c_writes_and_we_replay(make_server, prefix):
    need_c()
    # C refuses epoch jobs, and its empty-unique jobs of a function share one key.
    jobs = sample_jobs(prefix, 0, empty_uniques=1)
    c_server = make_server(*options(prefix), impl="c")
    submit_ok(c_server, jobs)
    wait_until(lambda: len(ours(prefix)) == len(jobs), 5, what="C's items")
    c_server.kill()
    server = make_server(*options(prefix), impl="py")
    check_replay_any_order(server, jobs)
    wait_until(lambda: not ours(prefix), 5, what="done jobs deleted from memcached")


def test_we_write_and_c_replays_every_job(make_server, prefix, memcached_servers):
    """C replays the keys `stats cachedump` lists, and memcached 1.5+ lists an item
    only once its LRU maintainer has moved it out of the HOT segment (a second or
    so). On a memcached of the test's own (the shared one's cachedump output is
    capped at 2 MB of other keys), once every item is listed, C replays every job."""
    need_c()
    address = memcached_servers[0]
    options = ("-q", "libmemcached", servers_option([address]), "--libmemcached-prefix", prefix)
    jobs = [job for job in sample_jobs(prefix, 0) if b"-" not in job.function]
    server = make_server(*options, impl="py")
    submit_ok(server, jobs)
    server.kill()
    items = {key for key in all_keys(address) if key.startswith(prefix.encode())}
    assert len(items) == len(jobs)
    wait_until(lambda: items <= cachedump_keys(address), 15,
               what="memcached to list every item in stats cachedump", interval=0.2)

    c_server = make_server(*options, impl="c")
    expected = {(job.function, job.data): job for job in jobs}
    ran = drain(c_server, sorted({job.function for job in jobs}), len(jobs))
    for function, unique, data in ran:
        job = expected.pop((function, data))          # each once, binary data intact
        assert unique == job.unique or job.unique in (b"", b"-")
    assert not expected, f"C did not replay {sorted(expected)}"


def test_unreachable_memcached_at_start_exits_1_with_one_line(make_server, prefix):
    port = free_port()
    code, lines = run_once(make_server, "-q", "libmemcached",
                           f"--libmemcached-servers=127.0.0.1:{port}")
    assert code == 1
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines

    code, lines = run_once(make_server, "-q", "libmemcached")
    assert code == 1
    assert any("--libmemcached-servers" in line for line in lines)


# --- several servers ------------------------------------------------------------

@pytest.fixture
def memcached_servers(prefix):
    """Three memcached servers of our own, on free ports."""
    binary = shutil.which("memcached")
    if binary is None:
        unavailable("the memcached program is not installed")
    addresses, processes = [], []
    try:
        for _ in range(3):
            port = free_port()
            processes.append(subprocess.Popen([binary, "-u", "root", "-l", "127.0.0.1",
                                               "-p", str(port), "-m", "16"]))
            addresses.append(("127.0.0.1", port))
        for address in addresses:
            wait_until(lambda: answers(address), 5, what=f"memcached on {address}")
        yield addresses
    finally:
        for process in processes:
            process.kill()
            process.wait()


def answers(address):
    try:
        return client(address).version()
    except OSError:
        return False


def servers_option(addresses):
    return "--libmemcached-servers=" + ",".join("%s:%d" % address for address in addresses)


def job_items(addresses, prefix):
    """Each server's keys under `prefix` (job items only)."""
    return [{key for key in all_keys(address) if key.startswith(prefix.encode())}
            for address in addresses]


def test_c_spreads_over_two_servers_and_we_replay_and_delete_each(make_server, prefix,
                                                                  memcached_servers):
    """C puts each key on the server libmemcached's hash picks; ours must find it
    there to replay it and, above all, to delete it when the job is done."""
    need_c()
    two = memcached_servers[:2]
    options = ("-q", "libmemcached", servers_option(two), "--libmemcached-prefix", prefix)
    function = prefix.encode()
    jobs = [Job(function, b"u%d" % i, b"d%d" % i) for i in range(40)]
    c_server = make_server(*options, impl="c")
    submit_ok(c_server, jobs)
    wait_until(lambda: sum(map(len, job_items(two, prefix))) == len(jobs), 5,
               what="C's items")
    first, second = job_items(two, prefix)
    assert first and second, "C put every item on one server"
    c_server.kill()

    server = make_server(*options, impl="py")
    check_replay_any_order(server, jobs)
    wait_until(lambda: job_items(two, prefix) == [set(), set()], 5,
               what="every done job deleted from the server C put it on")


def test_jobs_spread_over_three_servers_survive_kill_9(make_server, prefix, memcached_servers):
    options = ("-q", "libmemcached", servers_option(memcached_servers),
               "--libmemcached-prefix", prefix)
    server = make_server(*options)
    jobs = sample_jobs(prefix, int(time.time()) + 4)
    jobs += [Job(prefix.encode(), b"u%d" % i, b"d%d" % i) for i in range(30)]
    submit_ok(server, jobs)
    placed = job_items(memcached_servers, prefix)
    assert all(placed), f"items per server: {[len(keys) for keys in placed]}"
    # each key on exactly one server
    assert sum(map(len, placed)) == len(set().union(*placed))

    server.kill()
    server.start()
    check_replay_any_order(server, jobs)
    wait_until(lambda: not any(all_keys(address) for address in memcached_servers), 5,
               what="done jobs and their companions deleted from every server")
