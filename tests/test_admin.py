"""Text admin protocol, byte for byte as C gearmand 1.1.20 answers it (admin.md)."""
import re

import pytest

from conftest import IMPL, admin_reply_complete, recv_until, wait_until
from gearproto import (
    CAN_DO, GRAB_JOB, JOB_ASSIGN, NO_JOB, SET_CLIENT_ID, SUBMIT_JOB, SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH, SUBMIT_JOB_LOW_BG, WORK_COMPLETE, WORK_FAIL, can_do, closed, complete,
    expect, gm_hash, grab_handle, hash_order, recv_exact, send, submit, sync,
)

PREFIX = ("--job-handle-prefix", "T")
# Debian's C build says 1.1.20+ds; ours says 1.1.20, nothing else.
VERSIONS = (b"OK 1.1.20\n", b"OK 1.1.20+ds\n") if IMPL == "c" else (b"OK 1.1.20\n",)
INVALID = b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+"
UNKNOWN = b"ERR UNKNOWN_COMMAND Unknown+server+command"
BUSY = b"ERR there are still connected workers or executing clients\r\n"


@pytest.fixture
def srv(make_server):
    return make_server(*PREFIX)


def ask(sock, line):
    """Send one admin line on an open connection and read its whole reply."""
    sock.sendall(line)
    return recv_until(sock, admin_reply_complete, 5)


# names chosen so that some share a bucket of the 991-bucket function table
FUNCTIONS = [b"fn83", b"alpha", b"fn76", b"fn13", b"beta", b"fn88", b"fn113",
             b"gamma", b"fn1", "\u00fcber".encode(), b"fn86", b"fn89"]


def test_function_names_used_share_buckets():
    buckets = [gm_hash(f) % 991 for f in FUNCTIONS]
    assert len(set(buckets)) < len(buckets) - 3


# --- status / prioritystatus -----------------------------------------------

def test_status_rows_in_hash_bucket_order_newest_first(srv):
    c, w = srv.connect(), srv.connect()
    for i, f in enumerate(FUNCTIONS):  # created three different ways
        if i % 3 == 0:
            assert srv.admin("create function " + f.decode()) == b"OK\r\n"
        elif i % 3 == 1:
            submit(c, f, "", "x")
        else:
            can_do(w, f)
    expected = hash_order(FUNCTIONS, 991)
    rows = srv.admin("status").split(b"\n")
    assert [r.split(b"\t")[0] for r in rows[:-2]] == expected
    assert rows[-2:] == [b".", b""]
    # prioritystatus lists the same order
    rows = srv.admin("prioritystatus").split(b"\n")
    assert [r.split(b"\t")[0] for r in rows[:-2]] == expected
    # dropped and re-created: now the newest in its bucket
    assert srv.admin("drop function fn83") == b"OK\r\n"
    assert srv.admin("create function fn83") == b"OK\r\n"
    expected = hash_order([f for f in FUNCTIONS if f != b"fn83"] + [b"fn83"], 991)
    rows = srv.admin("status").split(b"\n")
    assert [r.split(b"\t")[0] for r in rows[:-2]] == expected


def test_status_order_ignores_hashtable_buckets(make_server):
    server = make_server(*PREFIX, "--hashtable-buckets", "3")
    for f in FUNCTIONS:
        server.admin("create function " + f.decode())
    rows = server.admin("status").split(b"\n")
    assert [r.split(b"\t")[0] for r in rows[:-2]] == hash_order(FUNCTIONS, 991)


def test_status_counts(srv):
    assert srv.admin("status") == b".\n"
    c, w = srv.connect(), srv.connect()
    for _ in range(3):
        submit(c, "f", "", "x")
    can_do(w, "f", "g", "f")
    grab_handle(w)
    assert srv.admin("status") == b"f\t3\t1\t2\ng\t0\t0\t1\n.\n"
    complete(w, b"T:1")
    sync(w)
    assert srv.admin("status") == b"f\t2\t0\t2\ng\t0\t0\t1\n.\n"
    w.close()
    wait_until(lambda: srv.admin("status") == b"f\t2\t0\t0\ng\t0\t0\t0\n.\n")


def test_prioritystatus_counts_queued_jobs_per_priority(srv):
    c, w = srv.connect(), srv.connect()
    for t in (SUBMIT_JOB_HIGH, SUBMIT_JOB_BG, SUBMIT_JOB_BG, SUBMIT_JOB_LOW_BG):
        submit(c, "f", "", "x", t)
    can_do(w, "f")
    assert srv.admin("prioritystatus") == b"f\t1\t2\t1\t1\n.\n"
    grab_handle(w)  # running jobs are not counted
    assert srv.admin("prioritystatus") == b"f\t0\t2\t1\t1\n.\n"
    assert srv.admin("status") == b"f\t4\t1\t1\n.\n"


def test_empty_function_name_row(srv):
    w = srv.connect()
    can_do(w, "")
    assert srv.admin("status") == b"\t0\t0\t1\n.\n"
    assert srv.admin("prioritystatus") == b"\t0\t0\t0\t1\n.\n"


# --- workers ----------------------------------------------------------------

def test_workers_rows(srv):
    w1 = srv.connect()
    send(w1, SET_CLIENT_ID, "w one")
    can_do(w1, "a", "b", "a")
    w2 = srv.connect()
    can_do(w2, "")
    c = srv.connect()
    send(c, SET_CLIENT_ID, "client")
    sync(c)
    adm = srv.connect()
    send(adm, SET_CLIENT_ID, "admin")
    sync(adm)
    expected = [rb"admin :", rb"client :", rb"- : ", rb"w one : a b a"]

    def rows():
        return ask(adm, b"workers\r\n").split(b"\n")

    wait_until(lambda: len(rows()) == len(expected) + 2)  # earlier probes are gone
    got = rows()
    assert got[-2:] == [b".", b""]
    fds = []
    for row, tail in zip(got, expected):
        m = re.fullmatch(rb"(\d+) 127\.0\.0\.1 " + re.escape(tail), row)
        assert m, (row, tail)
        fds.append(m.group(1))
    assert len(set(fds)) == 4
    # a closed connection disappears; the rest keep their order
    w2.close()
    wait_until(lambda: len(rows()) == len(expected) + 1)
    assert [r for r in rows()] == [got[0], got[1], got[3], b".", b""]


def test_workers_lists_the_asking_connection(srv):
    adm = srv.connect()
    wait_until(lambda: len(ask(adm, b"workers\r\n").split(b"\n")) == 3)
    assert re.fullmatch(rb"\d+ 127\.0\.0\.1 - :\n\.\n", ask(adm, b"workers\r\n"))


# --- show jobs / show unique jobs -------------------------------------------

@pytest.mark.parametrize("buckets", [None, 7])
def test_show_jobs_in_hash_order(make_server, buckets):
    extra = ("--hashtable-buckets", str(buckets)) if buckets else ()
    server = make_server(*PREFIX, *extra)
    c, w = server.connect(), server.connect()
    handles = [submit(c, "f", "", "x") for _ in range(12)]
    handles.append(submit(c, "f", "", "fg", SUBMIT_JOB))
    can_do(w, "f")
    assert grab_handle(w) == b"T:1"  # running jobs are listed too
    rows = [b"%s\t0\t0\t%d" % (h, h != b"T:13") for h in hash_order(handles, buckets or 991)]
    assert server.admin("show jobs") == b"\n".join(rows) + b"\n.\n"
    # deleting an entry does not reorder the others
    complete(w, b"T:1")
    sync(w)
    rows = [r for r in rows if not r.startswith(b"T:1\t")]
    assert server.admin("show jobs") == b"\n".join(rows) + b"\n.\n"


def test_show_jobs_columns(srv):
    assert srv.admin("show jobs") == b".\n"
    c, w = srv.connect(), srv.connect()
    submit(c, "f", "", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab_handle(w)
    send(w, CAN_DO, "g")
    w.close()  # requeue: RETRIES 1
    wait_until(lambda: srv.admin("show jobs") == b"T:1\t1\t0\t0\n.\n")
    submit(c, "f", "", "y")
    assert srv.admin("cancel job T:2") == b"OK\r\n"  # IGNORE 1
    assert srv.admin("show jobs") == b"T:1\t1\t0\t0\nT:2\t0\t1\t0\n.\n"


@pytest.mark.parametrize("buckets", [None, 5])
def test_show_unique_jobs_in_hash_order(make_server, buckets):
    extra = ("--hashtable-buckets", str(buckets)) if buckets else ()
    server = make_server(*PREFIX, *extra)
    c = server.connect()
    jobs = [(b"f", b"myuniq", b"x"), (b"g", b"myuniq", b"x"), (b"f", b"", b"a"),
            (b"f", b"", b"b"), (b"f", b"-", b"payload"), (b"f", b"-", b""),
            (b"f", b"u1", b""), (b"f", b"u2", b""), (b"f", b"u3", b""), (b"h", b"-", b"zz"),
            (b"f", b"u4", b""), (b"f", b"u5", b"")]
    for f, u, d in jobs:
        submit(c, f, u, d)

    def key(job):
        _, u, d = job
        if u == b"" or (u == b"-" and d == b""):
            return 0
        return gm_hash(d if u == b"-" else u)

    nbuckets = buckets or 991
    order = sorted(enumerate(jobs), key=lambda e: (key(e[1]) % nbuckets, -e[0]))
    want = b"".join(j[1] + b"\n" for _, j in order) + b".\n"
    assert server.admin("show unique jobs") == want


def test_show_errors(srv):
    assert srv.admin("show") == UNKNOWN + b"show\r\n"
    for line in ["show foo", "show jobs x", "show unique", "show unique foo",
                 "show unique jobs x", "show status"]:
        assert srv.admin(line) == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n", line


# --- cancel job -------------------------------------------------------------

def test_cancel_queued_background_job(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    assert srv.admin("cancel job T:1") == b"OK\r\n"
    assert srv.admin("show jobs") == b"T:1\t0\t1\t0\n.\n"
    assert srv.status() == {"f": (1, 0, 0)}  # still counted until a grab discards it
    assert srv.admin("cancel job T:1") == b"OK\r\n"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    assert srv.status() == {"f": (0, 0, 1)}
    assert srv.admin("cancel job T:1") == b"ERR UNKNOWN_JOB\r\n"


def test_cancel_sends_work_fail_to_attached_clients(srv):
    c1, c2 = srv.connect(), srv.connect()
    h = submit(c1, "f", "u", "x", SUBMIT_JOB)
    submit(c2, "f", "u", "x", SUBMIT_JOB)
    assert srv.admin("cancel job T:1") == b"OK\r\n"
    expect(c1, WORK_FAIL, h)
    expect(c2, WORK_FAIL, h)
    assert srv.admin("cancel job T:1") == b"OK\r\n"  # re-sent until discarded
    expect(c1, WORK_FAIL, h)
    expect(c2, WORK_FAIL, h)
    sync(c1)
    sync(c2)


def test_cancel_does_not_stop_a_running_worker(srv):
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    can_do(w, "f")
    grab_handle(w)
    assert srv.admin("cancel job T:1") == b"OK\r\n"
    expect(c, WORK_FAIL, h)
    sync(w)  # the worker is not told
    assert srv.status() == {"f": (1, 1, 1)}
    complete(w, h, "r")
    expect(c, WORK_COMPLETE, h, "r")
    assert srv.status() == {"f": (0, 0, 1)}


def test_cancel_errors(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    assert srv.admin("cancel job t:1") == b"ERR UNKNOWN_JOB\r\n"  # handles are case-sensitive
    assert srv.admin("cancel job T:2") == b"ERR UNKNOWN_JOB\r\n"
    assert srv.admin("cancel") == UNKNOWN + b"cancel\r\n"
    assert srv.admin("cancel job") == UNKNOWN + b"cancel\r\n"
    assert srv.admin("cancel foo bar") == b"ERR UNKNOWN_ERROR\r\n"
    assert srv.admin("cancel jobs T:1") == b"ERR UNKNOWN_ERROR\r\n"
    assert srv.admin("cancel job T:1 x") == b"ERR UNKNOWN_ERROR\r\n"
    assert srv.admin("show jobs") == b"T:1\t0\t0\t1\n.\n"


# --- create / drop function --------------------------------------------------

def test_create_function(srv):
    assert srv.admin("create function abc") == b"OK\r\n"
    assert srv.admin("create function abc") == b"OK\r\n"  # already there
    assert srv.status() == {"abc": (0, 0, 0)}
    assert srv.admin("create") == INVALID + b"create\r\n"
    assert srv.admin("create function") == INVALID + b"create\r\n"
    assert srv.admin("create x y") == INVALID + b"create\r\n"
    assert srv.admin("create function a b") == INVALID + b"create\r\n"
    assert srv.admin("CREATE x y") == INVALID + b"CREATE\r\n"
    assert srv.status() == {"abc": (0, 0, 0)}


def test_create_function_with_bare_newline_loses_last_byte(srv):
    sock = srv.connect()
    assert ask(sock, b"create function xyz\n") == b"OK\r\n"
    assert ask(sock, b"create function q\n") == b"OK\r\n"
    assert ask(sock, b"status\n") == b"\t0\t0\t0\nxy\t0\t0\t0\n.\n"


def test_drop_function(srv):
    w = srv.connect()
    can_do(w, "busy")
    srv.admin("create function idle")
    assert srv.admin("drop function busy") == BUSY
    assert srv.admin("drop function idle") == b"OK\r\n"
    assert srv.admin("drop function idle") == b"ERR function not found\r\n"
    assert srv.admin("drop function nope") == b"ERR function not found\r\n"
    assert srv.status() == {"busy": (0, 0, 1)}
    assert srv.admin("drop") == INVALID + b"drop\r\n"
    assert srv.admin("drop function") == INVALID + b"drop\r\n"
    assert srv.admin("drop x y") == INVALID + b"drop\r\n"
    assert srv.admin("drop function a b") == INVALID + b"drop\r\n"
    assert srv.admin("Drop function") == INVALID + b"Drop\r\n"
    w.close()
    wait_until(lambda: srv.admin("drop function busy") == b"OK\r\n")
    assert srv.admin("status") == b".\n"


def test_drop_function_matches_case_insensitively(srv):
    w = srv.connect()
    can_do(w, "Ab")
    sock = srv.connect()
    for name in (b"ab", b"AB", b"aB"):
        assert ask(sock, b"create function " + name + b"\r\n") == b"OK\r\n"
    assert ask(sock, b"status\r\n") == b"ab\t0\t0\t0\nAb\t0\t0\t1\nAB\t0\t0\t0\naB\t0\t0\t0\n.\n"
    # every matching function is processed, one reply each, in status order
    sock.sendall(b"drop function aB\r\n")
    want = b"OK\r\n" + BUSY + b"OK\r\nOK\r\n"
    assert recv_exact(sock, len(want)) == want
    assert ask(sock, b"status\r\n") == b"Ab\t0\t0\t1\n.\n"


def test_drop_function_with_queued_jobs_drops_them(srv):
    if IMPL == "c":
        pytest.skip("C bug fixed on purpose: C orphans the queued jobs")
    c, fg = srv.connect(), srv.connect()
    submit(c, "f", "", "x")
    submit(fg, "f", "", "y", SUBMIT_JOB)
    assert srv.admin("drop function f") == b"OK\r\n"
    assert srv.admin("status") == b".\n"
    assert srv.admin("show jobs") == b".\n"
    w = srv.connect()
    can_do(w, "f")
    send(w, GRAB_JOB)
    expect(w, NO_JOB)
    assert submit(c, "f", "", "z") == b"T:3"
    send(w, GRAB_JOB)
    expect(w, JOB_ASSIGN, "T:3", "f", "z")


# --- maxqueue ---------------------------------------------------------------

def test_maxqueue_forms(srv):
    assert srv.admin("maxqueue") == INVALID + b"maxqueue\r\n"
    assert srv.admin("MaxQueue") == INVALID + b"MaxQueue\r\n"
    # unknown function: OK, but nothing is created or remembered
    assert srv.admin("maxqueue ghost 1") == b"OK\r\n"
    assert srv.admin("status") == b".\n"
    c = srv.connect()
    submit(c, "ghost", "", "1")
    submit(c, "ghost", "", "2")
    assert srv.status() == {"ghost": (2, 0, 0)}
    for line in ["maxqueue ghost", "maxqueue ghost 5", "maxqueue ghost 1 2",
                 "maxqueue ghost 1 2 3", "maxqueue ghost x", "maxqueue ghost -4",
                 "MAXQUEUE Ghost 1", "maxqueue  ghost   2"]:
        assert srv.admin(line) == b"OK\r\n", line


def test_maxqueue_run_of_spaces_is_one_separator(srv):
    c = srv.connect()
    submit(c, "f", "", "1")
    assert srv.admin("maxqueue  f   1") == b"OK\r\n"
    send(c, SUBMIT_JOB_BG, "f", "", "2")
    expect(c, 19, "QUEUE_ERROR", "Job queue is full")


def test_maxqueue_function_name_is_case_sensitive(srv):
    c = srv.connect()
    submit(c, "f", "", "1")
    assert srv.admin("maxqueue F 1") == b"OK\r\n"
    assert submit(c, "f", "", "2") == b"T:2"


@pytest.mark.parametrize("line", ["maxqueue f x", "maxqueue f -3", "maxqueue f 0"])
def test_maxqueue_garbage_or_negative_means_unlimited(srv, line):
    c = srv.connect()
    submit(c, "f", "", "1")
    assert srv.admin("maxqueue f 1") == b"OK\r\n"
    assert srv.admin(line) == b"OK\r\n"
    assert submit(c, "f", "", "2") == b"T:2"


# --- getpid, verbose, version -----------------------------------------------

def test_getpid(srv):
    assert srv.admin("getpid") == b"OK %d\n" % srv.pid
    assert srv.admin("GETPID extra") == b"OK %d\n" % srv.pid


def test_version(srv):
    assert srv.admin("version") in VERSIONS
    assert srv.admin("VERSION x") in VERSIONS


def test_verbose_default(srv):
    assert srv.admin("verbose") == b"OK ERROR\n"
    assert srv.admin("Verbose x") == b"OK ERROR\n"


@pytest.mark.parametrize("level", ["FATAL", "WARNING", "INFO"])
def test_verbose_reports_the_level(make_server, level):
    server = make_server(*PREFIX, "--verbose", level)
    assert server.admin("verbose") == b"OK %s\n" % level.encode()


# --- parsing ----------------------------------------------------------------

def test_unknown_commands(srv):
    assert srv.admin("foo bar") == UNKNOWN + b"foo\r\n"
    assert srv.admin("FOO") == UNKNOWN + b"FOO\r\n"
    assert srv.admin("jobs") == UNKNOWN + b"jobs\r\n"
    assert srv.admin("gladiator") == UNKNOWN + b"gladiator\r\n"
    assert srv.admin("status\tx") == UNKNOWN + b"status\tx\r\n"  # TAB is not a separator
    assert srv.admin("") == UNKNOWN + b"\r\n"
    assert srv.admin("   ") == UNKNOWN + b"\r\n"
    assert srv.admin(" status") == UNKNOWN + b"\r\n"  # leading space: empty first token


def test_shutdown_is_unknown_in_c(srv):
    if IMPL != "c":
        pytest.skip("ours implements shutdown on purpose")
    assert srv.admin("shutdown") == UNKNOWN + b"shutdown\r\n"
    assert srv.admin("shutdown graceful") == UNKNOWN + b"shutdown\r\n"


def test_shutdown_stops_the_server(srv):
    if IMPL == "c":
        pytest.skip("deliberate extension: C 1.1.20 has no shutdown command")
    assert srv.admin("shutdown") == b"OK\r\n"
    assert srv.proc.wait(10) == 0


def test_shutdown_graceful_lets_running_jobs_finish(srv):
    if IMPL == "c":
        pytest.skip("deliberate extension: C 1.1.20 has no shutdown command")
    c, w = srv.connect(), srv.connect()
    h = submit(c, "f", "", "x", SUBMIT_JOB)
    can_do(w, "f")
    assert grab_handle(w) == h
    assert srv.admin("shutdown graceful") == b"OK\r\n"
    with pytest.raises(ConnectionRefusedError):
        srv.connect()
    sync(w)  # existing connections are still served
    complete(w, h, "r")
    expect(c, WORK_COMPLETE, h, "r")
    assert srv.proc.wait(10) == 0


def test_shutdown_graceful_without_jobs_exits(srv):
    if IMPL == "c":
        pytest.skip("deliberate extension: C 1.1.20 has no shutdown command")
    assert srv.admin("shutdown graceful") == b"OK\r\n"
    assert srv.proc.wait(10) == 0


def test_commands_are_case_insensitive(srv):
    c = srv.connect()
    submit(c, "f", "u", "x")
    assert srv.admin("STATUS") == b"f\t1\t0\t0\n.\n"
    assert srv.admin("PrioritySTATUS") == b"f\t0\t1\t0\t0\n.\n"
    assert srv.admin("Show Jobs") == b"T:1\t0\t0\t1\n.\n"
    assert srv.admin("SHOW UNIQUE JOBS") == b"u\n.\n"
    assert re.fullmatch(rb"\d+ 127\.0\.0\.1 - :\n(\d+ 127\.0\.0\.1 - :\n)*\.\n",
                        srv.admin("WORKERS"))
    assert srv.admin("Create Function G") == b"OK\r\n"
    assert srv.admin("DROP FUNCTION g") == b"OK\r\n"
    assert srv.admin("CANCEL JOB T:1") == b"OK\r\n"


def test_line_endings_and_extra_tokens(srv):
    sock = srv.connect()
    assert ask(sock, b"status\n") == b".\n"
    assert ask(sock, b"status\r\n") == b".\n"
    assert ask(sock, b"status extra\r\n") == b".\n"
    assert ask(sock, b"status \r\n") == b".\n"
    assert ask(sock, b"workers x y z\r\n").endswith(b".\n")
    assert ask(sock, b"prioritystatus x\r\n") == b".\n"
    assert ask(sock, b"verbose\n") == b"OK ERROR\n"


def test_several_lines_in_one_segment(srv):
    sock = srv.connect()
    sock.sendall(b"verbose\r\nfoo\r\nstatus\r\nmaxqueue\r\n")
    want = b"OK ERROR\n" + UNKNOWN + b"foo\r\n.\n" + INVALID + b"maxqueue\r\n"
    assert recv_exact(sock, len(want)) == want
    sync(sock)


def test_five_tokens_accepted_six_close_the_connection(srv):
    c = srv.connect()
    submit(c, "f", "", "x")
    sock = srv.connect()
    assert ask(sock, b"maxqueue f 1 1 1\r\n") == b"OK\r\n"
    sock.sendall(b"maxqueue f 0 0 0 0\r\n")
    assert closed(sock)
    sock = srv.connect()
    sock.sendall(b"a b c d e f\r\n")
    assert closed(sock)
    sock = srv.connect()
    sock.sendall(b"maxqueue f 0 0 0 \r\n")  # the trailing space adds a 6th token
    assert closed(sock)
    # the limits of the 5-token line are still in force
    send(c, SUBMIT_JOB_BG, "f", "", "y")
    expect(c, 19, "QUEUE_ERROR", "Job queue is full")
