"""Interop: every `gearadmin` (gearman-tools 1.1.20) option against known server state.

gearadmin prints the server's reply without the leading `OK ` for one-line answers and
prints `Error: <rest of the ERR line>` (CRLF included) on stderr, exit status 0."""
import re

import pytest

from conftest import IMPL, need_tool
from clients import (CAN_DO, GRAB_JOB, JOB_ASSIGN, NO_JOB, SET_CLIENT_ID, SUBMIT_JOB_BG,
                     SUBMIT_JOB_HIGH, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW, SUBMIT_JOB_LOW_BG,
                     WORK_FAIL, RawConn, run, wait_until)
from gearproto import hash_order


@pytest.fixture
def gearadmin(server):
    exe = need_tool("gearadmin")

    def call(*args):
        res = run([exe, "-h", "127.0.0.1", "-p", str(server.port), *args])
        return res.stdout, res.stderr
    return call


def test_gearadmin_status_on_empty_server_is_empty_list(gearadmin):
    assert gearadmin("--status") == (b".\n", b"")


def test_gearadmin_status_counts_queued_running_and_workers_in_hash_order(server, gearadmin):
    client = RawConn(server)
    for _ in range(3):
        client.submit("alpha", b"x", ptype=SUBMIT_JOB_BG)
    client.submit("beta", b"y", ptype=SUBMIT_JOB_BG)
    client.submit("beta", b"z", ptype=SUBMIT_JOB_LOW_BG)
    busy = RawConn(server)                 # a worker running one beta job
    busy.send(CAN_DO, "beta")
    busy.send(GRAB_JOB)
    assert busy.expect(JOB_ASSIGN).split(b"\0")[1] == b"beta"
    idle = RawConn(server)                 # registered twice for gamma, once for beta
    idle.send(CAN_DO, "gamma")
    idle.send(CAN_DO, "gamma")
    idle.send(CAN_DO, "beta")
    assert gearadmin("--create-function", "delta") == (b"OK\n", b"")
    wait_until(lambda: server.status().get("beta") == (2, 1, 2), 10, "registrations")
    expected = {b"alpha": b"alpha\t3\t0\t0", b"beta": b"beta\t2\t1\t2",
                b"gamma": b"gamma\t0\t0\t2", b"delta": b"delta\t0\t0\t0"}
    order = hash_order([b"alpha", b"beta", b"gamma", b"delta"])
    out, err = gearadmin("--status")
    assert err == b""
    assert out == b"".join(expected[name] + b"\n" for name in order) + b".\n"


def test_gearadmin_priority_status_counts_only_queued_jobs_per_priority(server, gearadmin):
    client = RawConn(server)
    for ptype in (SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_BG, SUBMIT_JOB_BG, SUBMIT_JOB_LOW_BG,
                  SUBMIT_JOB_LOW_BG, SUBMIT_JOB_LOW_BG):
        client.submit("pri", b"data", ptype=ptype)
    fg = RawConn(server)
    fg.submit("pri", b"fg-high", ptype=SUBMIT_JOB_HIGH)
    fg.submit("pri", b"fg-low", ptype=SUBMIT_JOB_LOW)
    assert gearadmin("--priority-status") == (b"pri\t2\t2\t4\t0\n.\n", b"")
    worker = RawConn(server)               # the worker takes one HIGH job: no longer queued
    worker.send(CAN_DO, "pri")
    worker.send(GRAB_JOB)
    worker.expect(JOB_ASSIGN)
    assert gearadmin("--priority-status") == (b"pri\t1\t2\t4\t1\n.\n", b"")
    assert server.status()["pri"] == (8, 1, 1)


def test_gearadmin_workers_lists_connections_newest_first(server, gearadmin):
    w1 = RawConn(server)
    w1.send(SET_CLIENT_ID, "first worker")
    w1.send(CAN_DO, "fa")
    w1.send(CAN_DO, "fb")
    wait_until(lambda: server.status().get("fb") == (0, 0, 1), 10, "w1 registered")
    w2 = RawConn(server)
    w2.send(CAN_DO, "fc")
    wait_until(lambda: server.status().get("fc") == (0, 0, 1), 10, "w2 registered")
    plain = RawConn(server)                # a connection that registered nothing
    plain.send(SET_CLIENT_ID, "client-3")
    # ask on `plain` itself (no extra connection) until exactly w1, w2 and plain are
    # listed, so no earlier admin connection is still around when gearadmin connects
    wait_until(lambda: len(plain.admin("workers").split(b"\n")) == 5
               and b" client-3 :" in plain.admin("workers"), 10, "client id set, admin conns gone")
    out, err = gearadmin("--workers")
    assert err == b""
    lines = out.decode().split("\n")
    assert lines[-2:] == [".", ""]
    pattern = [r"(\d+) 127\.0\.0\.1 - :",            # gearadmin's own connection
               r"(\d+) 127\.0\.0\.1 client-3 :",
               r"(\d+) 127\.0\.0\.1 - : fc",
               r"(\d+) 127\.0\.0\.1 first worker : fb fa"]
    assert len(lines) == len(pattern) + 2, out
    fds = []
    for line, pat in zip(lines, pattern):
        m = re.fullmatch(pat, line)
        assert m, (line, pat, out)
        fds.append(int(m.group(1)))
    assert len(set(fds)) == 4


def test_gearadmin_server_version(server, gearadmin):
    # upstream prints 1.1.20, the Debian build 1.1.20+ds; ours 1.1.20 only
    versions = (b"1.1.20", b"1.1.20+ds") if IMPL == "c" else (b"1.1.20",)
    assert gearadmin("--server-version") in [(v + b"\n", b"") for v in versions]
    assert server.admin("version") in [b"OK " + v + b"\n" for v in versions]


def test_gearadmin_server_verbose_reports_default_level(gearadmin):
    assert gearadmin("--server-verbose") == (b"ERROR\n", b"")


def test_gearadmin_server_verbose_reports_configured_level(make_server):
    exe = need_tool("gearadmin")
    server = make_server("--verbose", "WARNING")
    res = run([exe, "-h", "127.0.0.1", "-p", str(server.port), "--server-verbose"])
    assert (res.stdout, res.stderr) == (b"WARNING\n", b"")


def test_gearadmin_getpid_is_server_pid(server, gearadmin):
    assert gearadmin("--getpid") == (f"{server.pid}\n".encode(), b"")
    assert server.admin("getpid") == f"OK {server.pid}\n".encode()


def test_gearadmin_show_jobs_lists_every_job_with_retries_and_flags(server, gearadmin):
    client = RawConn(server)
    bg = [client.submit("sj", f"bg{i}".encode(), unique=f"u{i}".encode(), ptype=SUBMIT_JOB_BG)
          for i in range(3)]
    fg_client = RawConn(server)
    fg = fg_client.submit("sj", b"fg")
    # a worker takes the first background job and dies: that job is requeued (retries 1)
    dying = RawConn(server)
    dying.send(CAN_DO, "sj")
    dying.send(GRAB_JOB)
    assert dying.expect(JOB_ASSIGN).split(b"\0")[0] == bg[0]
    dying.close()
    wait_until(lambda: server.status()["sj"] == (4, 0, 0), 10, "job requeued")
    # another worker now runs the second one
    runner = RawConn(server)
    runner.send(CAN_DO, "sj")
    runner.send(GRAB_JOB)
    assert runner.expect(JOB_ASSIGN).split(b"\0")[0] == bg[1]
    # cancel the third
    assert gearadmin("--cancel-job", bg[2].decode()) == (b"OK\n", b"")
    expected = {bg[0]: b"\t1\t0\t1", bg[1]: b"\t0\t0\t1", bg[2]: b"\t0\t1\t0", fg: b"\t0\t0\t0"}
    order = hash_order([bg[0], bg[1], bg[2], fg])
    out, err = gearadmin("--show-jobs")
    assert err == b""
    assert out == b"".join(h + expected[h] + b"\n" for h in order) + b".\n"


def test_gearadmin_show_jobs_on_empty_server(gearadmin):
    assert gearadmin("--show-jobs") == (b".\n", b"")


def test_gearadmin_show_unique_jobs_lists_uniques(server, gearadmin):
    client = RawConn(server)
    client.submit("uq", b"1", unique=b"order-17", ptype=SUBMIT_JOB_BG)
    client.submit("uq", b"2", unique=b"zeta", ptype=SUBMIT_JOB_BG)
    client.submit("uq2", b"3", unique=b"order-17", ptype=SUBMIT_JOB_BG)   # other function
    client.submit("uq", b"4", unique=b"", ptype=SUBMIT_JOB_BG)            # no unique
    client.submit("uq", b"5", unique=b"order-17", ptype=SUBMIT_JOB_BG)   # coalesced: not new
    client.submit("uq", b"6", unique=b"kappa", ptype=SUBMIT_JOB_BG)
    assert server.status()["uq"] == (4, 0, 0)
    named = hash_order([b"order-17", b"zeta", b"order-17", b"kappa"])
    out, err = gearadmin("--show-unique-jobs")
    assert err == b""
    # an empty unique is kept in bucket 0, listed first
    assert out == b"\n" + b"".join(u + b"\n" for u in named) + b".\n"


def test_gearadmin_cancel_job_fails_waiting_client_and_job_never_runs(server, gearadmin):
    fg_client = RawConn(server)
    handle = fg_client.submit("cj", b"payload")
    assert gearadmin("--cancel-job", handle.decode()) == (b"OK\n", b"")
    assert fg_client.expect(WORK_FAIL) == handle
    assert server.admin("show jobs") == handle + b"\t0\t1\t0\n.\n"
    # the cancelled job is discarded when a worker looks for work; it is never assigned
    worker = RawConn(server)
    worker.send(CAN_DO, "cj")
    worker.send(GRAB_JOB)
    assert worker.expect(NO_JOB) == b""
    assert server.admin("show jobs") == b".\n"
    assert server.status()["cj"] == (0, 0, 1)


def test_gearadmin_cancel_unknown_job_reports_error(gearadmin):
    assert gearadmin("--cancel-job", "H:nosuchhost:99") == (b"", b"Error: UNKNOWN_JOB\r\n")


def test_gearadmin_create_function_adds_empty_function(server, gearadmin):
    assert gearadmin("--create-function", "made") == (b"OK\n", b"")
    assert gearadmin("--status") == (b"made\t0\t0\t0\n.\n", b"")
    assert gearadmin("--create-function", "made") == (b"OK\n", b"")   # already exists: still OK
    assert gearadmin("--status") == (b"made\t0\t0\t0\n.\n", b"")


def test_gearadmin_drop_function_removes_idle_function(server, gearadmin):
    assert gearadmin("--create-function", "dropme") == (b"OK\n", b"")
    assert gearadmin("--create-function", "keep") == (b"OK\n", b"")
    assert gearadmin("--drop-function", "dropme") == (b"OK\n", b"")
    assert gearadmin("--status") == (b"keep\t0\t0\t0\n.\n", b"")
    assert gearadmin("--drop-function", "dropme") == (b"", b"Error: function not found\r\n")


def test_gearadmin_drop_function_matches_name_case_insensitively(server, gearadmin):
    assert gearadmin("--create-function", "MixedCase") == (b"OK\n", b"")
    assert gearadmin("--drop-function", "mixedcase") == (b"OK\n", b"")
    assert gearadmin("--status") == (b".\n", b"")


def test_gearadmin_drop_function_refused_while_worker_registered(server, gearadmin):
    worker = RawConn(server)
    worker.send(CAN_DO, "busyfn")
    wait_until(lambda: server.status().get("busyfn") == (0, 0, 1), 10, "worker registered")
    assert gearadmin("--drop-function", "busyfn") == (
        b"", b"Error: there are still connected workers or executing clients\r\n")
    worker.close()
    wait_until(lambda: server.status().get("busyfn") == (0, 0, 0), 10, "worker gone")
    assert gearadmin("--drop-function", "busyfn") == (b"OK\n", b"")
    assert gearadmin("--status") == (b".\n", b"")


def test_gearadmin_drop_unknown_function_reports_not_found(gearadmin):
    assert gearadmin("--drop-function", "never-existed") == (b"", b"Error: function not found\r\n")


def test_gearadmin_sees_jobs_queued_by_gearman_cli(server, gearadmin):
    gm = need_tool("gearman")
    base = [gm, "-h", "127.0.0.1", "-p", str(server.port)]
    run(base + ["-b", "-u", "cli-b", "-f", "clifn", "--", "data"])
    run(base + ["-b", "-I", "-u", "cli-a", "-f", "clifn", "--", "data"])
    assert gearadmin("--status") == (b"clifn\t2\t0\t0\n.\n", b"")
    assert gearadmin("--priority-status") == (b"clifn\t1\t1\t0\t0\n.\n", b"")
    out, _ = gearadmin("--show-unique-jobs")
    assert out == b"".join(u + b"\n" for u in hash_order([b"cli-b", b"cli-a"])) + b".\n"
