"""TLS on the Gear port: --ssl --ssl-certificate --ssl-key --ssl-ca-file, and ours,
--ssl-verify-client. Certificates are made with the openssl CLI for each session.

Only Python clients are used: ssl-wrapped raw sockets (TLS 1.3) and `gear` (TLS 1.2).
Debian's libgearman and C gearmand are built without TLS, so `gearman -S` cannot
work here, and the C server accepts --ssl but then serves plain TCP: every test in
this file is skipped against C.
"""
import json
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import IMPL, ROOT, free_port, need_tool, unavailable, wait_until
from gearproto import (
    ECHO_REQ, ECHO_RES, Closed, can_do, expect, pack, read_to_eof, round_trip, send, submit,
    sync,
)

pytestmark = pytest.mark.skipif(
    IMPL == "c", reason="Debian's C gearmand is built without TLS: it accepts --ssl and "
                        "serves plain TCP")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_cert(directory, name, ca, extensions):
    # Python 3.13's default client context checks strictly (VERIFY_X509_STRICT): the
    # key identifiers, and the CA's key usage above, must be there.
    (directory / f"{name}.ext").write_text(extensions + "\nsubjectKeyIdentifier=hash\n"
                                           "authorityKeyIdentifier=keyid\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA with a server and a client certificate, and a second CA with a client
    certificate of its own."""
    need_tool("openssl")
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory, "ca")
    make_ca(directory, "otherca")
    make_cert(directory, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                         "extendedKeyUsage=serverAuth")
    make_cert(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    make_cert(directory, "stranger", "otherca", "extendedKeyUsage=clientAuth")
    return {name: str(directory / name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
             "stranger.pem", "stranger.key")}


def tls_options(certs, *extra):
    return ("--ssl", "--ssl-certificate", certs["server.pem"], "--ssl-key", certs["server.key"],
            "--ssl-ca-file", certs["ca.pem"], *extra)


def client_context(certs, cert=None):
    context = ssl.create_default_context(cafile=certs["ca.pem"])
    if cert:
        context.load_cert_chain(certs[cert + ".pem"], certs[cert + ".key"])
    return context


def tls_connect(server, context, timeout=5.0):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(sock, server_hostname="localhost")


def admin(sock, line, terminator=b".\n"):
    sock.sendall(line)
    data = b""
    while not data.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            raise Closed(f"closed after {data!r}")
        data += chunk
    return data


def refused(server, context):
    """True if the server will not talk to a client using `context`: the handshake
    fails, or (TLS 1.3, where the client finishes first) the first read does."""
    try:
        sock = tls_connect(server, context)
        sock.sendall(pack(ECHO_REQ, "who"))
        sock.settimeout(5)
        data = sock.recv(100)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    return data == b""


@pytest.fixture
def tls_server(make_server, certs):
    return make_server(*tls_options(certs), "--job-handle-prefix", "T")


def test_admin_status_over_tls(tls_server, certs):
    sock = tls_connect(tls_server, client_context(certs))
    assert sock.version() == "TLSv1.3"
    assert admin(sock, b"status\r\n") == b".\n"
    assert admin(sock, b"version\r\n", b"\n") == b"OK 1.1.20\n"
    submit(sock, "tls", "u", "x")
    assert admin(sock, b"status\r\n") == b"tls\t1\t0\t0\n.\n"


def test_job_round_trip_over_tls_raw(tls_server, certs):
    context = client_context(certs)
    worker = tls_connect(tls_server, context)
    can_do(worker, "rt")
    client = tls_connect(tls_server, context)
    round_trip(client, worker, "rt", "", "ping", "pong")


def test_large_replies_over_tls_read_late(tls_server, certs):
    """8 MiB of replies queued while the peer does not read: TLS partial writes."""
    sock = tls_connect(tls_server, client_context(certs))
    blobs = [bytes([65 + i]) * (512 * 1024 + i) for i in range(16)]
    for blob in blobs:
        send(sock, ECHO_REQ, blob)
    time.sleep(0.3)
    for blob in blobs:
        expect(sock, ECHO_RES, blob)
    sync(sock)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_job_round_trip_over_tls_with_gear(tls_server, certs):
    try:
        import gear
    except ImportError:
        unavailable("python package gear is not installed")
    keys = dict(ssl_key=certs["client.key"], ssl_cert=certs["client.pem"],
                ssl_ca=certs["ca.pem"])
    worker = gear.Worker("tls-worker")
    client = gear.Client("tls-client")
    try:
        worker.addServer("127.0.0.1", tls_server.port, **keys)
        client.addServer("127.0.0.1", tls_server.port, **keys)
        worker.waitForServer()
        client.waitForServer()
        worker.registerFunction("reverse")
        # The CAN_DO has no reply: wait until the server lists the worker.
        wait_until(lambda: b"reverse\t0\t0\t1\n" in admin(
            tls_connect(tls_server, client_context(certs)), b"status\r\n"),
            what="the worker's CAN_DO to reach the server")
        job = gear.TextJob("reverse", "hello over tls")
        client.submitJob(job)
        got = worker.getJob()
        assert got.arguments == b"hello over tls"
        got.sendWorkComplete(got.arguments[::-1])
        wait_until(lambda: job.complete, what="the job to complete")
        assert not job.failure
        assert job.data == ["slt revo olleh"]
    finally:
        worker.shutdown()
        client.shutdown()


@pytest.mark.parametrize("data", [pack(ECHO_REQ, "plain"), b"status\r\n",
                                  b"\x16\x03\x01\x02\x00\x01\x00"])
def test_plain_client_on_a_tls_port_is_closed(tls_server, certs, data):
    """Plain Gearman, plain admin, or half a ClientHello then silence: that peer is
    closed or ignored; a TLS client connected before, and a new one, are served."""
    context = client_context(certs)
    before = tls_connect(tls_server, context)
    sync(before)
    plain = tls_server.connect()
    plain.sendall(data)
    if data.startswith(b"\x16"):
        # a stalled handshake must not stall the server
        sync(before)
        sync(tls_connect(tls_server, context))
    else:
        # closed, after a TLS alert at most: never a Gearman or admin answer
        reply = read_to_eof(plain)
        assert reply == b"" or reply[:1] == b"\x15", reply
    plain.close()
    sync(before)
    sync(tls_connect(tls_server, context))
    assert tls_server.proc.poll() is None


def test_certificate_key_and_ca_default_to_the_environment(make_server, certs):
    """GEARMAND_SERVER_PEM, GEARMAND_SERVER_KEY and GEARMAND_CA_CERTIFICATE stand
    for --ssl-certificate, --ssl-key and --ssl-ca-file, as in C."""
    env = dict(os.environ, GEARMAND_SERVER_PEM=certs["server.pem"],
               GEARMAND_SERVER_KEY=certs["server.key"], GEARMAND_CA_CERTIFICATE=certs["ca.pem"])
    server = make_server("--ssl", "--ssl-verify-client", env=env)
    sock = tls_connect(server, client_context(certs, "client"))   # the server's certificate
    assert sock.getpeercert()["subject"] == ((("commonName", "server"),),)
    sync(sock)
    assert refused(server, client_context(certs, "stranger"))    # the CA's verdict
    # The options win over the environment.
    env.update(GEARMAND_SERVER_PEM=certs["client.pem"], GEARMAND_SERVER_KEY=certs["client.key"])
    server = make_server(*tls_options(certs), env=env)
    sync(tls_connect(server, client_context(certs)))


@pytest.fixture
def verifying_server(make_server, certs):
    return make_server(*tls_options(certs, "--ssl-verify-client"))


def test_verify_client_refuses_a_client_without_a_certificate(verifying_server, certs):
    good = tls_connect(verifying_server, client_context(certs, "client"))
    sync(good)
    assert refused(verifying_server, client_context(certs))
    sync(good)


def test_verify_client_refuses_a_certificate_from_another_ca(verifying_server, certs):
    good = tls_connect(verifying_server, client_context(certs, "client"))
    sync(good)
    assert refused(verifying_server, client_context(certs, "stranger"))
    sync(good)


def test_verify_client_accepts_a_good_certificate(verifying_server, certs):
    sock = tls_connect(verifying_server, client_context(certs, "client"))
    assert admin(sock, b"status\r\n") == b".\n"
    sync(sock)
    # TLS 1.2 as well (gear's version)
    context = client_context(certs, "client")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    sock12 = tls_connect(verifying_server, context)
    assert sock12.version() == "TLSv1.2"
    sync(sock12)


def test_without_verify_client_a_certificate_is_not_required(tls_server, certs):
    assert not refused(tls_server, client_context(certs))
    assert not refused(tls_server, client_context(certs, "stranger"))


def start_failure(tmp_path, *args, env=None):
    """Start with `args`, which must fail: the one line it prints (exit status 1)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "gearmand.py"), "-p", str(free_port()), "-L", "127.0.0.1",
         "-l", "stderr", "-P", str(tmp_path / "pid"), *args],
        capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_certificate_names_the_file_and_the_option(tmp_path, certs):
    """Before: `cannot load TLS certificate, key or CA file: [Errno 2] No such file or
    directory`, naming neither the file nor the option."""
    missing = tmp_path / "missing.pem"
    assert start_failure(tmp_path, "--ssl", "--ssl-certificate", str(missing), "--ssl-key",
                         certs["server.key"]) == (
        f"gearmand: cannot read the TLS certificate {missing} (--ssl-certificate): "
        f"No such file or directory")


def test_missing_default_key_names_the_default(tmp_path, certs):
    env = {k: v for k, v in os.environ.items() if k != "GEARMAND_SERVER_KEY"}
    assert start_failure(tmp_path, "--ssl", "--ssl-certificate", certs["server.pem"],
                         env=env) == (
        "gearmand: cannot read the TLS key /etc/ssl/certs/gearmand.key (the default of "
        "--ssl-key): No such file or directory")
    env["GEARMAND_SERVER_KEY"] = str(tmp_path / "env.key")
    assert start_failure(tmp_path, "--ssl", "--ssl-certificate", certs["server.pem"],
                         env=env) == (
        f"gearmand: cannot read the TLS key {tmp_path / 'env.key'} (GEARMAND_SERVER_KEY, the "
        f"default of --ssl-key): No such file or directory")


def test_a_key_that_is_not_the_certificates_names_both(tmp_path, certs):
    line = start_failure(tmp_path, "--ssl", "--ssl-certificate", certs["server.pem"],
                         "--ssl-key", certs["client.key"])
    assert line.startswith(f"gearmand: cannot load the TLS certificate {certs['server.pem']} "
                           f"(--ssl-certificate) with the TLS key {certs['client.key']} "
                           f"(--ssl-key): "), line


def test_verify_client_without_ssl_is_refused(tmp_path, certs):
    """It used to start a plaintext server that verified nothing."""
    assert start_failure(tmp_path, "--ssl-verify-client", "--ssl-ca-file", certs["ca.pem"]) \
        == "gearmand: --ssl-verify-client needs --ssl: without it every port serves plain TCP"


# --- the HTTP port under --ssl (#17) -----------------------------------------------

def curl(*args):
    """curl's exit status and body (status code on the last line)."""
    proc = subprocess.run([need_tool("curl"), "-sS", "--max-time", "10",
                           "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=30)
    return proc.returncode, proc.stdout


@pytest.fixture
def https_server(make_server, certs):
    http_port = free_port()
    server = make_server(*tls_options(certs, "--ssl-verify-client"), "--http-port",
                         str(http_port), "--verbose", "WARNING")
    server.http_port = http_port
    return server


def test_http_port_speaks_https_with_client_verification(https_server, certs):
    """Before, the HTTP port answered plain HTTP to anyone, job submission included,
    though --ssl-verify-client was given."""
    port = https_server.http_port
    url = f"https://localhost:{port}"
    client = ("--cacert", certs["ca.pem"], "--cert", certs["client.pem"], "--key",
              certs["client.key"], "--resolve", f"localhost:{port}:127.0.0.1")
    status, out = curl(*client, url + "/status")
    assert status == 0 and out.endswith("\n200"), out
    assert json.loads(out.rsplit("\n", 1)[0])["pid"] == https_server.pid
    status, out = curl(*client, "-H", "X-Gearman-Background: true", "--data-binary", "x",
                       url + "/over-https")
    assert status == 0 and out.endswith("\n200"), out
    # plain HTTP, no client certificate, another CA's certificate: no answer, no job
    status, out = curl(f"http://127.0.0.1:{port}/status")
    assert status != 0 and not out.startswith("{"), out
    status, out = curl("--cacert", certs["ca.pem"], "--resolve", f"localhost:{port}:127.0.0.1",
                       url + "/status")
    assert status != 0, out
    status, out = curl("--cacert", certs["ca.pem"], "--cert", certs["stranger.pem"], "--key",
                       certs["stranger.key"], "--resolve", f"localhost:{port}:127.0.0.1",
                       "-H", "X-Gearman-Background: true", "--data-binary", "x",
                       url + "/stranger")
    assert status != 0, out
    sock = tls_connect(https_server, client_context(certs, "client"))
    assert admin(sock, b"status\r\n") == b"over-https\t1\t0\t0\n.\n"
    # each refusal is in the log (at WARNING), saying who and why
    refusals = [line for line in https_server.log().splitlines()
                if "TLS handshake failed" in line]
    assert len(refusals) >= 2 and all(line.startswith("WARNING ") for line in refusals)
    assert any("CERTIFICATE" in line.upper() for line in refusals), refusals
