"""-q libtokyocabinet through the system libtokyocabinet.so.9: jobs survive kill -9
and replay exactly once, and the file holds C gearmand's records, read here with
tcamgr (Debian's C gearmand has no Tokyo Cabinet queue to cross-test with)."""
import ctypes.util
import shutil
import subprocess
import time

import pytest

pytest.register_assert_rewrite("storetools")

from conftest import IMPL, unavailable  # noqa: E402
from storetools import (HIGH, LOW, NORMAL, Job, check_ended_jobs_leave_the_store,  # noqa: E402
                        check_kill_9_at_a_random_instant, check_replay,
                        check_submissions_share_commits, drain, run_once, sample_jobs, submit_ok)

pytestmark = pytest.mark.skipif(IMPL == "c",
                                reason="C gearmand in Debian has no Tokyo Cabinet queue")


@pytest.fixture
def db(tmp_path):
    if not ctypes.util.find_library("tokyocabinet"):
        unavailable("libtokyocabinet is not installed (apt-get install libtokyocabinet9)")
    if not shutil.which("tcamgr"):
        unavailable("tcamgr is not installed (apt-get install tokyocabinet-bin)")
    return tmp_path / "queue.tch"


def options(path, *more):
    return ("-q", "libtokyocabinet", f"--libtokyocabinet-file={path}") + more


def tcamgr(*args):
    return subprocess.run(["tcamgr", *map(str, args)], capture_output=True, check=True,
                          timeout=10).stdout


def records(path):
    """{key: value} as `tcamgr list` prints them (the server must not hold the file)."""
    result = {}
    for line in tcamgr("list", "-pv", "-px", path).decode().splitlines():
        key, _, value = line.partition("\t")
        result[bytes.fromhex(key)] = bytes.fromhex(value)
    return result


def live_keys(path):
    """{(function, unique)} of the records while the server holds the file:
    tchmgr reads it without taking its lock (-nl). No `-` in the functions."""
    listing = subprocess.run(["tchmgr", "list", "-nl", str(path)], capture_output=True,
                             check=True, timeout=10).stdout
    return {tuple(key.split(b"-", 1)) for key in listing.splitlines()}


def c_record(job, unique=None):
    """(key, value) of a job as C gearmand's libtokyocabinet queue writes it."""
    unique = job.unique if unique is None else unique
    return (job.function + b"-" + unique,
            job.function + b"\0" + unique + b"\0" + b"%d%d\0" % (job.priority, job.when) + job.data)


def test_background_jobs_survive_kill_9_and_replay_exactly_once(make_server, db):
    server = make_server(*options(db, "--libtokyocabinet-optimize"))
    jobs = sample_jobs("tc", int(time.time()) + 4)
    jobs.append(Job(b"tc.my-func", b"u-1", b"dash \0 and binary", LOW))
    submit_ok(server, jobs)
    server.kill()

    # The file holds C's records, one per job, readable by tcamgr.
    stored = records(db)
    assert len(stored) == len(jobs)
    for job in jobs:
        if job.unique in (b"", b"-"):       # stored under generated uniques
            key = next(k for k, v in stored.items() if v.endswith(b"\0" + job.data)
                       and k.startswith(job.function + b"-gearmand.py:"))
            assert stored[key] == c_record(job, key[len(job.function) + 1:])[1]
        else:
            assert stored[c_record(job)[0]] == c_record(job)[1]

    server.start()
    check_replay(server, jobs)            # in submission order within each priority
    server.stop()
    assert records(db) == {}


def test_records_in_c_format_replay(make_server, db):
    jobs = [Job(b"f", b"n", b"normal \0 data"), Job(b"f", b"h", b"", HIGH),
            Job(b"f", b"l", b"low", LOW), Job(b"g", b"a-b", b"dash in unique"),
            Job(b"e", b"later", b"epoch", 1, int(time.time()) + 3)]
    for job in jobs:
        key, value = c_record(job)
        tcamgr("put", "-sx", db, key.hex(), value.hex())
    server = make_server(*options(db))
    check_replay(server, jobs)


@pytest.mark.parametrize("round_number", range(2))
def test_acknowledged_jobs_survive_kill_9_at_random_instants(make_server, db, round_number):
    """storetools.check_kill_9_at_a_random_instant: no acknowledged job lost, only
    jobs running at the kill run twice."""
    server = make_server(*options(db))
    print(check_kill_9_at_a_random_instant(server, b"crash%d" % round_number))


def test_pipelined_submissions_share_commits(make_server, db):
    """One fsync per batch: 400 pipelined submissions make few."""
    check_submissions_share_commits(make_server, options(db), b"f")
    assert len(live_keys(db)) == 400


def test_records_leave_when_jobs_end_and_a_dead_workers_job_stays(make_server, db):
    if not shutil.which("tchmgr"):
        unavailable("tchmgr is not installed (apt-get install tokyocabinet-bin)")
    check_ended_jobs_leave_the_store(make_server(*options(db)), b"f", lambda: live_keys(db))


def test_completed_and_cancelled_jobs_leave_the_file(make_server, db):
    server = make_server(*options(db))
    submit_ok(server, [Job(b"f", b"a", b"1"), Job(b"f", b"b", b"2")])
    handle, = submit_ok(server, [Job(b"g", b"c", b"3")])
    assert server.admin(f"cancel job {handle.decode()}") == b"OK\r\n"
    assert drain(server, [b"f"], 2) == [(b"f", b"a", b"1"), (b"f", b"b", b"2")]
    assert server.stop() == 0
    assert records(db) == {}


def test_b_tree_file_works_too(make_server, tmp_path, db):
    path = tmp_path / "queue.tcb"
    server = make_server(*options(path))
    submit_ok(server, [Job(b"f", b"x", b"1"), Job(b"f", b"y", b"2", HIGH)])
    server.kill()
    assert set(tcamgr("list", path).split()) == {b"f-x", b"f-y"}
    server.start()
    assert drain(server, [b"f"], 2) == [(b"f", b"y", b"2"), (b"f", b"x", b"1")]


def test_bad_settings_exit_1_with_one_line(make_server, tmp_path, db):
    code, lines = run_once(make_server, "-q", "libtokyocabinet")
    assert code == 1 and len(lines) == 1 and "--libtokyocabinet-file" in lines[0]
    code, lines = run_once(make_server, *options(tmp_path / "queue.db"))
    assert code == 1 and len(lines) == 1 and ".tch" in lines[0]
    code, lines = run_once(make_server, *options(tmp_path / "missing" / "queue.tch"))
    assert code == 1 and lines == [f"gearmand: libtokyocabinet queue: cannot open "
                                   f"{tmp_path}/missing/queue.tch: No such file or directory"]


def test_second_server_on_the_same_file_fails_at_once(make_server, db):
    make_server(*options(db))
    started = time.monotonic()
    code, lines = run_once(make_server, *options(db))
    assert code == 1 and len(lines) == 1 and "locked by another process" in lines[0]
    assert time.monotonic() - started < 10


def test_negative_epoch_time_replays_intact(make_server, db):
    """SUBMIT_JOB_EPOCH takes a negative time (due at once). C writes it with %lld and
    reads it back with strtoul(), which takes the `-`: so do we, keeping the data whole."""
    job = Job(b"f", b"past", b"data", NORMAL, -5)
    server = make_server(*options(db))
    submit_ok(server, [job])
    server.kill()
    assert records(db) == dict([c_record(job)])       # b"f\0past\0" b"1-5\0data"
    server.start()
    assert drain(server, [b"f"], 1) == [(b"f", b"past", b"data")]
