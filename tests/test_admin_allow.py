"""--admin-allow=any|loopback|none: who may send the admin commands that change the
server (shutdown, cancel job, drop function, create function, maxqueue). The option
is ours; the default keeps C's behaviour for C's commands (anyone may send them) and
lets only loopback peers send `shutdown`, which C does not have."""
import socket
import subprocess
import sys

import pytest

from conftest import IMPL, ROOT, admin_reply_complete, recv_until, unavailable
from gearproto import ERR_QUEUE_FULL, ERROR, SUBMIT_JOB_BG, can_do, expect, send, submit, sync

OURS_ONLY = pytest.mark.skipif(IMPL == "c", reason="--admin-allow is an option of ours")

def admin_from(address, port, line, source=None):
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.settimeout(5)
    if source:
        sock.bind((source, 0))
    sock.connect((address, port))
    with sock:
        sock.sendall(line.encode() + b"\r\n")
        return recv_until(sock, admin_reply_complete)


def denied(command, ip):
    return b"ERR PERMISSION_DENIED %s+is+not+allowed+from+%s\r\n" % (command.encode(), ip.encode())


@pytest.fixture
def locked(make_server):
    """--admin-allow=none, with a queued job, an idle worker's function and a limit."""
    server = make_server("--admin-allow=none", "--job-handle-prefix", "T")
    client = server.connect()
    assert submit(client, "f", "u", "x") == b"T:1"
    assert server.admin("create function g") == denied("create", "127.0.0.1")
    return server, client


def snapshot(server):
    return [server.admin(line) for line in ("status", "show jobs", "show unique jobs",
                                           "prioritystatus")]


CHANGING = [
    ("shutdown", "shutdown"),
    ("shutdown graceful", "shutdown"),
    ("SHUTDOWN", "shutdown"),
    ("cancel job T:1", "cancel"),
    ("drop function f", "drop"),
    ("create function g", "create"),
    ("maxqueue f 1", "maxqueue"),
    ("MaxQueue f 0 0 0", "maxqueue"),
]


@OURS_ONLY
@pytest.mark.parametrize("line,command", CHANGING)
def test_none_denies_every_changing_command(locked, line, command):
    server, client = locked
    before = snapshot(server)
    assert server.admin(line) == denied(command, "127.0.0.1")
    assert server.proc.poll() is None
    sync(client)
    assert snapshot(server) == before
    # the limit did not change: two more jobs still fit
    assert submit(client, "f", "", "y") == b"T:2"
    assert submit(client, "f", "", "z") == b"T:3"
    assert server.status() == {"f": (3, 0, 0)}


@OURS_ONLY
def test_none_still_answers_read_only_commands(locked):
    server, client = locked
    worker = server.connect()
    can_do(worker, "f")
    assert server.status() == {"f": (1, 0, 1)}
    assert server.admin("show jobs") == b"T:1\t0\t0\t1\n.\n"
    assert server.admin("show unique jobs") == b"u\n.\n"
    assert server.admin("prioritystatus") == b"f\t0\t1\t0\t1\n.\n"
    workers = server.admin("workers")
    assert workers.endswith(b"\n.\n") and b" : f\n" in workers
    assert server.admin("getpid") == b"OK %d\n" % server.pid
    assert server.admin("version").startswith(b"OK ")
    assert server.admin("verbose") == b"OK ERROR\n"
    # an unknown command is still just unknown
    assert server.admin("bogus") == b"ERR UNKNOWN_COMMAND Unknown+server+commandbogus\r\n"


@OURS_ONLY
def test_loopback_allows_a_loopback_peer(make_server):
    server = make_server("--admin-allow=loopback")
    assert server.admin("create function g") == b"OK\r\n"
    assert server.status() == {"g": (0, 0, 0)}
    assert server.admin("maxqueue g 1") == b"OK\r\n"
    client = server.connect()
    submit(client, "g", "", "x")
    send(client, SUBMIT_JOB_BG, "g", "", "y")
    expect(client, ERROR, ERR_QUEUE_FULL)
    assert server.admin("drop function g") == b"OK\r\n"
    assert server.status() == {}
    assert server.admin("shutdown") == b"OK\r\n"
    assert server.proc.wait(10) == 0


def local_address(family):
    """A local global-scope address of `family` ("4" or "6") that is not loopback."""
    try:
        out = subprocess.run(["ip", "-" + family, "-o", "addr", "show", "scope", "global"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        for word in ("inet", "inet6"):
            if word in parts:
                address = parts[parts.index(word) + 1].split("/")[0]
                if not address.startswith("127.") and address != "::1":
                    return address
    return None


def can_bind(address):
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


@OURS_ONLY
def test_loopback_allows_an_ipv6_loopback_peer(make_server):
    if not can_bind("::1"):
        unavailable("no IPv6 loopback here")
    server = make_server("--admin-allow=loopback", "-L", "::1")
    assert admin_from("::1", server.port, "create function g6") == b"OK\r\n"
    assert server.status() == {"g6": (0, 0, 0)}


@OURS_ONLY
@pytest.mark.parametrize("family", ["4", "6"], ids=["IPv4", "IPv6"])
def test_loopback_denies_a_non_loopback_peer(make_server, family):
    address = local_address(family)
    if address is None or not can_bind(address):
        unavailable(f"no local IPv{family} address other than loopback to connect from")
    server = make_server("--admin-allow=loopback", "-L", address)
    reply = admin_from(address, server.port, "create function g", source=address)
    assert reply == denied("create", address)
    assert admin_from(address, server.port, "shutdown", source=address) == \
        denied("shutdown", address)
    assert admin_from(address, server.port, "status", source=address) == b".\n"
    # the same commands from 127.0.0.1 on the same server work
    assert server.admin("create function g") == b"OK\r\n"
    assert server.status() == {"g": (0, 0, 0)}


def test_default_any_allows_changing_commands_as_c_does(make_server):
    server = make_server("--job-handle-prefix", "T")
    client = server.connect()
    assert submit(client, "f", "", "x") == b"T:1"
    assert server.admin("create function g") == b"OK\r\n"
    assert server.admin("maxqueue g 5") == b"OK\r\n"
    assert server.admin("drop function g") == b"OK\r\n"
    assert server.admin("cancel job T:1") == b"OK\r\n"
    assert server.status() == {"f": (1, 0, 0)}   # C counts a cancelled job until it is reached


@pytest.mark.skipif(IMPL == "c", reason="shutdown is ours: C 1.1.20 answers ERR UNKNOWN_COMMAND")
def test_default_allows_shutdown_from_loopback(make_server):
    server = make_server()
    client = server.connect()
    submit(client, "f", "", "x")
    assert server.admin("shutdown") == b"OK\r\n"
    assert server.proc.wait(10) == 0


@OURS_ONLY
def test_invalid_admin_allow_value_exits_1(make_server):
    server = make_server("--admin-allow=everyone", start=False)
    proc = subprocess.run(server.command(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "admin-allow" in proc.stderr


class FakePeer:
    """What Admin.line reads of a connection, from an address we cannot connect from."""
    closed = False
    port = 40000

    def __init__(self, address):
        self.address = address


def in_process_admin(*args):
    """A Server built in this process (no sockets served): its Admin, the replies it
    sends and its loop (to see whether a stop was asked for)."""
    sys.path.insert(0, str(ROOT))
    import gearmand
    options = gearmand.parse_options(["-l", "none", *args])
    server = gearmand.Server(options, gearmand.Store(), gearmand.Log("none"))
    replies = []
    server.loop.send = lambda conn, data: replies.append(data)
    return server.admin, replies, server.loop


@OURS_ONLY
@pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::7", "::ffff:192.0.2.7"])
def test_default_refuses_shutdown_from_a_non_loopback_peer(address):
    """Without --admin-allow, `shutdown` (C has no such command) is a loopback-only
    command: the quick start listens on every address. It used to stop the server
    for anyone who could reach the port."""
    admin, replies, loop = in_process_admin()
    for line in (b"shutdown\r", b"shutdown graceful\r"):
        admin.line(FakePeer(address), line)
        assert replies.pop() == denied("shutdown", address)
    assert loop.stop_requested is None
    # C's changing commands stay open to anyone, as in C
    admin.line(FakePeer(address), b"create function g\r")
    assert replies.pop() == b"OK\r\n"
    admin.line(FakePeer("127.0.0.1"), b"shutdown\r")
    assert replies.pop() == b"OK\r\n" and loop.stop_requested == "now"
    assert loop.stop_reason == "admin shutdown from 127.0.0.1:40000"


@OURS_ONLY
def test_admin_allow_any_opens_shutdown_to_every_peer():
    admin, replies, loop = in_process_admin("--admin-allow=any")
    admin.line(FakePeer("192.0.2.7"), b"shutdown graceful\r")
    assert replies.pop() == b"OK\r\n" and loop.stop_requested == "graceful"
