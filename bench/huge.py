#!/usr/bin/env python3
"""The queue-larger-than-memory check: millions of durable jobs, a kill -9, a restart.

    python bench/huge.py                       # 10,000,020 jobs in SQLite, default options
    python bench/huge.py --jobs 1000000 --functions 4 --store mysql
    python bench/huge.py --jobs 100000000 --functions 4   # the 100 M run (disk: ~8 GB)

`--functions` functions get `--jobs` / functions NORMAL jobs each, submitted at once
from one process per function (one pipelined connection each, so each function's
submission order is known). The first function also gets 10 HIGH and 10 LOW jobs.
Then: `status` must count them all; the server is killed with SIGKILL and started
again, and the time until `status` answers with the right counts is taken; a job
for a function nobody used is submitted and grabbed (its latency); the first
function is drained by a pipelined worker that checks the exact order (10 HIGH, the
NORMAL ones in submission order, 10 LOW). The server's RSS is sampled throughout.
One JSON line is printed at the end. Standard library only; stdlib sockets.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct(">4sII")
SUBMIT_JOB_BG, SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW_BG = 18, 32, 34
JOB_CREATED, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, NO_JOB = 8, 30, 31, 10
CAN_DO, PRE_SLEEP, NOOP, WORK_COMPLETE = 1, 4, 6, 13


def request(ptype, *args):
    payload = b"\0".join(args)
    return HEADER.pack(b"\0REQ", ptype, len(payload)) + payload


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), 30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Reader:
    """Responses off a socket, parsed in bulk."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""
        self.start = 0

    def packets(self):
        """Read once; yield the complete packets now in."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        buffer = self.buffer[self.start:] + data
        start = 0
        while len(buffer) - start >= 12:
            _, ptype, size = HEADER.unpack_from(buffer, start)
            if len(buffer) - start - 12 < size:
                break
            yield ptype, buffer[start + 12:start + 12 + size]
            start += 12 + size
        self.buffer, self.start = buffer, start


def submit(port, function, jobs, window, extra, result):
    """One connection: `extra` packets, then `jobs` NORMAL jobs u0..u<jobs-1>."""
    sock = connect(port)
    reader = Reader(sock)
    data = b"x" * 20
    packets = list(extra)
    sent = acked = 0
    total = jobs + len(packets)
    started = time.monotonic()
    number = 0
    while acked < total:
        batch = []
        while sent - acked < window and sent < total:
            if packets:
                batch.append(packets.pop(0))
            else:
                batch.append(request(SUBMIT_JOB_BG, function, b"u%d" % number, data))
                number += 1
            sent += 1
        if batch:
            sock.sendall(b"".join(batch))
        for ptype, payload in reader.packets():
            if ptype != JOB_CREATED:
                raise RuntimeError(f"{function!r}: got {ptype} {payload[:80]!r}")
            acked += 1
    result.put((function.decode(), time.monotonic() - started))
    sock.close()


def admin(port, line, timeout=30):
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(line.encode() + b"\r\n")
        data = b""
        while not data.endswith(b"\n.\n") and data != b".\n":
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def status(port):
    rows = {}
    for line in admin(port, "status").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows[parts[0]] = int(parts[1])
    return rows


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.pid = None
        self.peak = {}
        self.phase = "start"

    def run(self):
        while True:
            if self.pid:
                value = rss_kb(self.pid)
                self.peak[self.phase] = max(self.peak.get(self.phase, 0), value)
            time.sleep(0.2)


def start_server(args, workdir, port):
    command = [sys.executable, str(ROOT / "gearmand.py"), "-p", str(port), "-L", "127.0.0.1",
               "-l", str(workdir / "server.log"), "--verbose", "NOTICE"] + store_args(args)
    if args.queue_memory:
        command += ["--queue-memory", args.queue_memory]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 600
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: "
                                   + (workdir / "server.log").read_text()[-2000:])
            time.sleep(0.01)


def store_args(args):
    if args.store == "sqlite":
        return ["-q", "sqlite", "--sqlite-db", str(args.db)]
    if args.store == "mysql":
        return ["-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-user", "root",
                "--mysql-db", "test", "--mysql-table", args.table]
    return ["-q", "Postgres", "--libpq-conninfo", "host=127.0.0.1 dbname=test user=root",
            "--libpq-table", args.table]


def drain(port, function, expected, window=32):
    """Drain `function` with a pipelined worker; check the order; jobs/s."""
    sock = connect(port)
    reader = Reader(sock)
    sock.sendall(request(CAN_DO, function))
    got = 0
    in_flight = 0
    started = time.monotonic()
    done = False
    while not done:
        if in_flight < window:
            sock.sendall(request(GRAB_JOB_UNIQ) * (window - in_flight))
            in_flight = window
        replies = []
        for ptype, payload in reader.packets():
            in_flight -= 1
            if ptype == NO_JOB:
                if got == len(expected):
                    done = True
                continue
            if ptype != JOB_ASSIGN_UNIQ:
                raise RuntimeError(f"got {ptype}")
            handle, _, unique, _ = payload.split(b"\0", 3)
            if got >= len(expected) or unique != expected[got]:
                raise RuntimeError(f"job {got}: got {unique!r}, want "
                                   f"{expected[got] if got < len(expected) else None!r}")
            got += 1
            replies.append(request(WORK_COMPLETE, handle, b""))
        if replies:
            sock.sendall(b"".join(replies))
        if not done and got < len(expected) and in_flight == window:
            continue
    seconds = time.monotonic() - started
    sock.close()
    return got / seconds


def rare_job_latency(port):
    """Submit one job for a function nobody used; the time until a waiting worker has it."""
    worker, client = connect(port), connect(port)
    worker.sendall(request(CAN_DO, b"rare") + request(PRE_SLEEP))
    time.sleep(0.2)
    started = time.monotonic()
    client.sendall(request(SUBMIT_JOB_BG, b"rare", b"r1", b""))
    reader = Reader(worker)
    while not any(ptype == NOOP for ptype, _ in reader.packets()):
        pass
    worker.sendall(request(GRAB_JOB_UNIQ))
    while not any(ptype == JOB_ASSIGN_UNIQ for ptype, _ in reader.packets()):
        pass
    latency = time.monotonic() - started
    worker.close()
    client.close()
    return latency


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--functions", type=int, default=4)
    parser.add_argument("--store", choices=("sqlite", "mysql", "postgres"), default="sqlite")
    parser.add_argument("--queue-memory", help="passed to the server (default: its own)")
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--workdir", help="where the SQLite file goes (default: a temp dir)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gearmand-huge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.db = workdir / "queue.db"
    args.table = f"huge_{os.getpid()}"
    port = args.port or free_port()
    sampler = RssSampler()
    sampler.start()
    server = start_server(args, workdir, port)
    sampler.pid = server.pid
    result = {"jobs": args.jobs + 20, "functions": args.functions, "store": args.store,
              "queue_memory": args.queue_memory or "default"}
    try:
        per_function = args.jobs // args.functions
        functions = [b"huge%d" % n for n in range(args.functions)]
        first = functions[0]
        extra = [request(SUBMIT_JOB_HIGH_BG, first, b"h%d" % n, b"") for n in range(10)]
        extra += [request(SUBMIT_JOB_LOW_BG, first, b"l%d" % n, b"") for n in range(10)]
        sampler.phase = "submit"
        queue = multiprocessing.Queue()
        started = time.monotonic()
        processes = [multiprocessing.Process(target=submit, args=(
            port, function, per_function, args.window, extra if function == first else [],
            queue)) for function in functions]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        submit_s = time.monotonic() - started
        result["submit_s"] = round(submit_s, 1)
        total = per_function * args.functions + 20
        result["submit_jobs_per_s"] = round(total / submit_s)
        counts = status(port)
        assert sum(counts.get(f.decode(), 0) for f in functions) == total, counts
        sampler.phase = "full"
        time.sleep(2)
        result["rss_full_mb"] = round(rss_kb(server.pid) / 1024, 1)
        server.kill()
        server.wait()
        sampler.phase = "restart"
        started = time.monotonic()
        server = start_server(args, workdir, port)
        sampler.pid = server.pid
        result["accept_after_restart_s"] = round(time.monotonic() - started, 2)
        while True:
            try:
                counts = status(port)
                if sum(counts.get(f.decode(), 0) for f in functions) == total:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        result["status_after_restart_s"] = round(time.monotonic() - started, 2)
        time.sleep(2)
        result["rss_after_restart_mb"] = round(rss_kb(server.pid) / 1024, 1)
        result["rare_job_latency_ms"] = round(rare_job_latency(port) * 1000, 2)
        sampler.phase = "drain"
        expected = ([b"h%d" % n for n in range(10)] + [b"u%d" % n for n in range(per_function)]
                    + [b"l%d" % n for n in range(10)])
        result["drain_jobs_per_s"] = round(drain(port, first, expected))
        result["drained_in_order"] = len(expected)
        result["rss_peak_mb"] = {phase: round(kb / 1024, 1) for phase, kb in sampler.peak.items()}
        if args.store == "sqlite":
            result["db_gb"] = round(sum(p.stat().st_size for p in workdir.glob("queue.db*"))
                                    / 1e9, 2)
    finally:
        server.terminate()
        server.wait()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
