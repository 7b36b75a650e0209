"""The server as a process: -d, -P, -u, -l with SIGHUP, --syslog, --verbose, option
errors, SIGTERM/SIGINT, and SIGUSR1's graceful stop with a persistent queue."""
import os
import pwd
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time

import pytest

from conftest import C_GEARMAND, IMPL, Server, recv_until, unavailable, wait_until
from gearproto import (
    ECHO_REQ, GRAB_JOB, GRAB_JOB_UNIQ, JOB_ASSIGN, JOB_ASSIGN_UNIQ, NO_JOB, SUBMIT_JOB,
    WORK_COMPLETE, Closed, can_do, expect, header, recv, round_trip, send, submit, sync,
)

LEVELS = ("FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
# C prints its argv[0] before its messages; ours prints "gearmand".
PROGRAM = C_GEARMAND if IMPL == "c" else "gearmand"


def alive(pid):
    """True while pid runs (a zombie counts as gone: it is not our child to reap)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def terminate(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def read_pid(path):
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def admin(port, line):
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(line.encode() + b"\r\n")
        return recv_until(sock, lambda d: d.endswith(b"\n"))


def run_options(*args, timeout=30):
    """Run the server with options that make it exit; (status, stderr lines)."""
    command = Server(tempfile.gettempdir(), args).command()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr.splitlines()


@pytest.fixture
def daemons():
    """Pids of detached servers (not our children), stopped after the test."""
    pids = []
    yield pids
    for pid in pids:
        terminate(pid, signal.SIGKILL)


# --- -d and -P ----------------------------------------------------------------------

def start_daemon(tmp_path, daemons, pid_arg, pid_path, *extra):
    server = Server(tmp_path, ["-d", "-P", pid_arg, *extra])
    launched = time.monotonic()
    server.start(expect_ready=False)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - launched < 10, "the launching process did not exit at once"
    pid = wait_until(lambda: read_pid(pid_path), what=f"pid file {pid_path}")
    # the pid file is written once the port is bound: it accepts at once
    if IMPL != "c":   # C writes its pid file before it binds the port
        assert accepts(server.port), "pid file written before the port accepts"
    daemons.append(pid)
    return server, pid


def test_daemon_detaches_and_writes_its_pid(tmp_path, daemons):
    pid_path = tmp_path / "daemon.pid"
    server, pid = start_daemon(tmp_path, daemons, str(pid_path), pid_path)
    assert pid != server.proc.pid and alive(pid)
    wait_until(lambda: accepts(server.port), what="port accepts")
    assert admin(server.port, "getpid") == b"OK %d\n" % pid
    # it serves work
    worker = server.connect()
    can_do(worker, "d")
    client = server.connect()
    round_trip(client, worker, "d", "", "x", "y")
    # its session is its own: SIGTERM to it stops it and removes the pid file
    assert os.getsid(pid) != os.getsid(0)
    terminate(pid)
    assert not alive(pid)
    wait_until(lambda: not pid_path.exists(), what="pid file removed")
    assert not accepts(server.port)


def test_daemon_relative_pid_file_is_in_the_launch_directory(tmp_path, daemons):
    """`-d -P name.pid` writes the file where the server was started (C does not
    change directory), not in /."""
    name = f"gearmand-test-{os.getpid()}-{time.monotonic_ns()}.pid"
    stray = "/" + name
    try:
        server = Server(tmp_path, ["-d", "-P", name])
        server.start(expect_ready=False)
        assert server.proc.wait(15) == 0
        wait_until(lambda: accepts(server.port), what="port accepts")
        pid = int(admin(server.port, "getpid").split()[1])
        daemons.append(pid)
        wait_until(lambda: (tmp_path / name).exists() or os.path.exists(stray),
                   what="a pid file")
        assert (tmp_path / name).exists(), f"pid file written as {stray}, not in {tmp_path}"
        assert read_pid(tmp_path / name) == pid
    finally:
        if os.path.exists(stray):
            os.unlink(stray)


def test_daemon_holds_its_sqlite_store(tmp_path, daemons):
    """The daemon opens the store after the fork, so another SQLite connection that
    closes does not take the WAL from under it: a job acknowledged after that
    survives kill -9."""
    db = tmp_path / "queue.db"
    pid_path = tmp_path / "daemon.pid"
    server, pid = start_daemon(tmp_path, daemons, str(pid_path), pid_path,
                               "-q", "libsqlite3", "--libsqlite3-db", str(db))
    client = server.connect()
    submit(client, "f", "A", "a")
    reader = sqlite3.connect(db)           # an operator looks at the queue, and leaves
    assert reader.execute("SELECT unique_key FROM gearman_queue").fetchall() == [("A",)]
    reader.close()
    submit(client, "f", "B", "b")
    terminate(pid, signal.SIGKILL)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT unique_key FROM gearman_queue ORDER BY rowid").fetchall() \
            == [("A",), ("B",)]


# --- -u -----------------------------------------------------------------------------

def test_user_switch_to_nobody(make_server):
    if os.getuid() != 0:
        unavailable("switching users needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        unavailable("there is no user nobody")
    # the pid file is written as nobody: give it a directory nobody may write in
    run_dir = tempfile.mkdtemp(prefix="gearmand-test-")
    try:
        os.chmod(run_dir, 0o1777)
        server = make_server("-u", "nobody", "-P", os.path.join(run_dir, "pid"))
        with open(f"/proc/{server.pid}/status") as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f
                   if line.startswith(("Uid:", "Gid:", "Groups:"))}
        assert ids["Uid"] == [str(nobody.pw_uid)] * 4
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4
        assert ids["Groups"] in ([], [str(nobody.pw_gid)])
        assert server.status() == {}
        client = server.connect()
        submit(client, "u", "", "x")
        assert server.status() == {"u": (1, 0, 0)}
    finally:
        for name in os.listdir(run_dir):
            os.unlink(os.path.join(run_dir, name))
        os.rmdir(run_dir)


# --- -l and SIGHUP, --syslog, --verbose ------------------------------------------------

def test_sighup_reopens_the_log_file(make_server, tmp_path):
    log = tmp_path / "gearmand.log"
    rotated = tmp_path / "gearmand.log.1"
    server = make_server("-l", str(log), "--verbose", "INFO")
    # ours installs its signal handlers just before its NOTICE "ready" line
    ready = "accepted,hup,ready" if IMPL == "c" else " ready, port "
    submit(server.connect(), "hup", "ready", "x")
    wait_until(lambda: log.exists() and ready in log.read_text(errors="replace"),
               what="server ready")
    log.rename(rotated)
    server.proc.send_signal(signal.SIGHUP)
    wait_until(log.exists, what="log file reopened")
    # something that is logged: C logs each accepted job at NOTICE; we warn about a
    # packet over --max-packet-size
    client = server.connect()
    submit(client, "hup", "after-hup", "x")
    if IMPL == "c":
        marker = "accepted,hup,after-hup"
    else:
        marker = "4294967295 bytes"
        bad = server.connect()
        bad.sendall(header(ECHO_REQ, 0xFFFFFFFF))
    wait_until(lambda: marker in log.read_text(errors="replace"), what="line in new log")
    assert marker not in rotated.read_text(errors="replace")
    sync(client)


def make_queue(path, jobs):
    """A SQLite queue in C's schema holding `jobs` background jobs of function "r"."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE gearman_queue ( unique_key TEXT, function_name TEXT, "
                   "priority INTEGER, data BLOB, when_to_run INTEGER, "
                   "PRIMARY KEY (unique_key, function_name))")
        db.executemany("INSERT INTO gearman_queue VALUES (?, 'r', 1, ?, 0)",
                       ((f"u{i}", b"d") for i in range(jobs)))


def start_replaying(make_server, db, *options):
    """A server started on a queue of 50,000 jobs, returned once its port is bound:
    the replay has begun, or is about to."""
    make_queue(db, 50_000)
    server = make_server(*options, "-q", "libsqlite3", "--libsqlite3-db", str(db), start=False)
    server.start(expect_ready=False)
    wait_until(lambda: accepts(server.port) or server.proc.poll() is not None,
               what="port bound")
    return server


def test_sighup_while_replaying_the_queue(make_server, tmp_path):
    """logrotate may send SIGHUP at any time, also while a big queue is replayed after
    the port is bound: the server must reopen its log, not die."""
    server = start_replaying(make_server, tmp_path / "queue.db",
                             "-l", str(tmp_path / "gearmand.log"))
    server.proc.send_signal(signal.SIGHUP)

    def replayed():
        assert server.proc.poll() is None, f"SIGHUP killed the server ({server.proc.returncode})"
        try:
            return admin(server.port, "status") == b"r\t50000\t0\t0\n.\n"
        except OSError:
            return False
    wait_until(replayed, timeout=60, what="queue replayed")


@pytest.mark.parametrize("sig", [
    pytest.param(signal.SIGUSR1, id="USR1", marks=pytest.mark.skipif(
        IMPL == "c", reason="C's SIGUSR1 waits until no job at all is left")),
    pytest.param(signal.SIGTERM, id="TERM")])
def test_stop_signal_while_replaying_exits_0_and_keeps_the_queue(make_server, tmp_path, sig):
    db = tmp_path / "queue.db"
    server = start_replaying(make_server, db)
    server.proc.send_signal(sig)
    assert server.proc.wait(15) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM gearman_queue").fetchone()[0] == 50_000


def test_syslog_is_accepted(make_server):
    server = make_server("--syslog", "--verbose", "NOTICE")
    client = server.connect()
    submit(client, "s", "", "x")
    assert server.status() == {"s": (1, 0, 0)}


def test_every_verbose_level_is_accepted_and_reported(make_server):
    servers = {level: make_server("--verbose", level, start=False) for level in LEVELS}
    for server in servers.values():
        server.start(expect_ready=False)
    for level, server in servers.items():
        wait_until(lambda: accepts(server.port) or server.proc.poll() is not None,
                   what=f"server with --verbose {level}")
        assert server.proc.poll() is None, server.log()
        assert server.admin("verbose") == f"OK {level}\n".encode()


@pytest.mark.parametrize("level", ["bogus", "info", "Debug", ""])
def test_invalid_verbose_level(level):
    status, lines = run_options("--verbose", level)
    assert status == 1
    assert lines == [f"{PROGRAM}: Invalid value for --verbose supplied"]


def test_unknown_option():
    status, lines = run_options("--bogus")
    assert status == 1
    assert lines == [f"{PROGRAM}: unrecognised option '--bogus'"]


# --- signals ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminating_signals_exit_0(make_server, sig):
    server = make_server()
    client = server.connect()
    submit(client, "t", "", "x")
    assert server.stop(sig) == 0
    assert not accepts(server.port)


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True                       # reset: it was in the backlog when the listener closed
    except TimeoutError:
        return False                      # still listening, backlog full of earlier probes
    return False


@pytest.mark.skipif(IMPL == "c", reason="C's SIGUSR1 waits until no job at all is left, "
                                        "queued ones included")
@pytest.mark.parametrize("result_size", [4, 8 << 20], ids=["small result", "8 MiB result"])
def test_sigusr1_finishes_running_jobs_keeps_queued_ones(make_server, tmp_path, result_size):
    db = tmp_path / "queue.db"
    options = ("--queue-type=sqlite", f"--sqlite-db={db}", "--job-handle-prefix", "T")
    server = make_server(*options)
    worker = server.connect()
    can_do(worker, "run")
    client = server.connect()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    handle = submit(client, "run", "", "input", ptype=SUBMIT_JOB)
    send(worker, GRAB_JOB)
    expect(worker, JOB_ASSIGN, handle, "run", "input")
    queuer = server.connect()
    for i in range(3):
        submit(queuer, "later", f"u{i}", f"d{i}")
    server.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: refused(server.port), what="listening socket closed", interval=0.05)
    # existing connections are still served while the job runs
    sync(queuer)
    sync(client)
    assert server.proc.poll() is None
    result = b"r" * result_size
    send(worker, WORK_COMPLETE, handle, result)
    try:
        ptype, body = recv(client, timeout=10)
    except Closed:
        ptype = body = None
    assert body is not None, "the client was closed before it had its whole result"
    assert ptype == WORK_COMPLETE and body == handle + b"\0" + result, \
        f"got type {ptype}, {len(body)} bytes"
    assert server.proc.wait(15) == 0
    # the queued background jobs were kept and are replayed
    server.start()
    assert server.status() == {"later": (3, 0, 0)}
    drainer = server.connect()
    can_do(drainer, "later")
    for i in range(3):
        send(drainer, GRAB_JOB_UNIQ)
        ptype, body = recv(drainer)
        assert ptype == JOB_ASSIGN_UNIQ
        assert body.split(b"\0")[1:] == [b"later", f"u{i}".encode(), f"d{i}".encode()]
        send(drainer, WORK_COMPLETE, body.split(b"\0")[0], "")
    send(drainer, GRAB_JOB)
    assert recv(drainer)[0] == NO_JOB


@pytest.mark.skipif(IMPL == "c", reason="C's SIGUSR1 waits until no job at all is left, "
                                        "queued ones included")
def test_sigusr1_gives_a_worker_no_queued_job(make_server, tmp_path):
    """After SIGUSR1 a worker's GRAB_JOB gets NO_JOB though jobs of its function are
    queued; the running job finishes and the queued ones wait in the store."""
    db = tmp_path / "queue.db"
    server = make_server("--queue-type=sqlite", f"--sqlite-db={db}", "--job-handle-prefix", "T")
    client = server.connect()
    for i in range(3):
        submit(client, "f", f"u{i}", f"d{i}")
    worker = server.connect()
    can_do(worker, "f")
    send(worker, GRAB_JOB)
    expect(worker, JOB_ASSIGN, "T:1", "f", "d0")
    server.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: refused(server.port), what="listening socket closed", interval=0.05)
    send(worker, GRAB_JOB)
    expect(worker, NO_JOB)
    send(worker, WORK_COMPLETE, "T:1", "")
    assert server.proc.wait(15) == 0
    server.start()
    assert server.status() == {"f": (2, 0, 0)}


# --- -d reports its start-up to the launching process (#17) -----------------------------

def daemon_run(tmp_path, daemons, *args, timeout=30):
    """Launch with -d and wait for the launching process; (status, stderr lines, port).
    A daemon that answers on the port is stopped after the test, whatever its status."""
    server = Server(tmp_path, ["-d", *args])
    proc = subprocess.run(server.command(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        daemons.append(int(admin(server.port, "getpid").split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    return proc.returncode, proc.stderr.splitlines(), server.port


def no_daemon_left(port):
    """No server stays behind: the port stops accepting (the daemon exits after it
    reported)."""
    wait_until(lambda: not accepts(port), what="no daemon left on the port")
    return True


@pytest.mark.skipif(IMPL == "c", reason="C checks its pid file before it detaches, "
                                        "with a message of its own")
def test_daemon_with_a_pid_file_it_cannot_write_exits_1_with_one_line(tmp_path, daemons):
    """Before, the launching process exited 0 and the daemon died silently."""
    log = tmp_path / "daemon.log"
    status, lines, port = daemon_run(tmp_path, daemons, "-P", "/nonexistent/dir/g.pid",
                                     "-l", str(log))
    assert status == 1
    assert lines == ["gearmand: Could not open pid file /nonexistent/dir/g.pid: "
                     "No such file or directory"]
    assert no_daemon_left(port)
    assert "Could not open pid file /nonexistent/dir/g.pid" in log.read_text()


@pytest.mark.skipif(IMPL == "c", reason="C checks its pid file before it switches user")
def test_daemon_as_nobody_with_a_pid_directory_of_root_exits_1(tmp_path, daemons):
    if os.getuid() != 0:
        pytest.skip("switching users needs root")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user nobody")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)             # root's: nobody cannot write in it
    status, lines, port = daemon_run(tmp_path, daemons, "-u", "nobody",
                                     "-P", str(run_dir / "g.pid"), "-l", "none")
    assert status == 1
    assert lines == [f"gearmand: Could not open pid file {run_dir / 'g.pid'}: Permission denied"]
    assert no_daemon_left(port)


def test_daemon_pid_file_is_there_when_the_launcher_returns(tmp_path, daemons):
    """start-stop-daemon and systemd's Type=forking read the pid file as soon as the
    launching process exits: it must be there, and the daemon must answer."""
    pid_path = tmp_path / "g.pid"
    status, lines, port = daemon_run(tmp_path, daemons, "-P", str(pid_path), "-l", "none")
    assert (status, lines) == (0, [])
    pid = read_pid(pid_path)              # at once: no waiting
    assert pid is not None, "no pid file when -d returned"
    daemons.append(pid)
    assert admin(port, "getpid") == b"OK %d\n" % pid
    os.kill(pid, signal.SIGUSR1)          # kill -USR1 $(cat g.pid) right after start
    wait_until(lambda: not alive(pid), what="daemon stopped by SIGUSR1")
    assert not pid_path.exists()


# --- one server per SQLite queue (#17) ----------------------------------------------------

@pytest.mark.skipif(IMPL == "c", reason="C lets two servers replay and run one queue")
@pytest.mark.parametrize("first_daemon", [False, True], ids=["foreground", "-d"])
@pytest.mark.parametrize("second_daemon", [False, True], ids=["then foreground", "then -d"])
def test_a_second_server_on_one_sqlite_queue_exits_1(make_server, tmp_path, daemons,
                                                    first_daemon, second_daemon):
    """Both used to replay the file and both ran its jobs. The lock is held by the
    process that serves, the daemon after -d's fork."""
    db = tmp_path / "queue.db"
    store = ("-q", "libsqlite3", "--libsqlite3-db", str(db))
    if first_daemon:
        pid_path = tmp_path / "first.pid"
        first, pid = start_daemon(tmp_path, daemons, str(pid_path), pid_path, *store)
    else:
        first = make_server(*store)
        pid = first.pid
    submit(first.connect(), "f", "u1", "x")
    if second_daemon:
        status, lines, port = daemon_run(tmp_path, daemons, "-P", str(tmp_path / "second.pid"),
                                         "-l", "none", *store)
    else:
        status, lines = run_options(*store, "-P", str(tmp_path / "second.pid"))
    assert status == 1
    assert lines == [f"gearmand: another server uses this queue: {db}.lock is locked by pid "
                     f"{pid}; stop it first, or give each server a queue of its own"]
    # the first server goes on alone with its job
    assert admin(first.port, "status") == b"f\t1\t0\t0\n.\n"
