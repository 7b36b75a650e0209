"""The status page in a real browser: headless Debian chromium renders GET / from a
live server, its script fills the tables from /status, and we read the DOM and
take a screenshot."""
import os
import shutil
import struct
import subprocess
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

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = [tag, ""]
        if "id" in attrs and tag in ("div", "h1"):
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


def test_status_page_renders_live_counts(make_server, tmp_path):
    if not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium)")
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
    resizer = server.connect()
    gp.send(resizer, gp.SET_CLIENT_ID, b"resizer-1")
    gp.can_do(resizer, "resize_image")
    ptype, body = gp.grab(resizer)             # holds the high job while the page loads
    assert (ptype, body.split(b"\0")[2]) == (gp.JOB_ASSIGN, b"h")
    mailer = server.connect()
    gp.send(mailer, gp.SET_CLIENT_ID, b"mailer-7")
    gp.can_do(mailer, "send_email", "send_sms")
    assert server.status() == {"resize_image": (6, 1, 1), "send_email": (2, 0, 1),
                               "send_sms": (0, 0, 1)}

    url = f"http://127.0.0.1:{http_port}/"
    page = Tables()
    page.feed(chromium(tmp_path, url, "--dump-dom"))
    functions = {row[0]: row[1:] for row in page.tables["functions"]}
    # jobs, running, high, normal, low, workers
    assert functions == {"resize_image": ["6", "1", "0", "3", "2", "1"],
                         "send_email": ["2", "0", "0", "2", "0", "1"],
                         "send_sms": ["0", "0", "0", "0", "0", "1"]}
    workers = sorted(row[1:] for row in page.tables["workers"])
    assert workers == [["mailer-7", "send_sms send_email", "0"],
                       ["resizer-1", "resize_image", "1"]]
    assert page.by_id["meta"].startswith("gearmand.py ")
    assert f"pid {server.pid}" in page.by_id["meta"]
    assert page.by_id["store"].startswith("builtin (not persistent): healthy, 0 errors")

    shot = tmp_path / "page.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1000,700")
    assert png_size(shot) == (1000, 700)
    assert shot.stat().st_size > 20000        # a rendered page, not a blank one
    if os.environ.get("GEARMAND_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GEARMAND_KEEP_SCREENSHOT"])
    resizer.close()
    mailer.close()
