"""The HTTP interface (--http-port, -r http): C gearmand's job submission over
HTTP, plus our HTTP/1.1 keep-alive, request limits, /metrics, /status and the page.

Tests marked `ours_only` cover behaviour C's module does not have (it answers
HTTP/1.0, one request per connection); the others also pass against C with
GEARMAND_TEST_IMPL=c, and test_c_and_ours_agree compares both in every run.
"""
import http.client
import json
import re
import socket
import sqlite3
import time

import pytest

import gearproto as gp
from conftest import IMPL, free_port, unavailable, wait_for_port, wait_until

ours_only = pytest.mark.skipif(IMPL == "c", reason="gearmand.py's HTTP/1.1 interface; "
                                                   "C's HTTP module lacks it")
HANDLE = re.compile(rb"^H:[^:]+:\d+$")


# --- helpers -----------------------------------------------------------------

def start(make_server, *options, impl=IMPL, c_style=False):
    """A server with an HTTP listener; `c_style` opens it as C must (-r http)."""
    port = free_port()
    flags = ("-r", "http", "--http-port", str(port)) if c_style or impl == "c" \
        else ("--http-port", str(port))
    server = make_server(*flags, *options, impl=impl)
    assert wait_for_port(port, server.proc), server.log()
    server.http_port = port
    return server


def connection(server):
    return http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)


def request(server, method, path, body=None, headers=None, conn=None):
    """One request -> (status, headers {lowercase: value}, body). A new connection
    unless `conn` is given (C closes after every response)."""
    own = conn is None
    conn = conn or connection(server)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return read(conn.getresponse())
    finally:
        if own:
            conn.close()


def read(response):
    headers = {name.lower(): value for name, value in response.getheaders()}
    return response.status, headers, response.read()


def gearman_headers(headers):
    return {k: v for k, v in headers.items() if k.startswith("x-gearman-")}


BACKGROUND = {"X-Gearman-Background": "true"}


def worker(server, *functions):
    sock = server.connect()
    gp.can_do(sock, *functions)
    return sock


def grab(sock):
    """GRAB_JOB -> (handle, function, data); asserts a job was assigned."""
    ptype, body = gp.grab(sock)
    assert ptype == gp.JOB_ASSIGN, gp.show((ptype, body))
    handle, function, data = body.split(b"\0", 2)
    return handle, function, data


def wait_queued(server, function, total):
    wait_until(lambda: server.status().get(function, (0,))[0] == total,
               what=f"{total} jobs of {function} in status")


def requested(server, sock, method, path, body=None):
    """`method` /function on a new HTTP connection; once the job is queued, `sock` (a
    worker for it) takes it. Returns (the connection, (handle, function, data))."""
    http_conn = connection(server)
    http_conn.request(method, path, body=body)
    wait_queued(server, path[1:], 1)
    return http_conn, grab(sock)


class Raw:
    """A raw HTTP connection: send exact bytes, read responses one by one."""

    def __init__(self, server):
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), 10)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)
        return self

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed; unread {self.buffer!r}")
        self.buffer += chunk

    def response(self, head=False):
        """-> (status line, {lowercase header: value}, body)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.strip().decode()
        size = 0 if head else int(headers.get("content-length", 0))
        while len(self.buffer) < size:
            self._fill()
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return lines[0].decode(), headers, body

    def closed(self):
        """True once the server closes (EOF, nothing more sent)."""
        return not self.buffer and gp.closed(self.sock)

    def close(self):
        self.sock.close()


def metric_samples(server, conn=None):
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        unavailable("prometheus_client is not installed (pip install prometheus_client)")
    status, headers, body = request(server, "GET", "/metrics", conn=conn)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def function_samples(samples, name):
    """{function label: value} of one per-function metric."""
    return {dict(labels)["function"]: value
            for (metric, labels), value in samples.items() if metric == name}


# --- C-compatible good paths (run against C too with GEARMAND_TEST_IMPL=c) ----

def test_background_post_answers_job_created_and_queues_the_job(make_server):
    server = start(make_server)
    data = b"bin\0ary\xff\0data"
    status, headers, body = request(server, "POST", "/f", data, BACKGROUND)
    assert status == 200
    assert body == b""
    assert headers["x-gearman-command"] == "JOB_CREATED"
    handle = headers["x-gearman-job-handle"].encode()
    assert HANDLE.match(handle), handle
    assert server.status()["f"] == (1, 0, 0)
    with worker(server, "f") as sock:
        assert grab(sock) == (handle, b"f", data)
        gp.complete(sock, handle, b"")
        gp.sync(sock)
        assert server.status()["f"] == (0, 0, 1)


def test_foreground_post_answers_the_workers_result(make_server):
    server = start(make_server)
    with worker(server, "reverse") as sock:
        http_conn, (handle, function, data) = requested(server, sock, "POST", "/reverse", b"hello")
        assert (function, data) == (b"reverse", b"hello")
        gp.complete(sock, handle, b"RESULT:olleh")
        status, headers, body = read(http_conn.getresponse())
        http_conn.close()
        assert server.status()["reverse"] == (0, 0, 1)
    assert status == 200
    assert gearman_headers(headers) == {"x-gearman-job-handle": handle.decode(),
                                        "x-gearman-command": "WORK_COMPLETE"}
    assert body == b"RESULT:olleh"
    assert headers["content-length"] == "12"
    assert headers["server"].startswith("Gearman/1.1.20")


def test_empty_function_name_is_404(make_server):
    server = start(make_server)
    assert request(server, "POST", "/", b"x")[0] == 404
    assert request(server, "POST", "///", b"x")[0] == 404
    assert "" not in server.status()


def test_get_submits_an_empty_payload(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        http_conn, (handle, _, data) = requested(server, sock, "GET", "/f")
        assert data == b""
        gp.complete(sock, handle, b"done")
        status, headers, body = read(http_conn.getresponse())
        http_conn.close()
    assert (status, headers["x-gearman-command"], body) == (200, "WORK_COMPLETE", b"done")


def test_function_name_is_the_path_verbatim(make_server):
    server = start(make_server)
    status, headers, _ = request(server, "POST", "/f%20x", b"d", BACKGROUND)
    assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")
    assert server.status() == {"f%20x": (1, 0, 0)}


@ours_only
def test_query_string_is_not_part_of_the_function_name(make_server):
    """C submits `POST /resize?x=1` to a function named `resize?x=1`; ours to `resize`."""
    server = start(make_server)
    status, headers, _ = request(server, "POST", "/resize?x=1", b"d", BACKGROUND)
    assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")
    with worker(server, "resize") as sock:
        request(server, "POST", "/resize?x=2&y", b"e", BACKGROUND)
        assert server.status() == {"resize": (2, 0, 1)}
        assert grab(sock)[1:] == (b"resize", b"d")


@ours_only
@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "Yes"])
def test_background_header_accepts_true_1_and_yes(make_server, value):
    server = start(make_server)
    status, headers, _ = request(server, "POST", "/bg", b"d", {"X-Gearman-Background": value})
    assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")
    assert server.status() == {"bg": (1, 0, 0)}


@ours_only
@pytest.mark.parametrize("value", ["ture", "2", "on", "background"])
def test_background_header_other_values_are_400_not_a_foreground_job(make_server, value):
    server = start(make_server)
    with worker(server, "bg"):            # a foreground job would be taken and run
        status, _, body = request(server, "POST", "/bg", b"d", {"X-Gearman-Background": value})
        assert status == 400 and b"X-Gearman-Background" in body
        assert server.status() == {"bg": (0, 0, 1)}


@ours_only
@pytest.mark.parametrize("value", ["false", "0", "No"])
def test_background_header_false_0_and_no_mean_foreground(make_server, value):
    server = start(make_server)
    status, _, _ = request(server, "POST", "/fg", b"d", {"X-Gearman-Background": value})
    assert status == 503                  # foreground, and no worker: answered at once


@ours_only
def test_reserved_paths_are_pages_for_get_and_functions_for_post(make_server):
    server = start(make_server)
    for path in ("/status", "/metrics"):
        assert request(server, "GET", path)[0] == 200
        status, headers, _ = request(server, "POST", path, b"d", BACKGROUND)
        assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")
    assert server.status() == {"status": (1, 0, 0), "metrics": (1, 0, 0)}


def test_priority_header_orders_the_queue(make_server):
    server = start(make_server)
    for data, priority in ((b"low", "low"), (b"normal1", None), (b"high", "high"),
                           (b"normal2", "NORMAL"), (b"high2", "High")):
        headers = dict(BACKGROUND)
        if priority:
            headers["X-Gearman-Priority"] = priority
        assert request(server, "POST", "/f", data, headers)[0] == 200
    assert server.admin("prioritystatus") == b"f\t2\t2\t1\t0\n.\n"
    with worker(server, "f") as sock:
        order = [grab(sock)[2] for _ in range(5)]
    assert order == [b"high", b"high2", b"normal1", b"normal2", b"low"]


def test_default_unique_coalesces_identical_payloads(make_server):
    server = start(make_server)
    handles = [request(server, "POST", "/f", data, BACKGROUND)[1]["x-gearman-job-handle"]
               for data in (b"same", b"same", b"other")]
    assert handles[0] == handles[1] != handles[2]
    assert server.status()["f"] == (2, 0, 0)


def test_unique_header_coalesces_jobs(make_server):
    server = start(make_server)
    first = request(server, "POST", "/f", b"one", {**BACKGROUND, "X-Gearman-Unique": "u1"})
    second = request(server, "POST", "/f", b"two", {**BACKGROUND, "X-Gearman-Unique": "u1"})
    third = request(server, "POST", "/f", b"one", {**BACKGROUND, "X-Gearman-Unique": "u2"})
    assert first[1]["x-gearman-job-handle"] == second[1]["x-gearman-job-handle"]
    assert third[1]["x-gearman-job-handle"] != first[1]["x-gearman-job-handle"]
    assert server.status()["f"] == (2, 0, 0)
    with worker(server, "f") as sock:
        assert sorted(grab(sock)[2] for _ in range(2)) == [b"one", b"one"]


def run_scenario(server):
    """Background and foreground submissions, normalised for comparison."""
    results = []
    status, headers, body = request(server, "POST", "/bg", b"payload", BACKGROUND)
    results.append((status, sorted(gearman_headers(headers)), headers["x-gearman-command"],
                    body))
    with worker(server, "bg", "fg") as sock:
        handle, _, data = grab(sock)
        assert headers["x-gearman-job-handle"] == handle.decode()
        results.append(data)
        gp.complete(sock, handle, b"")
        http_conn, (handle, function, data) = requested(server, sock, "POST", "/fg", b"in\0put")
        results.append((function, data))
        gp.complete(sock, handle, b"out\0put")
        status, headers, body = read(http_conn.getresponse())
        http_conn.close()
        assert headers["x-gearman-job-handle"] == handle.decode()
        results.append((status, gearman_headers(headers)["x-gearman-command"], body))
        results.append(request(server, "POST", "/", b"")[0])
    return results


def test_c_and_ours_agree(make_server):
    """The same requests to C gearmand's HTTP module and ours: same status codes,
    X-Gearman-* headers and bodies."""
    ours = run_scenario(start(make_server, impl="py", c_style=True))
    theirs = run_scenario(start(make_server, impl="c"))
    assert ours == theirs
    assert ours == [(200, ["x-gearman-command", "x-gearman-job-handle"], "JOB_CREATED", b""),
                    b"payload", (b"fg", b"in\0put"), (200, "WORK_COMPLETE", b"out\0put"), 404]


# --- HTTP/1.1 connection handling (ours only) ----------------------------------

@ours_only
def test_keep_alive_serves_several_requests_on_one_connection(make_server):
    server = start(make_server)
    raw = Raw(server)
    for path in ("/metrics", "/status", "/", "/metrics"):
        raw.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        line, headers, body = raw.response()
        assert line == "HTTP/1.1 200 OK"
        assert headers["connection"] == "keep-alive"
        assert len(body) == int(headers["content-length"]) > 0
    raw.send(b"POST /f HTTP/1.1\r\nContent-Length: 3\r\nX-Gearman-Background: true\r\n\r\nabc")
    assert raw.response()[1]["x-gearman-command"] == "JOB_CREATED"
    raw.close()
    assert server.status()["f"] == (1, 0, 0)


@ours_only
def test_pipelined_requests_are_answered_in_order(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        raw = Raw(server)
        # A foreground job, then /status: /status must wait for the job's answer.
        raw.send(b"POST /f HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
                 b"GET /status HTTP/1.1\r\n\r\n"
                 b"POST /f HTTP/1.1\r\nContent-Length: 2\r\nX-Gearman-Background: true\r\n\r\nbg")
        wait_queued(server, "f", 1)
        handle, _, data = grab(sock)
        assert data == b"hi"
        gp.complete(sock, handle, b"HI")
        assert raw.response()[2] == b"HI"
        line, headers, body = raw.response()
        assert headers["content-type"] == "application/json"
        # Read when the first job was done: the third request was not yet read.
        assert json.loads(body)["jobs"]["completed"]["foreground"] == 1
        assert json.loads(body)["functions"][0]["jobs"] == 0
        assert raw.response()[1]["x-gearman-command"] == "JOB_CREATED"
        raw.close()
    assert server.status()["f"][0] == 1


@ours_only
def test_http_1_0_closes_unless_keep_alive(make_server):
    server = start(make_server)
    raw = Raw(server).send(b"GET /metrics HTTP/1.0\r\n\r\n")
    line, headers, _ = raw.response()
    assert (line, headers["connection"]) == ("HTTP/1.0 200 OK", "close")
    assert raw.closed()
    raw = Raw(server)
    for _ in range(2):
        raw.send(b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        line, headers, _ = raw.response()
        assert (line, headers["connection"]) == ("HTTP/1.0 200 OK", "keep-alive")
    raw.close()


@ours_only
def test_connection_close_is_honoured(make_server):
    server = start(make_server)
    raw = Raw(server).send(b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n"
                           b"GET /status HTTP/1.1\r\n\r\n")
    line, headers, body = raw.response()
    assert (line, headers["connection"]) == ("HTTP/1.1 200 OK", "close")
    assert json.loads(body)["functions"] == []
    assert raw.closed()           # the second request is not answered


def refused(server, data, status, reason=None):
    """Send bytes; expect one error response with `status`, then the close."""
    raw = Raw(server).send(data)
    line, headers, body = raw.response()
    assert line.split(" ", 2)[:2] == ["HTTP/1.1", str(status)], line
    assert headers["connection"] == "close"
    assert len(body) == int(headers["content-length"])
    assert raw.closed()
    return body


@ours_only
def test_request_head_over_16_kib_is_431(make_server):
    server = start(make_server)
    refused(server, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 16400 + b"\r\n\r\n", 431)
    # No end of head at all: refused once 16 KiB are in.
    refused(server, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000, 431)
    # Just under the limit is fine.
    raw = Raw(server).send(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n")
    assert raw.response()[0] == "HTTP/1.1 200 OK"
    raw.close()


@ours_only
def test_body_over_max_packet_size_is_413(make_server):
    server = start(make_server, "--max-packet-size", "1000")
    refused(server, b"POST /f HTTP/1.1\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001, 413)
    status, headers, _ = request(server, "POST", "/f", b"x" * 1000, BACKGROUND)
    assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")
    assert server.status() == {"f": (1, 0, 0)}


@ours_only
def test_body_over_max_packet_size_is_413_before_the_body_is_read(make_server):
    """The 413 comes from the head alone, while the client is still sending 4 MB."""
    server = start(make_server, "--max-packet-size", "1000")
    raw = Raw(server)
    raw.send(b"POST /f HTTP/1.1\r\nContent-Length: 4000000\r\n\r\n")
    try:
        raw.sock.sendall(b"x" * 4000000)
    except OSError:
        pass                      # the server stopped reading: fine, if the 413 arrives
    line, headers, _ = raw.response()
    assert line == "HTTP/1.1 413 Payload Too Large"
    raw.close()


@ours_only
@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /metrics\r\n\r\n",
    b"GET  /metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nNo-Colon\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nSpace : before\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n folded: header\r\n\r\n",
    b"POST /f HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /f HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
])
def test_malformed_request_is_400(make_server, data):
    server = start(make_server)
    refused(server, data, 400)
    assert server.status() == {}


@ours_only
@pytest.mark.parametrize("method", [b"TRACE", b"DELETE", b"OPTIONS", b"get"])
def test_unsupported_method_is_405(make_server, method):
    server = start(make_server)
    refused(server, method + b" /f HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405)
    assert server.status() == {}


@ours_only
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"FOO"])
def test_wrong_http_version_is_505(make_server, version):
    server = start(make_server)
    body = refused(server, b"GET /metrics " + version + b"\r\n\r\n", 505)
    assert body == b"HTTP/1.0 or HTTP/1.1 only\n"


@ours_only
def test_chunked_body_is_411(make_server):
    server = start(make_server)
    refused(server, b"POST /f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n", 411)
    assert server.status() == {}


@ours_only
def test_error_after_a_head_request_still_has_its_body(make_server):
    """An error answered on a connection whose previous request was HEAD must
    still carry the body its Content-Length announces."""
    server = start(make_server)
    raw = Raw(server).send(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    line, headers, body = raw.response(head=True)
    assert line == "HTTP/1.1 200 OK" and int(headers["content-length"]) > 0
    raw.send(b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    raw.sock.settimeout(5)
    line, headers, body = raw.response()
    assert line == "HTTP/1.1 411 Length Required"
    assert body == b"send a Content-Length, not chunked data\n"


# --- job submission (ours only beyond C's good paths) ---------------------------

@ours_only
def test_foreground_binary_payload_and_result(make_server):
    server = start(make_server)
    data = bytes(range(256)) * 3
    result = b"\0\0result\0\xff\0"
    with worker(server, "f") as sock:
        http_conn, (handle, _, got) = requested(server, sock, "POST", "/f", data)
        assert got == data
        gp.complete(sock, handle, result)
        status, headers, body = read(http_conn.getresponse())
    assert (status, body) == (200, result)
    assert headers["content-type"] == "application/octet-stream"


@ours_only
def test_work_data_is_prepended_and_status_warning_ignored(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        http_conn, (handle, _, _) = requested(server, sock, "POST", "/f", b"x")
        gp.send(sock, gp.WORK_DATA, handle, b"chunk1\0")
        gp.send(sock, gp.WORK_STATUS, handle, b"1", b"3")
        gp.send(sock, gp.WORK_WARNING, handle, b"careful")
        gp.send(sock, gp.WORK_DATA, handle, b"chunk2;")
        gp.complete(sock, handle, b"end")
        status, headers, body = read(http_conn.getresponse())
    assert (status, headers["x-gearman-command"]) == (200, "WORK_COMPLETE")
    assert body == b"chunk1\0chunk2;end"


@ours_only
def test_work_fail_is_500(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        http_conn, (handle, _, _) = requested(server, sock, "POST", "/f", b"x")
        gp.send(sock, gp.WORK_FAIL, handle)
        status, headers, body = read(http_conn.getresponse())
        # The connection is kept: a second request on it works.
        assert request(server, "GET", "/status", conn=http_conn)[0] == 200
    assert status == 500
    assert gearman_headers(headers) == {"x-gearman-job-handle": handle.decode(),
                                        "x-gearman-command": "WORK_FAIL"}
    assert body == b""


@ours_only
def test_work_exception_is_500_with_the_exception(make_server):
    server = start(make_server)     # without --exceptions: HTTP clients get them anyway
    with worker(server, "f") as sock:
        http_conn, (handle, _, _) = requested(server, sock, "POST", "/f", b"x")
        gp.send(sock, gp.WORK_EXCEPTION, handle, b"it\0broke")
        status, headers, body = read(http_conn.getresponse())
    assert status == 500
    assert gearman_headers(headers) == {"x-gearman-job-handle": handle.decode(),
                                        "x-gearman-command": "WORK_EXCEPTION"}
    assert body == b"it\0broke"


@ours_only
def test_foreground_without_a_worker_is_503_at_once(make_server):
    server = start(make_server)
    http_conn = connection(server)
    # No worker ever comes: a request that waited for one would never be answered.
    status, headers, body = request(server, "POST", "/nobody", b"x", conn=http_conn)
    assert (status, body) == (503, b"no worker can do nobody\n")
    assert headers["connection"] == "keep-alive"
    assert server.status() == {}
    # A worker that registered and left no longer counts.
    sock = worker(server, "gone")
    sock.close()
    wait_until(lambda: server.status().get("gone") == (0, 0, 0), what="the worker to leave")
    assert request(server, "POST", "/gone", b"x", conn=http_conn)[0] == 503
    # Background jobs need no worker.
    assert request(server, "POST", "/nobody", b"x", BACKGROUND, conn=http_conn)[0] == 200
    assert server.status()["nobody"] == (1, 0, 0)


@ours_only
def test_full_queue_is_503_queue_error(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        assert request(server, "POST", "/f", b"1", BACKGROUND)[0] == 200
        assert server.admin("maxqueue f 1") == b"OK\r\n"
        for headers in (BACKGROUND, {}):
            status, got, body = request(server, "POST", "/f", b"2", headers)
            assert status == 503
            assert gearman_headers(got) == {"x-gearman-command": "ERROR",
                                            "x-gearman-error": "QUEUE_ERROR"}
            assert body == b"Job queue is full\n"
        assert server.status()["f"] == (1, 0, 1)
        gp.sync(sock)


@ours_only
def test_unique_over_64_bytes_is_400(make_server):
    server = start(make_server)
    status, headers, _ = request(server, "POST", "/f", b"x",
                                 {**BACKGROUND, "X-Gearman-Unique": "u" * 65})
    assert (status, headers["x-gearman-error"]) == (400, "ARGUMENT_TOO_LARGE")
    status, headers, _ = request(server, "POST", "/f", b"x",
                                 {**BACKGROUND, "X-Gearman-Unique": "u" * 64})
    assert (status, headers["x-gearman-command"]) == (200, "JOB_CREATED")


@ours_only
def test_head_submits_and_answers_without_body(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        raw = Raw(server).send(b"HEAD /f HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        wait_queued(server, "f", 1)
        handle, _, data = grab(sock)
        assert data == b""
        gp.complete(sock, handle, b"twelve bytes")
        line, headers, _ = raw.response(head=True)
        assert (line, headers["x-gearman-command"]) == ("HTTP/1.1 200 OK", "WORK_COMPLETE")
        assert headers["content-length"] == "12"
        # No body came: the next response starts right after the head.
        raw.send(b"HEAD /status HTTP/1.1\r\n\r\n")
        line, headers, _ = raw.response(head=True)
        assert (line, headers["content-type"]) == ("HTTP/1.1 200 OK", "application/json")
        raw.send(b"GET /status HTTP/1.1\r\n\r\n")
        assert json.loads(raw.response()[2])["jobs"]["completed"]["foreground"] == 1
        raw.close()


@ours_only
def test_foreground_coalesces_and_both_clients_get_the_result(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        first, second, third = connection(server), connection(server), connection(server)
        first.request("POST", "/f", body=b"same")
        second.request("POST", "/f", body=b"same")
        third.request("POST", "/f", body=b"same", headers={"X-Gearman-Unique": "mine"})
        # The second request reached the server before the third: once the third
        # made its job, the second has joined the first's.
        wait_queued(server, "f", 2)
        handles = sorted(grab(sock)[0] for _ in range(2))
        for handle in handles:
            gp.complete(sock, handle, b"result of " + handle)
        answers = [read(conn.getresponse()) for conn in (first, second, third)]
    assert answers[0][1]["x-gearman-job-handle"] == answers[1][1]["x-gearman-job-handle"]
    assert answers[0][2] == answers[1][2] == b"result of " + \
        answers[0][1]["x-gearman-job-handle"].encode()
    assert answers[2][1]["x-gearman-job-handle"] != answers[0][1]["x-gearman-job-handle"]
    assert sorted(a[1]["x-gearman-job-handle"].encode() for a in answers[1:]) == handles


def test_client_disconnect_abandons_its_foreground_job(make_server):
    server = start(make_server)
    with worker(server, "f") as sock:
        raw = Raw(server).send(b"POST /f HTTP/1.1\r\nContent-Length: 4\r\n\r\ndata")
        wait_queued(server, "f", 1)
        jobs = server.admin("show jobs").split(b"\n")
        assert jobs[0].split(b"\t")[1:] == [b"0", b"0", b"0"]
        raw.close()
        wait_until(lambda: server.admin("show jobs").split(b"\t")[2:3] == [b"1"],
                   what="the job to be ignored")
        ptype, _ = gp.grab(sock)
        assert ptype == gp.NO_JOB
        assert server.status()["f"] == (0, 0, 1)


@ours_only
def test_background_job_is_stored_with_sqlite(make_server, tmp_path):
    db = tmp_path / "q.db"
    server = start(make_server, "-q", "libsqlite3", "--libsqlite3-db", str(db))
    for data, priority in ((b"a\0b", "high"), (b"c", "low"), (b"d", None)):
        headers = dict(BACKGROUND, **({"X-Gearman-Priority": priority} if priority else {}))
        status, got, _ = request(server, "POST", "/stored", data, headers)
        assert (status, got["x-gearman-command"]) == (200, "JOB_CREATED")
    with sqlite3.connect(db) as sql:
        rows = sorted(sql.execute("SELECT function_name, priority, data FROM gearman_queue"))
    assert rows == [("stored", 0, b"a\0b"), ("stored", 1, b"d"), ("stored", 2, b"c")]
    # Each JOB_CREATED waited for its own commit: 3 commits of 1 job each.
    samples = metric_samples(server)
    assert sample(samples, "gearman_store_batch_size_count") == 3
    assert sample(samples, "gearman_store_batch_size_sum") == 3
    assert sample(samples, "gearman_store_batch_size_bucket", le="1") == 3
    assert sample(samples, "gearman_store_commit_seconds_count") == 3
    assert sample(samples, "gearman_store_commit_seconds_sum") > 0
    assert sample(samples, "gearman_store_errors_total") == 0
    assert sample(samples, "gearman_store_replayed_jobs") == 0

    server.restart()
    wait_for_port(server.http_port, server.proc)
    samples = metric_samples(server)
    assert sample(samples, "gearman_store_replayed_jobs") == 3
    assert sample(samples, "gearman_store_batch_size_count") == 0
    assert sample(samples, "gearman_jobs_queued", function="stored", priority="high") == 1
    store = json.loads(request(server, "GET", "/status")[2])["store"]
    assert 0 < time.time() - store.pop("since") < 60
    assert store == {
        "queue_type": "libsqlite3", "persistent": True, "durable": True, "healthy": True, "errors": 0,
        "last_error": "", "writes_in_flight": 0, "replayed_jobs": 3}



@ours_only
def test_a_store_that_cannot_write_shows_in_health_and_http_is_503(make_server, tmp_path):
    """README: a background job whose write failed gets QUEUE_ERROR, never
    JOB_CREATED; over HTTP that is 503 with X-Gearman-Error: QUEUE_ERROR. The
    failures show in gearman_store_errors_total and in /status's store health."""
    db = tmp_path / "q.db"
    server = start(make_server, "-q", "libsqlite3", "--libsqlite3-db", str(db))
    assert request(server, "POST", "/f", b"before", BACKGROUND)[0] == 200
    with sqlite3.connect(db) as sql:
        sql.execute("DROP TABLE gearman_queue")   # the store can write nothing now
    sql.close()

    status, headers, body = request(server, "POST", "/f", b"during", BACKGROUND)
    assert status == 503
    assert gearman_headers(headers) == {"x-gearman-command": "ERROR",
                                        "x-gearman-error": "QUEUE_ERROR"}
    assert body == b"QUEUE_ERROR\n"
    with server.connect() as sock:                # the Gear port says the same
        assert gp.call(sock, gp.SUBMIT_JOB_BG, "f", "u", "x") == \
            (gp.ERROR, b"QUEUE_ERROR\0QUEUE_ERROR")
    samples = metric_samples(server)
    assert sample(samples, "gearman_store_errors_total") >= 2
    store = json.loads(request(server, "GET", "/status")[2])["store"]
    assert store["healthy"] is False
    assert store["errors"] == sample(samples, "gearman_store_errors_total")
    assert "no such table" in store["last_error"]
    # Nothing was queued for the refused jobs; the one stored before still is.
    assert server.status()["f"] == (1, 0, 0)


@ours_only
def test_large_body_arrives_whole(make_server):
    """A 40 MB POST body, read in many pieces, becomes the job's data byte for byte,
    as a 40 MB Gear submission does. (How fast: bench/run.py.)"""
    server = start(make_server)
    size = 40 << 20
    data = bytes(range(256)) * (size // 256)
    raw = Raw(server)
    raw.send(b"POST /big HTTP/1.1\r\nX-Gearman-Background: true\r\nX-Gearman-Unique: http\r\n"
             b"Content-Length: %d\r\n\r\n" % size + data)
    line, headers, _ = raw.response()
    raw.close()
    assert (line, headers["x-gearman-command"]) == ("HTTP/1.1 200 OK", "JOB_CREATED")
    assert server.status()["big"] == (1, 0, 0)
    with worker(server, "big") as sock:
        ptype, body = gp.grab(sock, gp.GRAB_JOB_UNIQ)
        assert ptype == gp.JOB_ASSIGN_UNIQ
        handle, function, unique, got = body.split(b"\0", 3)
        assert (function, unique, len(got)) == (b"big", b"http", size)
        assert got == data
        gp.complete(sock, handle)
        gp.sync(sock)
        assert server.status()["big"] == (0, 0, 1)

# --- /metrics -----------------------------------------------------------------

@ours_only
def test_metrics_while_jobs_run(make_server):
    server = start(make_server)
    http_conn = connection(server)
    before = metric_samples(server, http_conn)
    assert sample(before, "gearman_up") == 1
    assert sample(before, "gearman_jobs_submitted_total", kind="background") == 0

    for data, priority in ((b"h", "high"), (b"n1", None), (b"n2", None), (b"n3", None),
                           (b"l1", "low"), (b"l2", "low")):
        headers = dict(BACKGROUND, **({"X-Gearman-Priority": priority} if priority else {}))
        assert request(server, "POST", "/f", data, headers, conn=http_conn)[0] == 200
    assert request(server, "POST", "/g", b"g", BACKGROUND, conn=http_conn)[0] == 200
    w1 = worker(server, "f")
    w2 = worker(server, "f")
    wg = worker(server, "g")
    handle, _, data = grab(w1)              # the high job runs, held by w1
    assert data == b"h"
    # A background g job completes, a foreground g job fails.
    fg = connection(server)
    fg.request("POST", "/g", body=b"fails")
    wait_queued(server, "g", 2)
    g1, _, data = grab(wg)
    assert data == b"g"
    g2, _, data = grab(wg)
    assert data == b"fails"
    gp.send(wg, gp.WORK_FAIL, g2)
    assert read(fg.getresponse())[0] == 500
    gp.complete(wg, g1, b"")
    gp.sync(wg)

    # Open: http_conn, fg, w1, w2, wg (admin connections closing are polled away).
    samples = wait_until(lambda: (lambda s: s if sample(s, "gearman_connections") == 5
                                  else None)(metric_samples(server, http_conn)),
                         what="5 open connections")
    assert function_samples(samples, "gearman_jobs") == {"f": 6, "g": 0}
    assert function_samples(samples, "gearman_jobs_running") == {"f": 1, "g": 0}
    assert function_samples(samples, "gearman_jobs_waiting") == {"f": 5, "g": 0}
    assert function_samples(samples, "gearman_workers") == {"f": 2, "g": 1}
    for priority, count in (("high", 0), ("normal", 3), ("low", 2)):
        assert sample(samples, "gearman_jobs_queued", function="f", priority=priority) == count
        assert sample(samples, "gearman_jobs_queued", function="g", priority=priority) == 0
    for what, foreground, background in (("submitted", 1, 7), ("completed", 0, 1),
                                         ("failed", 1, 0)):
        assert sample(samples, f"gearman_jobs_{what}_total", kind="foreground") == foreground
        assert sample(samples, f"gearman_jobs_{what}_total", kind="background") == background
    assert sample(samples, "gearman_store_batch_size_count") == 0
    assert sample(samples, "gearman_store_errors_total") == 0
    assert sample(samples, "gearman_store_replayed_jobs") == 0
    assert sample(samples, "gearman_uptime_seconds") >= sample(before, "gearman_uptime_seconds")
    assert sample(samples, "gearman_info", version="1.1.20",
                  server=json.loads(request(server, "GET", "/status")[2])["server"]) == 1

    # The same as admin status says.
    status = server.status()
    for function in ("f", "g"):
        assert status[function] == (function_samples(samples, "gearman_jobs")[function],
                                    function_samples(samples, "gearman_jobs_running")[function],
                                    function_samples(samples, "gearman_workers")[function])

    gp.complete(w1, handle, b"")
    gp.sync(w1)
    after = metric_samples(server, http_conn)
    assert sample(after, "gearman_jobs_completed_total", kind="background") == 2
    assert function_samples(after, "gearman_jobs_running") == {"f": 0, "g": 0}
    for sock in (w1, w2, wg, fg, http_conn):
        sock.close()


@ours_only
def test_metrics_accepted_connections_count_exactly(make_server):
    server = start(make_server)
    http_conn = connection(server)
    before = sample(metric_samples(server, http_conn), "gearman_connections_accepted_total")
    for _ in range(5):
        socket.create_connection(("127.0.0.1", server.port), 5).close()
    socks = [socket.create_connection(("127.0.0.1", server.http_port), 5) for _ in range(2)]
    samples = wait_until(lambda: (lambda s: s if sample(s, "gearman_connections") == 3 else None)(
        metric_samples(server, http_conn)), what="3 open connections")
    assert sample(samples, "gearman_connections_accepted_total") - before == 7
    for sock in socks:
        sock.close()


@ours_only
def test_metrics_with_odd_function_names_parse(make_server):
    server = start(make_server)
    names = [b'quo"te', b"back\\slash", b'both\\"', b"sp ace", b"tab\tbed", b"{br}=,ces",
             b"\xff\xfe bytes", b"caf\xc3\xa9", b"\\n literal", b"new\nline", b"# HELP x"]
    with server.connect() as sock:
        for name in names:
            gp.submit(sock, name, b"", b"x")
    samples = metric_samples(server)
    expected = {name.decode("utf-8", "backslashreplace"): 1 for name in names}
    assert function_samples(samples, "gearman_jobs") == expected
    for name in expected:
        assert sample(samples, "gearman_jobs_queued", function=name, priority="normal") == 1
    functions = json.loads(request(server, "GET", "/status")[2])["functions"]
    assert sorted(f["name"] for f in functions) == sorted(expected)


# --- /status and the page -----------------------------------------------------

@ours_only
def test_status_json_matches_the_admin_protocol(make_server):
    server = start(make_server)
    for function, data, priority in (("a", b"1", "high"), ("a", b"2", None), ("a", b"3", "low"),
                                     ("a", b"4", "low"), ("b", b"1", None)):
        headers = dict(BACKGROUND, **({"X-Gearman-Priority": priority} if priority else {}))
        assert request(server, "POST", "/" + function, data, headers)[0] == 200
    w1 = worker(server, "b", "a")           # grabs from "a" (its newest) first
    w2 = worker(server, "b", "c")
    gp.send(w2, gp.SET_CLIENT_ID, b"w-two")
    gp.sync(w2)
    grab(w1)
    status, headers, body = request(server, "GET", "/status?refresh=1")
    assert (status, headers["content-type"]) == (200, "application/json")
    snapshot = json.loads(body)

    functions = {f["name"]: f for f in snapshot["functions"]}
    assert functions == {
        "a": {"name": "a", "jobs": 4, "running": 1, "workers": 1,
              "queued": {"high": 0, "normal": 1, "low": 2}},
        "b": {"name": "b", "jobs": 1, "running": 0, "workers": 2,
              "queued": {"high": 0, "normal": 1, "low": 0}},
        "c": {"name": "c", "jobs": 0, "running": 0, "workers": 1,
              "queued": {"high": 0, "normal": 0, "low": 0}}}
    assert [f["name"] for f in snapshot["functions"]] == list(server.status())
    assert {name: (f["jobs"], f["running"], f["workers"]) for name, f in functions.items()} \
        == server.status()
    rows = {}
    for line in server.admin("prioritystatus").split(b"\n")[:-2]:
        name, *counts = line.split(b"\t")
        rows[name.decode()] = tuple(int(c) for c in counts)
    assert {name: (f["queued"]["high"], f["queued"]["normal"], f["queued"]["low"], f["workers"])
            for name, f in functions.items()} == rows

    admin_workers = {}
    for line in server.admin("workers").split(b"\n")[:-2]:
        fd, peer, client_id, _, names = re.match(rb"(\d+) (\S+) (\S+) :( (.*))?$",
                                                 line).groups()
        if names:
            admin_workers[int(fd)] = (peer.decode(), client_id.decode(),
                                      sorted(names.decode().split()))
    assert {w["fd"]: (w["address"], w["id"], sorted(w["functions"]))
            for w in snapshot["workers"]} == admin_workers
    assert sorted((w["id"], w["running"]) for w in snapshot["workers"]) == [("-", 1), ("w-two", 0)]
    assert snapshot["jobs"]["submitted"] == {"foreground": 0, "background": 5}
    assert snapshot["store"]["queue_type"] == "builtin"
    assert snapshot["store"]["healthy"] is True
    assert snapshot["connections"] == 3
    assert snapshot["version"] == "1.1.20"
    assert snapshot["pid"] == server.pid
    w1.close()
    w2.close()


@ours_only
def test_status_page_is_self_contained_and_refreshes(make_server):
    server = start(make_server)
    status, headers, body = request(server, "GET", "/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert page.startswith("<!DOCTYPE html>")
    assert re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I) == []
    assert re.findall(r"@import|url\(", page) == []
    # the page is whole without its script, links to the machine-readable views,
    # reloads itself without JavaScript and refreshes in place with it
    assert '<a href="/status">' in page and '<a href="/metrics">' in page
    assert re.search(r'<noscript><meta http-equiv="refresh" content="\d+"></noscript>', page)
    assert 'fetch("/")' in page
    interval = re.search(r"setInterval\(refresh, (\d+)\)", page)
    assert interval and 1000 <= int(interval.group(1)) <= 10000
    # HEAD: the headers only.
    raw = Raw(server).send(b"HEAD / HTTP/1.1\r\n\r\nGET /nothing-here HTTP/1.1\r\n\r\n")
    line, headers, _ = raw.response(head=True)
    assert int(headers["content-length"]) == len(body)
    assert raw.response()[0] == "HTTP/1.1 503 Service Unavailable"
    raw.close()


# --- HTTP never blocks the loop -------------------------------------------------

@ours_only
def test_waiting_http_request_does_not_block_the_server(make_server):
    server = start(make_server)
    with worker(server, "slow") as sock:
        waiting = connection(server)
        waiting.request("POST", "/slow", body=b"take your time")
        wait_queued(server, "slow", 1)
        handle = grab(sock)[0]
        # The HTTP request waits for its job: the gear port still answers...
        with server.connect() as client:
            for i in range(20):
                gp.sync(client, b"ping %d" % i)
        # ...and so does a second HTTP connection.
        samples = metric_samples(server)
        assert function_samples(samples, "gearman_jobs_running") == {"slow": 1}
        assert request(server, "POST", "/other", b"x", BACKGROUND)[0] == 200
        gp.complete(sock, handle, b"finally")
        status, headers, body = read(waiting.getresponse())
        waiting.close()
    assert (status, body) == (200, b"finally")
