"""Binary protocol, byte for byte as C gearmand 1.1.20 speaks it (protocol.md)."""
import os
import re
import time

import pytest

from conftest import IMPL, wait_until
from gearproto import (
    ALL_YOURS, CAN_DO, CAN_DO_TIMEOUT, CANT_DO, ECHO_REQ, ECHO_RES, ERR_INVALID_COMMAND,
    ERR_NOT_FOUND_DATA, ERR_NOT_FOUND_EXCEPTION, ERR_NOT_FOUND_RESULT, ERR_QUEUE_FULL,
    ERR_UNIQUE_TOO_LARGE, ERR_UNKNOWN_OPTION, ERROR, GET_STATUS, GET_STATUS_UNIQUE,
    GRAB_JOB, GRAB_JOB_ALL, GRAB_JOB_UNIQ, JOB_ASSIGN, JOB_ASSIGN_ALL, JOB_ASSIGN_UNIQ,
    JOB_CREATED, NO_JOB, NOOP, OPTION_REQ, OPTION_RES, PRE_SLEEP, RESET_ABILITIES,
    SET_CLIENT_ID, STATUS_RES, STATUS_RES_UNIQUE, SUBMIT_JOB, SUBMIT_JOB_BG,
    SUBMIT_JOB_EPOCH, SUBMIT_JOB_HIGH, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW,
    SUBMIT_JOB_LOW_BG, SUBMIT_JOB_SCHED, SUBMIT_REDUCE_JOB, SUBMIT_REDUCE_JOB_BACKGROUND,
    WORK_COMPLETE, WORK_DATA, WORK_EXCEPTION, WORK_FAIL, WORK_STATUS, WORK_WARNING,
    call, can_do, complete, expect, grab, grab_handle, pack, recv, send, submit, sync,
)

PREFIX = ("--job-handle-prefix", "T")
FG_TYPES = [SUBMIT_JOB, SUBMIT_JOB_HIGH, SUBMIT_JOB_LOW]
BG_TYPES = [SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG]


@pytest.fixture
def srv(make_server):
    return make_server(*PREFIX)


def sleeping_worker(server, *funcs):
    """A worker that registered `funcs` and sent PRE_SLEEP with nothing to do."""
    w = server.connect()
    can_do(w, *funcs)
    send(w, PRE_SLEEP)
    sync(w)  # no NOOP came back: it is asleep
    return w


def grab_order(worker, n, ptype=GRAB_JOB_UNIQ):
    """Grab n jobs and return their uniques; then assert the queue is empty."""
    got = []
    for _ in range(n):
        ptype_got, body = grab(worker, ptype)
        assert ptype_got == JOB_ASSIGN_UNIQ, (ptype_got, body)
        got.append(body.split(b"\0")[2].decode())
    send(worker, ptype)
    expect(worker, NO_JOB)
    return got


# --- framing, ECHO, text/binary mix ----------------------------------------

def test_echo_returns_payload_verbatim(srv):
    c = srv.connect()
    for body in [b"", b"hello", b"a\0b\0\0c", bytes(range(256)) * 300]:
        send(c, ECHO_REQ, body)
        expect(c, ECHO_RES, body)


def test_pipelined_requests_answered_in_order(srv):
    c = srv.connect()
    c.sendall(pack(ECHO_REQ, "1") + pack(SUBMIT_JOB_BG, "f", "", "x") + pack(ECHO_REQ, "2"))
    expect(c, ECHO_RES, "1")
    expect(c, JOB_CREATED, "T:1")
    expect(c, ECHO_RES, "2")


def test_text_and_binary_interleaved_on_one_connection(srv):
    c = srv.connect()
    c.sendall(b"version\n" + pack(ECHO_REQ, "x") + b"getpid\r\n" + pack(ECHO_REQ, "y"))
    line = b""
    while not line.endswith(b"\n"):
        line += c.recv(1)
    assert line in ((b"OK 1.1.20\n", b"OK 1.1.20+ds\n") if IMPL == "c" else (b"OK 1.1.20\n",))
    expect(c, ECHO_RES, "x")
    line = b""
    while not line.endswith(b"\n"):
        line += c.recv(1)
    assert line == b"OK %d\n" % srv.pid
    expect(c, ECHO_RES, "y")


# --- submission -------------------------------------------------------------

def test_every_submit_type_answers_job_created_with_sequential_handles(srv):
    c = srv.connect()
    handles = [submit(c, "f", "", "x", t) for t in FG_TYPES + BG_TYPES]
    assert handles == [b"T:%d" % i for i in range(1, 7)]
    # HIGH / NORMAL / LOW columns, two jobs each
    assert srv.admin("prioritystatus") == b"f\t2\t2\t2\t0\n.\n"
    assert srv.admin("status") == b"f\t6\t0\t0\n.\n"


def test_default_handle_prefix_is_H_colon_nodename(make_server):
    server = make_server()
    c = server.connect()
    assert submit(c, "f", "", "") == b"H:%s:1" % os.uname().nodename.encode()


def test_foreground_submissions_attach_a_client_background_do_not(srv):
    c = srv.connect()
    for i, t in enumerate(FG_TYPES + BG_TYPES):
        submit(c, "f", "u%d" % i, "x", t)
    for i in range(6):
        clients = b"1" if i < 3 else b"0"
        send(c, GET_STATUS_UNIQUE, "u%d" % i)
        expect(c, STATUS_RES_UNIQUE, "u%d" % i, "1", "0", "0", "0", clients)


def test_unique_longer_than_64_bytes_is_refused(srv):
    c = srv.connect()
    for t in FG_TYPES + BG_TYPES:
        send(c, t, "f", "u" * 65, "x")
        expect(c, ERROR, ERR_UNIQUE_TOO_LARGE)
    send(c, SUBMIT_JOB_EPOCH, "f", "u" * 65, "0", "x")
    expect(c, ERROR, ERR_UNIQUE_TOO_LARGE)
    assert srv.admin("status") == b".\n"  # checked before the function is created
    assert submit(c, "f", "u" * 63, "x") == b"T:1"


def test_unique_of_64_bytes_is_a_normal_unique(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C stores 63 bytes, never coalesces, sends two NULs")
    c, w = srv.connect(), srv.connect()
    uniq = "".join(chr(ord("a") + i % 26) for i in range(64))
    assert submit(c, "f", uniq, "x") == b"T:1"
    assert submit(c, "f", uniq, "y") == b"T:1"
    can_do(w, "f")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:1", "f", uniq, "x")
    assert srv.admin("show unique jobs") == uniq.encode() + b"\n.\n"


def test_submit_job_sched_is_rejected(srv):
    c = srv.connect()
    send(c, SUBMIT_JOB_SCHED, "f", "u", "1", "2", "3", "4", "5", "data")
    expect(c, ERROR, ERR_INVALID_COMMAND)
    sync(c)


# --- grabbing ---------------------------------------------------------------

def test_job_assign_bytes_for_each_grab_type(srv):
    c, w = srv.connect(), srv.connect()
    submit(c, "f", "u1", "d\0ata1")
    submit(c, "f", "u2", "data2")
    submit(c, "f", "", "data3")
    submit(c, "f", "u4", "data4")
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:1", "f", "d\0ata1")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:2", "f", "u2", "data2")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:3", "f", "", "data3")
    # GRAB_JOB_ALL without a reducer answers JOB_ASSIGN_UNIQ
    send(w, GRAB_JOB_ALL)
    expect(w, JOB_ASSIGN_UNIQ, "T:4", "f", "u4", "data4")
    send(w, GRAB_JOB_ALL)
    expect(w, NO_JOB)


def test_no_job_for_unregistered_or_idle_worker(srv):
    w = srv.connect()
    for t in (GRAB_JOB, GRAB_JOB_UNIQ, GRAB_JOB_ALL):
        send(w, t)
        expect(w, NO_JOB)
    submit(srv.connect(), "other", "", "x")
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    # payload bytes of GRAB_JOB are ignored
    w.sendall(pack(GRAB_JOB, "12345"))
    expect(w, NO_JOB)
    sync(w)


def test_priority_high_normal_low_then_fifo(srv):
    c, w = srv.connect(), srv.connect()
    for i in range(2):
        submit(c, "f", "low%d" % i, "", SUBMIT_JOB_LOW_BG)
        submit(c, "f", "normal%d" % i, "", SUBMIT_JOB)
        submit(c, "f", "high%d" % i, "", SUBMIT_JOB_HIGH_BG)
        submit(c, "f", "low%d+" % i, "", SUBMIT_JOB_LOW)
        submit(c, "f", "normal%d+" % i, "", SUBMIT_JOB_BG)
        submit(c, "f", "high%d+" % i, "", SUBMIT_JOB_HIGH)
    can_do(w, "f")
    assert grab_order(w, 12) == [
        "high0", "high0+", "high1", "high1+",
        "normal0", "normal0+", "normal1", "normal1+",
        "low0", "low0+", "low1", "low1+"]


def test_newest_registration_is_served_first(srv):
    c, w = srv.connect(), srv.connect()
    for i in range(2):
        for f in "abc":
            submit(c, f, f + str(i), "")
    can_do(w, "a", "b", "c")
    assert grab_order(w, 6) == ["c0", "c1", "b0", "b1", "a0", "a1"]


def test_priority_is_per_function_not_global(srv):
    c, w = srv.connect(), srv.connect()
    submit(c, "a", "a-high", "", SUBMIT_JOB_HIGH_BG)
    submit(c, "b", "b-low", "", SUBMIT_JOB_LOW_BG)
    can_do(w, "a", "b")
    assert grab_order(w, 2) == ["b-low", "a-high"]


def test_round_robin_rotates_over_functions(make_server):
    server = make_server(*PREFIX, "-R")
    c, w = server.connect(), server.connect()
    for i in range(2):
        for f in "abc":
            submit(c, f, f + str(i), "")
    can_do(w, "a", "b", "c")
    assert grab_order(w, 6) == ["c0", "b0", "a0", "c1", "b1", "a1"]


def test_worker_may_hold_several_jobs(srv):
    c, w = srv.connect(), srv.connect()
    submit(c, "f", "", "1")
    submit(c, "f", "", "2")
    can_do(w, "f")
    assert grab_handle(w) == b"T:1"
    assert grab_handle(w) == b"T:2"
    assert srv.status() == {"f": (2, 2, 1)}


def test_duplicate_and_removed_registrations(srv):
    c, w = srv.connect(), srv.connect()
    can_do(w, "f", "g", "f")
    assert srv.status() == {"f": (0, 0, 2), "g": (0, 0, 1)}
    send(w, CANT_DO, "f")
    sync(w)
    assert srv.status() == {"f": (0, 0, 0), "g": (0, 0, 1)}
    submit(c, "f", "", "x")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    send(w, CAN_DO, "f")
    send(w, RESET_ABILITIES)
    sync(w)
    assert srv.status() == {"f": (1, 0, 0), "g": (0, 0, 0)}
    send(w, GRAB_JOB)
    expect(w, NO_JOB)


def test_can_do_name_is_the_whole_payload(srv):
    w = srv.connect()
    can_do(w, "a\0b", "a")
    # two distinct functions; admin output prints names as C strings
    assert srv.admin("status") == b"a\t0\t0\t1\na\t0\t0\t1\n.\n"


def test_cant_do_requeues_running_jobs(srv):
    c, w = srv.connect(), srv.connect()
    submit(c, "f", "", "x")
    can_do(w, "f", "g")
    assert grab_handle(w) == b"T:1"
    send(w, CANT_DO, "f")
    sync(w)
    assert srv.status()["f"] == (1, 0, 0)
    assert srv.admin("show jobs") == b"T:1\t1\t0\t1\n.\n"
    w2 = srv.connect()
    can_do(w2, "f")
    assert grab_handle(w2) == b"T:1"


# --- sleep and wakeup -------------------------------------------------------

def test_pre_sleep_with_work_available_gets_noop_at_once(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    w = srv.connect()
    can_do(w, "f")
    send(w, PRE_SLEEP)
    expect(w, NOOP)


def test_sleeping_worker_gets_one_noop_until_it_grabs(srv):
    c = srv.connect()
    w = sleeping_worker(srv, "f")
    other = sleeping_worker(srv, "g")
    submit(c, "f", "", "1")
    expect(w, NOOP)
    submit(c, "f", "", "2")
    sync(w)  # no second NOOP
    sync(other)  # a worker of another function is not woken
    assert grab_handle(w) == b"T:1"
    send(w, PRE_SLEEP)
    expect(w, NOOP)  # T:2 is still queued
    assert grab_handle(w) == b"T:2"
    send(w, PRE_SLEEP)
    sync(w)
    submit(c, "f", "", "3")
    expect(w, NOOP)


def test_all_sleeping_workers_are_woken_by_default(srv):
    c = srv.connect()
    workers = [sleeping_worker(srv, "f") for _ in range(3)]
    submit(c, "f", "", "x")
    for w in workers:
        expect(w, NOOP)


def test_worker_wakeup_1_wakes_successive_workers(make_server):
    server = make_server(*PREFIX, "-w", "1")
    c = server.connect()
    workers = [sleeping_worker(server, "f") for _ in range(3)]

    def woken_by_next_job():
        submit(c, "f", "", "x")
        got = []
        for n, w in enumerate(workers):
            send(w, ECHO_REQ, "s")
            first = recv(w)
            if first == (NOOP, b""):
                got.append(n)
                expect(w, ECHO_RES, "s")
            else:
                assert first == (ECHO_RES, b"s")
        return got

    # one NOOP per job, oldest registration first, then rotating
    assert [woken_by_next_job() for _ in range(3)] == [[0], [1], [2]]
    assert woken_by_next_job() == []  # everyone already has its NOOP
    for w in workers:
        grab_handle(w)
    grab_handle(workers[0])
    for w in workers:
        send(w, PRE_SLEEP)
        sync(w)
    assert [woken_by_next_job() for _ in range(4)] == [[0], [1], [2], []]


def test_requeue_wakes_sleeping_workers(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    w1 = srv.connect()
    can_do(w1, "f")
    assert grab_handle(w1) == b"T:1"
    w2 = sleeping_worker(srv, "f")
    w1.close()
    expect(w2, NOOP)
    assert grab_handle(w2) == b"T:1"



@pytest.mark.parametrize("wakeup", [None, "1"])
def test_a_sleeping_worker_that_dies_holding_a_job_may_take_its_noop_along(make_server,
                                                                            wakeup):
    """C puts a dead worker's job back while the worker is still in the function's
    ring, and it is asleep: with -w 1 the one NOOP is its own, lost with it."""
    server = make_server(*PREFIX, *(("-w", wakeup) if wakeup else ()))
    c, w1 = server.connect(), server.connect()
    can_do(w1, "f")
    submit(c, "f", "", "x")
    assert grab_handle(w1) == b"T:1"
    send(w1, PRE_SLEEP)
    sync(w1)
    w2 = sleeping_worker(server, "f")
    w1.close()
    wait_until(lambda: server.status().get("f") == (1, 0, 1), 5, what="T:1 back in the queue")
    if wakeup:
        sync(w2)                          # nothing came before the echo: no NOOP
    else:
        expect(w2, NOOP)
    assert grab_handle(w2) == b"T:1"

# --- results forwarded to clients ------------------------------------------

def test_work_packets_forwarded_verbatim_to_every_attached_client(srv):
    c1, c2, w = srv.connect(), srv.connect(), srv.connect()
    h = submit(c1, "f", "u", "x", SUBMIT_JOB)
    assert submit(c2, "f", "u", "other", SUBMIT_JOB_HIGH) == h
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, h, "f", "x")
    sent = [
        (WORK_STATUS, (h, "1", "3")),
        (WORK_STATUS, (h, "abc", "")),
        (WORK_DATA, (h, "d\0a")),
        (WORK_WARNING, (h, "")),
        (WORK_DATA, (h, "")),
        (WORK_COMPLETE, (h, "res\0ult")),
    ]
    for ptype, args in sent:
        send(w, ptype, *args)
    sync(w)  # no acknowledgement for WORK_* packets
    for c in (c1, c2):
        for ptype, args in sent:
            expect(c, ptype, *args)
        sync(c)
    assert srv.status() == {"f": (0, 0, 1)}


def test_client_submitting_same_unique_twice_gets_results_twice(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "u", "x", SUBMIT_JOB)
    assert submit(c, "f", "u", "x", SUBMIT_JOB) == h
    can_do(w, "f")
    grab(w)
    complete(w, h, "r")
    expect(c, WORK_COMPLETE, h, "r")
    expect(c, WORK_COMPLETE, h, "r")
    sync(c)


def test_client_attached_later_sees_only_later_packets(srv):
    c1, c2, w = srv.connect(), srv.connect(), srv.connect()
    h = submit(c1, "f", "u", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab(w)
    send(w, WORK_DATA, h, "early")
    expect(c1, WORK_DATA, h, "early")
    assert submit(c2, "f", "u", "x", SUBMIT_JOB) == h
    complete(w, h, "")
    expect(c2, WORK_COMPLETE, h, "")
    expect(c1, WORK_COMPLETE, h, "")


def test_work_fail_forwarded(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB_LOW)
    can_do(w, "f")
    grab(w)
    send(w, WORK_FAIL, h)
    expect(c, WORK_FAIL, h)
    sync(c)
    assert srv.status() == {"f": (0, 0, 1)}


def test_work_exception_becomes_work_fail_without_exceptions_option(srv):
    """A client without the `exceptions` option hears WORK_FAIL with the handle alone.
    C 1.1.20 adds a stray NUL after the handle, which Perl's Gearman::Client cannot
    parse; the test runs against C too."""
    plain, opted, w = srv.connect(), srv.connect(), srv.connect()
    send(opted, OPTION_REQ, "exceptions")
    expect(opted, OPTION_RES, "exceptions")
    h = submit(plain, "f", "u", "x", SUBMIT_JOB)
    submit(opted, "f", "u", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab(w)
    send(w, WORK_EXCEPTION, h, "boom")
    expect(plain, WORK_FAIL, h + (b"\0" if IMPL == "c" else b""))
    expect(opted, WORK_EXCEPTION, h, "boom")
    sync(plain)
    sync(opted)
    assert srv.status() == {"f": (0, 0, 1)}


def test_exceptions_server_option_turns_it_on_for_every_connection(make_server):
    server = make_server(*PREFIX, "--exceptions")
    c, w = server.connect(), server.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab(w)
    send(w, WORK_EXCEPTION, h, "boom")
    expect(c, WORK_EXCEPTION, h, "boom")


def test_option_req(srv):
    c = srv.connect()
    send(c, OPTION_REQ, "EXCEPTIONS")
    expect(c, OPTION_RES, "EXCEPTIONS")
    send(c, OPTION_REQ, "ExCeptions")
    expect(c, OPTION_RES, "ExCeptions")
    # compared as a C string: whatever follows a NUL is ignored, and echoed back
    send(c, OPTION_REQ, "exceptions\0zz")
    expect(c, OPTION_RES, "exceptions\0zz")
    for bad in ["foo", "exception", "exceptionsx", "x" * 64, ""]:
        send(c, OPTION_REQ, bad)
        expect(c, ERROR, ERR_UNKNOWN_OPTION)


def test_background_job_results_go_nowhere(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x")
    can_do(w, "f")
    grab(w)
    send(w, WORK_DATA, h, "d")
    complete(w, h, "r")
    sync(w)
    sync(c)
    assert srv.status() == {"f": (0, 0, 1)}


# --- status queries ---------------------------------------------------------

def test_get_status(srv):
    c, w = srv.connect(), srv.connect()
    send(c, GET_STATUS, "T:99")
    expect(c, STATUS_RES, "T:99", "0", "0", "0", "0")
    h = submit(c, "f", "", "x")
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "0", "0", "0")
    can_do(w, "f")
    grab(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "1", "0", "0")
    send(w, WORK_STATUS, h, "1", "3")
    sync(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "1", "1", "3")
    # numerator atoi, denominator atoi of at most 10 characters
    send(w, WORK_STATUS, h, "7abc", "12345678901")
    sync(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "1", "7", "1234567890")
    send(w, WORK_STATUS, h, "x", "")
    sync(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "1", "0", "0")
    complete(w, h)
    sync(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "0", "0", "0", "0")


def test_get_status_unique(srv):
    c, c2, w = srv.connect(), srv.connect(), srv.connect()
    send(c, GET_STATUS_UNIQUE, "U1")
    expect(c, STATUS_RES_UNIQUE, "U1", "0", "0", "0", "0", "0")
    h = submit(c, "f", "U1", "x", SUBMIT_JOB)
    submit(c2, "f", "U1", "x", SUBMIT_JOB)
    send(c, GET_STATUS_UNIQUE, "U1")
    expect(c, STATUS_RES_UNIQUE, "U1", "1", "0", "0", "0", "2")
    can_do(w, "f")
    grab(w)
    send(w, WORK_STATUS, h, "1", "3")
    expect(c, WORK_STATUS, h, "1", "3")
    send(c, GET_STATUS_UNIQUE, "U1")
    expect(c, STATUS_RES_UNIQUE, "U1", "1", "1", "1", "3", "2")
    # a background job with that unique under another function: the newest job wins
    submit(c, "g", "U1", "x")
    send(c, GET_STATUS_UNIQUE, "U1")
    expect(c, STATUS_RES_UNIQUE, "U1", "1", "0", "0", "0", "0")


def test_work_status_of_requeued_job_is_reset(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x")
    can_do(w, "f")
    grab(w)
    send(w, WORK_STATUS, h, "5", "9")
    send(w, RESET_ABILITIES)
    sync(w)
    send(c, GET_STATUS, h)
    expect(c, STATUS_RES, h, "1", "0", "0", "0")


# --- unique coalescing ------------------------------------------------------

def test_same_unique_same_function_coalesces(srv):
    c = srv.connect()
    assert submit(c, "f", "u", "a", SUBMIT_JOB) == b"T:1"
    assert submit(c, "f", "u", "b", SUBMIT_JOB_BG) == b"T:1"
    assert submit(c, "f", "u", "c", SUBMIT_JOB_LOW) == b"T:1"
    assert submit(c, "f", "U", "a") == b"T:2"  # unique is case-sensitive
    assert submit(c, "g", "u", "a") == b"T:3"  # lookup is per function
    assert submit(c, "f", "v", "a") == b"T:4"  # coalesced ones used no handle number
    # the coalesced submission changed nothing: priority stays NORMAL, data stays "a"
    assert srv.admin("prioritystatus") == b"f\t0\t3\t0\t0\ng\t0\t1\t0\t0\n.\n"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "a")


def test_empty_unique_never_coalesces(srv):
    c = srv.connect()
    assert [submit(c, "f", "", "same") for _ in range(3)] == [b"T:1", b"T:2", b"T:3"]
    assert srv.status() == {"f": (3, 0, 0)}


def test_dash_unique_dedupes_by_payload(srv):
    c = srv.connect()
    assert submit(c, "f", "-", "payload") == b"T:1"
    assert submit(c, "f", "-", "payload", SUBMIT_JOB) == b"T:1"
    assert submit(c, "f", "-", "other") == b"T:2"
    assert submit(c, "g", "-", "payload") == b"T:3"  # per function
    # a job whose unique equals the payload bytes is not a match, nor the other way round
    assert submit(c, "f", "zzz", "q") == b"T:4"
    assert submit(c, "f", "-", "zzz") == b"T:5"
    assert submit(c, "f", "zzz", "other") == b"T:4"
    # payload-deduplicated jobs are not found by their stored unique `-`
    send(c, GET_STATUS_UNIQUE, "-")
    expect(c, STATUS_RES_UNIQUE, "-", "0", "0", "0", "0", "0")
    # `-` with empty data never coalesces
    assert submit(c, "f", "-", "") == b"T:6"
    assert submit(c, "f", "-", "") == b"T:7"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:1", "f", "-", "payload")


def test_coalescing_onto_a_running_job(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "u", "x")
    can_do(w, "f")
    grab(w)
    c2 = srv.connect()
    assert submit(c2, "f", "u", "y", SUBMIT_JOB) == h
    complete(w, h, "done")
    expect(c2, WORK_COMPLETE, h, "done")
    # the job is gone now: the same unique makes a new job
    assert submit(c, "f", "u", "x") == b"T:2"


def test_background_onto_foreground_returns_the_foreground_handle(srv):
    c = srv.connect()
    h = submit(c, "f", "u", "x", SUBMIT_JOB)
    assert submit(srv.connect(), "f", "u", "x", SUBMIT_JOB_HIGH_BG) == h
    assert srv.admin("prioritystatus") == b"f\t0\t1\t0\t0\n.\n"


def test_foreground_leaving_coalesced_background_job_keeps_it(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C drops the background job when the fg client leaves")
    c = srv.connect()
    h = submit(c, "f", "u", "x")
    fg = srv.connect()
    send(fg, SET_CLIENT_ID, "leaver")
    assert submit(fg, "f", "u", "x", SUBMIT_JOB) == h
    fg.close()
    wait_until(lambda: b" leaver :" not in srv.admin("workers"))
    assert srv.admin("show jobs") == b"T:1\t0\t0\t1\n.\n"
    w = srv.connect()
    can_do(w, "f")
    assert grab_handle(w) == h


def test_abandoned_foreground_job_is_discarded_at_grab(srv):
    c = srv.connect()
    h = submit(c, "f", "u", "x", SUBMIT_JOB)
    submit(c, "f", "", "y")
    c.close()
    wait_until(lambda: srv.admin("show jobs").startswith(b"T:1\t0\t1\t0\n"))
    assert srv.status() == {"f": (2, 0, 0)}
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:2", "f", "y")
    assert srv.status() == {"f": (1, 1, 1)}
    assert srv.admin("show jobs") == b"T:2\t0\t0\t1\n.\n"
    c2 = srv.connect()
    send(c2, GET_STATUS, h)
    expect(c2, STATUS_RES, h, "0", "0", "0", "0")


def test_abandoned_job_is_not_used_for_coalescing(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C attaches the new client to the doomed job")
    c = srv.connect()
    assert submit(c, "f", "u", "x", SUBMIT_JOB) == b"T:1"
    c.close()
    wait_until(lambda: srv.admin("show jobs") == b"T:1\t0\t1\t0\n.\n")
    c2 = srv.connect()
    assert submit(c2, "f", "u", "x2", SUBMIT_JOB) == b"T:2"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:2", "f", "x2")
    complete(w, b"T:2", "r")
    expect(c2, WORK_COMPLETE, "T:2", "r")


def test_cancelled_job_is_not_used_for_coalescing(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C attaches the new client to the cancelled job")
    c = srv.connect()
    assert submit(c, "f", "u", "x") == b"T:1"
    assert srv.admin("cancel job T:1") == b"OK\r\n"
    assert submit(c, "f", "u", "x2") == b"T:2"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:2", "f", "x2")


def test_abandoned_running_job_still_accepts_results(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab(w)
    c.close()
    wait_until(lambda: srv.admin("show jobs") == b"T:1\t0\t1\t0\n.\n")
    send(w, WORK_DATA, h, "d")
    complete(w, h, "r")
    sync(w)
    assert srv.status() == {"f": (0, 0, 1)}


# --- client id --------------------------------------------------------------

def test_set_client_id_shown_by_workers(srv):
    w = srv.connect()
    send(w, SET_CLIENT_ID, "my worker id")
    can_do(w, "f")
    rows = srv.admin("workers").split(b"\n")
    assert any(re.fullmatch(rb"\d+ 127\.0\.0\.1 my worker id : f", r) for r in rows), rows
    send(w, SET_CLIENT_ID, "x" * 200)
    sync(w)
    rows = srv.admin("workers").split(b"\n")
    assert any(re.fullmatch(rb"\d+ 127\.0\.0\.1 x{127} : f", r) for r in rows), rows


# --- worker failure, retries, timeouts --------------------------------------

def test_worker_disconnect_requeues_to_the_tail(srv):
    c = srv.connect()
    for u in ("a", "b", "c"):
        submit(c, "f", u, "")
    w1 = srv.connect()
    can_do(w1, "f")
    assert grab_handle(w1) == b"T:1"
    assert grab_handle(w1) == b"T:2"
    w1.close()
    wait_until(lambda: srv.status()["f"] == (3, 0, 0))
    rows = sorted(srv.admin("show jobs").split(b"\n")[:-2])
    assert rows == [b"T:1\t1\t0\t1", b"T:2\t1\t0\t1", b"T:3\t0\t0\t1"]
    # most recently assigned first, appended behind the still-queued T:3
    w2 = srv.connect()
    can_do(w2, "f")
    assert grab_order(w2, 3) == ["c", "b", "a"]


def test_job_retries_drops_job_with_work_fail(make_server):
    server = make_server(*PREFIX, "-j", "2")
    c = server.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    watchers = []
    for attempt in range(2):
        w = server.connect()
        can_do(w, "f")
        assert grab_handle(w) == h
        watchers.append(sleeping_worker(server, "f"))
        w.close()
        if attempt == 0:
            expect(watchers[0], NOOP)
            wait_until(lambda: server.admin("show jobs") == b"T:1\t1\t0\t0\n.\n")
    expect(c, WORK_FAIL, h)
    sync(c)
    wait_until(lambda: server.status()["f"] == (0, 0, 2))
    assert server.admin("show jobs") == b".\n"
    sync(watchers[1])  # the dropped job woke nobody


def test_can_do_timeout_requeues_the_job(srv):
    c = srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    w = srv.connect()
    send(w, CAN_DO_TIMEOUT, "f", "200")
    sync(w)
    assert srv.status() == {"f": (1, 0, 1)}
    started = time.monotonic()
    assert grab_handle(w) == h
    watcher = sleeping_worker(srv, "f")
    expect(watcher, NOOP)  # requeued when the (at least 1 s) timer fired
    assert time.monotonic() - started >= 0.9
    assert srv.admin("show jobs") == b"T:1\t1\t0\t0\n.\n"
    sync(c)  # the client is told nothing
    send(w, WORK_COMPLETE, h, "late")
    expect(w, ERROR, ERR_NOT_FOUND_RESULT)
    assert grab_handle(watcher) == h
    complete(watcher, h, "ok")
    expect(c, WORK_COMPLETE, h, "ok")


def test_can_do_timeout_timer_is_cancelled_by_completion(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C's stale timer makes running 4294967295")
    c, w = srv.connect(), srv.connect()
    send(w, CAN_DO_TIMEOUT, "f", "1000")
    sync(w)
    h = submit(c, "f", "", "1")
    assert grab_handle(w) == h
    complete(w, h)
    sync(w)
    assert srv.status() == {"f": (0, 0, 1)}
    time.sleep(1.3)  # past the timeout: this is when a stale timer would fire
    assert srv.status() == {"f": (0, 0, 1)}
    # the next assignment still gets its own timer
    h2 = submit(c, "f", "", "2")
    assert grab_handle(w) == h2
    watcher = sleeping_worker(srv, "f")
    expect(watcher, NOOP)
    assert srv.status() == {"f": (1, 0, 2)}


# --- epoch and reduce jobs --------------------------------------------------

def test_submit_job_epoch_in_the_future_is_not_grabbed(srv):
    c = srv.connect()
    w = sleeping_worker(srv, "f")
    a_year_ahead = str(int(time.time()) + 365 * 86400)
    h = call(c, SUBMIT_JOB_EPOCH, "f", "e", a_year_ahead, "x")
    assert h == (JOB_CREATED, b"T:1")
    expect(w, NOOP)  # woken although nothing is runnable yet
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    assert srv.admin("prioritystatus") == b"f\t0\t1\t0\t1\n.\n"
    assert srv.status() == {"f": (1, 0, 1)}
    send(w, PRE_SLEEP)
    sync(w)  # future jobs do not count as work


# parsed with strtoll(base 10): leading blanks and a sign are taken, the rest is ignored
@pytest.mark.parametrize("epoch", ["1", "-5", "garbage", "", "0", " 5", "+5", "\t7", "0x10",
                                   "1e3", "-9223372036854775808"])
def test_submit_job_epoch_in_the_past_or_garbage_runs_now(srv, epoch):
    c, w = srv.connect(), srv.connect()
    send(c, SUBMIT_JOB_EPOCH, "f", "e", epoch, "x")
    expect(c, JOB_CREATED, "T:1")
    can_do(w, "f")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:1", "f", "e", "x")


def test_future_epoch_job_blocks_low_jobs_in_c(srv):
    if IMPL != "c":
        pytest.skip("C quirk replaced on purpose: ours falls through to LOW")
    c, w = srv.connect(), srv.connect()
    send(c, SUBMIT_JOB_EPOCH, "f", "e", str(int(time.time()) + 3600), "x")
    expect(c, JOB_CREATED, "T:1")
    submit(c, "f", "low", "y", SUBMIT_JOB_LOW_BG)
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    send(w, PRE_SLEEP)
    expect(w, NOOP)


def test_future_epoch_job_does_not_block_lower_priorities(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C's future epoch job blocks LOW jobs")
    c, w = srv.connect(), srv.connect()
    send(c, SUBMIT_JOB_EPOCH, "f", "e", str(int(time.time()) + 3600), "x")
    expect(c, JOB_CREATED, "T:1")
    submit(c, "f", "low", "y", SUBMIT_JOB_LOW_BG)
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:2", "f", "y")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)


def test_sleeping_worker_woken_when_epoch_job_falls_due(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C sends no NOOP when an epoch job falls due")
    c = srv.connect()
    w = sleeping_worker(srv, "f")
    due = int(time.time()) + 2
    send(c, SUBMIT_JOB_EPOCH, "f", "e", str(due), "x")
    expect(c, JOB_CREATED, "T:1")
    expect(w, NOOP)
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    send(w, PRE_SLEEP)
    expect(w, NOOP)  # arrives once the epoch second has come (recv waits up to 5 s)
    assert time.time() >= due - 0.01
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:1", "f", "x")


def test_submit_reduce_job(srv):
    c, w = srv.connect(), srv.connect()
    send(c, SUBMIT_REDUCE_JOB, "f", "u1", "reducer", "", "data")
    expect(c, JOB_CREATED, "T:1")
    send(c, SUBMIT_REDUCE_JOB_BACKGROUND, "f", "u2", "red2", "agg", "data2")
    expect(c, JOB_CREATED, "T:2")
    send(c, GET_STATUS_UNIQUE, "u1")
    expect(c, STATUS_RES_UNIQUE, "u1", "1", "0", "0", "0", "1")
    send(c, GET_STATUS_UNIQUE, "u2")
    expect(c, STATUS_RES_UNIQUE, "u2", "1", "0", "0", "0", "0")
    can_do(w, "f")
    send(w, GRAB_JOB_ALL)
    expect(w, JOB_ASSIGN_ALL, "T:1", "f", "u1", "reducer", "data")
    send(w, GRAB_JOB_ALL)
    expect(w, JOB_ASSIGN_ALL, "T:2", "f", "u2", "red2", "data2")
    complete(w, b"T:1", "sum")
    expect(c, WORK_COMPLETE, "T:1", "sum")


def test_reduce_jobs_check_the_reducer_length_not_the_unique(srv):
    c = srv.connect()
    for t in (SUBMIT_REDUCE_JOB, SUBMIT_REDUCE_JOB_BACKGROUND):
        send(c, t, "f", "u", "r" * 65, "", "x")
        expect(c, ERROR, ERR_UNIQUE_TOO_LARGE)
    send(c, SUBMIT_REDUCE_JOB, "f", "u", "r" * 64, "", "x")
    expect(c, JOB_CREATED, "T:1")
    send(c, SUBMIT_REDUCE_JOB_BACKGROUND, "f", "v" * 65, "r", "", "x")
    expect(c, JOB_CREATED, "T:2")


def test_reduce_job_seen_by_plain_grabs(srv):
    c, w = srv.connect(), srv.connect()
    send(c, SUBMIT_REDUCE_JOB, "f", "u1", "reducer", "", "data")
    expect(c, JOB_CREATED, "T:1")
    send(c, SUBMIT_REDUCE_JOB, "f", "u2", "reducer", "", "data2")
    expect(c, JOB_CREATED, "T:2")
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:1", "f", "data")
    send(w, GRAB_JOB_UNIQ)
    expect(w, JOB_ASSIGN_UNIQ, "T:2", "f", "u2", "data2")


# --- errors -----------------------------------------------------------------

def test_all_yours_is_not_implemented(srv):
    w = srv.connect()
    can_do(w, "f")
    send(w, ALL_YOURS)
    expect(w, ERROR, ERR_INVALID_COMMAND)
    sync(w)


def test_work_packets_for_unknown_or_foreign_jobs(srv):
    c, w, other = srv.connect(), srv.connect(), srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    h2 = submit(c, "f", "", "queued", SUBMIT_JOB)
    can_do(w, "f")
    assert grab_handle(w) == h
    for handle in (b"T:99", h, h2):  # unknown, running elsewhere, queued
        send(other, WORK_DATA, handle, "d")
        expect(other, ERROR, ERR_NOT_FOUND_DATA)
        send(other, WORK_WARNING, handle, "d")
        expect(other, ERROR, ERR_NOT_FOUND_DATA)
        send(other, WORK_STATUS, handle, "1", "2")
        expect(other, ERROR, ERR_NOT_FOUND_RESULT)
        send(other, WORK_COMPLETE, handle, "r")
        expect(other, ERROR, ERR_NOT_FOUND_RESULT)
        send(other, WORK_FAIL, handle)
        expect(other, ERROR, ERR_NOT_FOUND_RESULT)
        send(other, WORK_EXCEPTION, handle, "e")
        expect(other, ERROR, ERR_NOT_FOUND_EXCEPTION)
    send(other, WORK_FAIL, "T:" + "9" * 62)
    expect(other, ERROR, "ARGUMENT_TOO_LARGE",
           "Error occurred due to GEARMAND_JOB_HANDLE_SIZE being too small from snprintf")
    sync(c)  # nothing reached the client
    assert srv.status() == {"f": (2, 1, 1)}
    complete(w, h, "ok")
    expect(c, WORK_COMPLETE, h, "ok")


def test_maxqueue_refuses_new_jobs_but_not_coalesced_ones(srv):
    c = srv.connect()
    submit(c, "f", "u", "x")
    assert srv.admin("maxqueue f 2") == b"OK\r\n"
    submit(c, "f", "", "x", SUBMIT_JOB)
    for t in FG_TYPES + BG_TYPES:
        send(c, t, "f", "", "x")
        expect(c, ERROR, ERR_QUEUE_FULL)
    send(c, SUBMIT_JOB_EPOCH, "f", "", "0", "x")
    expect(c, ERROR, ERR_QUEUE_FULL)
    assert submit(c, "f", "u", "x", SUBMIT_JOB_HIGH) == b"T:1"
    assert srv.status() == {"f": (2, 0, 0)}
    # running jobs count too
    w = srv.connect()
    can_do(w, "f")
    grab(w)
    send(c, SUBMIT_JOB_BG, "f", "", "x")
    expect(c, ERROR, ERR_QUEUE_FULL)
    complete(w, b"T:1")
    expect(c, WORK_COMPLETE, "T:1", "")  # c had coalesced onto T:1 in the foreground
    assert submit(c, "f", "", "x") == b"T:3"  # refusals used no handle number


def test_maxqueue_limits_per_priority(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    assert srv.admin("maxqueue f 1 0") == b"OK\r\n"  # HIGH=1, NORMAL=0, LOW=0 (unlimited)
    send(c, SUBMIT_JOB_HIGH_BG, "f", "", "x")
    expect(c, ERROR, ERR_QUEUE_FULL)
    assert submit(c, "f", "", "x", SUBMIT_JOB_LOW_BG) == b"T:2"
    assert submit(c, "f", "", "x") == b"T:3"
    assert srv.admin("maxqueue f 5 5 2") == b"OK\r\n"
    send(c, SUBMIT_JOB_LOW, "f", "", "x")
    expect(c, ERROR, ERR_QUEUE_FULL)
    assert submit(c, "f", "", "x", SUBMIT_JOB_HIGH) == b"T:4"
    assert srv.admin("maxqueue f") == b"OK\r\n"  # back to unlimited
    assert submit(c, "f", "", "x", SUBMIT_JOB_LOW) == b"T:5"


def test_departing_worker_requeues_by_registration_newest_first(make_server):
    """C keeps a worker's jobs per registration (CAN_DO) and, when the worker goes,
    takes its newest registration first, then each one's newest job: with -j 1 the
    client hears WORK_FAIL for the f2 job before the f1 job assigned after it."""
    server = make_server("-j", "1", *PREFIX)
    client = server.connect()
    f2_job = submit(client, "f2", "a", "A", ptype=SUBMIT_JOB)
    f1_job = submit(client, "f1", "b", "B", ptype=SUBMIT_JOB)
    worker = server.connect()
    can_do(worker, "f1")
    can_do(worker, "f2")                       # the newest registration: grabbed from first
    send(worker, GRAB_JOB)
    expect(worker, JOB_ASSIGN, f2_job, "f2", "A")
    send(worker, GRAB_JOB)
    expect(worker, JOB_ASSIGN, f1_job, "f1", "B")
    worker.close()
    expect(client, WORK_FAIL, f2_job)
    expect(client, WORK_FAIL, f1_job)
