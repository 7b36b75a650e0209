"""A tiny raw-socket Gearman client for tests: build request packets, read responses.

Every packet is `magic` + type (uint32 BE) + size (uint32 BE) + payload, where the
payload is the arguments joined by NUL bytes. Arguments may be str or bytes.
Also C gearmand's hash (`gm_hash`), which orders the rows of its admin lists.
"""
import socket
import struct

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")

# Packet type numbers (protocol.md §3).
TEXT = 0
CAN_DO = 1
CANT_DO = 2
RESET_ABILITIES = 3
PRE_SLEEP = 4
UNUSED = 5
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
NO_JOB = 10
JOB_ASSIGN = 11
WORK_STATUS = 12
WORK_COMPLETE = 13
WORK_FAIL = 14
GET_STATUS = 15
ECHO_REQ = 16
ECHO_RES = 17
SUBMIT_JOB_BG = 18
ERROR = 19
STATUS_RES = 20
SUBMIT_JOB_HIGH = 21
SET_CLIENT_ID = 22
CAN_DO_TIMEOUT = 23
ALL_YOURS = 24
WORK_EXCEPTION = 25
OPTION_REQ = 26
OPTION_RES = 27
WORK_DATA = 28
WORK_WARNING = 29
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
SUBMIT_JOB_HIGH_BG = 32
SUBMIT_JOB_LOW = 33
SUBMIT_JOB_LOW_BG = 34
SUBMIT_JOB_SCHED = 35
SUBMIT_JOB_EPOCH = 36
SUBMIT_REDUCE_JOB = 37
SUBMIT_REDUCE_JOB_BACKGROUND = 38
GRAB_JOB_ALL = 39
JOB_ASSIGN_ALL = 40
GET_STATUS_UNIQUE = 41
STATUS_RES_UNIQUE = 42

NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int)}

ERR_INVALID_COMMAND = b"INVALID_COMMAND\0Command not expected"
ERR_INVALID_MAGIC = b"INVALID_MAGIC\0Request magic expected"
ERR_UNIQUE_TOO_LARGE = b"ARGUMENT_TOO_LARGE\0Unique value too large"
ERR_QUEUE_FULL = b"QUEUE_ERROR\0Job queue is full"
ERR_UNKNOWN_OPTION = b"UNKNOWN_OPTION\0Server does not recognize given option"
ERR_NOT_FOUND_DATA = b"JOB_NOT_FOUND\0Job does not exist on server"
ERR_NOT_FOUND_RESULT = b"JOB_NOT_FOUND\0Job given in work result not found"
ERR_NOT_FOUND_EXCEPTION = (b"JOB_NOT_FOUND\0An exception was received for a job "
                           b"that does not exist")


class Closed(Exception):
    """The server closed the connection."""


def b(x):
    """An argument as bytes: str is UTF-8, an int its decimal digits."""
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, int):
        return str(x).encode()
    return bytes(x)


def payload(*args):
    return b"\0".join(b(a) for a in args)


def pack(ptype, *args, magic=REQ):
    body = payload(*args)
    return HEADER.pack(magic, ptype, len(body)) + body


def header(ptype, size=0, magic=REQ):
    """A packet header alone, announcing any size: for cut and malformed packets."""
    return HEADER.pack(magic, ptype, size)


def unpack(buffer):
    """Split the first whole packet off `buffer`: ((magic, type, payload), rest),
    or (None, buffer) while it is incomplete."""
    if len(buffer) < HEADER.size:
        return None, buffer
    magic, ptype, size = HEADER.unpack_from(buffer)
    end = HEADER.size + size
    if len(buffer) < end:
        return None, buffer
    return (magic, ptype, bytes(buffer[HEADER.size:end])), buffer[end:]


def send(sock, ptype, *args, magic=REQ):
    sock.sendall(pack(ptype, *args, magic=magic))


def recv_exact(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(f"closed after {data!r}")
        data += chunk
    return data


def recv(sock, timeout=5.0):
    """Read exactly one response packet -> (type, payload)."""
    magic, ptype, size = HEADER.unpack(recv_exact(sock, 12, timeout))
    assert magic == RES, f"bad response magic {magic!r}"
    return ptype, recv_exact(sock, size, timeout) if size else b""


def call(sock, ptype, *args):
    send(sock, ptype, *args)
    return recv(sock)


def expect(sock, ptype, *args):
    """Read one packet and assert it is exactly `ptype` with payload `args`."""
    got = recv(sock)
    want = (ptype, payload(*args))
    assert got == want, f"expected {show(want)}, got {show(got)}"
    return got


def packets_until_echo(sock, token, timeout=5.0):
    """Every packet (type, payload) the server sends before the ECHO_RES carrying
    `token` (the caller sent its ECHO_REQ); if the server closes the connection
    first, the packets and then ("closed",)."""
    packets = []
    while True:
        try:
            packet = recv(sock, timeout)
        except Closed:
            return packets + [("closed",)]
        if packet == (ECHO_RES, token):
            return packets
        packets.append(packet)


def show(packet):
    ptype, body = packet
    return f"{NAMES.get(ptype, ptype)} {body!r}"


def sync(sock, token=b"sync"):
    """Round-trip an ECHO: proves no other packet was queued for `sock` before it."""
    send(sock, ECHO_REQ, token)
    expect(sock, ECHO_RES, token)


def closed(sock, timeout=5.0):
    """True if the server closes `sock` (EOF) without sending anything first."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return data == b""


def read_to_eof(sock, timeout=5.0):
    """All the server sends until it closes (an RST counts as closing)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


# --- client helpers ---------------------------------------------------------

def submit(sock, func, uniq=b"", data=b"", ptype=SUBMIT_JOB_BG):
    """Submit one job and return its handle (bytes); asserts JOB_CREATED."""
    ptype_got, body = call(sock, ptype, func, uniq, data)
    assert ptype_got == JOB_CREATED, f"submit got {show((ptype_got, body))}"
    return body


def get_status(sock, handle):
    return call(sock, GET_STATUS, handle)


# --- worker helpers ---------------------------------------------------------

def can_do(sock, *funcs):
    """Register functions (no reply is sent, so sync to know they are registered)."""
    for func in funcs:
        send(sock, CAN_DO, func)
    sync(sock)


def grab(sock, ptype=GRAB_JOB):
    return call(sock, ptype)


def grab_handle(sock):
    """GRAB_JOB and return the assigned handle; asserts a job was assigned."""
    ptype, body = grab(sock)
    assert ptype == JOB_ASSIGN, f"grab got {show((ptype, body))}"
    return body.split(b"\0")[0]


def complete(sock, handle, data=b""):
    send(sock, WORK_COMPLETE, handle, data)


def pre_sleep(sock):
    send(sock, PRE_SLEEP)


def work_off(sock):
    """As a worker that registered its functions: complete every job it is given,
    until NO_JOB."""
    while True:
        send(sock, GRAB_JOB)
        ptype, body = recv(sock)
        if ptype == NO_JOB:
            return
        assert ptype == JOB_ASSIGN, show((ptype, body))
        send(sock, WORK_COMPLETE, body.split(b"\0")[0], b"")


def round_trip(client, worker, func, unique, data, result):
    """One foreground job: `client` submits it, `worker` (registered for `func`) gets
    it and completes it with `result`, and `client` receives that. Returns the handle."""
    handle = submit(client, func, unique, data, ptype=SUBMIT_JOB)
    send(worker, GRAB_JOB)
    expect(worker, JOB_ASSIGN, handle, func, data)
    send(worker, WORK_COMPLETE, handle, result)
    expect(client, WORK_COMPLETE, handle, result)
    return handle


# --- C gearmand's hash tables: the order of admin lists ----------------------

def _s32(x):
    x &= 0xFFFFFFFF
    return x - 0x100000000 if x & 0x80000000 else x


def gm_hash(data):
    """Jenkins one-at-a-time with C's signed chars and signed 32-bit ints (admin.md §4)."""
    v = 0
    for ch in data:
        v = _s32(v + (ch - 256 if ch >= 128 else ch))
        v = _s32(v + _s32(v << 10))
        v = _s32(v ^ (v >> 6))
    v = _s32(v + _s32(v << 3))
    v = _s32(v ^ (v >> 11))
    v = _s32(v + _s32(v << 15))
    return (v & 0xFFFFFFFF) or 1


def hash_order(keys, buckets=991):
    """Order in which gearmand lists `keys` (bytes) created in the given order:
    bucket 0 first, the newest entry first inside a bucket."""
    created = list(enumerate(keys))
    created.sort(key=lambda ik: (gm_hash(ik[1]) % buckets, -ik[0]))
    return [k for _, k in created]
