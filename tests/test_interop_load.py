"""Load and worker-failure behaviour: many workers and jobs, every result checked;
workers that die mid-job have their jobs requeued and finished by another worker."""
import threading

from conftest import need_tool
from clients import (CAN_DO, GRAB_JOB, JOB_ASSIGN, JOB_CREATED, SUBMIT_JOB, SUBMIT_JOB_BG,  # noqa: F401
                     SUBMIT_JOB_HIGH, SUBMIT_JOB_LOW, WORK_COMPLETE, WORK_FAIL, RawConn, finish,
                     packet, procs, raw_workers, wait_until)

N_WORKERS = 20
JOBS_PER_WORKER = 2000
N_JOBS = N_WORKERS * JOBS_PER_WORKER       # 40,000 foreground jobs
N_CLIENTS = 4


def result_of(data):
    return b"R:" + data[::-1]


def run_client(server, jobs, results, errors):
    """Pipeline every submission of `jobs` [(ptype, data)] on one connection, then read
    JOB_CREATED (in submission order) and WORK_COMPLETE packets until all are done."""
    try:
        conn = RawConn(server)
        conn.send_raw(b"".join(packet(ptype, "load", "", data) for ptype, data in jobs))
        handles = {}
        created = 0
        pending = len(jobs)
        while pending:
            ptype, payload = conn.recv(timeout=20)
            if ptype == JOB_CREATED:
                handles[payload] = jobs[created][1]
                created += 1
            elif ptype == WORK_COMPLETE:
                handle, result = payload.split(b"\0", 1)
                results[handle] = (handles[handle], result)
                pending -= 1
            else:
                raise AssertionError(f"unexpected packet {ptype} {payload[:100]!r}")
        conn.close()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_load_twenty_workers_complete_forty_thousand_jobs_with_correct_results(server, raw_workers):
    workers = [raw_workers(server, ["load"], lambda h, d: result_of(d), client_id=f"w{i}")
               for i in range(N_WORKERS)]
    wait_until(lambda: server.status().get("load") == (0, 0, N_WORKERS), 10, "workers registered")
    kinds = (SUBMIT_JOB, SUBMIT_JOB, SUBMIT_JOB_HIGH, SUBMIT_JOB_LOW)
    per_client = [[(kinds[i % 4], f"c{c}-job{i}-{'p' * (i % 97)}".encode())
                   for i in range(N_JOBS // N_CLIENTS)] for c in range(N_CLIENTS)]
    results, errors = {}, []
    threads = [threading.Thread(target=run_client, args=(server, jobs, results, errors))
               for jobs in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == N_JOBS                       # every job got its own handle
    for handle, (data, result) in results.items():
        assert result == result_of(data), handle
    executed = [h for w in workers for h, _ in w.done]
    assert sorted(executed) == sorted(results)          # each job ran exactly once
    assert sum(1 for w in workers if w.done) > 1        # the work was spread out
    assert [w.error for w in workers] == [None] * N_WORKERS
    assert server.status()["load"] == (0, 0, N_WORKERS)


def test_load_background_burst_is_run_exactly_once(server, raw_workers):
    workers = [raw_workers(server, ["bgload"], lambda h, d: b"") for _ in range(5)]
    wait_until(lambda: server.status().get("bgload") == (0, 0, 5), 10, "workers registered")
    client = RawConn(server)
    payloads = [f"bg-{i}".encode() for i in range(500)]
    client.send_raw(b"".join(packet(SUBMIT_JOB_BG, "bgload", "", p) for p in payloads))
    handles = [client.expect(JOB_CREATED) for _ in payloads]
    assert len(set(handles)) == 500
    wait_until(lambda: sum(len(w.done) for w in workers) == 500, 20, "all background jobs run")
    ran = sorted((h, d) for w in workers for h, d in w.done)
    assert ran == sorted(zip(handles, payloads))
    wait_until(lambda: server.status()["bgload"] == (0, 0, 5), 10, "queue drained")


def test_killed_cli_worker_job_is_requeued_and_finished_by_another_worker(server, procs):
    gm = need_tool("gearman")
    base = [gm, "-h", "127.0.0.1", "-p", server.port]
    # this worker never finishes: it takes the job and hangs
    stuck = procs.start(base + ["-w", "-f", "fragile", "--", "sh", "-c", "cat >/dev/null; sleep 60"])
    wait_until(lambda: server.status().get("fragile") == (0, 0, 1), 10, "stuck worker registered")
    client = RawConn(server)
    handle = client.submit("fragile", b"precious payload")
    wait_until(lambda: server.status()["fragile"] == (1, 1, 1), 10, "job running on stuck worker")
    procs.kill(stuck)                                   # SIGKILL mid-job
    wait_until(lambda: server.status()["fragile"] == (1, 0, 0), 10, "job requeued")
    assert server.admin("show jobs") == handle + b"\t1\t0\t0\n.\n"    # retries = 1
    rescuer = procs.start(base + ["-w", "-c", "1", "-f", "fragile", "--", "tr", "a-z", "A-Z"])
    assert client.expect(WORK_COMPLETE, timeout=10) == handle + b"\0PRECIOUS PAYLOAD"
    assert finish(rescuer)[0] == 0
    assert server.status()["fragile"] == (0, 0, 0)


def test_worker_closing_socket_requeues_all_its_jobs_for_another_worker(server, raw_workers):
    clients = [RawConn(server) for _ in range(3)]
    handles = [c.submit("multi", f"job{i}".encode()) for i, c in enumerate(clients)]
    greedy = RawConn(server)                            # grabs all three, then vanishes
    greedy.send(CAN_DO, "multi")
    for h in handles:
        greedy.send(GRAB_JOB)
        assert greedy.expect(JOB_ASSIGN).split(b"\0")[0] == h
    assert server.status()["multi"] == (3, 3, 1)
    greedy.close()
    wait_until(lambda: server.status()["multi"] == (3, 0, 0), 10, "jobs requeued")
    worker = raw_workers(server, ["multi"], lambda h, d: d.upper())
    for i, (c, h) in enumerate(zip(clients, handles)):
        assert c.expect(WORK_COMPLETE) == h + f"\0JOB{i}".encode()
    # requeued most recently assigned first
    assert [h for h, _ in worker.done] == handles[::-1]


def test_job_dropped_with_work_fail_after_max_retries(make_server):
    server = make_server("--job-retries", "2")
    client = RawConn(server)
    handle = client.submit("doomed", b"x")
    for attempt in (1, 2):
        w = RawConn(server)
        w.send(CAN_DO, "doomed")
        w.send(GRAB_JOB)
        assert w.expect(JOB_ASSIGN).split(b"\0")[0] == handle
        w.close()
        if attempt == 1:
            wait_until(lambda: server.status()["doomed"] == (1, 0, 0), 10, "requeued once")
    assert client.expect(WORK_FAIL) == handle
    wait_until(lambda: server.status()["doomed"] == (0, 0, 0), 10, "job dropped")
    assert server.admin("show jobs") == b".\n"
