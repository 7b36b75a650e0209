"""The same session against C gearmand 1.1.20 and ours, admin replies compared byte for byte.

Each step is sent to both servers; after each one, every listing command is asked of both
and the replies must be identical (only file descriptor numbers in `workers` differ, and
the version string, where Debian's C build says 1.1.20+ds).
"""
import os
import re

import pytest

from conftest import C_GEARMAND, admin_reply_complete, recv_until, unavailable, wait_until
from gearproto import RES, header, recv as read_packet, pack as request

LISTINGS = ["status", "prioritystatus", "show jobs", "show unique jobs", "workers"]
PREFIX = "--job-handle-prefix=SBS"


class Pair:
    """One connection to each server, driven in lockstep."""

    def __init__(self, servers):
        self.socks = [server.connect() for server in servers]
        # C's accept thread hands a burst of new connections over in reverse order;
        # one at a time, each is listed as the newest.
        self.send(request(16, b"hello"))
        assert self.packet() == [(17, b"hello")] * 2

    def send(self, data):
        for sock in self.socks:
            sock.sendall(data)

    def packet(self):
        return [read_packet(sock) for sock in self.socks]

    def line(self, text, end=b"\r\n"):
        self.send(text.encode() + end)
        return [recv_until(sock, admin_reply_complete) for sock in self.socks]

    def close(self):
        for sock in self.socks:
            sock.close()


def normalised(reply, c=False):
    """Without file descriptor numbers (the `workers` FD column); C's version
    string loses Debian's +ds, ours must not have it."""
    reply = re.sub(rb"(?m)^\d+ (127\.0\.0\.1 )", rb"FD \1", reply)
    return reply.replace(b"OK 1.1.20+ds\n", b"OK 1.1.20\n") if c else reply


@pytest.fixture
def servers(make_server):
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed (apt-get install gearman-job-server)")
    return [make_server(PREFIX, impl="c"), make_server(PREFIX, impl="py")]


def same_listings(servers, admin):
    for command in LISTINGS:
        c_reply, our_reply = admin.line(command)
        c_reply, our_reply = normalised(c_reply, c=True), normalised(our_reply)
        assert our_reply == c_reply, f"{command!r} differs:\nC:    {c_reply!r}\nours: {our_reply!r}"


def test_admin_replies_match_c_through_a_whole_session(servers):
    admin = Pair(servers)
    client = Pair(servers)
    worker = Pair(servers)
    other_worker = Pair(servers)
    try:
        same_listings(servers, admin)
        # Functions whose hash order differs from creation order, and odd bytes in names.
        names = [b"resize", b"email", b"zeta", b"alpha", b"reverse", b"caf\xc3\xa9", b"a b",
                 b"x\ty", b"sms", b"thumbnail"]
        for number, name in enumerate(names):
            client.send(request(18, name, b"u%d" % number, b"data"))   # SUBMIT_JOB_BG
            assert len({reply for reply in client.packet()}) == 1
        same_listings(servers, admin)
        for ptype, unique in ((32, b"hi1"), (34, b"lo1"), (18, b""), (18, b""), (18, b"-"),
                              (21, b"fg-high"), (7, b"fg")):
            client.send(request(ptype, b"resize", unique, b"payload " + unique))
            assert len({reply for reply in client.packet()}) == 1
        same_listings(servers, admin)
        worker.send(request(22, b"worker one"))                   # SET_CLIENT_ID
        worker.send(request(1, b"resize") + request(1, b"email") + request(1, b"resize"))
        other_worker.send(request(1, b"sms"))
        worker.send(request(30))                                  # GRAB_JOB_UNIQ
        assigned = worker.packet()
        assert assigned[0] == assigned[1]
        same_listings(servers, admin)
        # C drops a byte of a name created by a line that ends in a bare LF.
        admin.line("create function bare", end=b"\n")
        same_listings(servers, admin)
        for line in ("maxqueue resize 1", "create function made", "cancel job SBS:2",
                     "cancel job SBS:999", "drop function made", "drop function resize",
                     "drop function nothing", "show", "show jobs x", "show unique foo",
                     "cancel", "cancel job", "cancel foo bar", "create", "create x y",
                     "drop", "maxqueue", "bogus command", "", "getpid x", "verbose",
                     "version", "STATUS", "Show Jobs"):
            replies = admin.line(line)
            if line.startswith("getpid"):
                assert [r.startswith(b"OK ") for r in replies] == [True, True]
                continue
            c_reply, our_reply = normalised(replies[0], c=True), normalised(replies[1])
            assert our_reply == c_reply, f"{line!r}: C {c_reply!r}, ours {our_reply!r}"
            same_listings(servers, admin)
        client.send(request(34, b"resize", b"over", b"x"))          # over maxqueue 1
        replies = client.packet()
        assert replies[0] == replies[1] == (19, b"QUEUE_ERROR\0Job queue is full")
        worker.send(request(13, assigned[0][1].split(b"\0")[0], b"done"))  # WORK_COMPLETE
        worker.send(request(16, b"sync"))
        assert worker.packet() == [(17, b"sync")] * 2
        same_listings(servers, admin)
        other_worker.close()
        worker.close()
        # Each server notices a close when it reads the FIN: wait until both have.
        wait_until(lambda: all(reply.count(b"\n") == 3 for reply in admin.line("workers")),
                   what="both servers to drop the closed workers")
        same_listings(servers, admin)
    finally:
        for pair in (admin, client, worker, other_worker):
            pair.close()


def test_error_packets_match_c(servers):
    pair = Pair(servers)
    try:
        for data in (header(16, 1, magic=RES) + b"x",        # wrong magic
                     request(8, b"H:x"), request(10), request(19, b"a", b"b"),  # not for servers
                     request(13, b"SBS:77", b"x"), request(14, b"SBS:77"),
                     request(25, b"SBS:77", b"x"), request(28, b"SBS:77", b"x"),
                     request(12, b"SBS:77", b"1", b"2"), request(26, b"nope"),
                     request(18, b"f", b"u" * 65, b"x"), request(15, b"SBS:77"),
                     request(41, b"nothing"), request(26, b"EXCEPTIONS"),
                     request(16, b""), request(24), request(35, b"f", b"u", b"1", b"2", b"3",
                                                            b"4", b"5", b"x")):
            pair.send(data)
            replies = pair.packet()
            assert replies[0] == replies[1], f"{data!r}: C {replies[0]!r}, ours {replies[1]!r}"
    finally:
        pair.close()
