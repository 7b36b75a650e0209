"""Hardening: malformed input that test_faults.py does not cover, bounded memory
(--max-packet-size, --max-output), running out of descriptors (-f), thousands of
idle peers, and peers connecting and leaving in a tight loop.

Memory and CPU are read from /proc/PID/{status,stat,fd,limits} of the server.
GEARMAND_TEST_LONG=1 runs the many-peers and churn tests at full size.
"""
import os
import socket
import struct
import threading
import time

import pytest

import gearproto
from conftest import IMPL, Server, wait_until
from gearproto import (
    CAN_DO, CAN_DO_TIMEOUT, ECHO_REQ, ECHO_RES, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, NOOP, PRE_SLEEP,
    RES, SUBMIT_JOB, SUBMIT_JOB_BG, SUBMIT_JOB_HIGH, SUBMIT_JOB_LOW_BG,
    SUBMIT_REDUCE_JOB_BACKGROUND, WORK_COMPLETE, WORK_EXCEPTION, WORK_STATUS, WORK_WARNING,
    Closed, can_do, closed, expect, header, pack, read_to_eof, recv, recv_exact, round_trip,
    send, submit, sync, work_off,
)

LONG = os.environ.get("GEARMAND_TEST_LONG") == "1"
PREFIX = ("--job-handle-prefix", "T")
MiB = 1 << 20
OURS_ONLY = pytest.mark.skipif(IMPL == "c", reason="option or behaviour of gearmand.py only")


# --- /proc readings ------------------------------------------------------------

def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss_kb(pid):
    return status_kb(pid, "VmRSS")


def hwm_kb(pid):
    """Peak RSS so far: catches a spike that a later RSS reading would miss."""
    return status_kb(pid, "VmHWM")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limits(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def reset(sock):
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()



# --- a server with work that must survive every misbehaving peer ---------------

@pytest.fixture
def world(make_server):
    """A worker and a client connected before the misbehaving peer, a queued
    background job, and the server's descriptor count with just those two."""
    server = make_server(*PREFIX)
    worker = server.connect()
    can_do(worker, "f")
    client = server.connect()
    assert submit(client, "f", "u", "data") == b"T:1"
    sync(client)
    return server, worker, client, fd_count(server.pid)


def assert_untouched(world):
    server, worker, client, fds = world
    # the misbehaving connection is really gone on the server's side
    wait_until(lambda: fd_count(server.pid) == fds, what="server descriptor count back to "
               f"{fds}")
    assert server.proc.poll() is None
    assert server.status() == {"f": (1, 0, 1)}
    sync(client)
    sync(worker)
    send(worker, GRAB_JOB_UNIQ)
    expect(worker, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")
    assert submit(client, "f", "", "") == b"T:2"


def sent_and_closed(server, data, how):
    """After one answered packet, send `data` on a connection and close it with a
    FIN or an RST."""
    sock = server.connect()
    sync(sock)
    sock.sendall(data)
    if how == "rst":
        reset(sock)
        return
    sock.shutdown(socket.SHUT_WR)
    # the server answers the half-close by closing too, with no reply to the fragment
    assert read_to_eof(sock) == b""
    sock.close()


# --- malformed input -------------------------------------------------------------

TRUNCATED = {
    "one byte of a header": b"\0",
    "eleven bytes of a header": header(ECHO_REQ, 5)[:11],
    "half a small body": header(ECHO_REQ, 100) + b"x" * 50,
    "part of a 1 MiB body": header(ECHO_REQ, MiB) + b"x" * 300_000,
    "a submit cut before its data": header(SUBMIT_JOB_BG, 20) + b"f\0u\0",
    "an admin line without its newline": b"status",
    "8000 bytes of an admin line": b"s" * 8000,
    "half a header": b"\0RE",
}


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("name", list(TRUNCATED))
def test_truncated_input_then_close(world, name, how):
    server = world[0]
    sent_and_closed(server, TRUNCATED[name], how)
    assert_untouched(world)


def test_reset_with_replies_pending(world):
    """An RST while the server still holds megabytes of replies for that peer."""
    server = world[0]
    sock = server.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    for _ in range(32):
        sock.sendall(pack(ECHO_REQ, b"e" * (256 * 1024)))
    sock.sendall(header(SUBMIT_JOB_BG, 1000) + b"f\0")
    reset(sock)
    assert_untouched(world)


def test_response_magic_with_invalid_type_closes(world):
    server = world[0]
    for data in (header(0, 0, RES), header(43, 0, RES), header(1000, 3, RES) + b"abc"):
        sock = server.connect()
        sock.sendall(data)
        assert closed(sock)
    assert_untouched(world)


@OURS_ONLY
@pytest.mark.parametrize("size", [0x80000000, 0xFFFFFFFF, (64 << 20) + 1])
def test_huge_announced_size_closes_at_once(world, size):
    """Over the default --max-packet-size (64 MiB): closed without waiting for the body.
    (C 1.1.20 has no such limit: it keeps the connection open, waiting for the bytes.)"""
    server = world[0]
    sock = server.connect()
    sock.sendall(header(ECHO_REQ, size) + b"x" * 1000)
    assert closed(sock, timeout=2)
    assert_untouched(world)


@pytest.mark.skipif(IMPL == "c", reason="C 1.1.20 reads the next packet as the missing "
                                        "arguments (fixed on purpose, see README)")
@pytest.mark.parametrize("data", [
    pack(CAN_DO_TIMEOUT, "f"),
    pack(WORK_STATUS, "T:1", "50"),
    pack(WORK_EXCEPTION, "T:1"),
    pack(WORK_WARNING, "T:1"),
    pack(SUBMIT_JOB, "f", "u"),
    pack(SUBMIT_JOB_HIGH, "f"),
    pack(SUBMIT_JOB_LOW_BG, "f", "u"),
    pack(SUBMIT_REDUCE_JOB_BACKGROUND, "f", "u", "r"),
    pack(SUBMIT_JOB_BG),
], ids=["CAN_DO_TIMEOUT", "WORK_STATUS", "WORK_EXCEPTION", "WORK_WARNING", "SUBMIT_JOB",
        "SUBMIT_JOB_HIGH", "SUBMIT_JOB_LOW_BG", "SUBMIT_REDUCE_JOB_BACKGROUND",
        "empty SUBMIT_JOB_BG"])
def test_too_few_arguments_close(world, data):
    server = world[0]
    sock = server.connect()
    sock.sendall(data + pack(ECHO_REQ, "\0\0\0\0"))
    assert closed(sock)
    assert_untouched(world)


# Admin lines with NUL bytes: C compares NUL-terminated strings (answers checked on C).
NUL_LINES = {
    b"status\0junk\r\n": b"f\t1\t0\t1\n.\n",
    b"status\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\r\n": b"f\t1\t0\t1\n.\n",
    b"status \0 \0 \0 \0\r\n": b"f\t1\t0\t1\n.\n",
    b"sta\0tus\r\n": b"ERR UNKNOWN_COMMAND Unknown+server+commandsta\r\n",
    b"show \0jobs\r\n": b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n",
    b"\x01\0\0\0\0\0\0\0\r\n": b"ERR UNKNOWN_COMMAND Unknown+server+command\x01\r\n",
    b"cancel job \0T:1\r\n": b"ERR UNKNOWN_JOB\r\n",
    b"cancel job " + b"h" * 8000 + b"\r\n": b"ERR UNKNOWN_JOB\r\n",
}


@pytest.mark.parametrize("line", list(NUL_LINES), ids=lambda line: repr(line[:24]))
def test_admin_lines_with_nuls_and_long_tokens(world, line):
    server = world[0]
    sock = server.connect()
    sock.sendall(line)
    want = NUL_LINES[line]
    assert recv_exact(sock, len(want)) == want
    sync(sock)   # still open, and nothing more was sent
    sock.close()
    assert_untouched(world)


def test_admin_line_over_the_limit_in_small_pieces(world):
    """8193 bytes without a newline, dripped 64 bytes at a time: closed (as C)."""
    server = world[0]
    sock = server.connect()
    for _ in range(128):
        sock.sendall(b"x" * 64)
    assert not closed(sock, timeout=0.3)   # 8192 bytes without a newline are waited for
    sock.sendall(b"x")
    assert closed(sock)
    assert_untouched(world)


def test_admin_flood_without_reading(world):
    """50,000 pipelined admin lines, replies read only at the end."""
    server = world[0]
    sock = server.connect()
    sock.sendall(b"status\n" * 50_000)
    want = b"f\t1\t0\t1\n.\n" * 50_000
    assert recv_exact(sock, len(want), timeout=30) == want
    sync(sock)
    sock.close()
    assert_untouched(world)


# --- bounded memory ---------------------------------------------------------------

def send_until_closed(sock, data, limit):
    """Send `data` over and over until the server closes the connection; return the
    bytes sent. Fails if it is still open after `limit` bytes, or stops reading."""
    sock.settimeout(10)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(data)
            sent += len(data)
    except (BrokenPipeError, ConnectionResetError):
        return sent
    raise AssertionError(f"connection still open after {sent} bytes")


@OURS_ONLY
@pytest.mark.parametrize("limit", [1000, 300_000])
def test_max_packet_size_is_exact(make_server, limit):
    """A packet of exactly --max-packet-size bytes of payload works, one more byte
    closes, also when the whole packet arrives in one read."""
    server = make_server("--max-packet-size", str(limit))
    sock = server.connect()
    send(sock, ECHO_REQ, b"a" * limit)
    expect(sock, ECHO_RES, b"a" * limit)
    sock.sendall(pack(ECHO_REQ, b"b" * (limit + 1)))
    assert closed(sock), f"a packet of {limit + 1} bytes was accepted"
    sync(server.connect())


@OURS_ONLY
def test_max_input_buffer_bounds_large_packets_of_all_connections_together(make_server):
    """Each peer may send packets up to --max-packet-size, but together the large packets
    still arriving may hold at most --max-input-buffer: the peer that would pass it is
    closed, the others go on."""
    server = make_server("--max-packet-size", str(8 * MiB), "--max-input-buffer",
                         str(12 * MiB), "--verbose", "WARNING")
    peers = [server.connect(), server.connect()]
    payload = b"p" * (8 * MiB)
    part = 7 * MiB + MiB // 2              # two of these are over the 12 MiB budget

    def stream(sock):
        try:
            sock.sendall(header(ECHO_REQ, len(payload)) + payload[:part])
        except (BrokenPipeError, ConnectionResetError):
            pass

    threads = [threading.Thread(target=stream, args=(sock,)) for sock in peers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_until(lambda: "over --max-input-buffer" in server.log(), what="one peer closed")
    survivors = []
    for sock in peers:
        try:
            sock.sendall(payload[part:])
            expect(sock, ECHO_RES, payload)
            survivors.append(sock)
        except (BrokenPipeError, ConnectionResetError, Closed):
            pass
    assert len(survivors) == 1, f"{len(survivors)} of the two peers got their packet through"
    sync(server.connect())


@OURS_ONLY
def test_max_packet_size_refuses_before_buffering(make_server):
    """A peer announcing 512 MiB and streaming it is closed after the header: the
    server's RSS peak does not grow by what the peer sends."""
    server = make_server("--max-packet-size", str(MiB), "--verbose", "WARNING")
    other = server.connect()
    sync(other)
    before = hwm_kb(server.pid)
    sock = server.connect()
    sock.sendall(header(ECHO_REQ, 512 * MiB))
    sent = send_until_closed(sock, b"z" * MiB, 256 * MiB)
    assert sent < 64 * MiB, f"the server read {sent} bytes before closing"
    growth = hwm_kb(server.pid) - before
    assert growth < 8 * 1024, f"RSS peak grew by {growth} KiB"
    sync(other)
    assert "over --max-packet-size" in server.log()


@OURS_ONLY
def test_max_output_disconnects_a_peer_that_never_reads(make_server):
    """1 MiB ECHOs from a peer that never reads: closed once its unsent replies pass
    --max-output (8 MiB); the server's RSS peak stays bounded."""
    server = make_server("--max-output", str(8 * MiB), "--verbose", "WARNING")
    other = server.connect()
    sync(other)
    before = hwm_kb(server.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)   # little kernel slack
    sock.connect(("127.0.0.1", server.port))
    sent = send_until_closed(sock, pack(ECHO_REQ, b"e" * MiB), 256 * MiB)
    assert sent < 128 * MiB, f"{sent} bytes sent before the server gave up"
    growth = hwm_kb(server.pid) - before
    assert growth < 32 * 1024, f"RSS peak grew by {growth} KiB with --max-output 8 MiB"
    sync(other)
    wait_until(lambda: "not reading its replies" in server.log(), what="log line")


@OURS_ONLY
def test_max_output_spares_a_peer_that_reads_late(make_server):
    """Replies just under --max-output wait for a peer that reads them late."""
    server = make_server("--max-output", str(4 * MiB))
    sock = server.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    for i in range(3):
        send(sock, ECHO_REQ, bytes([65 + i]) * MiB)
    time.sleep(0.3)   # give the server time to (wrongly) close
    for i in range(3):
        expect(sock, ECHO_RES, bytes([65 + i]) * MiB)
    sync(sock)


@OURS_ONLY
def test_max_output_close_wakes_a_sleeping_worker_at_once(make_server):
    """A worker closed over --max-output at the end of a turn gives its job back: a
    sleeping worker gets its NOOP then, not when some other packet arrives."""
    server = make_server("--max-output", str(MiB), *PREFIX)
    sleeper = server.connect()
    can_do(sleeper, "f")
    client = server.connect()
    assert submit(client, "f", "u", "data") == b"T:1"
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", server.port))
    can_do(hog, "f")
    send(hog, GRAB_JOB_UNIQ)
    expect(hog, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")
    send(sleeper, PRE_SLEEP)
    sync(sleeper)                          # nothing to do: it sleeps
    hog.sendall(pack(ECHO_REQ, b"e" * (16 * MiB)))   # a reply it never reads
    assert recv(sleeper, timeout=2) == (NOOP, b"")
    send(sleeper, GRAB_JOB_UNIQ)
    expect(sleeper, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")


def test_completed_jobs_under_can_do_timeout_are_freed(make_server):
    """A completed assignment's CAN_DO_TIMEOUT timer lets go of its job at once, not
    when the timeout would have come: 200 jobs of 1 MiB under a one-hour timeout,
    while another one keeps running, leave the RSS about where it was."""
    jobs = 200
    server = make_server(*PREFIX)
    client, slow, worker = server.connect(), server.connect(), server.connect()
    for sock in (slow, worker):
        send(sock, CAN_DO_TIMEOUT, "f", "3600000")
        sync(sock)
    assert submit(client, "f", "slow", "s") == b"T:1"
    send(slow, GRAB_JOB_UNIQ)
    expect(slow, JOB_ASSIGN_UNIQ, "T:1", "f", "slow", "s")
    before = rss_kb(server.pid)
    data = b"d" * MiB
    for i in range(jobs):
        handle = submit(client, "f", "u%d" % i, data)
        send(worker, GRAB_JOB_UNIQ)
        expect(worker, JOB_ASSIGN_UNIQ, handle, "f", "u%d" % i, data)
        send(worker, WORK_COMPLETE, handle, "")
    sync(worker)
    growth = rss_kb(server.pid) - before
    assert growth < jobs * 1024 // 4, f"RSS grew by {growth} KiB after {jobs} jobs of 1 MiB"


# --- running out of descriptors ---------------------------------------------------

def test_file_descriptors_option_sets_the_limit(make_server):
    server = make_server("-f", "300")
    soft, hard = nofile_limits(server.pid)
    assert soft == 300 and hard >= 300   # C sets only the soft limit, we set both
    sync(server.connect())


def exhaust_descriptors(server, limit=64):
    """Open connections until the server, at `limit` descriptors, stops answering new
    ones; return the answered connections and the last one (left in the backlog)."""
    answered = []
    for _ in range(200):
        sock = server.connect()
        send(sock, ECHO_REQ, "hello")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert recv(sock, timeout=0.2) == (ECHO_RES, b"hello")
                answered.append(sock)
                break
            except socket.timeout:
                # slow, or not accepted: only the descriptor count tells
                if fd_count(server.pid) >= limit:
                    return answered, sock
                assert time.monotonic() < deadline, "a connection was neither answered " \
                                                    "nor left waiting at the limit"
    raise AssertionError(f"200 connections answered despite -f {limit}")


def test_out_of_descriptors_keeps_serving(make_server):
    server = make_server("-f", "64", *PREFIX)
    worker = server.connect()
    can_do(worker, "f")
    client = server.connect()
    answered, waiting = exhaust_descriptors(server)
    assert fd_count(server.pid) == 64
    # old connections are still served, jobs still flow
    round_trip(client, worker, "f", "u", "x", "done")
    for sock in answered:
        sync(sock)
    # once descriptors are free, the waiting connection is served (its ECHO was sent)
    for sock in answered[-5:]:
        sock.close()
    assert recv(waiting, timeout=5) == (ECHO_RES, b"hello")
    fresh = server.connect()
    sync(fresh)
    assert server.proc.poll() is None


@pytest.mark.skipif(IMPL == "c", reason="C 1.1.20 spins at 100% CPU while accept() fails "
                                        "with EMFILE")
def test_out_of_descriptors_does_not_spin(make_server):
    server = make_server("-f", "64")
    answered, waiting = exhaust_descriptors(server)
    # a few more peers knock while the server cannot accept
    extra = [socket.create_connection(("127.0.0.1", server.port), 2) for _ in range(5)]
    start = cpu_seconds(server.pid)
    time.sleep(1.0)
    used = cpu_seconds(server.pid) - start
    assert used < 0.2, f"server used {used:.2f} s of CPU in 1 s while out of descriptors"
    sync(answered[0])
    for sock in answered[:10]:
        sock.close()
    assert recv(waiting, timeout=5) == (ECHO_RES, b"hello")
    for sock in extra:
        sync(sock)


# --- many peers --------------------------------------------------------------------

IDLE_CONNECTIONS = 10_000 if LONG else 2_000


def test_thousands_of_idle_connections(make_server):
    server = make_server("-b", "4096", *PREFIX)
    worker = server.connect()
    can_do(worker, "rt")
    client = server.connect()
    sync(client)
    fds_before = fd_count(server.pid)
    rss_before = rss_kb(server.pid)
    idle = []
    for i in range(IDLE_CONNECTIONS):
        idle.append(socket.create_connection(("127.0.0.1", server.port), 10))
        if i % 500 == 499:
            sync(idle[-1])   # accepted in order: every earlier one is accepted too
    sync(idle[-1])
    assert fd_count(server.pid) == fds_before + IDLE_CONNECTIONS
    per_connection = (rss_kb(server.pid) - rss_before) / IDLE_CONNECTIONS
    print(f"\n{IDLE_CONNECTIONS} idle connections: {per_connection:.2f} KiB of RSS each")
    assert per_connection < 16, f"{per_connection:.1f} KiB of RSS per idle connection"
    # jobs still go round (worker and client connected before them)
    for _ in range(20):
        round_trip(client, worker, "rt", "", "ping", "pong")
    # every idle connection is alive and answers
    for sock in idle:
        sock.sendall(pack(ECHO_REQ, "idle"))
    for sock in idle:
        expect(sock, ECHO_RES, "idle")
    for sock in idle:
        sock.close()
    wait_until(lambda: fd_count(server.pid) == fds_before, timeout=10,
               what="descriptors back to baseline")


CHURN_SECONDS = 60.0 if LONG else 3.0


def churn_round(server, i):
    """One worker and one client come, run a job (or walk out on it), and leave."""
    client = server.connect()
    worker = server.connect()
    send(worker, CAN_DO, "churn")
    handle = submit(client, "churn", "", b"%d" % i, ptype=SUBMIT_JOB)
    if i % 7 == 0:
        submit(client, "churn", "bg%d" % (i % 3), "bg")   # coalesces, drained below
    send(worker, GRAB_JOB_UNIQ)
    ptype, body = recv(worker)
    assert ptype == JOB_ASSIGN_UNIQ, body
    assigned = body.split(b"\0")[0]
    mode = i % 5
    if mode == 0:
        reset(worker)            # dies holding a job: it is requeued
    elif mode == 1:
        reset(client)            # the client walks away before the result
        send(worker, WORK_COMPLETE, assigned, "r")
        sync(worker)
        worker.close()
    else:
        send(worker, WORK_COMPLETE, assigned, "r")
        if assigned == handle:
            expect(client, WORK_COMPLETE, handle, "r")
        sync(worker)
        worker.close()
    for sock in (client, worker):
        try:
            sock.close()
        except OSError:
            pass


def drain(server, function):
    sock = server.connect()
    can_do(sock, function)
    work_off(sock)
    sock.close()


def test_connect_and_leave_churn_does_not_leak(make_server):
    server = make_server(*PREFIX)
    observer = server.connect()
    sync(observer)
    for i in range(300):                   # warm up the allocator and caches
        churn_round(server, i)
    drain(server, "churn")
    wait_until(lambda: server.status().get("churn", (0, 0, 0)) == (0, 0, 0))
    # The round trip makes the server see the status() connection's close before counting.
    sync(observer)
    fds_before = fd_count(server.pid)
    rss_before = rss_kb(server.pid)
    rounds = 0
    deadline = time.monotonic() + CHURN_SECONDS
    while time.monotonic() < deadline:
        churn_round(server, rounds)
        rounds += 1
    drain(server, "churn")
    wait_until(lambda: server.status().get("churn") == (0, 0, 0), what="no jobs or workers")
    wait_until(lambda: fd_count(server.pid) == fds_before, what="descriptors back to baseline")
    sync(observer)
    growth = rss_kb(server.pid) - rss_before
    print(f"\nchurn: {rounds} rounds in {CHURN_SECONDS:.0f} s, RSS {growth:+d} KiB")
    assert rounds > 100
    assert growth < 4096, f"RSS grew by {growth} KiB over {rounds} rounds"
    assert server.admin("show jobs") == b".\n"


# --- without epoll -----------------------------------------------------------------

class PollServer(Server):
    """gearmand.py on a Python whose select module has no epoll, as on macOS and the BSDs."""

    def command(self):
        argv = super().command()
        code = ("import runpy, select, sys\ndel select.epoll\nsys.argv = sys.argv[1:]\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        return [argv[0], "-c", code] + argv[1:]


@OURS_ONLY
def test_without_epoll_the_loop_runs_on_poll(tmp_path):
    """Jobs too large for one send go out in pieces (POLLOUT), both ways, and an idle
    connection's close is seen."""
    server = PollServer(tmp_path, PREFIX).start()
    try:
        worker, client, idle = server.connect(), server.connect(), server.connect()
        can_do(worker, "f")
        data = os.urandom(8 * MiB)
        send(client, SUBMIT_JOB, "f", "", data)
        expect(client, gearproto.JOB_CREATED, "T:1")
        kind, body = gearproto.call(worker, GRAB_JOB_UNIQ)
        assert kind == JOB_ASSIGN_UNIQ and body == b"T:1\0f\0\0" + data
        send(worker, WORK_COMPLETE, "T:1", data[::-1])
        assert recv(client, 30) == (gearproto.WORK_COMPLETE, b"T:1\0" + data[::-1])
        idle.close()
        # `workers`: worker, client and the admin connection itself, then ".".
        wait_until(lambda: server.admin("workers").count(b"\n") == 4, 5,
                   what="the idle connection's close to be seen")
    finally:
        server.stop()
    assert not server.log_problems()
