"""Malformed input (protocol.md §1.1 and §9): the offending connection gets an ERROR or is
closed without a reply, and nobody else notices."""
import pytest

from conftest import IMPL, wait_until
from gearproto import (
    CAN_DO, CAN_DO_TIMEOUT, ECHO_REQ, ECHO_RES, ERR_INVALID_COMMAND, ERR_INVALID_MAGIC, ERROR,
    GET_STATUS, GET_STATUS_UNIQUE, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, JOB_CREATED, OPTION_REQ,
    RES, SET_CLIENT_ID, STATUS_RES, STATUS_RES_UNIQUE, SUBMIT_JOB_BG, SUBMIT_JOB_EPOCH,
    SUBMIT_REDUCE_JOB, WORK_COMPLETE, WORK_DATA, can_do, closed, expect, header, pack,
    recv_exact, send, submit, sync,
)

PREFIX = ("--job-handle-prefix", "T")



@pytest.fixture
def world(make_server):
    """A server with a registered worker and a queued background job, both on
    connections opened before the misbehaving one."""
    server = make_server(*PREFIX)
    worker = server.connect()
    can_do(worker, "f")
    client = server.connect()
    assert submit(client, "f", "u", "data") == b"T:1"
    return server, worker, client


def misbehaving(server):
    """A connection holding some state of its own (a registration for g)."""
    sock = server.connect()
    can_do(sock, "g")
    return sock


def assert_untouched(server, worker, client):
    # the bad connection's registration went with it; everything else is as before
    wait_until(lambda: server.status() == {"f": (1, 0, 1), "g": (0, 0, 0)})
    sync(client)
    sync(worker)
    send(worker, GRAB_JOB_UNIQ)
    expect(worker, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")
    assert submit(client, "f", "", "") == b"T:2"


CLOSING_INPUT = {
    "wrong magic": header(ECHO_REQ, magic=b"\0XYZ"),
    "lowercase magic": header(ECHO_REQ, magic=b"\0req"),
    "type 0": header(0),
    "type 0 with payload": header(0, 6) + b"status",
    "type 43": header(43),
    "type 1000": header(1000, 3) + b"abc",
    "type 2**31-1": header(0x7FFFFFFF),
    "GET_STATUS handle of 64 bytes": pack(GET_STATUS, "h" * 64),
    "GET_STATUS handle of 9000 bytes": pack(GET_STATUS, "h" * 9000),
    "GET_STATUS_UNIQUE of 64 bytes": pack(GET_STATUS_UNIQUE, "u" * 64),
    "CAN_DO_TIMEOUT value of 21 chars": pack(CAN_DO_TIMEOUT, "h", "0" * 21),
    # strtol saturating at LONG_MAX / LONG_MIN (also when given exactly) closes
    "CAN_DO_TIMEOUT value out of range": pack(CAN_DO_TIMEOUT, "h", "9" * 19),
    "CAN_DO_TIMEOUT value LONG_MAX": pack(CAN_DO_TIMEOUT, "h", "9223372036854775807"),
    "CAN_DO_TIMEOUT value LONG_MIN": pack(CAN_DO_TIMEOUT, "h", "-9223372036854775808"),
    # strtoll ERANGE closes; the extreme values themselves are accepted
    "EPOCH above range": pack(SUBMIT_JOB_EPOCH, "f", "", "9223372036854775808", "x"),
    "EPOCH below range": pack(SUBMIT_JOB_EPOCH, "f", "", "-9223372036854775809", "x"),
    "function name of 9000 bytes": pack(SUBMIT_JOB_BG, "f" * 9000, "", "x"),
    "CAN_DO name of 9000 bytes": pack(CAN_DO, "h" * 9000),
    "SET_CLIENT_ID of 9000 bytes": pack(SET_CLIENT_ID, "c" * 9000),
    "OPTION_REQ of 9000 bytes": pack(OPTION_REQ, "o" * 9000),
    # C waits while it holds at most 8192 bytes without a newline; an 8193rd byte closes
    "text line of 8193 bytes": b"x" * 8193,
    "text line of 8192 bytes plus newline": b"x" * 8192 + b"\n",
    "text line of six tokens": b"status a b c d e\r\n",
}


@pytest.mark.parametrize("name", list(CLOSING_INPUT))
def test_connection_closed_without_reply(world, name):
    server, worker, client = world
    sock = misbehaving(server)
    sock.sendall(CLOSING_INPUT[name])
    assert closed(sock)
    assert_untouched(server, worker, client)


@pytest.mark.parametrize("ptype", [0x80000000, 0xFFFFFFFF])
def test_huge_packet_type_closes_the_connection(world, ptype):
    if IMPL == "c":
        pytest.skip("C 1.1.20 exits with status 1 on a type >= 2**31")
    server, worker, client = world
    sock = misbehaving(server)
    sock.sendall(header(ptype))
    assert closed(sock)
    assert_untouched(server, worker, client)


DATA_WITHOUT_NULS = {
    "SUBMIT_JOB_BG without NULs": pack(SUBMIT_JOB_BG, "f"),
    "SUBMIT_JOB_BG with one NUL": pack(SUBMIT_JOB_BG, "f", "u"),
    "SUBMIT_JOB_EPOCH with two NULs": pack(SUBMIT_JOB_EPOCH, "f", "u", "0"),
    "SUBMIT_REDUCE_JOB with three NULs": pack(SUBMIT_REDUCE_JOB, "f", "u", "r", ""),
    "WORK_COMPLETE with a bare handle": pack(WORK_COMPLETE, "T:1"),
    "WORK_DATA with a bare handle": pack(WORK_DATA, "T:1"),
}


@pytest.mark.parametrize("name", list(DATA_WITHOUT_NULS))
def test_data_packet_missing_its_nuls_closes_the_connection(world, name):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C reads past the packet and desynchronises")
    server, worker, client = world
    sock = misbehaving(server)
    # the ECHO right behind it must not be taken as the rest of the packet
    sock.sendall(DATA_WITHOUT_NULS[name] + pack(ECHO_REQ, "\0\0\0\0"))
    assert closed(sock)
    assert_untouched(server, worker, client)


# --- limits that are still accepted ------------------------------------------

def test_just_below_the_limits(world):
    server, worker, client = world
    sock = misbehaving(server)
    send(sock, GET_STATUS, "h" * 63)
    expect(sock, STATUS_RES, "h" * 63, "0", "0", "0", "0")
    send(sock, GET_STATUS_UNIQUE, "u" * 63)
    expect(sock, STATUS_RES_UNIQUE, "u" * 63, "0", "0", "0", "0", "0")
    send(sock, CAN_DO_TIMEOUT, "h", "0" * 19 + "5")
    send(sock, CAN_DO, "i" * 8000)
    send(sock, SET_CLIENT_ID, "c" * 8000)
    sync(sock)
    send(sock, SUBMIT_JOB_BG, "j" * 8100, "", "x")
    expect(sock, JOB_CREATED, "T:2")
    sock.sendall(b"x" * 8191)
    sock.sendall(b"\n")
    want = b"ERR UNKNOWN_COMMAND Unknown+server+command" + b"x" * 8191 + b"\r\n"
    assert recv_exact(sock, len(want)) == want
    sync(sock)
    assert server.status()["h"] == (0, 0, 1)


def test_extreme_epochs_are_accepted(world):
    server, worker, client = world
    sock = misbehaving(server)
    send(sock, SUBMIT_JOB_EPOCH, "k", "max", "9223372036854775807", "x")
    expect(sock, JOB_CREATED, "T:2")
    sync(sock)
    send(sock, SUBMIT_JOB_EPOCH, "k", "min", "-9223372036854775808", "x")
    expect(sock, JOB_CREATED, "T:3")
    sync(sock)
    assert server.status()["k"] == (2, 0, 0)
    can_do(worker, "k")
    send(worker, GRAB_JOB_UNIQ)
    expect(worker, JOB_ASSIGN_UNIQ, "T:3", "k", "min", "x")
    send(worker, GRAB_JOB_UNIQ)
    expect(worker, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")
    sync(worker)
    assert server.status()["k"] == (2, 1, 1)


@pytest.mark.parametrize("timeout", ["9223372036854775806", "99999999999", "2147483648",
                                     "-9223372036854775807"])
def test_huge_can_do_timeout_values_are_harmless(world, timeout):
    server, worker, client = world
    sock = misbehaving(server)
    send(sock, CAN_DO_TIMEOUT, "f", timeout)
    sync(sock)
    assert server.status()["f"] == (1, 0, 2)
    send(sock, GRAB_JOB_UNIQ)
    expect(sock, JOB_ASSIGN_UNIQ, "T:1", "f", "u", "data")
    sync(sock)
    send(sock, WORK_COMPLETE, "T:1", "r")
    sync(sock)
    assert server.status()["f"] == (0, 0, 2)


# --- errors that keep the connection ----------------------------------------

def test_response_magic_is_answered_with_invalid_magic(world):
    server, worker, client = world
    sock = misbehaving(server)
    sock.sendall(pack(ECHO_REQ, "x", magic=RES))
    expect(sock, ERROR, ERR_INVALID_MAGIC)
    sock.sendall(pack(SUBMIT_JOB_BG, "f", "", "x", magic=RES))
    expect(sock, ERROR, ERR_INVALID_MAGIC)
    sock.sendall(pack(CAN_DO, "f", magic=RES))
    expect(sock, ERROR, ERR_INVALID_MAGIC)
    sync(sock)
    assert server.status() == {"f": (1, 0, 1), "g": (0, 0, 1)}  # nothing was done
    sock.close()
    assert_untouched(server, worker, client)


@pytest.mark.parametrize("ptype", [5, 6, 8, 10, 11, 17, 19, 20, 24, 27, 31, 35, 40, 42])
def test_server_only_and_unused_types_are_rejected(world, ptype):
    server, worker, client = world
    sock = misbehaving(server)
    # enough NUL-separated arguments for the shape of every type
    send(sock, ptype, "a", "b", "c", "d", "e", "f", "g", "h")
    expect(sock, ERROR, ERR_INVALID_COMMAND)
    if ptype in (5, 6, 8, 10, 17, 24, 27):  # shapes of at most one argument
        send(sock, ptype)
        expect(sock, ERROR, ERR_INVALID_COMMAND)
    sync(sock)
    sock.close()
    assert_untouched(server, worker, client)


def test_job_handle_shaped_packets_from_a_stranger(world):
    """A response packet naming a real job must not touch that job."""
    server, worker, client = world
    sock = misbehaving(server)
    send(sock, 11, "T:1", "f", "data")  # JOB_ASSIGN
    expect(sock, ERROR, ERR_INVALID_COMMAND)
    send(sock, 8, "T:1")  # JOB_CREATED
    expect(sock, ERROR, ERR_INVALID_COMMAND)
    send(sock, WORK_COMPLETE, "T:1", "stolen")
    expect(sock, ERROR, "JOB_NOT_FOUND", "Job given in work result not found")
    sync(sock)
    sock.close()
    assert_untouched(server, worker, client)


def test_echo_res_is_not_an_echo(world):
    server, worker, client = world
    sock = misbehaving(server)
    send(sock, ECHO_RES, "x")
    expect(sock, ERROR, ERR_INVALID_COMMAND)
    sync(sock)
