#!/usr/bin/env python3
"""Benchmark gearmand.py against the C gearmand and python-gear's server.

For every scenario repetition each server under test is started fresh on a
free loopback port, the gearbench load generator is run against it once, and
the server is stopped. Repetitions are interleaved (ours, C, gear, ours, C,
gear, ...) and the table shows the median of each figure and the ratios
ours/C and ours/gear.

    python bench/run.py --suite smoke
    python bench/run.py --suite memory --reps 3 --markdown

gearbench.py is not part of this repository: point --gearbench at it
(default: ../shared/bench/gearbench.py relative to the repository root).
See bench/README.md.
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GEARBENCH = ROOT.parent / "shared" / "bench" / "gearbench.py"
BASELINE = None   # --baseline: another checkout of gearmand.py, run as server "base"
C_GEARMAND = "/usr/sbin/gearmand"
ALL_SERVERS = ("ours", "c", "gear")
SERVER_TITLES = {"ours": "gearmand.py", "c": "C gearmand", "gear": "gear.Server",
                 "base": "baseline"}

# python-gear's server runs its poll loop in daemon threads; the main thread only waits.
GEAR_SERVER_CODE = ('import sys, time, gear; '
                    's = gear.Server(port=int(sys.argv[1]), host="127.0.0.1"); '
                    'time.sleep(1e9)')

# Extra gearbench options per server. gear.Server does not set TCP_NODELAY, so
# without --quickack every round trip can stall 40 ms (Nagle + delayed ACK);
# it only knows GRAB_JOB_UNIQ, hence --grab uniq.
SERVER_BENCH_ARGS = {"gear": ["--quickack", "--grab", "uniq"]}

# Where the database servers of the durable stores listen (checked before use).
STORE_ADDRESSES = {"mysql": ("127.0.0.1", 3306), "postgres": ("127.0.0.1", 5432),
                   "redis": ("127.0.0.1", 6379)}


# --- scenarios ---------------------------------------------------------------

@dataclasses.dataclass
class Metric:
    label: str
    key: str             # field of gearbench's JSON, or "rss_per_job", "cpu_us_per_job"
    lower_is_better: bool = False


JOBS_PER_S = Metric("jobs/s", "jobs_per_s")
P50_MS = Metric("p50 ms", "p50_ms", True)
P99_MS = Metric("p99 ms", "p99_ms", True)
RSS_PER_JOB = Metric("RSS bytes/job", "rss_per_job", True)
KB_PER_CONN = Metric("KB/conn", "server_kb_per_conn", True)
IDLE_CPU = Metric("idle CPU %", "server_idle_cpu_pct", True)
RT_P50_MS = Metric("job rt p50 ms", "job_rt_p50_ms", True)
QUEUED_AFTER_S = Metric("queued after restart s", "queued_after_cmd_s", True)
REPLAY_JOBS_PER_S = Metric("replayed jobs/s", "replay_jobs_per_s")
# Server CPU time per job, over the same window as jobs/s: the cost that a faster or
# slower generator does not hide. Every scenario with jobs reports it.
CPU_US_PER_JOB = Metric("server CPU µs/job", "cpu_us_per_job", True)


@dataclasses.dataclass
class Scenario:
    name: str                 # row name in the table
    bench: str                # gearbench scenario
    jobs: int                 # None: the scenario has no job count (conns)
    metrics: tuple
    store: str = "memory"     # memory, sqlite, mysql, postgres, redis
    servers: tuple = ALL_SERVERS
    c_jobs: int = None        # fewer jobs for C where its store is slow
    bench_args: tuple = ()
    restart: bool = False     # gearbench "recover": give it a restart command

    def jobs_for(self, server):
        return self.c_jobs if server == "c" and self.c_jobs else self.jobs

    @property
    def figures(self):
        return self.metrics + ((CPU_US_PER_JOB,) if self.jobs and self.bench != "recover" else ())


def memory_scenarios(jobs):
    return [
        Scenario("bg-submit", "bg-submit", jobs, (JOBS_PER_S,)),
        Scenario("bg-drain", "bg-drain", jobs, (JOBS_PER_S,)),
        Scenario("fg", "fg", jobs, (JOBS_PER_S, P50_MS, P99_MS)),
        Scenario("mixed", "mixed", jobs, (JOBS_PER_S,)),
    ]


DURABLE = ("ours", "c")   # gear.Server has no persistent queue

SUITES = {
    "memory": memory_scenarios(100_000),
    "million": [
        # C's hash tables have 991 buckets by default and slow down as they fill: allow time.
        Scenario("bg-submit, left queued", "bg-submit", 1_000_000, (JOBS_PER_S, RSS_PER_JOB),
                 bench_args=("--no-cleanup", "--timeout", "900")),
    ],
    "conns": [
        Scenario("5000 idle conns", "conns", None, (KB_PER_CONN, IDLE_CPU, RT_P50_MS),
                 bench_args=("--conns", "5000")),
    ],
    # Server RSS per connection and job round trip with 10,000 idle peers, ours vs C.
    "conns10k": [
        Scenario("10000 idle conns", "conns", None, (KB_PER_CONN, IDLE_CPU, RT_P50_MS),
                 servers=("ours", "c"), bench_args=("--conns", "10000")),
    ],
    # C's libsqlite3 store commits once per job (~1.5k jobs/s): give it fewer jobs.
    "sqlite": [
        Scenario("sqlite bg-submit", "bg-submit", 100_000, (JOBS_PER_S,), store="sqlite",
                 servers=DURABLE, c_jobs=3000),
        Scenario("sqlite bg-drain", "bg-drain", 100_000, (JOBS_PER_S,), store="sqlite",
                 servers=DURABLE, c_jobs=3000),
    ],
    "replay": [
        Scenario("sqlite kill -9 + replay", "recover", 1_000_000,
                 (QUEUED_AFTER_S, REPLAY_JOBS_PER_S), store="sqlite", servers=("ours",),
                 bench_args=("--timeout", "900"), restart=True),
    ],
    "backends": [
        Scenario("mysql bg-submit", "bg-submit", 20_000, (JOBS_PER_S,), store="mysql",
                 servers=DURABLE, c_jobs=3000),
        Scenario("postgres bg-submit", "bg-submit", 20_000, (JOBS_PER_S,), store="postgres",
                 servers=DURABLE, c_jobs=3000),
        Scenario("redis bg-submit", "bg-submit", 20_000, (JOBS_PER_S,), store="redis",
                 servers=DURABLE),
    ],
    "smoke": memory_scenarios(2000),
}
SUITE_DEFAULT_REPS = {"smoke": 1, "conns10k": 1}


def takes_part(server, scenario):
    """The baseline runs wherever ours does."""
    return server in scenario.servers or (server == "base" and "ours" in scenario.servers)


# --- the big suite: bench/huge.py's 10 M-job check, with the targets of docs/performance.md

BIG_JOBS = 10_000_000
BIG_TARGETS = [
    # (figure, key of huge.py's JSON, target, met?)
    ("submit jobs/s (whole run)", "submit_jobs_per_s", ">= 100,000", lambda v: v >= 100_000),
    ("RSS while full, MB", "rss_full_mb", "<= 300", lambda v: v <= 300),
    ("RSS peak over all phases, MB", "rss_peak_all_mb", "<= 300", lambda v: v <= 300),
    ("status right after kill -9 + restart, s", "status_after_restart_s", "<= 3",
     lambda v: v <= 3),
    ("rare function's job handed out, ms", "rare_job_latency_ms", "<= 10", lambda v: v <= 10),
    ("drain jobs/s, one function", "drain_jobs_per_s", "", None),
    ("jobs drained in exact order", "drained_in_order", "all of one function", None),
    ("SQLite file, GB", "db_gb", "", None),
]


def run_big(args):
    """The queue larger than memory: huge.py starts and kills its own server."""
    jobs = args.jobs or BIG_JOBS
    argv = [sys.executable, str(ROOT / "bench" / "huge.py"), "--jobs", str(jobs)]
    print(f"run.py: {shlex.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"run.py: huge.py failed ({proc.returncode}):\n{proc.stderr.strip()}")
        return 1
    result = json.loads(lines[-1])
    result["rss_peak_all_mb"] = max(result["rss_peak_mb"].values())
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"suite": "big", "command": shlex.join(argv),
                                "result": result}) + "\n")
    print_header("big", 1, machine_info(args.gearbench), [shlex.join(argv)], args.markdown)
    rows = [["figure", "gearmand.py", "target", "met"]]
    missed = 0
    for label, key, target, met in BIG_TARGETS:
        value = result.get(key)
        verdict = "" if met is None or value is None else ("yes" if met(value) else "NO")
        missed += verdict == "NO"
        rows.append([label, "-" if value is None else fmt(value), target, verdict])
    print_table(rows, args.markdown, numeric_from=1)
    return 1 if missed else 0


# --- servers -----------------------------------------------------------------

def server_unavailable(server):
    """Why a server cannot be run here, or None."""
    if server == "ours" and not (ROOT / "gearmand.py").exists():
        return f"{ROOT / 'gearmand.py'} does not exist"
    if server == "c" and not os.access(C_GEARMAND, os.X_OK):
        return f"{C_GEARMAND} is not installed"
    if server == "gear" and importlib.util.find_spec("gear") is None:
        return "the gear package is not importable (pip install gear)"
    if server == "base" and not (BASELINE / "gearmand.py").exists():
        return f"{BASELINE / 'gearmand.py'} does not exist"
    return None


def store_args(server, store, workdir, table):
    """gearmand options for a persistent queue (ours also takes C's names for them)."""
    if store == "memory":
        return []
    if store == "sqlite" and server in ("ours", "base"):
        return ["--queue-type=sqlite", f"--sqlite-db={workdir}/queue.db"]
    if store == "sqlite":
        return ["-q", "libsqlite3", "--libsqlite3-db", f"{workdir}/queue.db"]
    if store == "mysql":
        return ["-q", "MySQL", "--mysql-host", "127.0.0.1", "--mysql-user", "root",
                "--mysql-db", "test", "--mysql-table", table]
    if store == "postgres":
        return ["-q", "Postgres", "--libpq-conninfo", "host=127.0.0.1 dbname=test user=root",
                "--libpq-table", table]
    if store == "redis":
        return ["-q", "redis", "--redis-server", "127.0.0.1", "--redis-port", "6379",
                "--redis-prefix", table + "_"]
    raise ValueError(store)


def server_command(server, scenario, port, workdir, table):
    queue = store_args(server, scenario.store, workdir, table)
    if server in ("ours", "base"):
        home = ROOT if server == "ours" else BASELINE
        return ([sys.executable, str(home / "gearmand.py"), "-p", str(port), "-L", "127.0.0.1",
                 "-l", "none"] + queue)
    if server == "c":
        return ([C_GEARMAND, "-t", "1", "-p", str(port), "-L", "127.0.0.1", "-l", "none",
                 "-P", f"{workdir}/gearmand.pid"] + queue)
    if server == "gear":
        return [sys.executable, "-c", GEAR_SERVER_CODE, str(port)]
    raise ValueError(server)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=0.5):
    try:
        socket.create_connection((host, port), timeout).close()
        return True
    except OSError:
        return False


def start_server(argv, port, log_path):
    """Start a server and wait until its port accepts connections."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        if port_open("127.0.0.1", port):
            return proc
        time.sleep(0.02)
    stop_server(proc)
    raise RuntimeError("server did not accept connections within 30 s")


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_alive(pid):
    """True while pid runs; a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def stop_pid(pid):
    """Stop a server that is not our child (one started by the restart script)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pid_alive(pid):
            return


# The restart command of the "recover" scenario: kill -9 the server, wait until
# it is gone (as a zombie its sockets are already closed), start it again in the
# background and record its new PID for gearbench.
RESTART_SCRIPT = """\
old=$(cat {pid_file})
kill -9 "$old"
while [ -e /proc/$old ] && ! grep -q '^State:[[:space:]]*Z' /proc/$old/status 2>/dev/null; do
    sleep 0.01
done
{command} </dev/null >>{log} 2>&1 &
echo $! > {pid_file}
"""


def write_restart_script(workdir, argv, log_path):
    pid_file = workdir / "server.pid"
    script = workdir / "restart.sh"
    script.write_text(RESTART_SCRIPT.format(pid_file=shlex.quote(str(pid_file)),
                                            command=shlex.join(argv),
                                            log=shlex.quote(str(log_path))))
    return script, pid_file


def drop_table(store, table):
    """Best effort: remove the table a MySQL/Postgres run created (redis keys are drained)."""
    if store == "mysql" and shutil.which("mysql"):
        argv = ["mysql", "-h127.0.0.1", "-uroot", "test", "-e", f"DROP TABLE IF EXISTS {table}"]
    elif store == "postgres" and shutil.which("psql"):
        argv = ["psql", "-h", "127.0.0.1", "-U", "root", "-d", "test", "-qc",
                f"DROP TABLE IF EXISTS {table}"]
    else:
        return
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


# --- one run -----------------------------------------------------------------

def bench_command(gearbench, server, scenario, jobs, port, pid):
    jobs_args = ["--jobs", str(jobs)] if jobs else []   # conns has no jobs
    return ([sys.executable, str(gearbench), scenario.bench, "--port", str(port),
             "--server-pid", str(pid)] + jobs_args + ["--json", "--label", server]
            + list(scenario.bench_args) + SERVER_BENCH_ARGS.get(server, []))


def run_gearbench(argv):
    """Run gearbench; return (its JSON result or None, error message or None)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None, f"gearbench exited {proc.returncode} without JSON: {proc.stderr.strip()}"
    result = json.loads(lines[-1])
    if not result.get("ok"):
        return result, "; ".join(result.get("errors", [])) or proc.stderr.strip()
    if proc.returncode != 0:
        return result, f"gearbench exited {proc.returncode}: {proc.stderr.strip()}"
    return result, None


def run_once(gearbench, server, scenario, jobs, run_id):
    """Start a fresh server, run one gearbench scenario against it, stop it."""
    table = f"gb_{os.getpid()}_{run_id}"
    with tempfile.TemporaryDirectory(prefix="gearbench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        server_argv = server_command(server, scenario, port, workdir, table)
        log_path = workdir / "server.log"
        record = {"server": server, "scenario": scenario.name, "jobs": jobs,
                  "server_cmd": shlex.join(server_argv), "bench_cmd": None,
                  "ok": False, "error": None, "result": None}
        proc = None
        pid_file = None
        try:
            proc = start_server(server_argv, port, log_path)
            bench_argv = bench_command(gearbench, server, scenario, jobs, port, proc.pid)
            if scenario.restart:
                script, pid_file = write_restart_script(workdir, server_argv, log_path)
                pid_file.write_text(f"{proc.pid}\n")
                bench_argv += ["--restart-cmd", f"sh {script}", "--server-pid-file", str(pid_file)]
            record["bench_cmd"] = shlex.join(bench_argv)
            result, error = run_gearbench(bench_argv)
            record.update(result=result, error=error, ok=error is None)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            record["error"] = f"{type(e).__name__}: {e}"
        finally:
            if proc is not None:
                if pid_file is not None and proc.poll() is not None:
                    stop_pid(int(pid_file.read_text().split()[0]))
                stop_server(proc)
            drop_table(scenario.store, table)
        if record["error"]:
            record["server_log_tail"] = log_tail(log_path)
        return record


def log_tail(path, lines=15):
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- figures and the table ---------------------------------------------------

def metric_value(result, metric):
    if metric.key == "cpu_us_per_job":
        if not result.get("server_cpu_pct") or not result.get("jobs_per_s"):
            return None
        return result["server_cpu_pct"] * 1e4 / result["jobs_per_s"]
    if metric.key == "rss_per_job":
        if result.get("server_rss_kb") is None or result.get("server_rss_kb_before") is None:
            return None
        return (result["server_rss_kb"] - result["server_rss_kb_before"]) * 1024 / result["jobs"]
    return result.get(metric.key)


def median_of(records, metric):
    values = [metric_value(r["result"], metric) for r in records if r["ok"]]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:#.3g}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def build_table(scenarios, servers, records):
    """Rows of strings: scenario, figure, the median per server, ours/C, ours/gear."""
    ratio_with = [s for s in ("c", "gear", "base") if "ours" in servers and s in servers]
    header = (["scenario", "figure"] + [SERVER_TITLES[s] for s in servers]
              + [f"ours/{'C' if s == 'c' else s}" for s in ratio_with])
    rows = [header]
    for scenario in scenarios:
        name = scenario_label(scenario, servers)
        for metric in scenario.figures:
            medians = {}
            for server in servers:
                mine = [r for r in records if r["scenario"] == scenario.name
                        and r["server"] == server]
                medians[server] = median_of(mine, metric) if mine else None
            cells = [fmt(medians[s]) if takes_part(s, scenario) else "n/a" for s in servers]
            ratios = [ratio(medians["ours"], medians[s]) for s in ratio_with]
            label = metric.label + (" (lower is better)" if metric.lower_is_better else "")
            rows.append([name, label] + cells + ratios)
    return rows


def scenario_label(scenario, servers):
    if scenario.bench == "conns":
        return scenario.name
    jobs = f"{scenario.jobs:,} jobs"
    if scenario.c_jobs and "c" in servers:
        jobs += f", C {scenario.c_jobs:,}"
    return f"{scenario.name} ({jobs})"


def print_table(rows, markdown, numeric_from=2):
    if markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "|".join("---" if i < numeric_from else "---:"
                             for i in range(len(rows[0]))) + "|")
        for row in rows[1:]:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) if i < numeric_from else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


# --- machine information and the header -------------------------------------

def command_output(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(gearbench):
    try:
        gear_version = importlib.metadata.version("gear")
    except importlib.metadata.PackageNotFoundError:
        gear_version = None
    c_version = command_output([C_GEARMAND, "--version"]) if os.path.exists(C_GEARMAND) else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "gearmand (C)": c_version,
        "gear": gear_version,
        "gearmand.py commit": command_output(["git", "-C", str(ROOT), "describe", "--always",
                                              "--dirty"]),
        "gearbench": str(gearbench),
        "loadavg at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def print_header(suite, reps, info, commands, markdown):
    title = f"gearbench suite '{suite}', {reps} repetition(s), medians"
    if markdown:
        print(f"### {title}\n")
        for key, value in info.items():
            print(f"- {key}: {value}")
        print("\n```sh")
        print("\n".join(commands))
        print("```\n")
    else:
        print(f"# {title}")
        for key, value in info.items():
            print(f"# {key}: {value}")
        print("# commands (PORT, TMP, PID and TABLE are filled in per run):")
        for line in commands:
            print(f"#   {line}")
        print()


def command_templates(gearbench, scenarios, servers):
    lines = []
    for scenario in scenarios:
        for server in servers:
            if not takes_part(server, scenario):
                continue
            jobs = scenario.jobs_for(server)
            server_argv = server_command(server, scenario, "PORT", "TMP", "TABLE")
            bench_argv = bench_command(gearbench, server, scenario, jobs, "PORT", "PID")
            if scenario.restart:
                bench_argv += ["--restart-cmd", "sh TMP/restart.sh", "--server-pid-file",
                               "TMP/server.pid"]
            lines.append(shlex.join(server_argv))
            lines.append(shlex.join(bench_argv))
    return list(dict.fromkeys(lines))   # each distinct command once, in order


# --- main --------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark gearmand.py against C gearmand and "
                                            "gear.Server with gearbench.")
    p.add_argument("--suite", choices=sorted(list(SUITES) + ["big"]), default="smoke")
    p.add_argument("--reps", type=int, help="repetitions (default 3; smoke: 1)")
    p.add_argument("--jobs", type=int, help="jobs per run for every server (overrides the suite)")
    p.add_argument("--servers",
                   help="comma list among ours,c,gear (default: all that are available)")
    p.add_argument("--gearbench", type=Path, default=DEFAULT_GEARBENCH,
                   help=f"path to gearbench.py (default {DEFAULT_GEARBENCH})")
    p.add_argument("--out", help="append a JSON line for every run to this file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--baseline", type=Path,
                   help="a checkout of another gearmand.py commit (git worktree add DIR COMMIT),"
                        " run beside ours as server 'base' for before/after ratios")
    args = p.parse_args(argv)
    args.servers_given = args.servers is not None
    args.servers = (args.servers or ",".join(ALL_SERVERS)).split(",")
    if args.baseline:
        args.baseline = args.baseline.resolve()
        if "base" not in args.servers:
            args.servers.append("base")
    for s in args.servers:
        if s not in ALL_SERVERS + (("base",) if args.baseline else ()):
            p.error(f"unknown server {s!r} (choose among {', '.join(ALL_SERVERS)})")
    if args.reps is None:
        args.reps = SUITE_DEFAULT_REPS.get(args.suite, 3)
    return args


def usage_error(message):
    print(f"run.py: {message}", file=sys.stderr)
    sys.exit(2)


def choose_servers(args):
    """Servers to run: all requested ones; unavailable ones are an error only if named."""
    servers = []
    for server in args.servers:
        why = server_unavailable(server)
        if why is None:
            servers.append(server)
        elif args.servers_given:
            usage_error(f"cannot run {server}: {why}")
        else:
            print(f"run.py: skipping {server}: {why}", file=sys.stderr)
    return servers


def choose_scenarios(args):
    scenarios = []
    for scenario in SUITES[args.suite]:
        address = STORE_ADDRESSES.get(scenario.store)
        if address and not port_open(*address):
            print(f"run.py: skipping {scenario.name}: nothing listens on "
                  f"{address[0]}:{address[1]}", file=sys.stderr)
            continue
        if args.jobs:
            scenario = dataclasses.replace(scenario, jobs=args.jobs, c_jobs=None)
        scenarios.append(scenario)
    return scenarios


def raise_nofile_limit():
    """Servers inherit our RLIMIT_NOFILE; the conns suite needs thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def report_progress(record, rep, reps):
    prefix = f"{record['scenario']} [{record['server']} {rep}/{reps}]"
    if record["ok"]:
        r = record["result"]
        figures = " ".join(f"{k}={r[k]}" for k in ("jobs_per_s", "p50_ms", "server_kb_per_conn",
                                                   "queued_after_cmd_s", "server_cpu_pct",
                                                   "gen_cpu_pct") if r.get(k) is not None)
        print(f"{prefix} ok {figures}", file=sys.stderr, flush=True)
    else:
        print(f"{prefix} FAILED: {record['error']}", file=sys.stderr, flush=True)
        if record.get("server_log_tail"):
            print("  server log tail:\n    " + record["server_log_tail"].replace("\n", "\n    "),
                  file=sys.stderr)


def main(argv=None):
    global BASELINE
    args = parse_args(sys.argv[1:] if argv is None else argv)
    BASELINE = args.baseline
    if not args.gearbench.is_file():
        usage_error(f"gearbench not found at {args.gearbench} "
                    "(pass --gearbench PATH/TO/gearbench.py)")
    if args.suite == "big":
        return run_big(args)
    scenarios = choose_scenarios(args)
    servers = [s for s in choose_servers(args) if any(takes_part(s, sc) for sc in scenarios)]
    if not servers:
        usage_error("no server to benchmark (or none that takes part in this suite)")
    raise_nofile_limit()
    info = machine_info(args.gearbench)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"suite": args.suite, "reps": args.reps, "servers": servers,
                                "machine": info}) + "\n")

    records = []
    for scenario in scenarios:
        for rep in range(1, args.reps + 1):
            for server in servers:
                if not takes_part(server, scenario):
                    continue
                record = run_once(args.gearbench, server, scenario, scenario.jobs_for(server),
                                  len(records))
                record.update(suite=args.suite, rep=rep)
                records.append(record)
                report_progress(record, rep, args.reps)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")

    print_header(args.suite, args.reps, info,
                 command_templates(args.gearbench, scenarios, servers), args.markdown)
    print_table(build_table(scenarios, servers, records), args.markdown)
    failed = [r for r in records if not r["ok"]]
    if any(s == "gear" for s in servers):
        print("\nNote: gear.Server runs are made with gearbench --quickack (it lacks TCP_NODELAY).")
    if failed:
        print(f"\n{len(failed)} run(s) FAILED:")
        for r in failed:
            print(f"  {r['scenario']} [{r['server']} rep {r['rep']}]: {r['error']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
