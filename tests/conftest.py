"""Shared test fixtures: a real job server as a subprocess on a free loopback port.

GEARMAND_TEST_IMPL=c runs the same tests against the C gearmand (/usr/sbin/gearmand),
which is how we check that a test asserts what C gearmand 1.1.20 really does.
GEARMAND_TEST_REQUIRE_SERVICES=1 turns "tool or service missing" skips into failures.
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("storetools", "gearproto")

ROOT = Path(__file__).resolve().parent.parent
IMPL = os.environ.get("GEARMAND_TEST_IMPL", "py")
REQUIRE_SERVICES = os.environ.get("GEARMAND_TEST_REQUIRE_SERVICES") == "1"
C_GEARMAND = "/usr/sbin/gearmand"
# test_differential's random sessions: new seeds every run unless GEARMAND_DIFF_SEED fixes
# the first; shown at the end of the run so that a failure can be replayed.
DIFF_SEEDS = int(os.environ.get("GEARMAND_DIFF_SEEDS", "3"))
DIFF_FIRST_SEED = int(os.environ.get("GEARMAND_DIFF_SEED")
                      or random.SystemRandom().randrange(1 << 31))
# What a server's log must never hold, whatever the test did to it.
LOG_PROBLEMS = ("Traceback", "internal error")


def unavailable(reason):
    """Skip a test whose tool or service is missing; fail instead where CI demands them."""
    if REQUIRE_SERVICES:
        pytest.fail(reason + " (GEARMAND_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def need_tool(name):
    path = shutil.which(name)
    if not path:
        unavailable(f"{name} is not installed")
    return path


def import_gearmand(monkeypatch, name="gearmand", path=None):
    """This checkout's gearmand.py (or `path`) imported in-process as `name`, for
    one test only (monkeypatch puts sys.modules back afterwards)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path or ROOT / "gearmand.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc=None, timeout=15.0):
    """Poll until the port accepts connections; fail at once if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def wait_until(predicate, timeout=10.0, what="condition", interval=0.01):
    """Poll `predicate` until it returns a truthy value and return that value;
    fail after `timeout` seconds, naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"last value {last!r}")
        time.sleep(interval)


def recv_until(sock, predicate, timeout=10.0):
    sock.settimeout(timeout)
    data = b""
    while not predicate(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def admin_reply_complete(data):
    """True once `data` holds one whole admin reply (a list ending '.\\n' or one line)."""
    if not data.endswith(b"\n"):
        return False
    if data.startswith((b"OK", b"ERR")):
        return True
    return data == b".\n" or data.endswith(b"\n.\n")


class Server:
    """One job server process. `args` are gearmand options (ours and C's share them)."""

    def __init__(self, workdir, args=(), impl=IMPL, port=None, env=None):
        self.workdir = Path(workdir)
        self.args = list(args)
        self.impl = impl
        self.port = port or free_port()
        self.env = env
        self.proc = None
        self.log_path = self.workdir / f"server-{self.port}.log"

    def command(self):
        base = ["-p", str(self.port), "-L", "127.0.0.1"]
        if not any(a == "-l" or a.startswith("--log-file") for a in self.args):
            base += ["-l", "stderr"]
        if not any(a == "-P" or a.startswith("--pid-file") for a in self.args):
            base += ["-P", str(self.workdir / f"server-{self.port}.pid")]
        if self.impl == "c":
            if not os.path.exists(C_GEARMAND):
                unavailable("C gearmand is not installed (apt-get install gearman-job-server)")
            return [C_GEARMAND, "-t", "1"] + base + self.args
        return [sys.executable, str(ROOT / "gearmand.py")] + base + self.args

    def start(self, expect_ready=True):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env)
        log.close()
        if expect_ready:
            if not wait_for_port(self.port, self.proc):
                raise AssertionError("server did not start: " + self.log())
            if "--ssl" not in self.args:
                # The port accepts before the queue is replayed; an answer means serving.
                self.admin("version")
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_files(self):
        """Every file the server logs to: its stderr, and a -l/--log-file of its own."""
        paths = [self.log_path]
        args = self.args
        for i, arg in enumerate(args):
            value = None
            if arg in ("-l", "--log-file") and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--log-file="):
                value = arg.split("=", 1)[1]
            if value and value not in ("stderr", "none"):
                paths.append(self.workdir / value)    # relative to its cwd; absolute stays
        return paths

    def log_problems(self):
        """Lines of its logs that say something went wrong inside the server: a
        traceback (an exception nothing caught) or an "internal error" (one the loop
        caught to save itself). Expected errors (a store that cannot write, a peer
        closed for misbehaving) are logged otherwise and are not reported here."""
        problems = []
        for path in self.log_files():
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            lines = text.splitlines()
            for number, line in enumerate(lines):
                if any(marker in line for marker in LOG_PROBLEMS):
                    problems.append(f"{path}:{number + 1}: " + "\n".join(lines[number:number + 30]))
        return problems

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    def connect(self, timeout=10.0):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def admin(self, line):
        """Send one admin line (CRLF, as gearadmin does) and return the whole reply."""
        with self.connect() as sock:
            sock.sendall(line.encode() + b"\r\n")
            return recv_until(sock, admin_reply_complete)

    def status(self):
        """`status` as {function: (total, running, workers)}."""
        rows = {}
        for line in self.admin("status").split(b"\n"):
            parts = line.split(b"\t")
            if len(parts) == 4:
                rows[parts[0].decode()] = tuple(int(p) for p in parts[1:])
        return rows


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(*options, impl=...) starts a server and stops it after the test.
    At the end, every server's log is read: a traceback or an "internal error" fails the
    test, so an exception the server swallowed is charged to the test that caused it."""
    servers = []

    def factory(*args, impl=IMPL, start=True, **kw):
        server = Server(tmp_path, args, impl=impl, **kw)
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.stop(signal.SIGKILL)
    problems = [problem for server in servers for problem in server.log_problems()]
    if problems:
        pytest.fail("the server logged an internal error:\n" + "\n".join(problems),
                    pytrace=False)


@pytest.fixture
def server(make_server):
    return make_server()


def pytest_terminal_summary(terminalreporter):
    ran = any("test_differential.py" in getattr(report, "nodeid", "")
              for reports in terminalreporter.stats.values() for report in reports)
    if ran:
        terminalreporter.write_line(
            f"test_differential seeds {DIFF_FIRST_SEED}..{DIFF_FIRST_SEED + DIFF_SEEDS - 1}: "
            f"GEARMAND_DIFF_SEED={DIFF_FIRST_SEED} GEARMAND_DIFF_SEEDS={DIFF_SEEDS} replays them")
