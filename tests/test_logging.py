"""What the log says (#17): C's line format, one line at start and one at stop at the
default level, signals and admin shutdown with their reason, start details at INFO,
connections and jobs at DEBUG, and floods cut short."""
import re
import signal

import pytest

from conftest import IMPL, wait_until
from gearproto import submit, sync

ours_only = pytest.mark.skipif(IMPL == "c", reason="what gearmand.py logs")

# C's format: level right-aligned in 7, date, time with microseconds, thread in 6.
LINE = re.compile(r"^ {0,3}(FATAL|ALERT|CRITICAL|ERROR|WARNING|NOTICE|INFO|DEBUG) "
                  r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \[ *[\w-]+ \] .")


def lines(path):
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def logging_server(make_server, tmp_path, *args, impl=IMPL):
    log = tmp_path / f"gearmand-{impl}.log"
    server = make_server("-l", str(log), *args, impl=impl)
    return server, log


def test_every_line_has_cs_format(make_server, tmp_path):
    """The same pattern matches C's lines (GEARMAND_TEST_IMPL=c) and ours, so a parser
    written for C's log reads ours."""
    server, log = logging_server(make_server, tmp_path, "--verbose", "DEBUG")
    submit(server.connect(), "f", "u", "x")
    wait_until(lambda: len(lines(log)) > 5, what="lines in the log")
    server.stop()
    seen = lines(log)
    # C writes its SIGHUP line without a date; nothing else breaks the pattern
    assert [line for line in seen if not LINE.match(line)] == [], seen


@ours_only
def test_default_level_logs_start_and_stop_only(make_server, tmp_path):
    """C's default (ERROR) logs nothing when it starts or stops, so a log cannot tell a
    restart from a crash. Ours logs one NOTICE line at start and one at stop, at every
    level, as C writes its SIGHUP line at every level."""
    server, log = logging_server(make_server, tmp_path)
    submit(server.connect(), "f", "u", "x")
    (ready,) = lines(log)
    assert LINE.match(ready)
    assert ready.startswith(" NOTICE ")
    assert (f"gearmand.py {ready.split('gearmand.py ')[1].split()[0]} (gearmand 1.1.20) "
            f"ready, port {server.port}, pid {server.pid}, queue builtin (in memory), "
            f"0 jobs replayed, verbose ERROR") in ready
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(lines(log)) == 2, what="the SIGHUP line")
    assert lines(log)[1].endswith("] SIGHUP, reopening log file")
    assert server.stop() == 0
    assert len(lines(log)) == 3
    assert lines(log)[2].startswith(" NOTICE ")
    assert lines(log)[2].endswith("] stopping at once (SIGTERM)")


@ours_only
@pytest.mark.parametrize("how, expected", [
    (signal.SIGUSR1, "stopping gracefully: running jobs finish, no new connections (SIGUSR1)"),
    (signal.SIGINT, "stopping at once (SIGINT)"),
    ("shutdown", "stopping at once (admin shutdown from 127.0.0.1:{port})"),
    ("shutdown graceful", "stopping gracefully: running jobs finish, no new connections "
                          "(admin shutdown from 127.0.0.1:{port} graceful)"),
])
def test_stop_says_why(make_server, tmp_path, how, expected):
    server, log = logging_server(make_server, tmp_path)
    if isinstance(how, str):
        with server.connect() as sock:
            port = sock.getsockname()[1]
            sock.sendall(how.encode() + b"\r\n")
            assert sock.recv(100) == b"OK\r\n"
        expected = expected.format(port=port)
    else:
        server.proc.send_signal(how)
    assert server.proc.wait(15) == 0
    assert lines(log)[-1].endswith("] " + expected), lines(log)


@ours_only
def test_info_logs_how_it_started(make_server, tmp_path):
    server, log = logging_server(make_server, tmp_path, "--verbose", "INFO")
    server.stop()
    text = "\n".join(lines(log))
    for part in (f"Initializing Gear on port {server.port} with SSL: false",
                 f"Starting up with pid {server.pid}, verbose is set to INFO",
                 f"Listening on 127.0.0.1:{server.port} (",
                 "queue builtin: builtin",
                 "Shutdown complete"):
        assert part in text, part
    assert "DEBUG" not in text


@ours_only
def test_debug_logs_connections_and_jobs(make_server, tmp_path):
    """`--verbose DEBUG` used to add nothing: there was no debug line at all."""
    server, log = logging_server(make_server, tmp_path, "--verbose", "DEBUG",
                                 "--job-handle-prefix", "T")
    with server.connect() as sock:
        port = sock.getsockname()[1]
        submit(sock, "resize", "u-1", "x" * 100)
        sync(sock)
    wait_until(lambda: any("Disconnected 127.0.0.1:%d" % port in line for line in lines(log)),
               what="the disconnect line")
    text = "\n".join(lines(log))
    assert "DEBUG" in text
    assert f"Accepted connection from 127.0.0.1:{port} (" in text
    assert f"127.0.0.1:{port} <- SUBMIT_JOB_BG resize u-1 (100 bytes of data)" in text
    assert f"127.0.0.1:{port} -> JOB_CREATED T:1" in text


@ours_only
def test_a_flood_of_refused_connections_is_cut_short(make_server, tmp_path):
    """200 peers over --max-packet-size: ten lines, not two hundred."""
    server, log = logging_server(make_server, tmp_path, "--verbose", "WARNING",
                                 "--max-packet-size", "1000")
    for _ in range(200):
        with server.connect() as sock:
            sock.sendall(b"\0REQ" + (7).to_bytes(4, "big") + (5000).to_bytes(4, "big"))
            sock.settimeout(5)
            assert sock.recv(10) == b""       # closed
    warnings = [line for line in lines(log) if "over --max-packet-size" in line]
    assert len(warnings) == 10
    assert server.status() == {}
