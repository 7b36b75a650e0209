"""Random sessions against C gearmand 1.1.20 and ours in lockstep, every packet compared.

Two clients and three workers (and an admin connection) send random valid requests:
submissions of every kind, grabs, results for held and unknown handles, registrations
coming and going, workers dying, status queries, admin listings. After each step every
connection is synchronised with an ECHO and all it received must be the same bytes from
both servers. Steps that reach our deliberate differences from C (cancelled or abandoned
jobs, future epoch jobs, drop function with queued jobs) are not generated; the one that
can't be avoided, C's stray NUL after the handle in the WORK_FAIL that stands in for a
WORK_EXCEPTION, is taken off C's packets before comparing.

GEARMAND_DIFF_SEEDS=N runs N seeds instead of the few that CI runs.
"""
import os
import random
import re
import struct

import pytest

from conftest import C_GEARMAND, IMPL, admin_reply_complete, recv_until, unavailable

SEEDS = int(os.environ.get("GEARMAND_DIFF_SEEDS", "3"))
STEPS = 250
CLIENTS, WORKERS = (0, 1), (2, 3, 4)
FUNCTIONS = [b"f1", b"f2", b"f3"]
UNIQUES = [b"", b"-", b"u1", b"u2", b"u3"]
DATA = [b"", b"d1", b"d2"]
OPTION_SETS = [(), ("-R",), ("-j", "3"), ("-w", "1", "--exceptions")]

pytestmark = pytest.mark.skipif(IMPL == "c", reason="compares C with ours itself")


def request(ptype, *args):
    payload = b"\0".join(args)
    return b"\0REQ" + struct.pack(">II", ptype, len(payload)) + payload


def packets_until_echo(sock, token):
    """Every packet up to the ECHO_RES carrying `token`."""
    sock.settimeout(5)
    buffer, packets = b"", []
    while True:
        while len(buffer) >= 12 and len(buffer) >= 12 + struct.unpack(">I", buffer[8:12])[0]:
            ptype, size = struct.unpack(">II", buffer[4:12])
            body, buffer = buffer[12:12 + size], buffer[12 + size:]
            if ptype == 17 and body == token:
                return packets
            packets.append((ptype, body))
        chunk = sock.recv(65536)
        if not chunk:
            return packets + [("closed",)]
        buffer += chunk


class Side:
    """One server's connections."""

    def __init__(self, server):
        self.server = server
        self.admin = self.connect()
        self.conns = [self.connect() for _ in range(5)]
        self.held = [[] for _ in range(5)]       # handles each connection was assigned

    def connect(self):
        # One at a time: C's accept thread lists a burst of new connections in reverse.
        sock = self.server.connect()
        sock.sendall(request(16, b"hello"))
        packets_until_echo(sock, b"hello")
        return sock

    def admin_line(self, line):
        self.admin.sendall(line + b"\r\n")
        reply = recv_until(self.admin, admin_reply_complete)
        return re.sub(rb"(?m)^\d+ ", b"FD ", reply)    # file descriptors differ

    def step(self, index, data, token):
        self.conns[index].sendall(data)
        if data[4:8] in (b"\0\0\0\x0d", b"\0\0\0\x0e", b"\0\0\0\x19"):   # the job ends
            handle = data[12:].split(b"\0")[0]
            if handle in self.held[index]:
                self.held[index].remove(handle)
        seen = []
        for number, sock in enumerate(self.conns):
            sock.sendall(request(16, token))
            packets = packets_until_echo(sock, token)
            for packet in packets:
                if packet[0] in (11, 31, 40):             # JOB_ASSIGN, _UNIQ, _ALL
                    self.held[number].append(packet[1].split(b"\0")[0])
            # The one difference on purpose: C's WORK_FAIL for a WORK_EXCEPTION ends
            # in a stray NUL, which we leave out (clients cannot parse it).
            seen.append([(14, payload.rstrip(b"\0")) if kind == 14 else (kind, payload)
                         for kind, payload in packets])
        return seen

    def replace(self, index):
        """The worker at `index` dies; a new connection takes its place."""
        self.conns[index].close()
        self.held[index] = []
        rows = len(self.conns) + 1
        self.conns[index] = self.connect()
        # The server notices the close when it reads the FIN: wait until it has.
        for _ in range(500):
            if self.admin_line(b"workers").count(b"\n") == rows + 1:
                return
        raise AssertionError("the server did not drop the closed worker")


def random_request(rnd, held):
    """(connection index, request bytes), or (None, admin line)."""
    kind = rnd.choice(["submit"] * 3 + ["reduce", "epoch", "can_do", "can_do", "timeout",
                       "cant_do", "reset", "grab", "grab", "grab", "result", "result",
                       "result", "pre_sleep", "status", "status_unique", "option",
                       "client_id", "admin", "admin", "die"])
    client, worker = rnd.choice(CLIENTS), rnd.choice(WORKERS)
    if kind == "submit":
        ptype = rnd.choice([7, 18, 21, 32, 33, 34])
        return client, request(ptype, rnd.choice(FUNCTIONS), rnd.choice(UNIQUES), rnd.choice(DATA))
    if kind == "reduce":
        return client, request(rnd.choice([37, 38]), rnd.choice(FUNCTIONS), rnd.choice(UNIQUES),
                               rnd.choice([b"", b"r1"]), b"", rnd.choice(DATA))
    if kind == "epoch":                          # due or garbage times only: runnable now
        return client, request(36, rnd.choice(FUNCTIONS), rnd.choice(UNIQUES),
                               rnd.choice([b"0", b"1", b"abc", b"-5"]), rnd.choice(DATA))
    if kind == "can_do":
        return worker, request(1, rnd.choice(FUNCTIONS))
    if kind == "timeout":
        return worker, request(23, rnd.choice(FUNCTIONS), b"0")
    if kind == "cant_do":
        return worker, request(2, rnd.choice(FUNCTIONS))
    if kind == "reset":
        return worker, request(3)
    if kind == "grab":
        return worker, request(rnd.choice([9, 30, 39]))
    if kind == "pre_sleep":
        return worker, request(4)
    if kind == "result":
        handles = held[worker]
        handle = rnd.choice(handles) if handles and rnd.random() < 0.9 else b"D:%d" % rnd.randrange(1, 30)
        ptype = rnd.choice([12, 13, 14, 25, 28, 29])
        if ptype == 12:
            return worker, request(12, handle, rnd.choice([b"1", b"abc"]), b"2")
        return worker, request(ptype, handle) if ptype == 14 else request(ptype, handle, b"res")
    if kind == "status":
        return rnd.randrange(5), request(15, b"D:%d" % rnd.randrange(1, 30))
    if kind == "status_unique":
        return rnd.randrange(5), request(41, rnd.choice(UNIQUES[2:]))
    if kind == "option":
        return rnd.randrange(5), request(26, b"exceptions")
    if kind == "client_id":
        return rnd.randrange(5), request(22, rnd.choice([b"w one", b"x", b""]))
    if kind == "die":
        return worker, None
    return None, rnd.choice([b"status", b"prioritystatus", b"show jobs", b"show unique jobs",
                             b"workers", b"create function f3", b"maxqueue f1 %d" % rnd.randrange(4),
                             b"maxqueue f2 1 2 %d" % rnd.randrange(3)])


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: " ".join(o) or "defaults")
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_sessions_match_c_packet_for_packet(make_server, seed, options):
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed (apt-get install gearman-job-server)")
    args = ("--job-handle-prefix", "D") + options
    c, ours = Side(make_server(*args, impl="c")), Side(make_server(*args, impl="py"))
    rnd = random.Random(f"{seed} {options}")
    history = []
    for step in range(STEPS):
        index, data = random_request(rnd, c.held)
        if index is None:
            history.append(data)
            c_reply, our_reply = c.admin_line(data), ours.admin_line(data)
            assert our_reply == c_reply, (f"step {step} {data!r}: C {c_reply!r}, ours "
                                          f"{our_reply!r}; before: {history[-12:]}")
        elif data is None:
            history.append(f"worker {index} dies")
            c.replace(index)
            ours.replace(index)
        else:
            history.append((index, data[4:8], data[12:]))
            token = b"step%d" % step
            c_seen, our_seen = c.step(index, data, token), ours.step(index, data, token)
            c_seen = [[(14, p[1][:-1]) if p[0] == 14 and p[1].endswith(b"\0") else p
                       for p in packets] for packets in c_seen]
            assert our_seen == c_seen, (f"step {step}: C {c_seen!r}, ours {our_seen!r}; "
                                        f"before: {history[-12:]}")
