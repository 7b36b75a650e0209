"""The three ways gearmand.py is meant to be used, each with every backend in extras/
(issue #12): a plain copy run as `python gearmand.py`; the layout `pip install` makes
(module gearmand, package gearmand_extras); and vendored in a project's package
(myproj/gearmand.py, myproj/extras/), imported or run with `python -m myproj.gearmand`.

The vendored copies run with a top-level `gearmand` on the path that refuses to be
imported: a project that vendors gearmand.py has none (here pip may have installed
one), and a vendored server must never load a second copy of itself, whose StoreError
the server would not catch.
"""
import ctypes.util
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import gearproto as gp
from conftest import IMPL, ROOT, Server, unavailable, wait_for_port
from storetools import MYSQL, POSTGRES

pytestmark = pytest.mark.skipif(IMPL == "c", reason="how gearmand.py itself is installed")

SHADOW = 'raise ImportError("a vendored gearmand.py imported the top-level gearmand")\n'

# way: (directory the command runs in, argv before the server's options)
WAYS = {
    "copy": ("copy", ["gearmand.py"]),
    "pip": ("site", ["-c", "import sys, gearmand; sys.exit(gearmand.main())"]),
    "vendored": ("project", ["-c", "import sys\nfrom myproj import gearmand\n"
                                   "sys.exit(gearmand.main(sys.argv[1:]))"]),
    "vendored -m": ("project", ["-m", "myproj.gearmand"]),
}


def lay_out(tmp_path):
    """The three installations of this checkout's gearmand.py and extras/."""
    extras = [p for p in (ROOT / "extras").iterdir() if p.suffix == ".py"]
    for target in (tmp_path / "copy" / "extras", tmp_path / "site" / "gearmand_extras",
                   tmp_path / "project" / "myproj" / "extras", tmp_path / "shadow"):
        target.mkdir(parents=True, exist_ok=True)
    for directory in (tmp_path / "copy", tmp_path / "site", tmp_path / "project" / "myproj"):
        shutil.copy(ROOT / "gearmand.py", directory / "gearmand.py")
    for directory in (tmp_path / "copy" / "extras", tmp_path / "site" / "gearmand_extras",
                      tmp_path / "project" / "myproj" / "extras"):
        for path in extras:
            shutil.copy(path, directory / path.name)
    (tmp_path / "project" / "myproj" / "__init__.py").write_text("")
    (tmp_path / "shadow" / "gearmand.py").write_text(SHADOW)


class Installed(Server):
    """A server started as `argv` (then the server's options) in `cwd`."""

    def __init__(self, tmp_path, argv, cwd, args, env):
        super().__init__(tmp_path, args, env=env)
        self.argv, self.cwd = argv, cwd

    def start(self, expect_ready=True):
        command = [*self.argv, "-p", str(self.port), "-L", "127.0.0.1", "-l", "stderr",
                   "-P", str(self.workdir / f"server-{self.port}.pid"), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, env=self.env)
        if expect_ready:
            if not wait_for_port(self.port, self.proc):
                raise AssertionError(f"{self.argv}: the server did not start: {self.log()}")
            self.admin("version")
        return self


def need_driver(module):
    if importlib.util.find_spec(module) is None:
        unavailable(f"{module} is not installed")


def redis_backend(tmp_path, tag):
    need_driver("redis")
    import redis
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        unavailable(f"Redis is not reachable on 127.0.0.1:6379: {error}")
    return ("-q", "redis", "--redis-server", "127.0.0.1", "--redis-port", "6379",
            "--redis-prefix", tag), None


def mysql_backend(tmp_path, tag):
    MYSQL.require()
    return MYSQL.options(tag), lambda: MYSQL.drop_table(tag)


def postgres_backend(tmp_path, tag):
    POSTGRES.require()
    return POSTGRES.options(tag), lambda: POSTGRES.drop_table(tag)


def memcached_backend(tmp_path, tag):
    need_driver("pymemcache")
    from pymemcache.client.base import Client
    try:
        Client(("127.0.0.1", 11211), connect_timeout=2, timeout=2).version()
    except Exception as error:  # noqa: BLE001 - any failure means no memcached here
        unavailable(f"memcached is not reachable on 127.0.0.1:11211: {error}")
    return ("-q", "libmemcached", "--libmemcached-servers", "127.0.0.1:11211",
            "--libmemcached-prefix", tag), None


def tokyocabinet_backend(tmp_path, tag):
    if not ctypes.util.find_library("tokyocabinet"):
        unavailable("libtokyocabinet is not installed (apt-get install libtokyocabinet9)")
    return ("-q", "libtokyocabinet", f"--libtokyocabinet-file={tmp_path / (tag + '.tch')}"), None


BACKENDS = {"redis": redis_backend, "mysql": mysql_backend, "postgres": postgres_backend,
            "memcached": memcached_backend, "tokyocabinet": tokyocabinet_backend}


@pytest.fixture
def servers(tmp_path):
    """start(argv, cwd, *options, env=..., expect_ready=True) -> a started Installed."""
    started = []

    def start(argv, cwd, *args, env=None, expect_ready=True):
        server = Installed(tmp_path, argv, cwd, args, env)
        started.append(server)
        return server.start(expect_ready)
    yield start
    for server in started:
        server.kill()


@pytest.fixture
def installed(tmp_path, servers):
    """start(way, *options, expect_ready=True): a server started one of the WAYS."""
    lay_out(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))

    def start(way, *args, expect_ready=True):
        directory, argv = WAYS[way]
        return servers([sys.executable, *argv], tmp_path / directory, *args, env=env,
                       expect_ready=expect_ready)
    return start


def serves_a_stored_job(server, function):
    """A background job is stored (JOB_CREATED), runs, and the server stops cleanly."""
    with server.connect() as client:
        ptype, handle = gp.call(client, gp.SUBMIT_JOB_BG, function, b"u1", b"payload")
        assert ptype == gp.JOB_CREATED, (gp.show((ptype, handle)), server.log())
    with server.connect() as worker:
        gp.can_do(worker, function)
        assert gp.grab(worker) == (gp.JOB_ASSIGN, handle + b"\0" + function + b"\0payload")
        gp.complete(worker, handle)
        gp.sync(worker)
    assert server.status()[function.decode()] == (0, 0, 0)
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("way", WAYS)
def test_every_backend_stores_and_runs_a_job_every_way(installed, tmp_path, way, backend):
    tag = "gv" + secrets.token_hex(4)
    options, cleanup = BACKENDS[backend](tmp_path, tag)
    try:
        serves_a_stored_job(installed(way, *options), tag.encode())
    finally:
        if cleanup:
            cleanup()


@pytest.mark.parametrize("way", WAYS)
def test_a_backend_error_is_one_line_every_way(installed, tmp_path, way):
    """The backend raises the StoreError of the very module that runs the server: a
    second copy of gearmand.py would raise one the server does not catch."""
    options, _ = tokyocabinet_backend(tmp_path, "unused")
    missing = tmp_path / "no-such-directory" / "queue.tch"
    server = installed(way, "-q", "libtokyocabinet", f"--libtokyocabinet-file={missing}",
                       expect_ready=False)
    assert server.proc.wait(20) == 1
    assert server.log().strip().split("\n") == [
        f"gearmand: libtokyocabinet queue: cannot open {missing}: No such file or directory"]


@pytest.mark.parametrize("way", ["vendored", "vendored -m"])
def test_a_backend_missing_beside_a_vendored_copy_says_so(installed, tmp_path, way):
    (tmp_path / "project" / "myproj" / "extras" / "tokyocabinet.py").unlink()
    options, _ = tokyocabinet_backend(tmp_path, "unused")
    server = installed(way, *options, expect_ready=False)
    assert server.proc.wait(20) == 1
    assert server.log().strip() == (
        "gearmand: queue type libtokyocabinet needs extras/tokyocabinet.py next to "
        "gearmand.py: copy it there, or pip install 'gearmand-py[all]'")


def test_a_backend_that_does_not_load_is_blamed_not_its_driver(installed, tmp_path):
    """extras/ from a release whose backends import the top-level gearmand, vendored:
    the driver is fine, the backend is what does not load."""
    need_driver("redis")
    backend = tmp_path / "project" / "myproj" / "extras" / "redis.py"
    backend.write_text("from gearmand import Store\n" + backend.read_text())
    server = installed("vendored", "-q", "redis", expect_ready=False)
    assert server.proc.wait(20) == 1
    assert server.log().strip() == (
        "gearmand: queue type redis: cannot load myproj.extras.redis (a vendored gearmand.py "
        "imported the top-level gearmand): extras/ and gearmand.py must come from the same "
        "release")


def test_the_wheel_installs_and_runs_with_its_backends(tmp_path, servers):
    """python -m build makes the sdist and, from it, the wheel, without a warning; the
    wheel installs in a fresh virtual environment (no network: --no-index) and runs,
    its backends as gearmand_extras."""
    if importlib.util.find_spec("build") is None:
        unavailable("build is not installed (pip install build)")
    if int(importlib.metadata.version("setuptools").split(".")[0]) < 77:
        unavailable("setuptools>=77 is not installed (pip install 'setuptools>=77')")
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT / "extras", source / "extras",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("gearmand.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist,
                            source], capture_output=True, text=True, env=env, timeout=120)
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "warning" not in output.lower(), output
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "gearmand.py", "pyproject.toml", "extras/__init__.py",
            *(f"extras/{backend}.py" for backend in BACKENDS)} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("gearmand_py-0.1.0.dist-info/METADATA").decode()
    assert {"gearmand.py", "gearmand_extras/__init__.py",
            "gearmand_py-0.1.0.dist-info/licenses/LICENSE",
            *(f"gearmand_extras/{backend}.py" for backend in BACKENDS)} <= names
    assert "License-Expression: BSD-3-Clause" in metadata.split("\n")

    # A fresh environment holding the wheel alone: it runs, and names the driver it lacks.
    def venv(name, *options):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", *options,
                        tmp_path / name], check=True, timeout=60)
        python = tmp_path / name / "bin" / "python"
        subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                        "--no-index", "--no-deps", "--ignore-installed", wheel],
                       check=True, timeout=60)
        return python, tmp_path / name / "bin" / "gearmand-py"
    python, command = venv("bare")
    version = subprocess.run([command, "-V"], capture_output=True, text=True, timeout=20)
    assert version.stdout.startswith("\ngearmand 1.1.20 - gearmand.py 0.1.0"), version
    missing = subprocess.run([command, "-q", "redis"], capture_output=True, text=True, timeout=20)
    assert (missing.returncode, missing.stderr) == (
        1, "gearmand: queue type redis needs redis: pip install redis (or, installed with pip, "
           "pip install 'gearmand-py[redis]')\n")

    # With the drivers of this machine: -q redis through the wheel's gearmand_extras.
    options, _ = redis_backend(tmp_path, "gv" + secrets.token_hex(4))
    python, command = venv("drivers", "--system-site-packages")
    where = subprocess.run([python, "-c", "import gearmand, gearmand_extras.redis as r; "
                            "print(gearmand.__file__); print(r.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True, timeout=20)
    assert all(path.startswith(str(tmp_path / "drivers")) for path in where.stdout.split()), where
    serves_a_stored_job(servers([command], tmp_path, *options), options[-1].encode())
