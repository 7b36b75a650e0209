"""Helpers shared by the persistent-store tests (any backend, ours or C's).

Everything talks to the job server over raw sockets (tests/gearproto.py):
submit background jobs, drain them with a worker, read `status` and
`prioritystatus`, run a foreground job, poll a condition with a deadline,
check a replay; and the checks the SQL stores (MySQL, Postgres) share.
"""
import collections
import os
import subprocess
import time

import gearproto as gp
from conftest import C_GEARMAND, IMPL, unavailable, wait_until

QUEUE_ERROR = (gp.ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")

HIGH, NORMAL, LOW = 0, 1, 2
SUBMIT_TYPES = {HIGH: gp.SUBMIT_JOB_HIGH_BG, NORMAL: gp.SUBMIT_JOB_BG, LOW: gp.SUBMIT_JOB_LOW_BG}

# One background job: `when` > 0 makes it a SUBMIT_JOB_EPOCH (always NORMAL).
Job = collections.namedtuple("Job", "function unique data priority when")
Job.__new__.__defaults__ = (NORMAL, 0)


def submit_packet(job):
    if job.when:
        return gp.pack(gp.SUBMIT_JOB_EPOCH, job.function, job.unique, str(job.when), job.data)
    return gp.pack(SUBMIT_TYPES[job.priority], job.function, job.unique, job.data)


def submit_all(server, jobs, timeout=10.0):
    """Submit `jobs` in order on one connection; return one (type, payload) per job."""
    with server.connect() as sock:
        replies = []
        for job in jobs:          # one at a time, so the store sees them in this order
            sock.sendall(submit_packet(job))
            replies.append(gp.recv(sock, timeout))
        return replies


def submit_ok(server, jobs):
    """Submit `jobs` and assert every one got JOB_CREATED; return the handles."""
    replies = submit_all(server, jobs)
    for job, reply in zip(jobs, replies):
        assert reply[0] == gp.JOB_CREATED, f"{job}: {gp.show(reply)}"
    return [payload for _, payload in replies]


def submit_one(server, job):
    return submit_all(server, [job])[0]


def drain(server, functions, count, timeout=10.0, poll=0.05):
    """Work as one worker for `functions` until `count` jobs ran, then check that
    no other job is runnable. Returns [(function, unique, data)] in the order run."""
    ran = []
    deadline = time.monotonic() + timeout
    with server.connect() as sock:
        gp.can_do(sock, *functions)
        while True:
            ptype, body = gp.call(sock, gp.GRAB_JOB_UNIQ)
            if ptype == gp.JOB_ASSIGN_UNIQ:
                handle, function, unique, data = body.split(b"\0", 3)
                ran.append((function, unique, data))
                gp.send(sock, gp.WORK_COMPLETE, handle, b"")
                continue
            assert ptype == gp.NO_JOB, gp.show((ptype, body))
            if len(ran) >= count:
                return ran
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(ran)} of {count} jobs ran: {ran}")
            time.sleep(poll)      # C sends no wakeup when an epoch job falls due


def runnable(server, functions):
    """True if a worker for `functions` would be given a job now (nothing is taken)."""
    with server.connect() as sock:
        gp.can_do(sock, *functions)
        gp.send(sock, gp.PRE_SLEEP)
        try:
            ptype, _ = gp.recv(sock, timeout=0.3)
        except OSError:
            return False
        return ptype == gp.NOOP


def foreground(server, function, data=b"fg"):
    """Run one foreground job through a worker; return the client's WORK_COMPLETE data."""
    with server.connect() as client, server.connect() as worker:
        gp.can_do(worker, function)
        ptype, handle = gp.call(client, gp.SUBMIT_JOB, function, b"", data)
        assert ptype == gp.JOB_CREATED, gp.show((ptype, handle))
        ptype, body = gp.call(worker, gp.GRAB_JOB)
        assert ptype == gp.JOB_ASSIGN, gp.show((ptype, body))
        gp.send(worker, gp.WORK_COMPLETE, handle, data[::-1])
        ptype, body = gp.recv(client)
        assert ptype == gp.WORK_COMPLETE, gp.show((ptype, body))
        return body.split(b"\0", 1)[1]


def admin_rows(server, command, width):
    rows = {}
    for line in server.admin(command).split(b"\n"):
        parts = line.split(b"\t")
        if len(parts) == width:
            rows[parts[0]] = tuple(int(p) for p in parts[1:])
    return rows


def status(server):
    """{function: (total, running, workers)}"""
    return admin_rows(server, "status", 4)


def priority_status(server):
    """{function: (high, normal, low, workers)}"""
    return admin_rows(server, "prioritystatus", 5)


def sample_jobs(prefix, epoch_at, empty_uniques=2):
    """A set of background jobs that exercises a store: every priority (submitted
    interleaved), binary data with NULs, an empty payload, `empty_uniques` jobs with
    an empty unique, a `-` unique, and an epoch job due at `epoch_at`.
    Functions: <prefix>.prio, <prefix>.misc, <prefix>.epoch."""
    prio, misc, epoch = (f"{prefix}.{name}".encode() for name in ("prio", "misc", "epoch"))
    jobs = [Job(prio, b"l1", b"low 1", LOW), Job(prio, b"n1", b"normal 1", NORMAL),
            Job(prio, b"h1", b"high 1", HIGH), Job(prio, b"l2", b"low 2", LOW),
            Job(prio, b"n2", b"normal 2", NORMAL), Job(prio, b"h2", b"high 2", HIGH),
            Job(misc, b"bin", b"\0\xff\0bin\x00\r\n'\"\\%s\0"),
            Job(misc, b"empty", b""),
            Job(misc, b"dash-unique", b"for -"),
            Job(misc, b"-", b"payload keyed")]
    jobs += [Job(misc, b"", b"no unique %d" % i) for i in range(empty_uniques)]
    jobs.append(Job(epoch, b"later", b"epoch job", NORMAL, int(epoch_at)))
    return jobs


def functions_of(jobs):
    return sorted({job.function for job in jobs})


def expected_priority_status(jobs):
    counts = {}
    for job in jobs:
        row = counts.setdefault(job.function, [0, 0, 0])
        row[job.priority] += 1
    return {function: tuple(row) for function, row in counts.items()}


def in_priority_order(jobs):
    """(function, unique, data) of `jobs` (one function) in the order a worker gets them."""
    return [(j.function, j.unique, j.data) for p in (HIGH, NORMAL, LOW)
            for j in jobs if j.priority == p]


def check_replay(server, jobs, priorities=True, epoch_waits=True, timeout=15.0):
    """After a restart: `jobs` (from sample_jobs) are all queued and each runs exactly
    once with its data; with `priorities`, in priority then submission order; with
    `epoch_waits`, the epoch job runs only when due."""
    if priorities:
        assert {f: row[:3] for f, row in priority_status(server).items()
                if f in functions_of(jobs)} == expected_priority_status(jobs)
    totals = collections.Counter(job.function for job in jobs)
    assert {f: row[0] for f, row in status(server).items() if f in totals} == dict(totals)

    epochs = [job for job in jobs if job.when]
    others = [job for job in jobs if not job.when]
    by_function = collections.defaultdict(list)
    for job in others:
        by_function[job.function].append(job)
    for function, group in by_function.items():
        ran = drain(server, [function], len(group))
        want = [(j.function, j.unique, j.data) for j in group]
        if priorities and len({j.priority for j in group}) > 1:
            assert ran == in_priority_order(group)
        else:
            assert sorted(ran) == sorted(want)
    for job in epochs:
        if epoch_waits and time.time() < job.when - 1:
            assert not runnable(server, [job.function]), "epoch job runnable too early"
        ran = drain(server, [job.function], 1, timeout=timeout + max(0, job.when - time.time()))
        assert ran == [(job.function, job.unique, job.data)]
        if epoch_waits:
            assert time.time() >= job.when - 1


def check_replay_any_order(server, jobs):
    """Like check_replay, for a server that replays in no particular order within a
    priority: each job runs exactly once with its data, higher priorities first."""
    functions = {job.function for job in jobs}
    assert {f: row[:3] for f, row in priority_status(server).items()
            if f in functions} == expected_priority_status(jobs)
    by_function = collections.defaultdict(list)
    for job in jobs:
        if not job.when:
            by_function[job.function].append(job)
    for function, group in by_function.items():
        ran = drain(server, [function], len(group))
        assert sorted(ran) == sorted((j.function, j.unique, j.data) for j in group)
        priority = {(j.function, j.unique, j.data): j.priority for j in group}
        order = [priority[job] for job in ran]
        assert order == sorted(order), ran
    epochs = [job for job in jobs if job.when]
    if epochs:
        check_replay(server, epochs)


def need_c():
    if not os.path.exists(C_GEARMAND):
        unavailable("C gearmand is not installed")


def run_once(make_server, *args):
    """Run a server with `args` to its exit; return (exit code, its stderr lines)."""
    server = make_server(*args, start=False)
    result = subprocess.run(server.command(), capture_output=True, timeout=30)
    return result.returncode, result.stderr.decode().strip().splitlines()


# -- SQL stores: the same checks for MySQL and Postgres -------------------------------
# `options` are the server's queue options, `rows()` reads the table as
# {(unique, function): (priority, data, when_to_run)}.

def check_refused_writes(server, function, rows, drop_table):
    """A row the database refuses (a function name longer than VARCHAR(255)) and a
    missing table answer QUEUE_ERROR; the rest keeps working."""
    long_name = b"f" * 300
    replies = submit_all(server, [Job(function, b"a", b"1"), Job(long_name, b"b", b"2"),
                                  Job(function, b"c", b"3")])
    assert [r[0] for r in replies] == [gp.JOB_CREATED, gp.ERROR, gp.JOB_CREATED]
    assert replies[1] == QUEUE_ERROR
    assert set(rows()) == {(b"a", function), (b"c", function)}
    assert server.status().get("f" * 300, (0,))[0] == 0

    # Without its table the store can write nothing; the rest keeps working.
    drop_table()
    assert submit_one(server, Job(function, b"d", b"4")) == QUEUE_ERROR
    assert foreground(server, function + b".fg", b"abc") == b"cba"
    if IMPL == "c":
        return      # C closes a worker whose WORK_COMPLETE cannot delete the row
    assert sorted(drain(server, [function], 2)) == [(function, b"a", b"1"), (function, b"c", b"3")]


def check_c_writes_we_replay(make_server, options, rows, prefix):
    """C queues sample jobs and is killed; we replay them all (C stores priority and
    when_to_run correctly), then delete every row."""
    need_c()
    # C refuses a second empty-unique job of a function (duplicate key), so one only.
    jobs = sample_jobs(prefix, int(time.time()) + 4, empty_uniques=1)
    c_server = make_server(*options, impl="c")
    submit_ok(c_server, jobs)
    assert len(rows()) == len(jobs)
    c_server.kill()
    server = make_server(*options, impl="py")
    check_replay(server, jobs)
    wait_until(lambda: not rows(), 5, what="done jobs deleted from the table")


def we_write_and_c_starts(make_server, options, rows, jobs):
    """We queue `jobs` and are killed; C starts on the same table. Returns C's server
    and `jobs` as C sees them: our generated uniques (for empty and `-` uniques) are
    ordinary ones to it."""
    need_c()
    server = make_server(*options, impl="py")
    submit_ok(server, jobs)
    server.kill()
    generated = {data: unique for (unique, _), (_, data, _) in rows().items()}
    c_server = make_server(*options, impl="c")
    return c_server, [job._replace(unique=generated[job.data])
                      if job.unique in (b"", b"-") else job for job in jobs]


def check_outage(server, backend_stopped, rows, function, backend):
    """While the `backend_stopped()` context holds the database down, background
    submissions fail at once with QUEUE_ERROR and foreground and queued work still
    runs; when it is back, submissions succeed again by themselves, the failed delete
    is retried and nothing acknowledged is lost. `backend` names it in messages."""
    submit_ok(server, [Job(function, b"before1", b"1"), Job(function, b"before2", b"2")])

    with backend_stopped():
        started = time.monotonic()
        assert submit_one(server, Job(function, b"during", b"x")) == QUEUE_ERROR
        assert submit_one(server, Job(function, b"during2", b"y", LOW)) == QUEUE_ERROR
        assert time.monotonic() - started < 3, f"the store blocked while {backend} was down"
        assert foreground(server, function + b".fg", b"abc") == b"cba"
        # Queued work is still handed out; its delete waits for the database.
        with server.connect() as worker:
            gp.can_do(worker, function)
            ptype, body = gp.call(worker, gp.GRAB_JOB_UNIQ)
            assert ptype == gp.JOB_ASSIGN_UNIQ
            handle, _, unique, _ = body.split(b"\0", 3)
            assert unique == b"before1"
            gp.send(worker, gp.WORK_COMPLETE, handle, b"")
            gp.sync(worker)
        assert server.status()[function.decode()][0] == 1

    # Back up: submissions succeed again by themselves, and the delete is retried.
    attempt = iter(range(10 ** 6))

    def submitted():
        unique = b"after%d" % next(attempt)
        reply = submit_one(server, Job(function, unique, unique))
        return unique if reply[0] == gp.JOB_CREATED else None

    after = wait_until(submitted, 20, what="a background submission to succeed again",
                       interval=0.1)
    wait_until(lambda: set(rows()) == {(b"before2", function), (after, function)}, 10,
               what="the failed delete to be retried")

    # Nothing acknowledged was lost.
    server.kill()
    server.start()
    assert sorted(drain(server, [function], 2)) == [(function, after, after),
                                                    (function, b"before2", b"2")]


def check_bad_settings_exit_1(make_server, arg_sets, store):
    """Each of `arg_sets` makes the server exit 1 within 10 s; ours logs one line
    naming the `store`."""
    for args in arg_sets:
        server = make_server(*args, start=False)
        started = time.monotonic()
        server.start(expect_ready=False)
        assert server.proc.wait(15) == 1, server.log()
        assert time.monotonic() - started < 10
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert IMPL == "c" or len(lines) == 1 and store in lines[0], server.log()
