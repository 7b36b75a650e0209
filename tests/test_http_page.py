"""The status page in a real browser: headless Debian chromium renders GET / from a
live server, with JavaScript off (the page as served) and on (it refreshes itself in
place), and we read the DOM and take a screenshot."""
import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser

import pytest

import gearproto as gp
from conftest import IMPL, free_port, unavailable, wait_for_port

pytestmark = pytest.mark.skipif(IMPL == "c", reason="gearmand.py's status page; C has none")

CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path, url, *args):
    if not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url]
    try:
        done = subprocess.run(command, capture_output=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def chromium_dom_without_javascript(tmp_path, url):
    """The DOM of `url` in chromium with JavaScript off. --dump-dom needs JavaScript
    (--blink-settings=scriptEnabled=false makes it print nothing), so this drives the
    browser over the DevTools protocol (--remote-debugging-pipe: commands on fd 3,
    replies on fd 4, NUL-terminated JSON)."""
    if not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium)")
    to_browser, browser_in = os.pipe()[::-1]
    from_browser, browser_out = os.pipe()

    def pipes():                          # in the child: fd 3 reads, fd 4 writes
        reading, writing = os.dup(browser_in), os.dup(browser_out)
        os.dup2(reading, 3)
        os.dup2(writing, 4)
    profile = tmp_path / "chromium-profile-nojs"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                             "--remote-debugging-pipe", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(3, 4, browser_in, browser_out), preexec_fn=pipes)
    os.close(browser_in)
    os.close(browser_out)
    buffer = b""
    sequence = 0

    def call(method, session=None, **params):
        nonlocal sequence
        sequence += 1
        message = {"id": sequence, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(to_browser, json.dumps(message).encode() + b"\0")
        return wait(lambda m: m.get("id") == sequence)

    seen = []                             # messages read, not yet waited for

    def wait(matches):
        nonlocal buffer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                seen.append(json.loads(raw))
            for message in seen:
                if matches(message):
                    seen.remove(message)
                    assert "error" not in message, message
                    return message
            ready, _, _ = select.select([from_browser], [], [], 1)
            if ready:
                chunk = os.read(from_browser, 1 << 20)
                assert chunk, "chromium closed its pipe"
                buffer += chunk
        raise AssertionError("chromium did not answer")
    try:
        target = call("Target.createTarget", url="about:blank")["result"]["targetId"]
        session = call("Target.attachToTarget", targetId=target,
                       flatten=True)["result"]["sessionId"]
        call("Emulation.setScriptExecutionDisabled", session, value=True)
        call("Page.enable", session)
        call("Page.navigate", session, url=url)
        wait(lambda m: m.get("method") == "Page.loadEventFired")
        root = call("DOM.getDocument", session)["result"]["root"]["nodeId"]
        return call("DOM.getOuterHTML", session, nodeId=root)["result"]["outerHTML"]
    finally:
        proc.kill()
        proc.wait()
        os.close(to_browser)
        os.close(from_browser)
        shutil.rmtree(profile, ignore_errors=True)


class Tables(HTMLParser):
    """Text of each table's body rows by table id, and of elements by id."""

    def __init__(self):
        super().__init__()
        self.tables = {}
        self.by_id = {}
        self.table = None
        self.row = None
        self.cell = None
        self.open_ids = []
        self.links = set()
        self.svgs = set()
        self.polylines = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.add(attrs.get("href"))
        elif tag == "svg":
            self.svgs.add(attrs.get("id"))
        elif tag == "polyline":
            self.polylines += 1
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = [tag, ""]
        if "id" in attrs and tag in ("div", "h1", "span"):
            self.open_ids.append((tag, attrs["id"]))
            self.by_id[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(tuple(self.cell))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.row and all(kind == "td" for kind, _ in self.row):
                self.table.append([value for _, value in self.row])
            self.row = None
        elif tag == "table":
            self.table = None
        if self.open_ids and self.open_ids[-1][0] == tag:
            self.open_ids.pop()

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data
        for _, element in self.open_ids:
            self.by_id[element] += data


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def busy_server(make_server):
    """A server with queued, running and orphaned jobs and two workers."""
    http_port = free_port()
    server = make_server("--http-port", str(http_port))
    assert wait_for_port(http_port, server.proc)
    with server.connect() as client:
        for ptype, data in ((gp.SUBMIT_JOB_HIGH_BG, b"h"), (gp.SUBMIT_JOB_BG, b"n1"),
                            (gp.SUBMIT_JOB_BG, b"n2"), (gp.SUBMIT_JOB_BG, b"n3"),
                            (gp.SUBMIT_JOB_LOW_BG, b"l1"), (gp.SUBMIT_JOB_LOW_BG, b"l2")):
            gp.submit(client, "resize_image", b"", data, ptype)
        for data in (b"a", b"b"):
            gp.submit(client, "send_email", b"", data)
        for data in (b"p1", b"p2", b"p3"):
            gp.submit(client, "make_pdf", b"", data)          # no worker for these
    resizer = server.connect()
    gp.send(resizer, gp.SET_CLIENT_ID, b"resizer-1")
    gp.can_do(resizer, "resize_image")
    ptype, body = gp.grab(resizer)             # holds the high job while the page loads
    assert (ptype, body.split(b"\0")[2]) == (gp.JOB_ASSIGN, b"h")
    mailer = server.connect()
    gp.send(mailer, gp.SET_CLIENT_ID, b"mailer-7")
    gp.can_do(mailer, "send_email", "send_sms")
    gp.send(mailer, gp.GRAB_JOB)
    assert gp.recv(mailer)[0] == gp.JOB_ASSIGN
    gp.send(mailer, gp.WORK_COMPLETE, b"H:" + os.uname().nodename.encode() + b":7", b"sent")
    gp.sync(mailer)
    assert server.status() == {"resize_image": (6, 1, 1), "send_email": (1, 0, 1),
                               "send_sms": (0, 0, 1), "make_pdf": (3, 0, 0)}
    server.workers = (resizer, mailer)
    server.url = f"http://127.0.0.1:{http_port}/"
    return server


def check_page(page, server, live):
    functions = {row[0]: row[1:] for row in page.tables["functions"]}
    # jobs, running, high, normal, low, workers; a function with jobs and no worker is marked
    assert functions == {"resize_image": ["6", "1", "0", "3", "2", "1"],
                         "send_email": ["1", "0", "0", "1", "0", "1"],
                         "send_sms": ["0", "0", "0", "0", "0", "1"],
                         "make_pdf": ["3", "0", "0", "3", "0", "0 (no worker)"]}
    workers = {row[1]: row for row in page.tables["workers"]}
    assert sorted(workers) == ["mailer-7", "resizer-1"]
    assert workers["mailer-7"][2:] == ["send_sms send_email", "0"]
    assert workers["resizer-1"][2:] == ["resize_image", "1"]
    port = server.workers[0].getsockname()[1]
    assert workers["resizer-1"][0].startswith(f"127.0.0.1:{port} (fd ")   # the worker's port
    totals = {row[0]: row[1:4] for row in page.tables["totals"]}
    assert totals == {"submitted": ["11", "0", "11"], "completed": ["1", "0", "1"],
                      "failed": ["0", "0", "0"]}
    assert all(re.fullmatch(r"\d+\.\d\d|-", row[4]) for row in page.tables["totals"])
    assert page.by_id["meta"].startswith("gearmand.py ")
    assert f"pid {server.pid}" in page.by_id["meta"]
    assert page.by_id["store"].startswith("builtin (not persistent): healthy, 0 errors")
    assert page.links >= {"/status", "/metrics"}
    assert page.svgs >= {"chart-depth", "chart-throughput"}
    assert page.polylines >= 2
    assert page.by_id["live"].startswith("live, updated " if live else "reloads every 10 s")


def test_status_page_without_javascript(make_server, tmp_path):
    """Everything is on the page as served: the tables, the totals, the charts."""
    if not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium)")
    server = busy_server(make_server)
    page = Tables()
    page.feed(chromium_dom_without_javascript(tmp_path, server.url))
    check_page(page, server, live=False)


def test_status_page_with_javascript_refreshes_in_place(make_server, tmp_path):
    if not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium)")
    server = busy_server(make_server)
    page = Tables()
    page.feed(chromium(tmp_path, server.url, "--dump-dom"))
    check_page(page, server, live=True)

    shot = tmp_path / "page.png"
    chromium(tmp_path, server.url, f"--screenshot={shot}", "--window-size=1000,900")
    assert png_size(shot) == (1000, 900)
    assert shot.stat().st_size > 20000        # a rendered page, not a blank one
    if os.environ.get("GEARMAND_KEEP_SCREENSHOT"):   # docs/status-page.png is made so
        shutil.copy(shot, os.environ["GEARMAND_KEEP_SCREENSHOT"])
    for sock in server.workers:
        sock.close()
