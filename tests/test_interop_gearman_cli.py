"""Interop: the `gearman` command-line tool (gearman-tools, libgearman 1.1.20) as client
and worker against the job server."""
import os
import sys
import time

import pytest

from conftest import IMPL, need_tool
from clients import (CAN_DO, GRAB_JOB, JOB_ASSIGN, RawConn, WORK_COMPLETE, WORK_DATA,  # noqa: F401
                     WORK_EXCEPTION, finish, procs, run, status_unique, wait_until)

REVERSE_PY = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1])"


@pytest.fixture
def gm(server):
    """gm(*args) -> argv for `gearman` pointed at the test server."""
    exe = need_tool("gearman")

    def argv(*args):
        return [exe, "-h", "127.0.0.1", "-p", str(server.port), *args]
    return argv


def workers_of(server, func):
    return server.status().get(func, (0, 0, 0))[2]


def start_worker(procs, server, gm, func, *args, count=None, stdout=None, wait=True):
    """Start `gearman -w -f func [-c count] [-- cmd...]`; unless jobs are already waiting
    for it (wait=False), wait until it has registered."""
    before = workers_of(server, func)
    opts = ["-w", "-f", func] + (["-c", str(count)] if count is not None else [])
    kw = {"stdout": stdout} if stdout is not None else {}
    proc = procs.start(gm(*opts, *args), **kw)
    if wait:
        wait_until(lambda: workers_of(server, func) == before + 1, 10, f"worker for {func}")
    return proc


def test_cli_client_gets_worker_command_output(server, gm, procs):
    start_worker(procs, server, gm, "upper", "--", "tr", "a-z", "A-Z", count=1)
    res = run(gm("-f", "upper"), input=b"hello gearman\n")
    assert res.stdout == b"HELLO GEARMAN\n"


def test_cli_each_argument_is_one_job_and_results_are_concatenated(server, gm, procs):
    worker = start_worker(procs, server, gm, "upper", "--", "tr", "a-z", "A-Z", count=2)
    res = run(gm("-f", "upper", "hello", "world"))
    assert res.stdout == b"HELLOWORLD"
    # -c 2: the worker exits by itself after exactly two jobs
    rc, _, _ = finish(worker)
    assert rc == 0
    wait_until(lambda: server.status()["upper"] == (0, 0, 0), 10, "worker gone")


def test_cli_one_job_per_line_with_function_prefix(server, gm, procs):
    start_worker(procs, server, gm, "upper", "--", "tr", "a-z", "A-Z", count=3)
    res = run(gm("-N", "-P", "-f", "upper"), input=b"ab\ncd\nef\n")
    assert res.stdout == b"upper: ABupper: CDupper: EF"


def test_cli_binary_payload_with_nul_bytes_round_trips(server, gm, procs):
    start_worker(procs, server, gm, "cat", "--", "cat", count=1)
    payload = b"\x00a\x00\x00b\xff\xfe\r\n\x00\x01end\x00"
    res = run(gm("-f", "cat"), input=payload)
    assert res.stdout == payload


def test_cli_one_mebibyte_payload_round_trips(server, gm, procs):
    start_worker(procs, server, gm, "reverse", "--", sys.executable, "-c", REVERSE_PY, count=1)
    payload = os.urandom(1 << 20)
    res = run(gm("-f", "reverse"), input=payload, timeout=30)
    assert len(res.stdout) == len(payload)
    assert res.stdout == payload[::-1]


def test_cli_worker_line_mode_sends_work_data_packets(server, gm, procs):
    # `gearman -w -n` sends a WORK_DATA packet per output line (cumulative output);
    # the server must forward each one verbatim, then WORK_COMPLETE.
    start_worker(procs, server, gm, "lines", "-n", "--", "cat", count=1)
    client = RawConn(server)
    handle = client.submit("lines", b"ab\ncd\nef\n")
    packets = []
    while not packets or packets[-1][0] != WORK_COMPLETE:
        packets.append(client.recv())
    assert packets == [
        (WORK_DATA, handle + b"\0ab\n"),
        (WORK_DATA, handle + b"\0ab\ncd\n"),
        (WORK_DATA, handle + b"\0ab\ncd\nef\n"),
        (WORK_COMPLETE, handle + b"\0"),
    ]


def test_cli_background_job_queued_without_worker_runs_on_later_worker(server, gm, procs, tmp_path):
    res = run(gm("-b", "-f", "later", "--", "queued payload"))
    assert res.stdout == b""
    assert server.status()["later"] == (1, 0, 0)
    out = tmp_path / "later.out"
    worker = start_worker(procs, server, gm, "later", "--", "sh", "-c", f"cat > {out}", count=1,
                          wait=False)
    rc, _, _ = finish(worker)
    assert rc == 0
    assert out.read_bytes() == b"queued payload"
    assert server.status()["later"] == (0, 0, 0)


def test_cli_background_priorities_run_high_then_normal_then_low(server, gm, procs, tmp_path):
    for flags, data in ((["-L"], "low1"), ([], "normal1"), (["-I"], "high1"),
                        (["-L"], "low2"), (["-I"], "high2"), ([], "normal2")):
        run(gm("-b", *flags, "-f", "prio", "--", data))
    assert server.admin("prioritystatus") == b"prio\t2\t2\t2\t0\n.\n"
    log = tmp_path / "order.log"
    worker = start_worker(procs, server, gm, "prio", "--", "sh", "-c", f"cat >> {log}; echo >> {log}",
                          count=6, wait=False)
    assert finish(worker)[0] == 0
    assert log.read_text().split() == ["high1", "high2", "normal1", "normal2", "low1", "low2"]


def test_cli_foreground_high_and_low_priority_jobs(server, gm, procs, tmp_path):
    low = procs.start(gm("-L", "-f", "fgprio", "--", "low"))
    wait_until(lambda: server.status().get("fgprio") == (1, 0, 0), 10, "low job queued")
    normal = procs.start(gm("-f", "fgprio", "--", "normal"))
    wait_until(lambda: server.status().get("fgprio") == (2, 0, 0), 10, "normal job queued")
    high = procs.start(gm("-I", "-f", "fgprio", "--", "high"))
    wait_until(lambda: server.status().get("fgprio") == (3, 0, 0), 10, "high job queued")
    assert server.admin("prioritystatus") == b"fgprio\t1\t1\t1\t0\n.\n"
    log = tmp_path / "order.log"
    start_worker(procs, server, gm, "fgprio", "--", "sh", "-c", f"cat >> {log}; echo >> {log}; echo done",
                 count=3, wait=False)
    for proc in (low, normal, high):
        rc, out, err = finish(proc)
        assert (rc, out) == (0, b"done\n"), err
    assert log.read_text().split() == ["high", "normal", "low"]


def test_cli_same_unique_foreground_clients_share_one_execution(server, gm, procs, tmp_path):
    clients = []
    for i in range(3):
        clients.append(procs.start(gm("-u", "shared-key", "-f", "once", "--", f"payload{i}")))
        wait_until(lambda: status_unique(server, "shared-key") == (1, 0, 0, 0, i + 1), 10,
                   f"client {i} attached to the job")
    # three clients are attached to a single job
    assert server.status()["once"] == (1, 0, 0)
    assert server.admin("show unique jobs") == b"shared-key\n.\n"
    runs = tmp_path / "runs.log"
    worker = start_worker(procs, server, gm, "once", "--", "sh", "-c", f"cat >> {runs}; echo ran",
                          count=1, wait=False)
    for proc in clients:
        rc, out, err = finish(proc)
        assert (rc, out) == (0, b"ran\n"), err
    assert finish(worker)[0] == 0
    assert runs.read_bytes() == b"payload0"   # the first submission's payload, run once


def test_cli_same_unique_background_jobs_are_coalesced(server, gm, procs):
    for data in ("first", "second"):
        run(gm("-b", "-u", "bg-key", "-f", "bgonce", "--", data))
    run(gm("-b", "-u", "other-key", "-f", "bgonce", "--", "third"))
    assert server.status()["bgonce"] == (2, 0, 0)
    rows = server.admin("show unique jobs").split(b"\n")
    assert sorted(rows[:-2]) == [b"bg-key", b"other-key"] and rows[-2:] == [b".", b""]


def test_cli_worker_serves_several_functions(server, gm, procs):
    worker = procs.start(gm("-w", "-f", "fa", "-f", "fb", "-c", "2", "--", "tr", "a-z", "A-Z"))
    wait_until(lambda: server.status().get("fa") == (0, 0, 1) and server.status().get("fb") == (0, 0, 1),
               10, "worker registered for fa and fb")
    assert run(gm("-f", "fa", "--", "one")).stdout == b"ONE"
    assert run(gm("-f", "fb", "--", "two")).stdout == b"TWO"
    assert finish(worker)[0] == 0


def test_cli_client_timeout_when_no_worker_answers(server, gm):
    start = time.monotonic()
    res = run(gm("-t", "300", "-f", "nobody", "--", "data"), timeout=10, check_rc=False)
    elapsed = time.monotonic() - start
    assert res.stdout == b""
    assert b"timeout" in res.stderr.lower()
    assert elapsed < 5
    # the job had been accepted by the server before the client gave up
    assert server.status()["nobody"][0] == 1


@pytest.mark.skipif(IMPL == "c", reason="C 1.1.20 sends WORK_FAIL as the handle and a stray NUL, "
                                        "which libgearman matches to no task: the client hangs "
                                        "(issue #12)")
def test_cli_client_reports_failure_when_the_worker_sends_an_exception(server, gm, procs):
    client = procs.start(gm("-f", "boom", "--", "payload"))
    wait_until(lambda: server.status().get("boom", (0, 0, 0))[0] == 1, 10, "job queued")
    worker = RawConn(server)
    worker.send(CAN_DO, "boom")
    worker.send(GRAB_JOB)
    ptype, body = worker.recv()
    assert ptype == JOB_ASSIGN
    worker.send(WORK_EXCEPTION, body.split(b"\0")[0], "it broke")
    rc, out, err = finish(client, timeout=10)
    assert (rc, out, err) == (1, b"", b"Job failed\n")
    assert server.status()["boom"][:2] == (0, 0)
