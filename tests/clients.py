"""Helpers shared by the interoperability tests (tests/test_interop_*.py).

* `procs` fixture: start client/worker processes in their own process group and kill
  the whole group after the test.
* `RawConn` / `RawWorker`: a tiny binary-protocol client and a threaded worker used to
  set up server state and to drive load without a client library.
* `wait_until` (from conftest): poll a condition with a deadline (never a blind sleep).
"""
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

import gearproto as gp
from conftest import admin_reply_complete, wait_until  # noqa: F401  (re-exported)

NODENAME = os.uname().nodename
HANDLE_PREFIX = "H:" + NODENAME   # default job handle prefix of gearmand 1.1.20

# packet types, from the shared codec
from gearproto import (  # noqa: E402,F401  (re-exported to the interop tests)
    CAN_DO, CAN_DO_TIMEOUT, CANT_DO, ECHO_REQ, ECHO_RES, ERROR, GET_STATUS, GET_STATUS_UNIQUE,
    GRAB_JOB, GRAB_JOB_UNIQ, JOB_ASSIGN, JOB_ASSIGN_UNIQ, JOB_CREATED, NO_JOB, NOOP, OPTION_REQ,
    OPTION_RES, PRE_SLEEP, RESET_ABILITIES, SET_CLIENT_ID, STATUS_RES, STATUS_RES_UNIQUE,
    SUBMIT_JOB, SUBMIT_JOB_BG, SUBMIT_JOB_HIGH, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW,
    SUBMIT_JOB_LOW_BG, WORK_COMPLETE, WORK_DATA, WORK_EXCEPTION, WORK_FAIL, WORK_STATUS,
    WORK_WARNING,
)


def wait_status(server, func, expected, timeout=10.0):
    """Wait until `status` reports `expected` == (total, running, workers) for `func`."""
    return wait_until(lambda: server.status().get(func) == expected, timeout,
                      f"status {func} == {expected} (now {server.status().get(func)})")


# --------------------------------------------------------------------------- processes

class Processes:
    """Processes started by a test; every one gets its own session so that killing its
    process group also kills the commands a `gearman -w` worker spawned."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.started = []

    def start(self, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, **kw):
        proc = subprocess.Popen([str(a) for a in argv], stdin=stdin, stdout=stdout,
                                stderr=stderr, cwd=self.workdir, start_new_session=True, **kw)
        self.started.append(proc)
        return proc

    def kill(self, proc, sig=signal.SIGKILL):
        """Kill one started process (and its process group) and reap it."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def kill_all(self):
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.kill_all()


def finish(proc, timeout=20):
    """Wait for a started process; return (returncode, stdout, stderr) as bytes."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} did not finish in {timeout}s; "
                             f"stdout={out[-2000:]!r} stderr={err[-2000:]!r}")
    return proc.returncode, out, err


def run(argv, input=None, timeout=20, check_rc=True):
    """Run a command to completion; return CompletedProcess (bytes)."""
    kw = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    res = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, **kw)
    if check_rc:
        assert res.returncode == 0, (argv, res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    return res


def run_client_script(procs, argv, background=False):
    """Run a client-library script: in the background (returns the process), or to
    completion, asserting it wrote nothing on stderr (returns its JSON output)."""
    if background:
        return procs.start(argv)
    res = run(argv)
    assert res.stderr == b"", res.stderr
    return json.loads(res.stdout)


def log_lines(path):
    """The lines a worker script logged to `path` ([] before it wrote any)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


# --------------------------------------------------------------------------- raw protocol

packet = gp.pack


class RawConn:
    """One binary-protocol connection with a receive buffer."""

    def __init__(self, server_or_sock):
        if isinstance(server_or_sock, socket.socket):
            self.sock = server_or_sock
        else:
            self.sock = server_or_sock.connect()
        self.buf = b""

    def send(self, ptype, *args):
        self.sock.sendall(packet(ptype, *args))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self, timeout=10.0):
        """Next packet as (type, payload). Raises on EOF/timeout."""
        self.sock.settimeout(timeout)
        while True:
            packet, self.buf = gp.unpack(self.buf)
            if packet is not None:
                magic, ptype, payload = packet
                assert magic == gp.RES, f"bad magic {magic!r}"
                return ptype, payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def expect(self, ptype, timeout=10.0):
        got, payload = self.recv(timeout)
        assert got == ptype, f"expected packet type {ptype}, got {got} {payload[:200]!r}"
        return payload

    def admin(self, line, timeout=10.0):
        """Send a text admin command on this (binary) connection; return the reply."""
        self.sock.sendall(line.encode() + b"\r\n")
        self.sock.settimeout(timeout)
        while not admin_reply_complete(self.buf):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        reply, self.buf = self.buf, b""
        return reply

    def submit(self, func, data=b"", unique=b"", ptype=SUBMIT_JOB):
        """Submit one job and return its handle (bytes)."""
        self.send(ptype, func, unique, data)
        return self.expect(JOB_CREATED)

    def close(self):
        self.sock.close()


def status_unique(server, unique):
    """GET_STATUS_UNIQUE -> (known, running, numerator, denominator, clients) as ints."""
    conn = RawConn(server)
    try:
        conn.send(GET_STATUS_UNIQUE, unique)
        fields = conn.expect(STATUS_RES_UNIQUE).split(b"\0")
    finally:
        conn.close()
    return tuple(int(f) for f in fields[1:])


class RawWorker(threading.Thread):
    """A worker thread speaking the raw protocol: CAN_DO, GRAB_JOB, PRE_SLEEP/NOOP.

    `handler(handle, data) -> bytes` computes the result. Every executed job is recorded
    in `self.done` as (handle, data)."""

    def __init__(self, server, funcs, handler, client_id=None):
        super().__init__(daemon=True)
        self.conn = RawConn(server)
        self.handler = handler
        self.done = []
        self.error = None
        self.stopping = False
        if client_id:
            self.conn.send(SET_CLIENT_ID, client_id)
        for f in funcs:
            self.conn.send(CAN_DO, f)

    def run(self):
        try:
            while not self.stopping:
                self.conn.send(GRAB_JOB)
                while True:
                    ptype, payload = self.conn.recv(timeout=None)
                    if ptype != NOOP:   # a stale NOOP may precede the reply
                        break
                if ptype == NO_JOB:
                    self.conn.send(PRE_SLEEP)
                    while self.conn.recv(timeout=None)[0] != NOOP:
                        pass
                    continue
                assert ptype == JOB_ASSIGN, (ptype, payload)
                handle, _func, data = payload.split(b"\0", 2)
                result = self.handler(handle, data)
                self.done.append((handle, data))
                self.conn.send(WORK_COMPLETE, handle, result)
        except (OSError, ConnectionError) as e:
            if not self.stopping:
                self.error = e
        except Exception as e:  # noqa: BLE001 - surfaced by the test via .error
            self.error = e

    def stop(self):
        self.stopping = True
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self.join(10)


@pytest.fixture
def raw_workers():
    """Factory fixture: raw_workers(server, funcs, handler) starts a RawWorker thread."""
    started = []

    def factory(server, funcs, handler, client_id=None):
        w = RawWorker(server, funcs, handler, client_id)
        started.append(w)
        w.start()
        return w

    yield factory
    for w in started:
        w.stop()
