"""Starting the server as users do: a plain copy of the file, `python -m gearmand`,
config files, and backends that are chosen but cannot be loaded."""
import shutil
import socket
import subprocess
import sys
import time

import pytest

import gearproto as gp

from conftest import (IMPL, ROOT, Server, admin_reply_complete, free_port, recv_until,
                      unavailable, wait_for_port, wait_until)

pytestmark = pytest.mark.skipif(IMPL == "c", reason="how gearmand.py itself is started")


def run(args, cwd, python=(sys.executable,)):
    return subprocess.run(list(python) + args, cwd=cwd, capture_output=True, timeout=60)


def one_line(result):
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    return lines[0]


def test_a_plain_copy_of_the_file_serves(tmp_path):
    shutil.copy(ROOT / "gearmand.py", tmp_path / "gearmand.py")
    server = Server(tmp_path, ["--queue-type=sqlite", f"--sqlite-db={tmp_path / 'q.db'}"])
    server.command = lambda: [sys.executable, str(tmp_path / "gearmand.py"), "-p",
                              str(server.port), "-L", "127.0.0.1", "-l", "stderr",
                              "--queue-type=sqlite", f"--sqlite-db={tmp_path / 'q.db'}"]
    try:
        server.start()
        assert server.admin("version") == b"OK 1.1.20\n"
    finally:
        server.kill()


def test_python_dash_m_gearmand_works_from_the_files_directory(tmp_path):
    shutil.copy(ROOT / "gearmand.py", tmp_path / "gearmand.py")
    result = run(["-m", "gearmand", "-V"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.decode().startswith("\ngearmand 1.1.20 - gearmand.py ")


def test_a_backend_missing_next_to_a_plain_copy_is_one_line(tmp_path):
    """The driver is there, the backend module is not (no extras/ beside the copy, and
    python -S hides an installed gearmand_extras)."""
    shutil.copy(ROOT / "gearmand.py", tmp_path / "gearmand.py")
    (tmp_path / "drivers" / "redis").mkdir(parents=True)
    (tmp_path / "drivers" / "redis" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-S", "gearmand.py", "-q", "redis", "-L", "127.0.0.1",
         "-p", str(free_port())], cwd=tmp_path, capture_output=True, timeout=20,
        env={"PYTHONPATH": str(tmp_path / "drivers")})
    assert result.returncode == 1
    assert one_line(result) == ("gearmand: queue type redis needs extras/redis.py next to "
                                "gearmand.py: copy it there, or pip install 'gearmand-py[redis]'")


@pytest.mark.parametrize("failure", [
    'raise ImportError("libpq.so.5: cannot open shared object file")',
    "from redis.backoff import ExponentialBackoff",   # redis-py 3.x has no redis.backoff
])
def test_a_driver_that_does_not_load_is_one_line(tmp_path, failure):
    """The driver is installed but its import fails (a missing system library, a
    release too old for the backend): one line, exit 1, no traceback."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text(failure + "\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "gearmand.py"), "-q", "redis", "-L", "127.0.0.1",
         "-p", str(free_port())], cwd=tmp_path, capture_output=True, timeout=20,
        env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("gearmand: queue type redis: cannot load its driver (")
    # the plain driver package for a copied file, the extra for a pip-installed server
    assert line.endswith("): pip install --upgrade redis (or, installed with pip, "
                         "pip install --upgrade 'gearmand-py[redis]')")


@pytest.mark.parametrize("queue_type, message", [
    ("MySQL", "queue type MySQL needs mysql-connector-python: pip install "
              "mysql-connector-python (or, installed with pip, pip install 'gearmand-py[mysql]')"),
    ("libdrizzle", "queue type MySQL needs mysql-connector-python: pip install "
                   "mysql-connector-python (or, installed with pip, "
                   "pip install 'gearmand-py[mysql]')"),
    ("Postgres", "queue type Postgres needs psycopg2-binary: pip install psycopg2-binary "
                 "(or, installed with pip, pip install 'gearmand-py[postgres]')"),
    ("libmemcached", "queue type libmemcached needs pymemcache: pip install pymemcache "
                     "(or, installed with pip, pip install 'gearmand-py[memcached]')"),
    ("REDIS", "queue type redis needs redis: pip install redis "
              "(or, installed with pip, pip install 'gearmand-py[redis]')"),
])
def test_a_missing_driver_is_one_line_naming_the_package_and_the_extra(tmp_path, queue_type,
                                                                       message):
    """A copied gearmand.py has no extras to install: the line names the driver's
    own package first."""
    # python -S leaves site-packages, and so every driver, out of reach.
    result = run([str(ROOT / "gearmand.py"), "-q", queue_type, "-p", str(free_port())],
                 tmp_path, python=(sys.executable, "-S"))
    assert result.returncode == 1
    assert one_line(result) == "gearmand: " + message


def test_drivers_are_imported_only_when_their_queue_type_is_chosen(tmp_path):
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("the redis driver is not installed")
    script = ("import sys, gearmand\n"
              "drivers = ('mysql', 'psycopg2', 'pymemcache', 'redis')\n"
              "gearmand.store_class('sqlite')\n"
              "print(sorted(m for m in drivers if m in sys.modules))\n"
              "gearmand.store_class('redis')\n"
              "print(sorted(m for m in drivers if m in sys.modules))\n")
    result = run(["-c", script], ROOT)
    assert result.stdout.decode().split("\n")[:2] == ["[]", "['redis']"], result.stderr


def test_unknown_queue_type_is_cs_message_and_the_valid_types(tmp_path):
    result = run([str(ROOT / "gearmand.py"), "-q", "mysql2", "-p", str(free_port())], tmp_path)
    assert result.returncode == 1
    assert one_line(result) == (
        "gearmand: Error while initializing the queue : mysql2 (queue types: builtin; "
        "libsqlite3, sqlite; MySQL, libdrizzle; Postgres, postgresql, libpq; libmemcached, "
        "memcached; redis; libtokyocabinet, tokyocabinet)")


def test_config_file_options_and_command_line_precedence(tmp_path):
    config = tmp_path / "gearmand.conf"
    config.write_text("--job-handle-prefix=FROMFILE\n--verbose=NOTICE --port=1\n")
    for form in (["--config-file", str(config)], [f"--config-file={config}"], [f"@{config}"]):
        server = Server(tmp_path, form)   # the command line's -p wins over the file's --port
        try:
            server.start()
            assert server.admin("verbose") == b"OK NOTICE\n"
            with server.connect() as sock:
                sock.sendall(gp.pack(gp.SUBMIT_JOB_BG, "f", "u", "x"))
                assert sock.recv(100).endswith(b"FROMFILE:1")
        finally:
            server.kill()


def test_missing_explicit_config_file_is_an_error(tmp_path):
    result = run([str(ROOT / "gearmand.py"), "--config-file", str(tmp_path / "nope.conf")],
                 tmp_path)
    assert result.returncode == 1
    assert one_line(result) == "gearmand: Could not open configuration file."


@pytest.mark.parametrize("args, message", [
    (["-j", "many"], "argument -j/--job-retries: invalid int value: 'many'"),
    (["--hashtable-buckets", "0"], "hashtable-buckets has to be greater than 0"),
    (["-r", "gopher"], "Unknown protocol module : gopher"),
    (["-v"], "Option -v has been deprecated, please use --verbose"),
    (["stray"], "unrecognised option 'stray'"),
    (["--job-handle-prefix", "x" * 64], "--job-handle-prefix must be shorter than 64 characters"),
    (["-p", "99999"], "port (-p) 99999 is out of range: a port is 1-65535"),
    (["-p", "0"], "port (-p) 0 is out of range: a port is 1-65535"),
    (["--http-port", "70000"], "--http-port 70000 is out of range: a port is 1-65535"),
    (["--ssl-verify-client"], "--ssl-verify-client needs --ssl: without it every port serves "
                              "plain TCP"),
    (["--ssl-ca-file", "/etc/hostname"], "--ssl-ca-file needs --ssl: without it every port "
                                         "serves plain TCP"),
])
def test_bad_values_are_one_line_and_exit_1(tmp_path, args, message):
    result = run([str(ROOT / "gearmand.py"), "-p", str(free_port())] + args, tmp_path)
    assert result.returncode == 1
    assert one_line(result) == "gearmand: " + message


def test_check_args_validates_and_exits_0(tmp_path):
    result = run([str(ROOT / "gearmand.py"), "--check-args", "-p", "4730"], tmp_path)
    assert result.returncode == 0 and result.stderr == b""


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def workers_seen_from(host, port):
    with socket.create_connection((host, port), 5) as sock:
        sock.sendall(b"workers\r\n")
        return recv_until(sock, admin_reply_complete)


@pytest.mark.parametrize("listen", [[], ["-L", "127.0.0.1", "-L", "::1"]],
                         ids=["every address by default", "-L twice"])
def test_listens_on_ipv4_and_ipv6(tmp_path, listen):
    if not ipv6_loopback():
        unavailable("no IPv6 loopback here")
    with socket.socket(socket.AF_INET6) as probe:       # a port free on both families
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "gearmand.py"), "-p", str(port),
                             "-l", "none", "-P", str(tmp_path / "pid")] + listen)
    try:
        assert wait_for_port(port, proc)
        assert workers_seen_from("127.0.0.1", port).endswith(b" 127.0.0.1 - :\n.\n")
        assert workers_seen_from("::1", port).endswith(b" ::1 - :\n.\n")
    finally:
        proc.kill()
        proc.wait()


# --- ports and --help ------------------------------------------------------------------

def test_a_port_another_server_listens_on_fails_at_once(tmp_path):
    """C (and we, before) retried for 20 silent seconds and then said one line."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = run([str(ROOT / "gearmand.py"), "-L", "127.0.0.1", "-p", str(port),
                      "-l", "stderr", "-P", str(tmp_path / "pid")], tmp_path)
        assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert one_line(result) == (f"gearmand: Could not listen on port {port}: another process "
                                f"is listening on it")


def test_a_busy_port_is_retried_and_says_so(tmp_path):
    """A port bound by a socket that does not listen (a server still closing) is
    retried, and the server says so at once instead of waiting in silence."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))         # no SO_REUSEADDR, no listen(): busy, not serving
    port = holder.getsockname()[1]
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "gearmand.py"), "-L", "127.0.0.1",
                                 "-p", str(port), "-l", "stderr", "-P", str(tmp_path / "pid")],
                                stderr=stderr)
    try:
        wait_until(lambda: "busy" in log.read_text(), what="the busy line")
        assert log.read_text().splitlines()[0] == (
            f"gearmand: 127.0.0.1 port {port} is busy (Address already in use); "
            f"retrying for up to 20 s")
        assert proc.poll() is None
        holder.close()
        assert wait_for_port(port, proc)
    finally:
        holder.close()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args", [["--http-port", "{port}"], ["-r", "http"]],
                         ids=["--http-port", "-r http (8080)"])
def test_http_port_equal_to_the_gearman_port_is_refused_at_once(tmp_path, args):
    port = 8080 if args == ["-r", "http"] else free_port()
    started = time.monotonic()
    result = run([str(ROOT / "gearmand.py"), "-L", "127.0.0.1", "-p", str(port)]
                 + [arg.format(port=port) for arg in args], tmp_path)
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert one_line(result) == (f"gearmand: --http-port {port} is the Gearman port (-p) too: "
                                f"give them different ports")


def test_help_shows_the_defaults(tmp_path):
    result = run([str(ROOT / "gearmand.py"), "--help"], tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.decode().split())    # argparse wraps lines
    for default in ("(default: 4730)", "(default: /var/log/gearmand.log)",
                    "(default: /var/gearmand.pid)", "(default: 32)", "(default: ERROR)",
                    "(default: gearman_queue)", "(default: queue)",
                    "(default: /etc/ssl/certs/gearmand.pem)",
                    "(default: /etc/ssl/certs/gearmand.key)",
                    "(default: /etc/ssl/certs/gearmand-ca.pem)", "(default: 991)",
                    "(default: builtin)", "(default: /etc/gearmand.conf)"):
        assert default in help_text, default
    # every valid queue type is named
    for name in ("libsqlite3", "MySQL", "Postgres", "libmemcached", "redis", "libtokyocabinet"):
        assert name in help_text
