"""Memory comes back after queues drain (issue #12).

Applications that name functions per tenant or per run fill a queue deep on a
function name they never use again. Once it is empty, what the function grew while it
was deep must be freed: round after round on fresh names, the server's RSS stays flat.
The driver is one selectors loop in the test: a client pipelines background
submissions of every priority (half with a unique key, half with the unique "-"
and a distinct payload) while workers pipeline grabs and completions.

The server runs with PYTHONMALLOC=malloc. With CPython's default small-object
allocator, each round leaves an arena or two of 1 MiB pinned by a few long-lived
objects (the new function's own), about 1.5 MB a round that no code can give back;
that noise swamped the limit. With malloc the growth over eight rounds is about
1 MB, and a function that keeps what it grew adds some 11 MB a round.
"""
import os
import selectors
import struct
import time

import pytest

from conftest import IMPL, wait_until
from gearproto import (GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, JOB_CREATED, NO_JOB, NOOP, PRE_SLEEP,
                       SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG, CAN_DO,
                       WORK_COMPLETE, pack)

ROUNDS = 8
JOBS = 200_000
WORKERS = 4
GRAB_WINDOW = 64              # grabs in flight per worker connection
SEND_CHUNK = 256 << 10        # bytes of submissions per send
GROWTH_LIMIT_KB = 6 << 10    # over all the rounds

HEADER = struct.Struct(">4sII")
SUBMITS = (SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_BG, SUBMIT_JOB_LOW_BG)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def packets(buffer):
    """(complete packets as (type, body), the rest of `buffer`)."""
    out, pos, end = [], 0, len(buffer)
    while end - pos >= 12:
        _magic, ptype, size = HEADER.unpack_from(buffer, pos)
        if end - pos - 12 < size:
            break
        out.append((ptype, bytes(buffer[pos + 12:pos + 12 + size])))
        pos += 12 + size
    return out, buffer[pos:]


def submissions(function, jobs):
    parts = []
    for i in range(jobs):
        data = b"%s-%d" % (function, i)
        unique = b"u%d" % i if i & 1 else b"-"
        parts.append(pack(SUBMITS[i % 3], function, unique, data))
    return b"".join(parts)


def run_round(server, function, jobs):
    """Submit `jobs` background jobs while workers complete them; return when all ran."""
    blob = memoryview(submissions(function, jobs))
    grab = pack(GRAB_JOB_UNIQ)
    selector = selectors.DefaultSelector()
    client = server.connect()
    client.setblocking(False)
    state = {client: {"in": b"", "out": b""}}
    selector.register(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
    for _ in range(WORKERS):
        worker = server.connect()
        worker.setblocking(False)
        state[worker] = {"in": b"", "out": pack(CAN_DO, function) + grab * GRAB_WINDOW,
                         "waiting": GRAB_WINDOW}
        selector.register(worker, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent = created = done = 0
    deadline = time.monotonic() + 120
    try:
        while done < jobs or any(conn["out"] for conn in state.values()):
            assert time.monotonic() < deadline, f"round stalled: {created} created, {done} done"
            for key, events in selector.select(1.0):
                sock, conn = key.fileobj, state[key.fileobj]
                if events & selectors.EVENT_WRITE:
                    if sock is client and not conn["out"] and sent < len(blob):
                        conn["out"] = blob[sent:sent + SEND_CHUNK]
                        sent += len(conn["out"])
                    if conn["out"]:
                        try:
                            conn["out"] = conn["out"][sock.send(conn["out"]):]
                        except BlockingIOError:
                            pass
                if events & selectors.EVENT_READ:
                    chunk = sock.recv(1 << 20)
                    assert chunk, "the server closed a connection"
                    got, conn["in"] = packets(conn["in"] + chunk)
                    replies = []
                    for ptype, body in got:
                        if ptype == JOB_CREATED:
                            created += 1
                        elif ptype == JOB_ASSIGN_UNIQ:
                            done += 1
                            replies.append(pack(WORK_COMPLETE, body[:body.index(b"\0")], b""))
                            replies.append(grab)
                        elif ptype == NO_JOB:
                            conn["waiting"] -= 1
                            if not conn["waiting"]:
                                replies.append(pack(PRE_SLEEP))
                        elif ptype == NOOP and not conn["waiting"]:
                            conn["waiting"] = GRAB_WINDOW
                            replies.append(grab * GRAB_WINDOW)
                        else:
                            assert ptype == NOOP, (ptype, body)
                    if replies:
                        conn["out"] = bytes(conn["out"]) + b"".join(replies)
                want = selectors.EVENT_READ
                if conn["out"] or (sock is client and sent < len(blob)):
                    want |= selectors.EVENT_WRITE
                if want != key.events:
                    selector.modify(sock, want)
        assert created == jobs
    finally:
        for sock in state:
            sock.close()
        selector.close()
    wait_until(lambda: server.status().get(function.decode()) == (0, 0, 0), 10,
               f"{function.decode()} drained")


@pytest.mark.skipif(IMPL == "c", reason="measures gearmand.py's own memory")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_rss_stays_flat_over_rounds_of_deep_queues_on_fresh_function_names(make_server):
    server = make_server(env=dict(os.environ, PYTHONMALLOC="malloc"))
    tag = os.urandom(4).hex().encode()
    rss = []
    for number in range(ROUNDS):
        run_round(server, b"tenant-%s-%d" % (tag, number), JOBS)
        rss.append(rss_kb(server.pid))
    status = server.status()
    assert all(status[f"tenant-{tag.decode()}-{n}"] == (0, 0, 0) for n in range(ROUNDS))
    assert rss[-1] - rss[0] < GROWTH_LIMIT_KB, f"RSS after each round (kB): {rss}"
