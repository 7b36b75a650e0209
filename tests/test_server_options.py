"""Options and environment variables whose effect is outside the protocol:
--keepalive and its settings on accepted sockets, GEARMAND_PORT, --syslog.
C-compatible: they pass against C gearmand 1.1.20 too."""
import ctypes
import errno
import os
import shutil
import socket

import pytest

from conftest import IMPL, free_port, unavailable, wait_until

SYS_PIDFD_GETFD = 438      # the same number on every Linux architecture


def server_side_of(server, client):
    """A duplicate of the server's socket for the connection `client` made, taken
    from the running server with pidfd_getfd(2): its real socket options."""
    if not hasattr(os, "pidfd_open"):
        unavailable("os.pidfd_open needs Python 3.9+ on Linux 5.3+")
    libc = ctypes.CDLL(None, use_errno=True)
    want = client.getsockname()
    pidfd = os.pidfd_open(server.pid)
    try:
        for name in os.listdir(f"/proc/{server.pid}/fd"):
            try:
                if not os.readlink(f"/proc/{server.pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                    unavailable("pidfd_getfd(2) is not allowed here")
                continue
            sock = socket.socket(fileno=fd)
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == want:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no socket of the server is connected to {want}")


def keepalive_settings(sock):
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def test_keepalive_options_reach_accepted_sockets(make_server):
    server = make_server("--keepalive", "--keepalive-idle=17", "--keepalive-interval=7",
                         "--keepalive-count=3")
    with server.connect() as client:
        server.admin("status")            # accepted by now
        with server_side_of(server, client) as accepted:
            on, idle, interval, count = keepalive_settings(accepted)
    assert (bool(on), idle, interval, count) == (True, 17, 7, 3)


def test_keepalive_alone_keeps_the_system_timings(make_server):
    with socket.socket() as fresh:
        defaults = keepalive_settings(fresh)[1:]
    server = make_server("--keepalive")
    with server.connect() as client:
        server.admin("status")
        with server_side_of(server, client) as accepted:
            on, *timings = keepalive_settings(accepted)
    assert on and tuple(timings) == defaults


def test_keepalive_is_on_for_accepted_sockets_even_without_the_option(make_server):
    server = make_server()
    with server.connect() as client:
        server.admin("status")
        with server_side_of(server, client) as accepted:
            assert keepalive_settings(accepted)[0]


def test_gearmand_port_sets_the_default_port(make_server):
    port = free_port()
    server = make_server(start=False, env=dict(os.environ, GEARMAND_PORT=str(port)))
    command = server.command()
    at = command.index("-p")
    server.command = lambda: command[:at] + command[at + 2:]    # no -p: the default
    server.port = port
    server.start()
    assert server.status() == {}
    # -p wins over it
    other = make_server(env=dict(os.environ, GEARMAND_PORT=str(free_port())))
    assert other.status() == {}


# --- --syslog -----------------------------------------------------------------

class SyslogListener:
    """A datagram socket that receives what syslog(3) sends to /dev/log. If there
    is no /dev/log, it is bound there for the test; if there is one (a real syslog
    daemon's), the server runs in a mount namespace of its own (unshare -m) where
    ours is bind-mounted over it: the machine's syslog is never touched."""

    def __init__(self, directory):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.created = None
        self.wrap = []
        if not os.path.lexists("/dev/log"):
            try:
                self.sock.bind("/dev/log")
            except OSError as error:
                self.sock.close()
                unavailable(f"cannot bind a syslog listener at /dev/log: {error}")
            self.created = "/dev/log"
        else:
            if os.geteuid() != 0 or not shutil.which("unshare"):
                self.sock.close()
                unavailable("/dev/log belongs to the machine's syslog, and a private one "
                            "needs root and unshare(1)")
            path = str(directory / "log")
            self.sock.bind(path)
            self.wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount --bind "$0" /dev/log && exec "$@"', path]

    def messages(self, timeout=0.2):
        self.sock.settimeout(timeout)
        got = []
        try:
            while True:
                got.append(self.sock.recv(65536).decode(errors="replace"))
        except socket.timeout:
            return got

    def close(self):
        self.sock.close()
        if self.created:
            os.unlink(self.created)


@pytest.fixture
def syslog(tmp_path):
    listener = SyslogListener(tmp_path)
    yield listener
    listener.close()


def test_syslog_gets_the_log_lines_too(make_server, syslog):
    server = make_server("--syslog", "--verbose", "INFO", start=False)
    command = server.command()
    server.command = lambda: syslog.wrap + command
    server.start()
    pid = server.pid if not syslog.wrap else None
    seen = []

    def from_gearmand():
        seen.extend(syslog.messages())
        return [m for m in seen if "gearmand[" in m and (pid is None or f"[{pid}]" in m)]

    lines = wait_until(from_gearmand, 10, what="a syslog message from gearmand")
    # The same words as the log file's lines, as user-facility messages.
    assert all(message.startswith("<1") for message in lines), lines
    logged = server.log()
    assert any(message.split("]: ", 1)[1].strip() in logged for message in lines), \
        (lines, logged)
