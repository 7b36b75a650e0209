#!/usr/bin/env python3
"""gearmand.py: a Gearman job server in one file, standard library only.

A drop-in replacement for the C gearmand 1.1.20: the same binary protocol, the
same text admin protocol byte for byte, the same command line, and the same
persistent-queue schemas, so a store written by one replays in the other.
Background jobs are written to the store before the client hears JOB_CREATED,
the jobs of one or more loop turns in one transaction, by a writer thread that
never stalls the loop.

Run it:  python gearmand.py --queue-type=sqlite --sqlite-db=queue.db

The file reads top to bottom in the order data flows:
  protocol          packet numbers, the codec, C's parsing rules
  jobs and workers  Job, FunctionQueue, Registration, and Queues, which owns them
  persistence       Store and the shared base of the backends, SqliteStore, the
                    writer thread, and Journal: the loop's side of the store
  logging, stats    Log, Stats
  event loop        Connection, Timers, EventLoop (one epoll or poll(2) loop, one thread)
  binary protocol   BinaryProtocol: framing, dispatch and the packet handlers
  admin, HTTP       Admin (the text protocol), HttpProtocol (jobs, /metrics, /status)
  command line      options, Server (the rooms wired together), run() and main()
"""

import argparse
import collections
import errno
import functools
import gc
import hashlib
import heapq
import importlib
import importlib.util
import os
import queue
import re
import select
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import threading
import time
import traceback
import uuid

__version__ = "0.1.0"
# The C gearmand release whose behaviour we match; `version` reports it, as C does.
GEARMAND_VERSION = "1.1.20"


# --- protocol: packet numbers, shapes, encoding ------------------------------

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")

CAN_DO = 1
CANT_DO = 2
RESET_ABILITIES = 3
PRE_SLEEP = 4
UNUSED = 5
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
NO_JOB = 10
JOB_ASSIGN = 11
WORK_STATUS = 12
WORK_COMPLETE = 13
WORK_FAIL = 14
GET_STATUS = 15
ECHO_REQ = 16
ECHO_RES = 17
SUBMIT_JOB_BG = 18
ERROR = 19
STATUS_RES = 20
SUBMIT_JOB_HIGH = 21
SET_CLIENT_ID = 22
CAN_DO_TIMEOUT = 23
ALL_YOURS = 24
WORK_EXCEPTION = 25
OPTION_REQ = 26
OPTION_RES = 27
WORK_DATA = 28
WORK_WARNING = 29
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
SUBMIT_JOB_HIGH_BG = 32
SUBMIT_JOB_LOW = 33
SUBMIT_JOB_LOW_BG = 34
SUBMIT_JOB_SCHED = 35
SUBMIT_JOB_EPOCH = 36
SUBMIT_REDUCE_JOB = 37
SUBMIT_REDUCE_JOB_BACKGROUND = 38
GRAB_JOB_ALL = 39
JOB_ASSIGN_ALL = 40
GET_STATUS_UNIQUE = 41
STATUS_RES_UNIQUE = 42
PACKET_TYPES = 43
PACKET_NAMES = {number: name for name, number in globals().items()
                if name.isupper() and type(number) is int and 0 < number < PACKET_TYPES}

# How many NUL-terminated arguments each request carries before its last part
# (the last part is opaque data, or the final argument running to the end).
# The numbers are those of libgearman's command table, which C gearmand parses by.
ARGUMENT_NULS = {
    CAN_DO: 0, CANT_DO: 0, RESET_ABILITIES: 0, PRE_SLEEP: 0, UNUSED: 0, NOOP: 0,
    SUBMIT_JOB: 2, JOB_CREATED: 0, GRAB_JOB: 0, NO_JOB: 0, JOB_ASSIGN: 2,
    WORK_STATUS: 2, WORK_COMPLETE: 1, WORK_FAIL: 0, GET_STATUS: 0, ECHO_REQ: 0,
    ECHO_RES: 0, SUBMIT_JOB_BG: 2, ERROR: 1, STATUS_RES: 4, SUBMIT_JOB_HIGH: 2,
    SET_CLIENT_ID: 0, CAN_DO_TIMEOUT: 1, ALL_YOURS: 0, WORK_EXCEPTION: 1,
    OPTION_REQ: 0, OPTION_RES: 0, WORK_DATA: 1, WORK_WARNING: 1, GRAB_JOB_UNIQ: 0,
    JOB_ASSIGN_UNIQ: 3, SUBMIT_JOB_HIGH_BG: 2, SUBMIT_JOB_LOW: 2, SUBMIT_JOB_LOW_BG: 2,
    SUBMIT_JOB_SCHED: 7, SUBMIT_JOB_EPOCH: 3, SUBMIT_REDUCE_JOB: 4,
    SUBMIT_REDUCE_JOB_BACKGROUND: 4, GRAB_JOB_ALL: 0, JOB_ASSIGN_ALL: 4,
    GET_STATUS_UNIQUE: 0, STATUS_RES_UNIQUE: 5,
}
ARGUMENT_NULS = tuple(ARGUMENT_NULS.get(ptype, 0) for ptype in range(PACKET_TYPES))
# Types whose last part is opaque data; for the others it is a plain argument.
DATA_TYPES = frozenset({
    SUBMIT_JOB, JOB_ASSIGN, WORK_COMPLETE, ECHO_REQ, ECHO_RES, SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH, WORK_EXCEPTION, WORK_DATA, WORK_WARNING, JOB_ASSIGN_UNIQ,
    SUBMIT_JOB_HIGH_BG, SUBMIT_JOB_LOW, SUBMIT_JOB_LOW_BG, SUBMIT_JOB_SCHED,
    SUBMIT_JOB_EPOCH, SUBMIT_REDUCE_JOB, SUBMIT_REDUCE_JOB_BACKGROUND, JOB_ASSIGN_ALL,
})

# C keeps arguments in an 8 KiB buffer and drops connections whose arguments
# do not fit; we do the same so a peer cannot make us hold unbounded names.
ARGUMENT_MAX = 8192
TEXT_LINE_MAX = 8192
TEXT_TOKENS_MAX = 5
HANDLE_MAX = 63      # C's 64-byte handle buffer
UNIQUE_MAX = 64      # longer uniques are refused; 64 exactly works (C truncates it)
CLIENT_ID_MAX = 127
OPTION_NAME_MAX = 63
TIMEOUT_DIGITS_MAX = 20
SEND_SLICE = 256 * 1024   # bytes joined for one send() when replies pile up
FLUSH_PATIENCE = 10.0     # seconds a graceful stop waits for peers to read their results
TIMER_WAIT_MAX = 3600.0   # poll() overflows past ~24 days; far timers are re-checked hourly
# What the loop polls for; poll(2) and epoll give these bits the same values.
READABLE = select.POLLIN
WRITABLE = select.POLLIN | select.POLLOUT

HIGH, NORMAL, LOW = 0, 1, 2
PRIORITY_NAMES = ("high", "normal", "low")
KINDS = ("foreground", "background")   # indexed by a job's `background`


def packet(ptype, payload=b""):
    """One server-to-client packet."""
    return HEADER.pack(RES, ptype, len(payload)) + payload


def error_packet(code, text):
    return packet(ERROR, code + b"\0" + text)


NOOP_PACKET = packet(NOOP)
NO_JOB_PACKET = packet(NO_JOB)
# ERROR payloads a submission may get, whichever protocol it came by.
UNIQUE_TOO_LARGE = b"ARGUMENT_TOO_LARGE\0Unique value too large"
QUEUE_FULL = b"QUEUE_ERROR\0Job queue is full"
STORE_FAILED = b"QUEUE_ERROR\0QUEUE_ERROR"
ERROR_INVALID_MAGIC = error_packet(b"INVALID_MAGIC", b"Request magic expected")
ERROR_INVALID_COMMAND = error_packet(b"INVALID_COMMAND", b"Command not expected")
ERROR_UNKNOWN_OPTION = error_packet(b"UNKNOWN_OPTION", b"Server does not recognize given option")
ERROR_NO_SUCH_JOB = error_packet(b"JOB_NOT_FOUND", b"Job does not exist on server")
ERROR_NO_SUCH_RESULT_JOB = error_packet(b"JOB_NOT_FOUND", b"Job given in work result not found")
ERROR_NO_SUCH_EXCEPTION_JOB = error_packet(
    b"JOB_NOT_FOUND", b"An exception was received for a job that does not exist")
ERROR_HANDLE_TOO_LARGE = error_packet(
    b"ARGUMENT_TOO_LARGE",
    b"Error occurred due to GEARMAND_JOB_HANDLE_SIZE being too small from snprintf")

_LEADING_INTEGER = re.compile(rb"\s*([+-]?\d+)")


def c_integer(text, bits=64):
    """Parse like strtol/strtoll: leading integer or 0; None if out of range."""
    match = _LEADING_INTEGER.match(text)
    if not match:
        return 0
    value = int(match.group(1))
    limit = 1 << (bits - 1)
    return value if -limit <= value < limit else None


def atoi(text):
    """glibc's atoi: (int)strtol(), so a value past 32 bits wraps (past 64 it saturates first)."""
    match = _LEADING_INTEGER.match(text)
    if not match:
        return 0
    value = max(-(1 << 63), min(int(match.group(1)), (1 << 63) - 1))
    return ((value + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def gm_hash(data):
    """C gearmand's Jenkins one-at-a-time hash (signed 32-bit arithmetic over signed
    bytes). It orders `status`, `show jobs` and `show unique jobs` rows as C does."""
    value = 0
    for byte in data:
        value = (value + (byte - 256 if byte >= 128 else byte)) & 0xFFFFFFFF
        value = (value + (value << 10)) & 0xFFFFFFFF
        signed = value - 0x100000000 if value & 0x80000000 else value
        value = (signed ^ (signed >> 6)) & 0xFFFFFFFF
    value = (value + (value << 3)) & 0xFFFFFFFF
    signed = value - 0x100000000 if value & 0x80000000 else value
    value = (signed ^ (signed >> 11)) & 0xFFFFFFFF
    value = (value + (value << 15)) & 0xFFFFFFFF
    return value or 1


def stored_handle_number(handle, prefix):
    """The number of one of our handles (prefix and digits), else 0."""
    number = handle[len(prefix):]
    return int(number) if handle.startswith(prefix) and number.isdigit() else 0


def argument_sizes_fit(ptype, args):
    """C's 8 KiB limit on every argument that is not opaque data."""
    plain = args[:-1] if ptype in DATA_TYPES else args
    return all(len(arg) < ARGUMENT_MAX for arg in plain)


# --- jobs and workers ---------------------------------------------------------
#
# A job's life, all of it in Queues below:
#   submit  a client's SUBMIT_JOB* makes a Job, or joins the live job with the same
#           unique. A background job goes to the journal first and waits in no queue
#           until its row is written (the builtin store writes nothing: it queues at once).
#   queue   it waits in its function's FIFO for its priority; an epoch job on a timer.
#   grab    a worker's GRAB_JOB* takes the first job of its newest registration that
#           has one, high priority first.
#   run     WORK_STATUS, WORK_DATA and WORK_WARNING go on to the clients that wait.
#   end     WORK_COMPLETE, WORK_FAIL or WORK_EXCEPTION ends it and the journal deletes
#           its row. A worker that leaves or times out puts it back in its queue (after
#           -j tries it is dropped); `cancel job` and `drop function` end it from outside.

# Where a job's row in the store stands.
NO_ROW = 0
FAILED = 1        # its write failed: its background submitters got ERROR
WRITING = 2       # handed to the writer; JOB_CREATED waits for the commit
STORED = 3
ADOPTED = 4       # in the table of another member of the cluster, served here


class Job:
    """One job, queued or running. Foreground submitters are its `clients`."""

    __slots__ = ("handle", "number", "function", "unique", "data", "priority", "when",
                 "reducer", "retries", "worker", "clients", "ignore", "kind", "background",
                 "queued", "row", "row_unique")

    def __init__(self, handle, number, function, unique, data, priority, when, reducer,
                 background):
        self.handle = handle
        self.number = number              # of the handle; with a paging store, its row's seq
        self.function = function          # its FunctionQueue
        self.unique = unique
        self.data = data
        self.priority = priority
        self.when = when                  # epoch seconds; 0 = now
        self.reducer = reducer
        self.retries = 0
        self.worker = None                # the Registration whose worker runs it
        self.clients = None               # Peers waiting for its result
        self.ignore = False               # abandoned or cancelled: discarded at the next grab
        self.kind = KINDS[background]     # how it was submitted, which is how stats count it
        self.background = background      # a background submission owns it: it outlives its clients
        # C's `job_queued`, the fourth column of `show jobs`: the queue took the job. C
        # sets it for every background submission, even with the builtin queue that keeps
        # nothing, and clears it when the job ends or is cancelled.
        self.queued = False
        self.row = NO_ROW
        self.row_unique = None            # the unique of its row, where it is not `unique`


class Registration:
    """One CAN_DO (or CAN_DO_TIMEOUT) of one connection; duplicates are allowed.
    Jobs belong to the registration that grabbed them, as in C: it decides the
    order in which a departing worker's jobs go back to the queue."""

    __slots__ = ("peer", "function", "timeout", "jobs")

    def __init__(self, peer, function, timeout):
        self.peer = peer
        self.function = function
        self.timeout = timeout            # milliseconds; 0 = none
        self.jobs = []                    # jobs it is running, oldest first


class FunctionQueue:
    """A function's queued jobs, one FIFO per priority, and the workers that can run it."""

    __slots__ = ("name", "queues", "scheduled", "total", "running", "registrations",
                 "wake_next", "wakeable", "max_queue", "by_unique", "by_payload", "bucket",
                 "spill")

    def __init__(self, name):
        self.name = name
        self.queues = (collections.deque(), collections.deque(), collections.deque())
        self.scheduled = 0                # epoch jobs in memory waiting for their time
        self.total = 0                    # jobs queued, scheduled and running, stored ones too
        self.running = 0
        self.registrations = []           # the worker ring that wake-ups walk
        self.wake_next = 0                # where the next wake-up walk starts
        self.wakeable = 0                 # registrations whose peer waits for a NOOP
        self.max_queue = [0, 0, 0]        # per priority; 0 = unlimited
        self.by_unique = {}               # unique -> job, for coalescing
        self.by_payload = {}              # data -> job, for unique "-"
        self.bucket = gm_hash(name) % 991  # C lists functions in a 991-bucket table
        self.spill = None                 # a Spill while part of the queue is in the store only

    def queued(self, priority):
        count = len(self.queues[priority])
        spill = self.spill
        if spill is not None:
            count += spill.stored[priority] + len(spill.behind[priority])
            if priority == NORMAL:
                count += spill.scheduled
        return count + self.scheduled if priority == NORMAL else count


class Spill:
    """The part of a function's queue that is in the store only (see Pager). Per
    priority, the store holds the jobs after `cursor`, in order; memory holds a
    window of the jobs before it, and the jobs that must wait for the stored ones."""

    __slots__ = ("stored", "cursor", "paging", "behind", "scheduled", "pinned", "cancelled")

    def __init__(self):
        self.stored = [0, 0, 0]           # jobs due now that are in the store only
        self.cursor = [0, 0, 0]           # seq of the last job paged in
        self.paging = [False, False, False]   # a page-in is on its way
        # (position, job): in memory, after the stored jobs of seq <= position and
        # before the others (a requeued job, a due epoch job, a foreground job).
        self.behind = (collections.deque(), collections.deque(), collections.deque())
        self.scheduled = 0                # epoch jobs that are in the store only
        self.pinned = {}                  # handle -> a stored job a foreground client joined
        self.cancelled = set()            # seqs of stored jobs cancelled, their rows not yet gone

    def spilled(self, priority):
        return bool(self.stored[priority] or self.paging[priority] or self.behind[priority])

    def empty(self):
        return not (any(self.stored) or any(self.paging) or any(self.behind) or self.scheduled
                    or self.pinned)


class Peer:
    """What the jobs room knows of a connection: the functions it can do and the
    jobs whose results it waits for. Client and worker roles are not enforced."""

    __slots__ = ("registrations", "client_jobs", "sleeping", "noop_sent", "paused")

    def __init__(self):
        self.registrations = []           # newest first, as C grabs
        self.client_jobs = []             # jobs whose results this peer waits for
        self.sleeping = False             # sent PRE_SLEEP and has not grabbed since
        self.noop_sent = False            # has been woken since it went to sleep
        self.paused = False               # its request waits for the store: read no further


SHRINK_FROM = 8192              # bytes of a function's dicts that are worth giving back
TRIM_AFTER_FREEING = 1 << 20   # bytes of tables freed at once that make it worth a trim
_malloc_trim = None


def trim_malloc():
    """Give back to the system the free memory glibc's malloc keeps after large frees
    (it keeps up to twice the largest block it freed); nothing where there is no
    malloc_trim."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (ImportError, OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class Queues:
    """Functions, jobs and worker registrations: C's function.cc, job.cc, worker.cc
    and client.cc. It reaches the outside through three hooks: `emit(peer, type,
    payload)` gives a peer news of a job (JOB_CREATED, WORK_*, NOOP, ERROR), `timers`
    calls it back later, and `journal` keeps background jobs in the store."""

    def __init__(self, options, emit, timers, log, stats):
        self.emit = emit
        self.timers = timers
        self.journal = None               # set by the Journal, which needs the queues first
        self.pager = None                 # the Journal's Pager, with a store that pages
        self.log = log
        self.stats = stats
        self.handle_prefix = options.job_handle_prefix.encode() + b":"
        self.job_retries = options.job_retries & 0xFF
        self.worker_wakeup = options.worker_wakeup & 0xFF
        self.round_robin = options.round_robin
        self.buckets = options.hashtable_buckets
        self.functions = {}               # name -> FunctionQueue
        self.jobs = {}                    # handle -> Job, oldest first
        # What only a few running jobs have, kept here rather than in every Job:
        self.progress = {}                # job -> (numerator, denominator) from WORK_STATUS
        self.timeouts = {}                # job -> its CAN_DO_TIMEOUT timer
        self.job_count = 0                # the last handle number given
        self.scheduled = 0                # epoch jobs in memory waiting for their time
        self.dispatching = True           # False once a graceful stop keeps the queue stored
        # In a cluster: the monotonic time past which this server may have lost its table
        # to another member (its lease), so it hands out nothing after it. Set by the
        # lease thread, read here, so that a server resumed from a pause stops at once.
        self.lease_until = None

    # -- functions and workers

    def find_or_add_function(self, name):
        function = self.functions.get(name)
        if function is None:
            function = self.functions[name] = FunctionQueue(name)
        return function

    def register(self, peer, name, timeout):
        """CAN_DO: the peer can run jobs of this function (timeout in ms, 0 = none)."""
        function = self.find_or_add_function(name)
        registration = Registration(peer, function, timeout)
        peer.registrations.insert(0, registration)
        function.registrations.append(registration)
        if peer.sleeping and not peer.noop_sent:
            function.wakeable += 1

    def unregister(self, peer, registrations):
        """Forget registrations in C's order: each in turn, newest first, requeues
        its jobs (most recently assigned first) while it is still registered, so
        a sleeping worker dropping a function hears the NOOP its own job makes."""
        for registration in registrations:
            jobs, registration.jobs = registration.jobs, []
            for job in reversed(jobs):
                self.requeue(job)
            peer.registrations.remove(registration)
            function = registration.function
            ring = function.registrations
            index = ring.index(registration)
            del ring[index]
            if index < function.wake_next:
                function.wake_next -= 1
            if peer.sleeping and not peer.noop_sent:
                function.wakeable -= 1

    def set_wakeable(self, peer, wakeable):
        """Count, per function, the workers a wake-up would NOOP."""
        was = peer.sleeping and not peer.noop_sent
        if wakeable:
            peer.sleeping = True
            peer.noop_sent = False
        elif was:
            peer.noop_sent = True
        if was != wakeable:
            step = 1 if wakeable else -1
            for registration in peer.registrations:
                registration.function.wakeable += step

    def wake_workers(self, function):
        """NOOP sleeping workers of a function, walking its ring from where the
        last walk stopped; at most -w of them (0 = all)."""
        if not function.wakeable or not self.dispatching:
            return
        ring = function.registrations
        count = len(ring)
        start = function.wake_next % count
        limit = self.worker_wakeup
        woken = 0
        for step in range(count):
            peer = ring[(start + step) % count].peer
            if peer.sleeping and not peer.noop_sent:
                self.set_wakeable(peer, False)
                self.emit(peer, NOOP, b"")
                woken += 1
                if woken == limit:
                    function.wake_next = (start + step + 1) % count
                    return
        function.wake_next = start

    def sleep(self, peer):
        """PRE_SLEEP: a NOOP at once if a job waits for the worker, else at the next one."""
        for registration in peer.registrations if self.may_dispatch() else ():
            if self.has_job(registration.function):
                self.emit(peer, NOOP, b"")
                return
        if self.timeouts:
            for registration in peer.registrations:
                for job in registration.jobs:
                    self.cancel_timeout(job)  # C cancels a sleeping worker's timer
        if peer.noop_sent:
            peer.sleeping = True          # one NOOP per sleep until the next grab
        else:
            self.set_wakeable(peer, True)

    def peer_left(self, peer):
        """A connection closed: its jobs go back to the queue, its waits are abandoned.
        As in C, a sleeping worker is still in the ring while its jobs go back, so the
        NOOP they make may be its own (lost with it; with -w it is one of the N)."""
        self.unregister(peer, list(peer.registrations))
        for job in peer.client_jobs:
            self.detach_client(job, peer)
        peer.client_jobs = []

    # -- submitting

    def submit(self, peer, name, unique, data, priority, background, when=0, reducer=None,
               looked_up=False):
        """A client submits a job: a new one, or the live one with the same unique."""
        if len(unique) > UNIQUE_MAX and reducer is None:
            self.emit(peer, ERROR, UNIQUE_TOO_LARGE)
            return
        function = self.functions.get(name) or self.find_or_add_function(name)
        job = self.coalesce(function, unique, data)
        if function.spill is not None and not (background or looked_up):
            # A stored job may hold the unique: ask the store first. (A background
            # job's row joins a stored one by the store's key when it is written.)
            if self.pager.look_up(peer, job, function, unique, data, priority, when, reducer):
                return
        if job is not None:
            if not background:
                self.attach_client(job, peer)
                self.emit(peer, JOB_CREATED, job.handle)
                return
            if not job.background:
                # Its client is told JOB_CREATED and may never ask again, so the job
                # must now outlive its foreground clients, and be stored (C does not).
                job.background = True
                self.journal.add_joined(job)
            self.journal.acknowledge(peer, job)
            return
        limit = function.max_queue[priority]
        if limit and function.total >= limit:
            self.emit(peer, ERROR, QUEUE_FULL)
            return
        self.job_count += 1
        function.total += 1
        job = self.index(Job(b"%s%d" % (self.handle_prefix, self.job_count), self.job_count,
                             function, unique, data, priority, when, reducer, background))
        self.stats.submitted[job.kind] += 1
        if background:
            if self.journal.add(job):
                self.journal.acknowledge(peer, job)
                return                    # it is queued once its row is written
        else:
            self.attach_client(job, peer)
        self.enqueue(job)
        self.emit(peer, JOB_CREATED, job.handle)

    def stored_job(self, function, number, unique, data, priority, when):
        """A background job read from the store (counted in its function already);
        with a paging store its row's seq is its handle's number."""
        job = self.index(Job(b"%s%d" % (self.handle_prefix, number), number, function,
                             unique, data, priority, when, None, True))
        job.queued = True
        job.row = STORED
        return job

    def index(self, job):
        """Make a new job known: by handle, and by unique for coalescing."""
        self.jobs[job.handle] = job
        unique = job.unique
        if unique:
            if unique != b"-":
                job.function.by_unique[unique] = job
            elif job.data:
                job.function.by_payload[job.data] = job
        return job

    def evict(self, job):
        """The job stays in the store only: forget it here (it is still counted)."""
        del self.jobs[job.handle]
        self.unindex(job)

    def restore(self, unique, name, priority, data, when, seq, now):
        """A background job replayed from the store; None if it is there already."""
        function = self.functions.get(name) or self.find_or_add_function(name)
        if self.coalesce(function, unique, data) is not None:
            return None
        if seq:
            self.job_count = max(self.job_count, seq)
        else:
            self.job_count += 1
        function.total += 1
        job = self.stored_job(function, seq or self.job_count, unique, data, priority, when)
        if when > now:
            self.enqueue(job)
        else:
            function.queues[priority].append(job)
        return job

    def coalesce(self, function, unique, data):
        """The live job a submission with this unique joins, if any."""
        if not unique:
            return None
        if unique == b"-":
            return function.by_payload.get(data) if data else None
        return function.by_unique.get(unique)

    def unindex(self, job):
        """Stop new submissions from joining a job."""
        function = job.function
        unique = job.unique
        if unique == b"-":
            if function.by_payload.get(job.data) is job:
                del function.by_payload[job.data]
        elif unique and function.by_unique.get(unique) is job:
            del function.by_unique[unique]

    def attach_client(self, job, peer):
        if job.clients is None:
            job.clients = [peer]
        else:
            job.clients.append(peer)
        peer.client_jobs.append(job)

    def detach_client(self, job, peer):
        """A waiting client left. A job nobody waits for any more is abandoned,
        unless a background submission owns it (C drops those too; we keep them)."""
        if job.clients is None:
            return
        job.clients.remove(peer)
        if not job.clients:
            job.clients = None
            if not job.background:
                job.ignore = True
                self.unindex(job)

    def is_live(self, job):
        return self.jobs.get(job.handle) is job

    # -- queueing and handing out

    def enqueue(self, job):
        """Make a job available to workers: now, or at its epoch time. (C wakes
        workers for an epoch job at submission too; they find nothing and sleep again.)"""
        if job.when <= 0 or not self.schedule(job):
            self.queue_up(job)            # due now
        if job.function.wakeable:
            self.wake_workers(job.function)

    def schedule(self, job):
        """An epoch job waits for its time on a timer: False if it is due already."""
        delay = job.when - time.time()
        if delay <= 0:
            return False
        job.function.scheduled += 1
        self.scheduled += 1
        self.timers.add(delay, self.job_due, job)
        return True

    def queue_up(self, job):
        """Put a job at the back of its queue, which may be in the store."""
        function = job.function
        spill = function.spill
        if spill is not None and spill.spilled(job.priority):
            spill.behind[job.priority].append((self.job_count, job))
        else:
            function.queues[job.priority].append(job)

    def job_due(self, job):
        function = job.function
        function.scheduled -= 1
        self.scheduled -= 1
        if self.pager is not None:
            self.pager.fired()
        if not self.is_live(job):
            return                        # dropped with its function
        if job.ignore:
            self.discard(job)
            return
        self.queue_up(job)
        self.wake_workers(function)

    def may_dispatch(self):
        return self.dispatching and (self.lease_until is None
                                     or time.monotonic() < self.lease_until)

    def grab(self, peer):
        """GRAB_JOB*: the job the worker runs next, now assigned to it; None if none.
        Its newest registration first, then high, normal, low priority, FIFO within each."""
        if peer.sleeping:
            self.set_wakeable(peer, False)
            peer.sleeping = peer.noop_sent = False
        if not self.may_dispatch():
            return None
        for registration in peer.registrations:
            function = registration.function
            if function.spill is None:
                job = self.first_job(function)
            else:
                job = self.pager.take(function)
                if job is PAGING:
                    return None           # its next job is on its way from the store
            if job is not None:
                if self.round_robin:
                    peer.registrations.remove(registration)
                    peer.registrations.append(registration)
                self.assign(job, registration)
                return job
        return None

    def first_job(self, function):
        for jobs in function.queues:
            while jobs and jobs[0].ignore:
                self.discard(jobs.popleft())
            if jobs:
                return jobs.popleft()
        return None

    def has_job(self, function):
        """Would a grab find a job of this function now?"""
        if function.spill is not None:
            return self.pager.has_job(function)
        for jobs in function.queues:
            while jobs and jobs[0].ignore:
                self.discard(jobs.popleft())
            if jobs:
                return True
        return False

    def assign(self, job, registration):
        job.worker = registration
        job.function.running += 1
        registration.jobs.append(job)
        timeout = registration.timeout
        if timeout > 0:
            self.timeouts[job] = self.timers.add(max(timeout, 1000) / 1000.0,
                                                 self.job_timed_out, job)

    def job_timed_out(self, job):
        del self.timeouts[job]
        if job.worker is not None:
            job.worker.jobs.remove(job)
            self.requeue(job)

    def requeue(self, job):
        """A worker left or timed out holding this job (the caller took it off its
        registration's list): run it again, or drop it after -j tries. Only dropping
        deletes its stored row."""
        job.retries = (job.retries + 1) & 0xFF
        self.unassign(job)
        if self.job_retries and job.retries == self.job_retries:
            self.log.notice(f"Dropped job due to max retry count: {job.handle.decode()}")
            self.notify(job, WORK_FAIL, job.handle)
            self.stats.failed[job.kind] += 1
            self.discard(job)
            return
        self.progress.pop(job, None)
        self.queue_up(job)
        self.wake_workers(job.function)

    def unassign(self, job):
        if self.timeouts:
            self.cancel_timeout(job)
        if job.worker is not None:
            job.worker = None
            job.function.running -= 1

    def cancel_timeout(self, job):
        timer = self.timeouts.pop(job, None)
        if timer is not None:
            self.timers.cancel(timer)

    # -- running and ending

    def running_job(self, peer, handle):
        """The job of this handle, if this peer's worker runs it."""
        job = self.jobs.get(handle)
        if job is None or job.worker is None or job.worker.peer is not peer:
            return None
        return job

    def notify(self, job, ptype, payload):
        """Give news of the job to every client waiting for it, newest first."""
        if job.clients:
            for client in reversed(job.clients):
                self.emit(client, ptype, payload)

    def report_progress(self, job, numerator, denominator, payload):
        self.progress[job] = (numerator, denominator)
        self.notify(job, WORK_STATUS, payload)

    def complete(self, job, payload):
        self.notify(job, WORK_COMPLETE, payload)
        self.stats.completed[job.kind] += 1
        self.finish(job)

    def fail(self, job):
        self.notify(job, WORK_FAIL, job.handle)
        self.stats.failed[job.kind] += 1
        self.finish(job)

    def throw(self, job, payload):
        """WORK_EXCEPTION; a client without the `exceptions` option hears WORK_FAIL."""
        self.notify(job, WORK_EXCEPTION, payload)
        self.stats.failed[job.kind] += 1
        self.finish(job)

    def finish(self, job):
        """The job is over (done, failed, dropped): forget it and delete its row."""
        if job.worker is not None:
            job.worker.jobs.remove(job)
        self.unassign(job)
        self.discard(job)

    def discard(self, job):
        live = self.jobs.pop(job.handle, None)
        if live is not job:
            if live is not None:
                # A job withdrawn from memory, and its row paged in again since.
                self.jobs[job.handle] = live
            return
        function = job.function
        function.total -= 1
        self.unindex(job)
        if not function.total:
            self.shrink(function)
        if self.progress:
            self.progress.pop(job, None)
        if job.clients:
            for client in job.clients:
                client.client_jobs.remove(job)
            job.clients = None
        self.journal.forget(job)

    def withdraw(self, job):
        """A queued stored job leaves memory while its row stays for whoever serves the
        table next: workers pass over it in its queue, and a client waiting for it
        hears that it failed here (the job itself runs once, from its row)."""
        self.notify(job, WORK_FAIL, job.handle)
        job.ignore = True
        job.row = NO_ROW                  # no delete: the row is not this memory's now
        self.discard(job)

    def shrink(self, function):
        """Dicts never shrink and deques keep spare blocks: a function that empties
        lets go of what it grew while it was deep (it stays listed, as in C), and so
        does the job table once no job is left."""
        freed = sys.getsizeof(function.by_unique) + sys.getsizeof(function.by_payload)
        if freed < SHRINK_FROM:
            return                        # it never grew: nothing worth the work
        function.by_unique.clear()        # clear() frees a dict's table
        function.by_payload.clear()
        function.queues = (collections.deque(), collections.deque(), collections.deque())
        if not self.jobs:
            freed += sys.getsizeof(self.jobs)
            self.jobs.clear()
        if freed > TRIM_AFTER_FREEING:
            trim_malloc()

    def cancel(self, job):
        """Admin `cancel job`: tell the clients it failed and delete its row; it is
        discarded when a worker next reaches it, or ends when its worker finishes."""
        self.notify(job, WORK_FAIL, job.handle)
        self.journal.forget(job)
        job.ignore = True
        self.unindex(job)
        if job.function.spill is not None:
            self.pager.cancelled(job)

    def remove_function(self, function):
        """Admin `drop function`: C leaves the queued jobs behind, unreachable;
        we drop them with the function and delete their rows."""
        for job in [job for job in self.jobs.values() if job.function is function]:
            self.notify(job, WORK_FAIL, job.handle)
            self.discard(job)
        del self.functions[function.name]
        if function.spill is not None:
            self.pager.dropped(function)

    def store_failed(self, job, new):
        """Its row could not be written, and its background submitters got ERROR.
        The job goes on as a foreground job if a client waits for it, else it is
        dropped. A `new` job was waiting for its row before it could run."""
        job.background = False
        if job.clients:
            if new:
                self.enqueue(job)
        elif new:
            self.discard(job)
        else:
            job.ignore = True
            self.unindex(job)

    # -- what admin, HTTP and metrics read

    def job_status(self, handle):
        """GET_STATUS: (running, numerator, denominator) of a live job, else None."""
        job = self.jobs.get(handle)
        if job is None:
            return None
        numerator, denominator = self.progress.get(job, (0, 0))
        return job.worker is not None, numerator, denominator

    def unique_status(self, unique):
        """GET_STATUS_UNIQUE: (running, numerator, denominator, clients) of the newest
        live job with this unique in any function, else None."""
        found = None
        if unique:
            for function in self.functions.values():
                job = function.by_unique.get(unique)
                if job is not None and (found is None or job.number > found.number):
                    found = job
        if found is None:
            return None
        numerator, denominator = self.progress.get(found, (0, 0))
        return (found.worker is not None, numerator, denominator,
                len(found.clients) if found.clients else 0)

    def any_running(self):
        return any(function.running for function in self.functions.values())

    def functions_in_c_order(self):
        """C's 991-bucket function table: by bucket, newest first within one."""
        return sorted(reversed(list(self.functions.values())),
                      key=lambda function: function.bucket)

    def jobs_in_c_order(self, key):
        """C's job hash tables (--hashtable-buckets): by bucket, newest first within one."""
        buckets = self.buckets
        return sorted(reversed(list(self.jobs.values())), key=lambda job: key(job) % buckets)


# --- persistence: the store interface, its shared bases, SQLite ---------------

class StoreError(Exception):
    """A store could not do what was asked; the message is one clear line.
    `unavailable` means no record can be written now (the backend is down, or a
    lock or timeout holds every row alike), as opposed to one record it refused."""

    def __init__(self, message, unavailable=False):
        super().__init__(message)
        self.unavailable = unavailable


class Store:
    """Keeps background jobs across restarts. This base is the builtin queue type,
    which keeps nothing.

    A store is used by one thread at a time: replay() runs before serving, then
    the writer thread calls write() with the work of one or more loop turns.
    A record is (unique, function, priority, data, when_to_run, seq), bytes for
    the first two and the data; a key is (unique, function, seq). seq is the job's
    handle number: a store that keeps no order of its own may ignore it.
    """

    persistent = False    # writes go to a backend (so a writer thread runs, and JOB_CREATED waits)
    durable = False       # what is written survives a restart of the backend
    notices = ()          # what the store found at start that the operator should hear of

    @classmethod
    def open(cls, options):
        """Connect and create what is missing; raise StoreError with one clear line."""
        return cls()

    def replay(self):
        """Yield every stored record, in insertion order where the backend knows it."""
        return iter(())

    def write(self, adds, dones):
        """Delete the `dones` keys, then store the `adds` records, all or nothing.
        A store that lost its backend raises StoreError(unavailable=True) at once,
        reconnecting (with backoff) on a later call, never blocking for long.
        A paging store returns {seq: seq of the row} for the adds whose key a stored
        job holds already (they join it); the others return nothing."""

    def close(self):
        pass

    # -- paging: a store whose `pages` is True keeps queues bigger than memory (see
    # Pager). Each row has a `seq`: its place in its queue and its job's handle number.
    # Rows due now have when_to_run 0; the others are "scheduled".

    pages = False

    def counts(self):
        """(the highest seq, [(function, priority, rows due now)], [(function, scheduled
        rows)]), from an index, without reading the rows. Rows whose epoch time has
        come are made due now (when_to_run 0) first: they join the FIFO in their place."""
        raise NotImplementedError

    def page(self, function, priority, after, limit):
        """The next rows due now of a queue, after seq `after`: [(seq, unique, data)]."""
        raise NotImplementedError

    def page_scheduled(self, after, limit):
        """The soonest scheduled rows after (when, seq) `after`:
        [(when, seq, function, unique, priority, data)]."""
        raise NotImplementedError

    def find(self, function, unique):
        """The row with this key: (seq, priority, data, when), or None."""
        raise NotImplementedError

    def find_sequence(self, seq):
        """(function, unique, priority, data, when) of the row `seq`, or None."""
        raise NotImplementedError

    def delete_sequence(self, seq):
        """Delete the row `seq`; (function, priority, when) of what it held, or None."""
        raise NotImplementedError

    def delete_function(self, function):
        raise NotImplementedError

    # -- health: see "persistence: health" below

    def probe(self):
        """Is the backend there? Called by the writer thread when the store has been
        idle for a while; raises StoreError if not. The builtin queue has nothing to ask."""

    @classmethod
    def lock_path(cls, options):
        """A file this store's server holds a lock on for its whole life, so that a
        second server on the same store refuses to start; None: no lock."""
        return None


class Backoff:
    """Fails fast while a backend is down: after a failed attempt, calls fail at
    once for a while (0.1 s, doubling up to 5 s); then one is let through to try."""

    def __init__(self, minimum=0.1, maximum=5.0):
        self.minimum = minimum
        self.maximum = maximum
        self.delay = minimum
        self.until = 0.0
        self.message = ""

    def check(self):
        if time.monotonic() < self.until:
            raise StoreError(self.message, unavailable=True)

    def failed(self, message):
        """Start or lengthen the wait; return the StoreError to raise."""
        self.message = message
        self.until = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return StoreError(message, unavailable=True)

    def succeeded(self):
        self.delay = self.minimum
        self.until = 0.0


class ReconnectingStore(Store):
    """What every store on a connection shares (SQL, Redis, memcached): a write that
    finds an old connection dead tries once more on a new one; when that fails too,
    writes fail at once for a growing interval (Backoff) and then reconnect. So an
    outage costs clients an ERROR, not a wait, and heals by itself.

    A backend provides connect() (a new connection, or a driver error),
    disconnect(), write_batch(adds, dones) on `self.connection`, and sorts its
    driver's errors: lost() means the connection is gone; blocked() that every
    record would fail alike now (a lock held elsewhere, a timeout, a server that
    refuses writes); any other is this batch's own (a record the backend refuses).
    """

    persistent = True
    durable = True
    driver_error = Exception          # the driver's base exception class(es)

    def __init__(self, label):
        self.label = label            # names the backend in messages, never a password
        self.connection = None
        self.backoff = Backoff()

    def connect(self):
        raise NotImplementedError

    def disconnect(self):
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:
                pass
            self.connection = None

    def write_batch(self, adds, dones):
        raise NotImplementedError

    def connected(self, connection):
        """A new connection is made (a hook for what a store must note of it)."""

    def lost(self, error):
        return False

    def blocked(self, error):
        return False

    def rollback(self):
        """Leave nothing of a failed batch for the next one to commit."""

    def describe(self, error):
        return " ".join(str(error).split()) or type(error).__name__

    def error(self, error, unavailable=False):
        return StoreError(f"{self.label}: {self.describe(error)}", unavailable)

    def attempt(self, work, patient=True):
        """work() on the connection, made if there is none: an old connection found
        dead is replaced once at once; a new one that fails starts the backoff, during
        which attempts fail at once (unless not `patient`: a probe)."""
        if patient:
            self.backoff.check()
        retried = False
        while True:
            fresh = self.connection is None
            if fresh:
                try:
                    self.connection = self.connect()
                    self.connected(self.connection)
                except self.driver_error as error:
                    self.disconnect()
                    raise self.backoff.failed(str(self.error(error))) from None
            try:
                result = work()
            except StoreError:
                self.rollback()
                raise
            except self.driver_error as error:
                if not self.lost(error):
                    self.rollback()
                    raise self.error(error, self.blocked(error)) from None
                self.disconnect()
                if fresh or retried:
                    raise self.backoff.failed(str(self.error(error))) from None
                retried = True    # an old connection died (idle timeout, restart): try a new one
                continue
            except Exception:
                self.rollback()
                raise
            self.backoff.succeeded()
            return result

    def write(self, adds, dones):
        return self.attempt(lambda: self.write_batch(adds, dones))

    def close(self):
        self.disconnect()

    def ping(self):
        """One cheap round trip on `self.connection` (a driver error if it fails)."""

    def probe(self):
        """Ping, on a new connection if the old one has died, backoff or not; a
        StoreError if the backend cannot be reached. Success ends a backoff at once."""
        self.attempt(self.ping, patient=False)


class SqlStore(ReconnectingStore):
    """What the SQL stores share: C's table, created if missing, and its replay. A
    dialect supplies connect(), table_exists(), write_batch() and its statements."""

    # C gearmand's table; {table} is interpolated unquoted, as C does.
    create_sql = ("CREATE TABLE {table} ( unique_key TEXT, function_name TEXT, priority INTEGER,"
                  " data BLOB, when_to_run INTEGER, PRIMARY KEY (unique_key, function_name))")
    select_sql = ("SELECT unique_key, function_name, priority, data, when_to_run, 0"
                  " FROM {table}")

    def __init__(self, table, label):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", table):
            raise StoreError(f"invalid table name {table!r}")
        super().__init__(label)
        self.table = table

    def table_exists(self, cursor):
        raise NotImplementedError

    def replay_cursor(self):
        return self.connection.cursor()

    def sql(self, statement):
        return statement.format(table=self.table)

    # -- a cluster (--cluster): a dialect that can says how to take a session lock,
    # name and end a session, and read the database's clock (see Lease)

    clusters = False
    fence = None                      # (cluster, member, owner, epoch) a write must see
    fence_fresh_until = 0.0           # monotonic: till then the lease is too fresh to be lost
    session = None                    # the id of the writer's connection, to be ended
    try_lock_sql = unlock_sql = session_sql = kill_sql = now_sql = share_sql = ""
    cluster_session_sql = page_all_sql = ""

    @staticmethod
    def lock_key(name):
        return name

    @classmethod
    def open_table(cls, options, table):
        """The same store, on another member's table."""
        raise NotImplementedError

    def cluster_setup(self, connection):
        """Create the cluster's table if it is missing; lock waits of this connection end."""
        cursor = connection.cursor()
        try:
            cursor.execute(self.cluster_session_sql)
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {CLUSTER_TABLE} (cluster VARCHAR(200)"
                           f" NOT NULL, member VARCHAR(200) NOT NULL, owner VARCHAR(200) NOT"
                           f" NULL, epoch BIGINT NOT NULL, lease_expires DOUBLE PRECISION NOT"
                           f" NULL, sessions VARCHAR(100) NOT NULL, wanted INT NOT NULL,"
                           f" address VARCHAR(200) NOT NULL, PRIMARY KEY (cluster, member))")
        finally:
            cursor.close()
        connection.commit()

    def check_fence(self, cursor):
        """In a write's own transaction: does this server still hold the table at its
        epoch? The share lock makes an adoption wait for a write under way."""
        if self.fence is None:
            return
        cluster, member, owner, epoch = self.fence
        if epoch is not None and time.monotonic() < self.fence_fresh_until:
            return    # renewed within half a lease: nobody may have taken the table since
        cursor.execute(f"SELECT epoch FROM {CLUSTER_TABLE} WHERE cluster = %s AND member = %s"
                       f" AND owner = %s{self.share_sql}", (cluster, member, owner))
        rows = cursor.fetchall()
        if epoch is None or not rows or rows[0][0] != epoch:
            raise StoreError(f"{self.label}: not written: this server does not hold the "
                             f"table {member} in cluster {cluster} now", unavailable=True)

    def connected(self, connection):
        if self.fence is not None:
            cursor = connection.cursor()
            try:
                cursor.execute(self.session_sql)
                self.session = cursor.fetchall()[0][0]
            finally:
                cursor.close()

    @staticmethod
    def quietly_close(connection):
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    def read(self, work):
        """work(cursor) on the connection, then COMMIT, which ends the read's snapshot:
        its result. Reads fail and reconnect as writes do (see attempt)."""
        def run():
            cursor = self.connection.cursor()
            try:
                result = work(cursor)
            finally:
                cursor.close()
            self.connection.commit()
            return result
        return self.attempt(run)

    def page_all(self, after, limit):
        """An adopted table's rows after seq `after`, in order:
        [(seq, function, unique, priority, data, when)]."""
        def work(cursor):
            cursor.execute(self.sql(self.page_all_sql), (after, limit))
            return [(seq, bytes(function or b""), bytes(unique or b""), priority or 0,
                     bytes(data or b""), when or 0)
                    for seq, function, unique, priority, data, when in cursor.fetchall()]
        return self.read(work)

    def setup(self):
        """Connect and create C's table if it is missing; StoreError if that fails."""
        try:
            self.connection = self.connect()
            cursor = self.connection.cursor()
            if not self.table_exists(cursor):
                cursor.execute(self.sql(self.create_sql))
            cursor.close()
            self.connection.commit()
        except self.driver_error as error:
            self.disconnect()
            raise self.error(error) from None

    def replay(self):
        try:
            cursor = self.replay_cursor()
            cursor.execute(self.sql(self.select_sql))
            for unique, function, priority, data, when, seq in cursor:
                yield (bytes(unique or b""), bytes(function or b""), priority or 0,
                       bytes(data or b""), when or 0, seq)
            cursor.close()
            self.connection.commit()
        except self.driver_error as error:
            raise self.error(error) from None

    def rollback(self):
        if self.connection is not None:
            try:
                self.connection.rollback()
            except Exception:
                pass

    def ping(self):
        cursor = self.connection.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            cursor.close()
        self.connection.rollback()        # leave no transaction open (Postgres)


class SqliteStore(SqlStore):
    """SQLite in WAL mode, durable against power loss unless --sqlite-sync=normal.
    A row's seq is its rowid: insertion order, as C's rows have it too. Two indexes
    that C never reads page the queues in: (function_name, priority, when_to_run),
    whose entries end in the rowid, and the scheduled rows' when_to_run."""

    pages = True
    driver_error = sqlite3.Error
    # Unique and function are bound as TEXT, as C binds them; C refuses BLOBs there on replay.
    # Many rows go in one statement: executemany would hand the GIL back and forth per row.
    # A key a stored job holds already is not overwritten: the new job joins that one.
    insert_sql = ("INSERT INTO {table} (rowid, unique_key, function_name, priority, data,"
                  " when_to_run) VALUES {rows} ON CONFLICT DO NOTHING")
    insert_row = "(?, CAST(? AS TEXT), CAST(? AS TEXT), ?, ?, ?)"
    delete_sql = "DELETE FROM {table} WHERE rowid IN ({seqs})"
    # SQLite takes 32,766 parameters since 3.32 (999 before): 1,000 rows a statement
    # write a usual batch in one, where 160 took three GIL hand-offs and parses.
    rows_per_statement = 1000 if sqlite3.sqlite_version_info >= (3, 32) else 160
    index_sql = ("CREATE INDEX IF NOT EXISTS {index}_gearmand_queue ON {name}"
                 " (function_name, priority, when_to_run)",
                 "CREATE INDEX IF NOT EXISTS {index}_gearmand_scheduled ON {name}"
                 " (when_to_run) WHERE when_to_run != 0")
    counts_sql = ("SELECT function_name, priority, COUNT(*) FROM {table} WHERE when_to_run = 0"
                  " GROUP BY function_name, priority")
    # How many rows each queue has, kept by write_batch in the transaction that changes
    # them, so that a start on 100 M stored jobs need not count them. The counts are
    # trusted only while every write since the last full count was ours: a trigger
    # marks them stale at the first row anyone else (C gearmand, the sqlite3 shell, our
    # own drop function and cancel) inserts, deletes or updates, and only a full count
    # at start trusts them again. Scheduled rows are counted per function, priority 0.
    counts_table_sql = ("CREATE TABLE IF NOT EXISTS {index}_gearmand_counts (function_name"
                        " TEXT, priority INTEGER, scheduled INTEGER, rows INTEGER NOT NULL,"
                        " PRIMARY KEY (function_name, priority, scheduled))",
                        "CREATE TABLE IF NOT EXISTS {index}_gearmand_counted (valid INTEGER)")
    stale_trigger_sql = ("CREATE TRIGGER IF NOT EXISTS {index}_gearmand_{event} AFTER {event}"
                         " ON {name} WHEN (SELECT valid FROM {name}_gearmand_counted)"
                         " BEGIN UPDATE {name}_gearmand_counted SET valid = 0; END")
    add_count_sql = ("INSERT INTO {table}_gearmand_counts VALUES (CAST(? AS TEXT), ?, ?, ?)"
                     " ON CONFLICT DO UPDATE SET rows = rows + excluded.rows")
    # Through the partial index: the planner would rather scan the whole queue index,
    # which costs seconds on a table of 100 M rows with no epoch job in it.
    scheduled_counts_sql = ("SELECT function_name, COUNT(*) FROM {table} INDEXED BY"
                            " {index}_gearmand_scheduled WHERE when_to_run != 0"
                            " GROUP BY function_name")
    page_sql = ("SELECT rowid, IFNULL(unique_key, ''), IFNULL(data, X'') FROM {table}"
                " WHERE function_name = CAST(? AS TEXT) AND priority = ? AND when_to_run = 0"
                " AND rowid > ? ORDER BY rowid LIMIT ?")
    page_scheduled_sql = ("SELECT when_to_run, rowid, function_name, IFNULL(unique_key, ''),"
                          " priority, IFNULL(data, X'') FROM {table} WHERE when_to_run != 0"
                          " AND (when_to_run, rowid) > (?, ?) ORDER BY when_to_run, rowid LIMIT ?")
    find_sql = ("SELECT rowid, priority, IFNULL(data, X''), when_to_run FROM {table}"
                " WHERE unique_key = CAST(? AS TEXT) AND function_name = CAST(? AS TEXT)")
    find_sequence_sql = ("SELECT function_name, IFNULL(unique_key, ''), priority,"
                         " IFNULL(data, X''), when_to_run FROM {table} WHERE rowid = ?")
    # With --store-queue-on-shutdown the queue is read whole at start.
    select_sql = ("SELECT IFNULL(unique_key, ''), IFNULL(function_name, ''), priority,"
                  " IFNULL(data, X''), IFNULL(when_to_run, 0), rowid FROM {table} ORDER BY rowid")

    def __init__(self, path, table, synchronous="full"):
        super().__init__(table, f"SQLite {path}")
        self.path = path
        self.synchronous = synchronous

    @classmethod
    def open(cls, options):
        if not options.sqlite_db:
            raise StoreError("missing required --libsqlite3-db=<dbfile> argument")
        # Absolute: the WAL files are found by name later, and -d changes directory.
        store = cls(os.path.abspath(options.sqlite_db), options.sqlite_table, options.sqlite_sync)
        store.setup()
        return store

    def connect(self):
        # The loop thread replays, then only the writer thread uses the connection.
        connection = sqlite3.connect(self.path, timeout=6.0, isolation_level=None,
                                     check_same_thread=False)
        connection.text_factory = bytes
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        return connection

    def setup(self):
        super().setup()
        try:
            self.ensure_when_to_run(self.connection)
            name = self.table.rpartition(".")[2]
            for statement in self.index_sql + self.counts_table_sql:
                self.connection.execute(statement.format(index=self.table, name=name))
            for event in ("INSERT", "DELETE", "UPDATE"):
                self.connection.execute(self.stale_trigger_sql.format(
                    index=self.table, name=name, event=event))
        except sqlite3.Error as error:
            self.disconnect()
            raise self.error(error) from None

    def blocked(self, error):
        # Every row alike: another process holds the database's lock past the busy
        # timeout, the table is gone, the disk is full or read-only.
        return isinstance(error, sqlite3.OperationalError)

    def ensure_when_to_run(self, connection):
        """Tables of gearmand before 0.22 lack when_to_run; C adds it the same way."""
        try:
            connection.execute(self.sql("SELECT when_to_run FROM {table} LIMIT 0"))
        except sqlite3.OperationalError as error:
            if "no such column" in str(error):
                connection.execute(self.sql("ALTER TABLE {table} ADD COLUMN when_to_run INTEGER"))

    def table_exists(self, cursor):
        schema, _, name = self.table.rpartition(".")     # "main.queue" is allowed
        master = schema + ".sqlite_master" if schema else "sqlite_master"
        cursor.execute(f"SELECT 1 FROM {master} WHERE type='table' AND name=?", (name,))
        return cursor.fetchone() is not None

    def replay(self):
        try:
            yield from self.connection.execute(self.sql(self.select_sql))
        except sqlite3.Error as error:
            raise self.error(error) from None

    def write_batch(self, adds, dones):
        step = self.rows_per_statement
        joins = {}
        cursor = self.connection.cursor()
        try:
            # IMMEDIATE: a read first and a write later could not wait for the lock.
            cursor.execute("BEGIN IMMEDIATE")
            counting = cursor.execute(self.sql("SELECT valid FROM {table}_gearmand_counted")
                                      ).fetchone() == (1,)
            changes = collections.Counter() if counting else None
            for start in range(0, len(dones), step * 6):
                chunk = [seq for _, _, seq in dones[start:start + step * 6]]
                statement = self.delete_sql.format(table=self.table,
                                                   seqs=", ".join(["?"] * len(chunk)))
                if not counting:
                    cursor.execute(statement, chunk)
                else:
                    cursor.execute(statement + " RETURNING function_name, priority, when_to_run",
                                   chunk)
                    for function, priority, when in cursor.fetchall():
                        changes[function, 0 if when else priority, when != 0] -= 1
            for start in range(0, len(adds), step):
                chunk = adds[start:start + step]
                cursor.execute(self.insert_sql.format(
                    table=self.table, rows=", ".join([self.insert_row] * len(chunk))),
                    [value for unique, function, priority, data, when, seq in chunk
                     for value in (seq, unique, function, priority, data, when)])
                taken = {}
                if cursor.rowcount != len(chunk):
                    taken = self.taken_keys(cursor, chunk)
                    joins.update(taken)
                if counting:
                    for _, function, priority, _, when, seq in chunk:
                        if seq not in taken:
                            changes[function, 0 if when else priority, when != 0] += 1
            if counting:
                cursor.executemany(self.sql(self.add_count_sql),
                                   [key + (rows,) for key, rows in changes.items() if rows])
                cursor.execute(self.sql("UPDATE {table}_gearmand_counted SET valid = 1"))
            cursor.execute("COMMIT")
        finally:
            cursor.close()
        return joins

    def taken_keys(self, cursor, chunk):
        """{seq: seq of the stored row} for the rows of `chunk` that were not inserted."""
        seqs = [row[5] for row in chunk]
        cursor.execute(self.sql("SELECT rowid FROM {table} WHERE rowid IN (%s)"
                                % ", ".join(["?"] * len(seqs))), seqs)
        inserted = {seq for seq, in cursor.fetchall()}
        joins = {}
        for unique, function, _, _, _, seq in chunk:
            if seq not in inserted:
                cursor.execute(self.sql(self.find_sql), (unique, function))
                found = cursor.fetchone()
                if found is None:
                    raise StoreError(f"{self.label}: the table refused the job {unique!r} of "
                                     f"{function!r}: its unique is taken under another key "
                                     f"of the table (the table's own key, not C's)")
                joins[seq] = found[0]
        return joins

    # -- paging

    def counts(self):
        connection = self.connection
        try:
            # Epoch jobs due already take their place in the FIFO, by rowid, as C's
            # replay queues them; only those still to come are scheduled. (If there
            # are any, this makes the kept counts stale.)
            connection.execute(self.sql("UPDATE {table} SET when_to_run = 0 WHERE"
                                        " when_to_run != 0 AND when_to_run <= ?"),
                               (int(time.time()),))
            highest = connection.execute(self.sql("SELECT MAX(rowid) FROM {table}")).fetchone()[0]
            if connection.execute(self.sql("SELECT valid FROM {table}_gearmand_counted")
                                  ).fetchone() == (1,):
                kept = connection.execute(self.sql(
                    "SELECT function_name, priority, scheduled, rows FROM {table}_gearmand_counts"
                    " WHERE rows > 0")).fetchall()
                return (highest or 0, [row[:2] + row[3:] for row in kept if not row[2]],
                        [(row[0], row[3]) for row in kept if row[2]])
            due, scheduled = self.count_rows()
        except sqlite3.Error as error:
            raise self.error(error) from None
        return highest or 0, due, scheduled

    def count_rows(self):
        """Count every queue from the indexes, and keep the counts from now on."""
        connection = self.connection
        # C reads a NULL when_to_run (tables older than gearmand 0.22) as 0: so do we.
        # (A scan of the table: only rows someone else wrote can have one.)
        connection.execute(self.sql("UPDATE {table} SET when_to_run = 0"
                                    " WHERE when_to_run IS NULL"))
        due = connection.execute(self.sql(self.counts_sql)).fetchall()
        odd = [(function, priority) for function, priority, _ in due if priority not in (0, 1, 2)]
        if odd:
            # C replays other priorities as NORMAL: make them so, and count them again.
            for function, priority in odd:
                connection.execute(self.sql("UPDATE {table} SET priority = 1 WHERE function_name"
                                            " = CAST(? AS TEXT) AND priority IS ?"),
                                   (function, priority))
            due = connection.execute(self.sql(self.counts_sql)).fetchall()
        scheduled = connection.execute(self.scheduled_counts_sql.format(
            table=self.table, index=self.table.rpartition(".")[2])).fetchall()
        # Nobody else writes while we hold the lock file; C gearmand, which takes
        # none, would make the counts stale again by its first row.
        connection.execute("BEGIN")
        try:
            connection.execute(self.sql("DELETE FROM {table}_gearmand_counts"))
            connection.executemany(self.sql(self.add_count_sql),
                                   [(function, priority, False, rows)
                                    for function, priority, rows in due]
                                   + [(function, 0, True, rows) for function, rows in scheduled])
            connection.execute(self.sql("DELETE FROM {table}_gearmand_counted"))
            connection.execute(self.sql("INSERT INTO {table}_gearmand_counted VALUES (1)"))
            connection.execute("COMMIT")
        except sqlite3.Error:
            connection.execute("ROLLBACK")
            raise
        return due, scheduled

    def page(self, function, priority, after, limit):
        return self.connection.execute(self.sql(self.page_sql),
                                       (function, priority, after, limit)).fetchall()

    def page_scheduled(self, after, limit):
        return self.connection.execute(self.sql(self.page_scheduled_sql),
                                       (after[0], after[1], limit)).fetchall()

    def find(self, function, unique):
        return self.connection.execute(self.sql(self.find_sql), (unique, function)).fetchone()

    def find_sequence(self, seq):
        return self.connection.execute(self.sql(self.find_sequence_sql), (seq,)).fetchone()

    def delete_sequence(self, seq):
        row = self.connection.execute(self.sql("DELETE FROM {table} WHERE rowid = ? RETURNING"
                                               " function_name, priority, when_to_run"),
                                      (seq,)).fetchone()
        return row

    def delete_function(self, function):
        self.connection.execute(self.sql("DELETE FROM {table} WHERE function_name = CAST(? AS TEXT)"),
                                (function,))

    def rollback(self):
        if self.connection is not None and self.connection.in_transaction:
            super().rollback()

    @classmethod
    def lock_path(cls, options):
        return os.path.abspath(options.sqlite_db) + ".lock" if options.sqlite_db else None


# Queue types: name -> (module or None for this file, class, driver module, pip extra, title).
QUEUE_TYPES = {
    "builtin": (None, "Store", None, None, "builtin"),
    "libsqlite3": (None, "SqliteStore", None, None, "libsqlite3"),
    "sqlite": (None, "SqliteStore", None, None, "libsqlite3"),
    "mysql": ("mysql", "MySQLStore", "mysql.connector", "mysql", "MySQL"),
    "libdrizzle": ("mysql", "MySQLStore", "mysql.connector", "mysql", "MySQL"),
    "postgres": ("postgres", "PostgresStore", "psycopg2", "postgres", "Postgres"),
    "postgresql": ("postgres", "PostgresStore", "psycopg2", "postgres", "Postgres"),
    "libpq": ("postgres", "PostgresStore", "psycopg2", "postgres", "Postgres"),
    "libmemcached": ("memcached", "MemcachedStore", "pymemcache", "memcached", "libmemcached"),
    "memcached": ("memcached", "MemcachedStore", "pymemcache", "memcached", "libmemcached"),
    "redis": ("redis", "RedisStore", "redis", "redis", "redis"),
    "libtokyocabinet": ("tokyocabinet", "TokyoCabinetStore", None, None, "libtokyocabinet"),
    "tokyocabinet": ("tokyocabinet", "TokyoCabinetStore", None, None, "libtokyocabinet"),
}
DRIVER_PACKAGES = {"mysql.connector": "mysql-connector-python", "psycopg2": "psycopg2-binary",
                   "pymemcache": "pymemcache", "redis": "redis"}
# What `-q` accepts, for messages and --help: each title with its other names.
QUEUE_TYPE_NAMES = [title + "".join(f", {name}" for name, entry in QUEUE_TYPES.items()
                                    if entry[4] == title and name != title.lower())
                    for title in dict.fromkeys(entry[4] for entry in QUEUE_TYPES.values())]


def store_class(queue_type):
    """The Store class for a queue type name, importing its backend only now."""
    entry = QUEUE_TYPES.get(queue_type.lower())
    if entry is None:
        raise StoreError(f"Error while initializing the queue : {queue_type} (queue types: "
                         + "; ".join(QUEUE_TYPE_NAMES) + ")")
    module_name, class_name, driver, extra, title = entry
    if module_name is None:
        return globals()[class_name]
    if driver and importlib.util.find_spec(driver.split(".")[0]) is None:
        raise StoreError(f"queue type {title} needs {DRIVER_PACKAGES[driver]}: "
                         f"pip install {DRIVER_PACKAGES[driver]} (or, installed with pip, "
                         f"pip install 'gearmand-py[{extra}]')")
    # The backends are extras/ beside this file. Vendored in a package (myproj/gearmand.py)
    # they are its subpackage (myproj.extras); a checkout or a plain copy loads them as
    # gearmand_extras, the package pip installs beside the module gearmand.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extras", module_name + ".py")
    name = (f"{__package__}.extras." if __package__ else "gearmand_extras.") + module_name
    if name not in sys.modules and not os.path.isfile(path) and (
            __package__ or importlib.util.find_spec("gearmand_extras") is None):
        raise StoreError(f"queue type {title} needs extras/{module_name}.py next to "
                         f"gearmand.py: copy it there, or pip install "
                         f"'gearmand-py[{extra or 'all'}]'")

    def driver_failed(error):
        # The driver is there but does not load (too old, a missing system library).
        package = DRIVER_PACKAGES.get(driver)
        return StoreError(f"queue type {title}: cannot load its driver ({error}): "
                          + (f"pip install --upgrade {package} (or, installed with pip, "
                             if package else "")
                          + f"pip install --upgrade 'gearmand-py[{extra or 'all'}]'"
                          + (")" if package else ""))
    try:
        if driver:
            importlib.import_module(driver)
    except ImportError as error:
        raise driver_failed(error) from None
    try:
        if name not in sys.modules and not __package__ and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return getattr(importlib.import_module(name), class_name)
    except ImportError as error:
        sys.modules.pop(name, None)
        if driver and (error.name or "").split(".")[0] == driver.split(".")[0]:
            raise driver_failed(error) from None      # a part the backend needs is missing
        raise StoreError(f"queue type {title}: cannot load {name} ({error}): extras/ and "
                         f"gearmand.py must come from the same release") from None


# --- persistence: the writer thread and the journal ---------------------------

# Nobody waits for a delete, so the journal keeps them until DELETE_DELAY has passed
# or DELETE_BATCH have gathered, unless new jobs go to the writer anyway: the
# writer thread then wakes some twenty times a second during a drain, not at every
# loop turn. A crash in between only runs a finished job again.
DELETE_DELAY = 0.05
DELETE_BATCH = 2000

# Uniques that the store's (unique, function) key cannot hold apart. C lets such
# jobs overwrite or refuse each other; we give each a row under a generated
# unique that C replays as an ordinary one, and that we read back as it was.
# A client's own unique that reads like one of those is stored with a mark.
STORE_OWN = b"gearmand.py:"
STORE_NO_UNIQUE = b"gearmand.py:no-unique:"
STORE_PAYLOAD_UNIQUE = b"gearmand.py:payload-unique:"
STORE_MARKED = b"gearmand.py:="
STORE_GENERATED = re.compile(rb"gearmand\.py:(no|payload)-unique:"
                             rb"([0-9a-f]{12}\.[0-9]+|[0-9a-f]{32})\Z")


def name_row(job, run_id):
    """Encode: a job without a unique of its own gets a generated one. Unique "-" joins
    jobs by payload, so such a row's unique is a hash of the payload: a stored job with
    the same payload then holds the key, as a live one would in memory."""
    if job.row_unique is None:
        if job.unique == b"" or job.unique == b"-":
            if job.unique and job.data:
                job.row_unique = payload_row_unique(job.data)
            else:
                job.row_unique = b"%s%s.%d" % (
                    STORE_PAYLOAD_UNIQUE if job.unique else STORE_NO_UNIQUE, run_id, job.number)
        elif job.unique.startswith(STORE_OWN):
            job.row_unique = marked_row_unique(job.unique)


def marked_row_unique(unique):
    """The row's unique for a client's own unique that would read back as one of ours
    (one byte longer); None for any other, which is stored as it is."""
    if unique.startswith(STORE_OWN) and (unique.startswith(STORE_MARKED)
                                         or STORE_GENERATED.match(unique)):
        return STORE_MARKED + unique[len(STORE_OWN):]
    return None


def payload_row_unique(data):
    return STORE_PAYLOAD_UNIQUE + hashlib.blake2b(data, digest_size=16).hexdigest().encode()


def read_row_unique(unique):
    """Decode: (the job's unique, its row's unique if that differs) of a stored key."""
    if unique.startswith(STORE_OWN):
        if unique.startswith(STORE_MARKED):
            return STORE_OWN + unique[len(STORE_MARKED):], unique
        generated = STORE_GENERATED.match(unique)
        if generated:
            return (b"" if generated.group(1) == b"no" else b"-"), unique
    elif len(unique) == UNIQUE_MAX and unique[-1] == 0:
        return unique[:-1], unique            # C's truncated 64-byte unique
    elif unique == b"" or unique == b"-":
        return unique, unique                 # C's row: its key stays what it is
    return unique, None


def row_key(job):
    """(unique, function, seq): what names the job's row in the store (a store that
    knows no seq goes by the first two)."""
    return (job.unique if job.row_unique is None else job.row_unique, job.function.name,
            job.number)


def row_record(job):
    """(unique, function, priority, data, when, seq): the job's row in the store."""
    return (job.unique if job.row_unique is None else job.row_unique, job.function.name,
            job.priority, job.data, job.when, job.number)


class Batch:
    """What the journal hands the writer at the end of one or more loop turns: jobs
    to write, in submission order, keys to delete, and requests to run after them.
    The jobs in `running` were queued or running before (a background submission
    joined them); the others wait for their row before they may run."""

    __slots__ = ("jobs", "running", "dones", "requests")

    def __init__(self, jobs, running, dones, requests):
        self.jobs = jobs
        self.running = running
        self.dones = dones
        self.requests = requests


class StoreRequest:
    """A read (or a delete) that the writer thread runs on the store after its
    batch's writes: `method` of the store with `arguments`. The loop then calls
    `answer` with the result, or with the exception it raised."""

    __slots__ = ("method", "arguments", "answer", "result")

    def __init__(self, method, arguments, answer):
        self.method = method
        self.arguments = arguments
        self.answer = answer
        self.result = None

    def run(self, store):
        try:
            self.result = getattr(store, self.method)(*self.arguments)
        except Exception as error:        # the loop hears of it; the writer must live
            self.result = error if isinstance(error, StoreError) else StoreError(
                f"{type(error).__name__}: {error}")


def in_order(batches):
    """The batches in groups to write one transaction each: all of them, unless a
    batch deletes a row an earlier one adds (a transaction deletes before it adds)."""
    groups = [[]]
    added = set()
    for batch in batches:
        if added and any(key[2] in added for key in batch.dones):
            groups.append([])
            added = set()
        groups[-1].append(batch)
        added.update(job.number for job in batch.jobs)
    return groups


class StoreWriter(threading.Thread):
    """Owns the store after replay. Takes the batches of many loop turns, writes
    them in one transaction (group commit), runs their requests, and reports each
    batch that had jobs or requests back to the loop (nobody waits for deletes
    alone). Deletes that fail are retried with backoff; jobs that fail are
    reported, so their clients get ERROR.
    """

    RETRY_DELAY_MAX = 5.0

    def __init__(self, store, on_written, log, stats):
        super().__init__(name="store-writer", daemon=True)
        self.store = store
        self.on_written = on_written      # called from this thread: (batch, failed jobs, joins)
        self.log = log
        self.stats = stats
        self.batches = queue.Queue()
        self.checked = time.monotonic()   # the last write or probe (see StoreHealth)

    def submit(self, batch):
        """Queue a Batch for the next transaction; None stops the thread."""
        self.batches.put(batch)

    def run(self):
        retry = []                        # keys whose delete failed, to retry
        due = None                        # when to retry them
        retry_delay = DELETE_DELAY
        while True:
            try:
                wake = self.checked + PROBE_INTERVAL
                if due is not None:
                    wake = min(wake, due)
                batches = [self.batches.get(timeout=max(wake - time.monotonic(), 0))]
            except queue.Empty:
                batches = []
                if time.monotonic() >= self.checked + PROBE_INTERVAL:
                    self.probe()          # idle: is the store still there?
            while True:
                try:
                    batches.append(self.batches.get_nowait())
                except queue.Empty:
                    break
            stop = None in batches
            batches = [batch for batch in batches if batch is not None]
            retrying = due is not None and time.monotonic() < due
            for group in in_order(batches):
                dones = retry + [key for batch in group for key in batch.dones]
                adds = [row_record(job) for batch in group for job in batch.jobs]
                # A read must not find the rows of jobs that ended before it was asked.
                reads = any(batch.requests for batch in group)
                failed, joins, retry = None, {}, []
                if adds or (dones and (reads or stop or not retrying)):
                    failed, joins = self.write(adds, dones, group)
                    if failed is None:
                        due, retry_delay = None, DELETE_DELAY
                    else:
                        # With a store that deletes by key, rows written one by one since
                        # replaced what these deletes aimed at. By seq they are apart.
                        written = set() if self.store.pages else {
                            row_key(job)[:2] for batch in group for job in batch.jobs
                            if job not in failed}
                        retry = [key for key in dones if key[:2] not in written]
                        retry_delay = min(retry_delay * 2, self.RETRY_DELAY_MAX)
                        due = time.monotonic() + retry_delay if retry else None
                else:
                    retry = dones
                for batch in group:
                    for request in batch.requests:
                        request.run(self.store)
                    if batch.jobs or batch.requests:
                        self.on_written(batch, failed or (), joins)
            if stop:
                return

    def write(self, adds, dones, batches):
        """Write everything at once; on failure, find the adds that cannot be written
        one by one. Returns (None, joins) if all was written, else (failed jobs, joins)."""
        started = self.checked = time.monotonic()
        every_job = {job for batch in batches for job in batch.jobs}
        try:
            joins = self.store.write(adds, dones) or {}
            self.stats.commit_seconds.observe(time.monotonic() - started)
            self.stats.batch_sizes.observe(len(adds) + len(dones))
            self.health.reached()
            return None, joins
        except Exception as error:        # a driver may raise anything; the thread must live
            self.stats.store_errors += 1
            self.stats.store_last_error = str(error)
            self.stats.store_last_error_time = time.time()
            if getattr(error, "unavailable", False):
                self.health.unreachable(error)
                return every_job, {}
            # The backend answered: it refused something of this batch.
            self.log.limited("store write", "ERROR", f"persistent queue write failed: {error}")
        if dones and adds:
            # Perhaps only a delete fails: the adds alone must not fail with it. An add
            # whose key the row of a delete still holds would join a job that is over:
            # that one fails instead.
            try:
                joins = self.store.write(adds, []) or {}   # the deletes are retried later
            except Exception as error:
                if getattr(error, "unavailable", False):
                    return every_job, {}
            else:
                ending = {key[:2] for key in dones}
                stale = {job for job in every_job
                         if job.number in joins and row_key(job)[:2] in ending}
                return stale, {seq: row for seq, row in joins.items()
                               if not any(job.number == seq for job in stale)}
        failed, joins = every_job, {}
        if len(adds) > 1:
            failed = set()
            for batch in batches:         # in order: a later row may replace an earlier
                for job in batch.jobs:
                    try:
                        joins.update(self.store.write([row_record(job)], []) or {})
                    except Exception:
                        failed.add(job)
        return failed, joins

    # -- health

    @property
    def health(self):
        return self.stats.store_health

    def probe(self):
        self.checked = time.monotonic()
        try:
            self.store.probe()
        except Exception as error:
            self.health.unreachable(error)
        else:
            self.health.reached()


# --- persistence: health ------------------------------------------------------

# An idle store is probed this often (seconds), so /status and gearman_store_healthy
# say what the backend is like now, not what it was at the last write.
PROBE_INTERVAL = 2.0


class StoreHealth:
    """Did the last write or probe reach the store? The writer thread sets it, and
    logs each change: one line when the store fails, one when it is back."""

    def __init__(self, log):
        self.log = log
        self.healthy = True
        self.since = time.time()          # of the current state
        self.failures = 0                 # writes and probes failed in this outage
        self.error = ""

    def reached(self):
        if not self.healthy:
            self.log.write("NOTICE", f"persistent queue recovered after "
                                     f"{time.time() - self.since:.1f} s and {self.failures} "
                                     f"failed writes or probes", force=True)
            self.healthy = True
            self.since = time.time()
            self.error = ""

    def unreachable(self, error):
        self.error = str(error)
        if self.healthy:
            self.healthy = False
            self.since = time.time()
            self.failures = 1
            self.log.error(f"persistent queue unavailable: {error}; new background jobs get "
                           f"ERROR QUEUE_ERROR until it recovers")
        else:
            self.failures += 1
            if self.log.debug:
                self.log.limited("store outage", "DEBUG", f"persistent queue still "
                                                          f"unavailable: {error}")


class Journal:
    """The loop's side of the store (C's queue.cc): which jobs have rows, the
    writes and deletes of this turn, the writer thread that commits them, the
    replies that wait for a commit, the start from what is stored and the write
    at stop. With a store that pages, its Pager keeps the queues in memory small.

    The queues ask four things of it: add(job) a new background job, add_joined(job)
    a foreground one a background submission joined, acknowledge(peer, job) with
    JOB_CREATED once its row is committed, and forget(job) once it ends.
    """

    def __init__(self, store, queues, loop, log, stats, write_at_shutdown=False,
                 queue_memory=0):
        self.store = store
        self.queues = queues
        self.loop = loop                  # its timers, emit and send, and wake()
        self.log = log
        self.stats = stats
        queues.journal = self
        # Write-ahead: a background job's row is committed before JOB_CREATED.
        # --store-queue-on-shutdown writes the queue only when the server stops.
        self.write_ahead = store.persistent and not write_at_shutdown
        self.write_at_shutdown = store.persistent and write_at_shutdown
        self.pager = None
        if store.pages and self.write_ahead:
            self.pager = queues.pager = Pager(queues, self, loop, log, queue_memory)
        self.run_id = uuid.uuid4().hex[:12].encode()   # makes generated row uniques unique
        self.adds = []                    # jobs to write in this turn's batch
        self.running = set()              # those of them that run already
        self.dones = []                   # keys to delete, kept for DELETE_DELAY
        self.requests = []                # StoreRequests for this turn's batch
        self.dones_timer = None           # sends them when DELETE_DELAY has passed
        self.adds_in_flight = 0           # batches with jobs the writer has not reported
        self.finished = collections.deque()   # (batch, failed jobs, joins), from the writer
        self.waiting = {}                 # job -> peers whose replies wait for its row
        self.writer = None
        self.cluster = None               # the Cluster, with --cluster

    # -- what the queues ask

    def add(self, job):
        """A new background job. True if it must wait for its row before it runs."""
        job.queued = True
        if self.write_ahead:
            if self.cluster is not None and not self.cluster.owning:
                job.row = FAILED          # fenced: it could not be stored; its client hears so
                job.queued = False
                self.queues.discard(job)
                return True
            name_row(job, self.run_id)
            job.row = WRITING
            self.adds.append(job)
            return True
        if self.write_at_shutdown:
            name_row(job, self.run_id)
        return False

    def add_joined(self, job):
        """A background submission joined a running or queued foreground job."""
        if self.write_ahead:
            name_row(job, self.run_id)
            job.queued = True
            job.row = WRITING
            self.adds.append(job)
            self.running.add(job)
        elif self.write_at_shutdown:
            name_row(job, self.run_id)
            job.queued = True

    def acknowledge(self, peer, job):
        """JOB_CREATED for a background submission, once the job's row is committed."""
        if job.row == WRITING:
            if peer.held is None:
                peer.held = collections.deque()
            peer.held.append(job)
            waiting = self.waiting.get(job)
            if waiting is None:
                self.waiting[job] = [peer]
            else:
                waiting.append(peer)
        elif job.row == FAILED:
            self.loop.emit(peer, ERROR, STORE_FAILED)
        else:
            self.loop.emit(peer, JOB_CREATED, job.handle)

    def forget(self, job):
        """The job ended or was cancelled: delete its row. A row still being written
        is deleted right after the write: its add goes to the writer first."""
        if job.row == ADOPTED:
            self.cluster.forget(job)
            return
        if job.row == WRITING:
            if job in self.adds:
                self.hand_to_writer()
            self.dones.append(row_key(job))
            return
        job.queued = False
        if job.row == STORED:
            self.dones.append(row_key(job))
            job.row = NO_ROW

    def ask(self, method, arguments, answer, alone=False):
        """Run store.method(*arguments) in the writer thread after this turn's writes,
        then answer(result) in the loop. `alone`: before any later write, and after
        every earlier one (a delete that must not touch rows written after it)."""
        if alone and (self.adds or self.dones or self.requests):
            self.hand_to_writer()
        self.requests.append(StoreRequest(method, arguments, answer))
        if alone:
            self.hand_to_writer()

    # -- replies held for a commit

    def release(self, peer):
        """Send what the peer was not told while its jobs' rows were being written,
        up to the first job still being written."""
        held = peer.held
        peer.held = None
        loop = self.loop
        while held:
            item = held[0]
            if item.__class__ is Job:
                if item.row == WRITING:
                    break
                if item.row == FAILED:
                    loop.emit(peer, ERROR, STORE_FAILED)
                else:
                    loop.emit(peer, JOB_CREATED, item.handle)
            elif item.__class__ is tuple:
                loop.emit(peer, *item)
            else:
                loop.send(peer, item)
            held.popleft()
        if held:
            peer.held = held

    # -- the writer

    def start(self):
        if self.store.persistent:
            self.writer = StoreWriter(self.store, self.writer_finished, self.log, self.stats)
            self.writer.start()
            if self.pager is not None:
                self.pager.start(serving=False)

    def end_turn(self):
        """Hand this turn's new rows and requests to the writer at once; deletes may
        wait a little."""
        if self.adds or self.requests or len(self.dones) >= DELETE_BATCH:
            self.hand_to_writer()
        elif self.dones and self.dones_timer is None:
            self.dones_timer = self.loop.timers.add(DELETE_DELAY, self.hand_deletes_to_writer,
                                                    None)

    def hand_to_writer(self):
        if self.adds:
            self.adds_in_flight += 1
        self.writer.submit(Batch(self.adds, self.running, self.dones, self.requests))
        self.adds = []
        self.running = set()
        self.dones = []
        self.requests = []
        if self.dones_timer is not None:
            self.loop.timers.cancel(self.dones_timer)
            self.dones_timer = None

    def hand_deletes_to_writer(self, _):
        self.dones_timer = None
        if self.dones:
            self.hand_to_writer()

    def writer_finished(self, batch, failed, joins):
        """Called in the writer thread: pass the outcome to the loop."""
        self.finished.append((batch, failed, joins))
        self.loop.wake()

    def collect(self):
        """In the loop: take in what the writer has finished."""
        while self.finished:
            self.batch_written(*self.finished.popleft())

    def batch_written(self, batch, failed, joins):
        """The writer stored a batch, except the jobs in `failed`; the jobs whose
        seq is in `joins` found their key held by a stored job."""
        queues = self.queues
        if batch.jobs:
            self.adds_in_flight -= 1
        for job in batch.jobs:
            new = job not in batch.running
            if job in failed:
                job.row = FAILED
                job.queued = False
                queues.store_failed(job, new)
            elif not queues.is_live(job) or job.ignore:
                job.row = NO_ROW          # it ended meanwhile: its delete is on its way
                job.queued = False
                if new and job.ignore:
                    queues.discard(job)
            elif joins.get(job.number, job.number) != job.number:
                # (A job "joined" to its own seq is a write retried after its commit
                # went through unseen: the row is its own.)
                self.pager.joined(job, joins[job.number], new)
            else:
                job.row = STORED
                if new:
                    if self.pager is not None:
                        self.pager.settle(job)
                    else:
                        queues.enqueue(job)
        waiting = self.waiting
        for job in batch.jobs:
            for peer in waiting.pop(job, ()):
                if peer.held is not None and not peer.closed:
                    self.release(peer)
        if self.pager is not None and self.pager.waiting_for_rows:
            for job in batch.jobs:
                self.pager.row_written(job)
        for request in batch.requests:
            request.answer(request.result)

    # -- start and stop

    def replay(self):
        """Take in what is stored before the first connection is served: with a
        paging store only how many jobs each queue has; else every job."""
        if self.pager is not None:
            return self.pager.load()
        count = 0
        now = time.time()
        restore = self.queues.restore
        # The jobs live long: tracing them over and over while they load only costs time.
        gc.disable()
        try:
            for unique, name, priority, data, when, seq in self.store.replay():
                unique, row_unique = read_row_unique(unique)
                if priority != NORMAL and priority != HIGH and priority != LOW:
                    priority = NORMAL
                job = restore(unique, name, priority, data, when, seq, now)
                self.queues.job_count = max(self.queues.job_count, seq)
                if job is None:
                    # Two rows for one job (written by an older server): keep one.
                    self.dones.append((row_unique or unique, name, seq))
                    continue
                job.row_unique = row_unique
                count += 1
        finally:
            gc.enable()
        gc.freeze()
        self.stats.replayed = count
        if count:
            self.log.notice(f"replayed {count} jobs from the persistent queue")
        return count

    def close(self):
        """Stop the writer, write the queue if asked to, close the store."""
        if self.writer is not None:
            if self.dones:
                self.hand_to_writer()
            self.writer.submit(None)
            self.writer.join()
            self.writer = None
            # Jobs that ended while their batch was being written leave rows to delete.
            self.collect()
        records = []
        if self.write_at_shutdown:
            records = [row_record(job) for job in self.queues.jobs.values()
                       if job.queued and job.row == NO_ROW]
        if records or self.dones:
            try:
                self.store.write(records, self.dones)
            except Exception as error:        # the rest of the stop must happen
                self.log.error(f"could not write to the store on shutdown: {error}")
        self.store.close()


# Paging: a queue's window in memory holds a page of jobs at most; windows shrink when
# many queues are spilled, so that ten thousand functions stay bounded too. A page-in is
# asked for when the window falls to half. Epoch jobs are paged in by due time.
WINDOW_MAX = 2000
WINDOW_MIN = 32
SCHEDULED_MAX = 10000             # epoch jobs in memory, at most, once any is stored only
JOB_BYTES = 600                   # memory a queued job takes besides its data and unique
PAGING = object()                 # no job yet: the next one is being paged in


class Pager:
    """Keeps the queues of a paging store (SQLite, MySQL, PostgreSQL) within
    --queue-memory, as a broker's store cursor does. A queue that grows past it is
    "spilled": its tail is in the store only (its new jobs go there once written),
    and memory holds a window at its head, paged in from the store in order before
    it runs dry. A queue that catches up is held in memory again. The counts stay
    true: each function counts its stored jobs (see Spill).

    At start nothing is loaded: every queue the store holds starts spilled, from its
    counts, and is paged in as workers take its jobs. A stored job's handle is its
    row's seq, so it is the same however often the job is paged out and in.
    """

    def __init__(self, queues, journal, loop, log, budget):
        self.queues = queues
        self.journal = journal
        self.loop = loop
        self.log = log
        self.budget = budget              # bytes of queued jobs in memory; 0 = no limit
        self.job_bytes = JOB_BYTES        # estimated memory of one queued job
        self.spilled = 0                  # functions with a Spill
        self.scheduled_cursor = None      # (when, seq) of the last stored epoch job paged in
        self.scheduled_stored = 0         # epoch jobs in the store only
        self.scheduled_paging = False
        self.waiting_for_rows = {}        # job -> submissions to make again once it is written
        self.ran_here = set()             # seqs not to page in again (see forget_stored)

    # -- start

    def load(self):
        """Count what the store holds; every queue with stored jobs starts spilled."""
        return self.take_counts(self.journal.store.counts())

    def take_counts(self, counts):
        highest, due, scheduled = counts
        queues = self.queues
        queues.job_count = max(queues.job_count, highest)
        count = 0
        for name, priority, rows in due:
            function = queues.find_or_add_function(name)
            self.spill_of(function).stored[priority] += rows
            function.total += rows
            count += rows
        for name, rows in scheduled:
            function = queues.find_or_add_function(name)
            self.spill_of(function).scheduled += rows
            function.total += rows
            self.scheduled_stored += rows
            count += rows
        if self.scheduled_stored:
            self.scheduled_cursor = (-2 ** 63, 0)
        self.journal.stats.replayed = count
        if count:
            self.log.notice(f"{count} jobs in the persistent queue; paging them in")
        return count

    def start(self, serving=True):
        """With the writer running: the first page of every stored queue. At the
        server's start (not `serving` yet) nobody is accepted until they are in (the
        writer answers in order, so a probe asked after them answers after them): a
        client's first `show jobs` then lists the jobs that C's, which replays them
        all before it serves, would."""
        for function in list(self.queues.functions.values()):
            spill = function.spill
            if spill is not None:
                for priority in (HIGH, NORMAL, LOW):
                    if spill.stored[priority]:
                        self.refill(function, priority)
        self.refill_scheduled()
        if not serving and self.journal.requests:
            self.loop.hold_accepting()
            self.journal.ask("probe", (), self.loop.resume_accepting)

    def forget_stored(self, running):
        """Memory lets go of what it knew of the store (a cluster member that held
        its table again: others may have run its jobs meanwhile), to count and page
        it in afresh. The rows of the jobs `running` here (seqs) are not taken in
        again, even once they end: their deletes may come after the pages."""
        for function in self.queues.functions.values():
            spill = function.spill
            if spill is not None:
                function.total -= sum(spill.stored) + spill.scheduled
                for priority, behind in enumerate(spill.behind):
                    function.queues[priority].extend(job for _, job in behind)
                function.spill = None
        self.spilled = 0
        self.scheduled_cursor = None
        self.scheduled_stored = 0
        self.ran_here = running

    def spill_of(self, function):
        if function.spill is None:
            function.spill = Spill()
            self.spilled += 1
        return function.spill

    def window(self):
        """How many jobs a spilled queue keeps in memory."""
        if not self.budget:
            return WINDOW_MAX
        jobs = self.budget // self.job_bytes
        return max(WINDOW_MIN, min(WINDOW_MAX, jobs // (4 * (self.spilled + 1))))

    def scheduled_window(self):
        """How many epoch jobs memory holds before those due last stay in the store."""
        if not self.budget:
            return SCHEDULED_MAX
        return max(WINDOW_MIN, min(SCHEDULED_MAX, self.budget // self.job_bytes // 4))

    def over_budget(self):
        return self.budget and len(self.queues.jobs) * self.job_bytes > self.budget

    # -- new jobs

    def settle(self, job):
        """A new background job's row is committed: queue it in memory, or leave it
        in the store only if its queue is spilled."""
        function = job.function
        priority = job.priority
        if job.when:                      # an epoch job: it has no place in the stored FIFO
            if job.when > time.time():
                self.schedule(job)
            else:
                self.queues.enqueue(job)
            return
        spill = function.spill
        if spill is not None and spill.spilled(priority):
            if job.number <= spill.cursor[priority]:
                # Queued after the window was paged in (its row took longer than a
                # foreground job's queueing): it comes before every stored job.
                function.queues[priority].append(job)
                return
            if job.clients:
                spill.pinned[job.handle] = job    # a client waits: it stays in memory
            else:
                self.queues.evict(job)
            spill.stored[priority] += 1
            return
        self.queues.enqueue(job)
        if self.over_budget():
            self.job_bytes = (self.job_bytes * 7 + JOB_BYTES + len(job.data)
                              + len(job.unique)) // 8
            self.spill(function, priority)

    def spill(self, function, priority):
        """The queue's tail goes to the store only; memory keeps a window at its head."""
        jobs = function.queues[priority]
        keep = self.window()
        if len(jobs) <= keep:
            return
        spill = self.spill_of(function)
        queues = self.queues
        window = [jobs.popleft() for _ in range(keep)]
        highest = max((job.number for job in window if job.row == STORED), default=0)
        spill.cursor[priority] = highest
        behind = spill.behind[priority]
        stored = 0
        while jobs:
            job = jobs.popleft()
            if job.ignore:
                queues.discard(job)
            elif (job.row == STORED and not job.clients and not job.when
                  and job.number > highest):
                queues.evict(job)
                stored += 1
                highest = job.number
            else:
                behind.append((highest, job))   # no row to page in from, or out of order
        jobs.extend(window)
        spill.stored[priority] += stored
        self.log.info(f"queue {text(function.name)} ({PRIORITY_NAMES[priority]}) spilled: "
                      f"{stored} jobs in the store only, {keep} in memory")

    def joined(self, job, seq, new):
        """The new job's key was held by the stored job `seq`: its submitters hear
        that job's handle, and it goes, unless a client waits for it."""
        queues = self.queues
        job.queued = False
        job.row = NO_ROW
        if new and not job.clients:
            handle = b"%s%d" % (queues.handle_prefix, seq)
            queues.discard(job)
            job.handle = handle           # what its held JOB_CREATED says
        else:
            job.background = False        # it goes on as a foreground job
            if new:
                queues.enqueue(job)

    # -- taking jobs

    def take(self, function):
        """The next job of a function whose queue is spilled, priority first; PAGING
        while the window it would come from is empty and its tail is being paged in."""
        spill = function.spill
        queues = self.queues
        for priority, jobs in enumerate(function.queues):
            while jobs and jobs[0].ignore:
                queues.discard(jobs.popleft())
            if jobs:
                job = jobs.popleft()
                if spill.stored[priority] and len(jobs) * 2 < self.window():
                    self.refill(function, priority)
                return job
            if spill.spilled(priority):
                self.refill(function, priority)
                if jobs:                  # its stored part was all paged in already
                    return jobs.popleft()
                return PAGING
        return None

    def has_job(self, function):
        spill = function.spill
        for priority, jobs in enumerate(function.queues):
            while jobs and jobs[0].ignore:
                self.queues.discard(jobs.popleft())
            if jobs:
                return True
            if spill.spilled(priority):
                self.refill(function, priority)
                return bool(jobs)
        return False

    def refill(self, function, priority):
        """Ask for the next page of a spilled queue; with nothing stored, the jobs
        behind come forward and the queue is in memory again."""
        spill = function.spill
        if spill.paging[priority]:
            return
        if not spill.stored[priority]:
            jobs = function.queues[priority]
            behind = spill.behind[priority]
            while behind:
                jobs.append(behind.popleft()[1])
            self.settled(function)
            return
        spill.paging[priority] = True
        limit = max(self.window() - len(function.queues[priority]), WINDOW_MIN)
        self.journal.ask("page", (function.name, priority, spill.cursor[priority], limit),
                         functools.partial(self.paged, function, priority, limit))

    def paged(self, function, priority, limit, rows):
        """A page of the queue came in: append it, with the jobs behind it in between."""
        spill = function.spill
        if spill is None or self.queues.functions.get(function.name) is not function:
            return                        # dropped meanwhile
        spill.paging[priority] = False
        if isinstance(rows, StoreError):
            self.log.error(f"cannot page in {text(function.name)}: {rows}; retrying in 1 s")
            self.loop.timers.add(1.0, lambda _: self.retry(function, priority), None)
            return
        queues = self.queues
        jobs = function.queues[priority]
        behind = spill.behind[priority]
        prefix = queues.handle_prefix
        known = queues.jobs
        for seq, unique, data in rows:
            while behind and behind[0][0] < seq:
                jobs.append(behind.popleft()[1])
            spill.cursor[priority] = seq
            if seq in spill.cancelled:
                spill.cancelled.discard(seq)
                continue
            if seq in self.ran_here:      # counted, but it ran here
                self.ran_here.discard(seq)
                spill.stored[priority] -= 1
                function.total -= 1
                continue
            job = known.get(b"%s%d" % (prefix, seq))
            if job is None:
                unique, row_unique = read_row_unique(unique)
                job = queues.stored_job(function, seq, unique, data, priority, 0)
                job.row_unique = row_unique
            elif spill.pinned.pop(job.handle, None) is None:
                continue                  # running, or behind: it has its place already
            spill.stored[priority] -= 1
            jobs.append(job)
        if len(rows) < limit or not spill.stored[priority]:
            if spill.stored[priority]:
                self.log.info(f"{text(function.name)}: {spill.stored[priority]} stored jobs "
                              f"were gone from the store")
                function.total -= spill.stored[priority]
                spill.stored[priority] = 0
            spill.cancelled.clear()
            self.refill(function, priority)
        self.queues.wake_workers(function)

    def retry(self, function, priority):
        if function.spill is not None and self.queues.functions.get(function.name) is function:
            self.refill(function, priority)

    def settled(self, function):
        """Drop a function's Spill once nothing of it is in the store only."""
        spill = function.spill
        if spill is not None and spill.empty():
            function.spill = None
            self.spilled -= 1

    # -- epoch jobs

    def schedule(self, job):
        """A new epoch job due later: a timer in memory, or the store only if it is
        due after every stored one paged in."""
        cursor = self.scheduled_cursor
        if cursor is not None and (job.when, job.number) > cursor and not job.clients:
            self.queues.evict(job)
            self.spill_of(job.function).scheduled += 1
            self.scheduled_stored += 1
            return
        self.queues.enqueue(job)
        if cursor is None and self.queues.scheduled > self.scheduled_window():
            # Those due later than this one stay in the store; this one is the cursor.
            self.scheduled_cursor = (job.when, job.number)

    def fired(self):
        if (self.scheduled_cursor is not None and not self.scheduled_paging
                and self.queues.scheduled * 2 < self.scheduled_window()):
            self.refill_scheduled()

    def refill_scheduled(self):
        if self.scheduled_cursor is None or self.scheduled_paging:
            return
        if not self.scheduled_stored:
            self.scheduled_cursor = None
            return
        self.scheduled_paging = True
        limit = max(self.scheduled_window() // 2, 1)
        self.journal.ask("page_scheduled", (self.scheduled_cursor, limit),
                         functools.partial(self.paged_scheduled, limit))

    def paged_scheduled(self, limit, rows):
        self.scheduled_paging = False
        if isinstance(rows, StoreError):
            self.log.error(f"cannot page in epoch jobs: {rows}; retrying in 1 s")
            self.loop.timers.add(1.0, lambda _: self.refill_scheduled(), None)
            return
        queues = self.queues
        for when, seq, name, unique, priority, data in rows:
            self.scheduled_cursor = (when, seq)
            function = queues.functions.get(name)
            if function is None or function.spill is None:
                continue                  # dropped meanwhile
            spill = function.spill
            if seq in spill.cancelled:
                spill.cancelled.discard(seq)
                continue
            if seq in self.ran_here:
                self.ran_here.discard(seq)
                spill.scheduled -= 1
                self.scheduled_stored -= 1
                function.total -= 1
                continue
            job = queues.jobs.get(b"%s%d" % (queues.handle_prefix, seq))
            if job is None:
                unique, row_unique = read_row_unique(unique)
                job = queues.stored_job(function, seq, unique, data,
                                        priority if priority in (HIGH, NORMAL, LOW) else NORMAL,
                                        when)
                job.row_unique = row_unique
            elif spill.pinned.pop(job.handle, None) is None:
                continue
            spill.scheduled -= 1
            self.scheduled_stored -= 1
            if not queues.schedule(job):  # no wake-up for a job paged in to wait
                queues.queue_up(job)
                queues.wake_workers(function)
            self.settled(function)
        if len(rows) < limit:
            self.scheduled_stored = 0
            self.scheduled_cursor = None
        else:
            self.fired()                  # those due already took no timer

    # -- stored jobs a client asks about

    def look_up(self, peer, job, function, unique, data, priority, when, reducer):
        """A foreground submission with a unique, to a function with stored jobs: if
        no job in memory has the unique, ask the store whether one holds it, then
        submit. If the one in memory is a new job whose row is being written, it may
        turn out to join a stored one: submit again once its row is. True if the
        peer now waits."""
        if job is not None:
            if job.row != WRITING:
                return False
            self.loop.pause(peer)
            self.waiting_for_rows.setdefault(job, []).append(functools.partial(
                self.resubmit, peer, function.name, unique, data, priority, when, reducer))
            return True
        if not unique or (unique == b"-" and not data):
            return False
        key = payload_row_unique(data) if unique == b"-" else marked_row_unique(unique) or unique
        self.loop.pause(peer)
        self.journal.ask("find", (function.name, key), functools.partial(
            self.found, peer, function, unique, data, priority, when, reducer))
        return True

    def row_written(self, job):
        """The journal has dealt with the job's written row: submit what waited for it."""
        for submit in self.waiting_for_rows.pop(job, ()):
            submit()

    def found(self, peer, function, unique, data, priority, when, reducer, row):
        queues = self.queues
        if (isinstance(row, tuple) and queues.functions.get(function.name) is function
                and function.spill is not None
                and queues.jobs.get(b"%s%d" % (queues.handle_prefix, row[0])) is None):
            seq, stored_priority, stored_data, stored_when = row
            job = queues.stored_job(function, seq, unique, stored_data, stored_priority,
                                    stored_when)
            job.row_unique = (payload_row_unique(data) if unique == b"-"
                              else marked_row_unique(unique))
            function.spill.pinned[job.handle] = job
        if not peer.closed:
            queues.submit(peer, function.name, unique, data, priority, False, when, reducer,
                          looked_up=True)
            self.loop.resume(peer)

    def resubmit(self, peer, name, unique, data, priority, when, reducer):
        if not peer.closed:
            self.queues.submit(peer, name, unique, data, priority, False, when, reducer)
            self.loop.resume(peer)

    def status_of_stored(self, peer, number, answer):
        """GET_STATUS of a handle that is not in memory: is its job in the store?
        answer(known) once the store has said."""
        self.loop.pause(peer)
        self.journal.ask("find_sequence", (number,), functools.partial(
            self.status_found, peer, number, answer))

    def status_found(self, peer, number, answer, row):
        if not peer.closed:
            answer(peer, isinstance(row, tuple) or
                   b"%s%d" % (self.queues.handle_prefix, number) in self.queues.jobs)
            self.loop.resume(peer)

    def cancel_stored(self, peer, number, answer):
        """Admin `cancel job` of a job in the store only: delete its row; answer(found)."""
        self.loop.pause(peer)
        self.journal.ask("delete_sequence", (number,), functools.partial(
            self.stored_cancelled, peer, number, answer), alone=True)

    def stored_cancelled(self, peer, number, answer, row):
        queues = self.queues
        found = isinstance(row, tuple)
        job = queues.jobs.get(b"%s%d" % (queues.handle_prefix, number))
        if job is not None:
            queues.cancel(job)            # paged in meanwhile: cancelled in memory too
            found = True
        elif found:
            name, priority, when = row
            function = queues.functions.get(name)
            if function is not None and function.spill is not None:
                spill = function.spill
                spill.cancelled.add(number)   # a page-in on its way may still bring it
                if when:
                    spill.scheduled -= 1
                    self.scheduled_stored -= 1
                else:
                    spill.stored[priority if priority in (HIGH, NORMAL, LOW) else NORMAL] -= 1
                function.total -= 1
        if not peer.closed:
            answer(peer, found)
            self.loop.resume(peer)

    def cancelled(self, job):
        """A job in memory was cancelled; a pinned one leaves its stored count."""
        spill = job.function.spill
        if spill.pinned.pop(job.handle, None) is not None:
            spill.cancelled.add(job.number)
            if job.when:
                spill.scheduled -= 1
                self.scheduled_stored -= 1
            else:
                spill.stored[job.priority] -= 1
            self.queues.discard(job)

    def dropped(self, function):
        """Admin `drop function`: its stored jobs go too."""
        self.journal.ask("delete_function", (function.name,), self.function_deleted, alone=True)
        self.scheduled_stored -= function.spill.scheduled
        function.spill = None
        self.spilled -= 1

    def function_deleted(self, result):
        if isinstance(result, StoreError):
            self.log.error(f"drop function: {result}")

    def stored_count(self):
        return sum(sum(f.spill.stored) + f.spill.scheduled
                   for f in self.queues.functions.values() if f.spill is not None)


# --- persistence: a cluster of servers on one database ------------------------
#
# Members of one cluster (--cluster NAME) share a database server; each keeps its own
# table. Their leases live in one more table, gearmand_cluster, a row per member's
# table: who serves it (owner), an epoch that grows with each change of owner, and
# when the lease ends (by the database's clock). Each member's lease thread renews
# its own lease about every second, holding a session lock named after its table
# (PostgreSQL's advisory lock, MySQL's GET_LOCK), and watches the others:
#   - a table whose lock is free has lost its server's session (kill -9, host gone):
#     a member takes the lock and adopts the table;
#   - a table whose lease has run out while its lock is held (a paused or cut-off
#     server) gets its server's sessions ended, then the same;
#   - an adopted table whose member wants it back (it started again) is handed back
#     once the jobs of it that are running here are done.
# Fencing: a member hands out nothing once its last renewal is older than the lease
# (by the monotonic clock; Queues.lease_until), and every write checks, in its own
# transaction, that the member still holds its table at its epoch. So a member paused
# or cut off neither runs nor writes what another has adopted.

CLUSTER_TABLE = "gearmand_cluster"
CLUSTER_QUEUE_TYPES = ("mysql", "libdrizzle", "postgres", "postgresql", "libpq")
RENEW_EVERY = 1.0                 # seconds between rounds of the lease thread
ADOPTED_WINDOW = 1000             # jobs of an adopted table in memory at most


def text_of(value):
    """A driver's text, as str (one driver gives bytes)."""
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) \
        else value


def lock_name(cluster, member):
    return "gearmand:" + hashlib.sha1(f"{cluster}\0{member}".encode()).hexdigest()


class Lease(threading.Thread):
    """The lease thread of a member: renews its lease, takes its table, notices dead
    or hung members and adopts their tables, hands them back. It has a connection of
    its own; what it decides goes to the loop as events (see Cluster.collect)."""

    def __init__(self, cluster, store, name, member, lease, address):
        super().__init__(name="cluster-lease", daemon=True)
        self.cluster = cluster            # the loop's side, for its events
        self.store = store                # the member's store: its connect() and dialect
        self.name = name
        self.member = member
        self.lease = lease
        self.address = address
        self.connection = None
        self.connected_at = 0.0
        self.owning = False               # this member holds its own table's lock
        self.epoch = None
        self.held = {}                    # adopted member -> epoch we hold it at
        self.releasing = collections.deque()   # members the loop has finished with
        self.members = []                 # the last look at gearmand_cluster, for admin
        self.stopping = False

    def run(self):
        while not self.stopping:
            started = time.monotonic()
            try:
                if self.connection is None:
                    self.connection = self.store.connect()
                    self.connected_at = time.monotonic()
                    self.store.cluster_setup(self.connection)
                self.round()
            except Exception as error:    # the database is gone, or a bug: fence, retry
                self.cluster.event("error", str(error))
                self.store.quietly_close(self.connection)
                self.connection = None
                if self.owning or self.held:
                    # The session locks went with the connection.
                    self.owning = False
                    self.held = {}
                    self.cluster.event("lost", None)
            time.sleep(max(0.0, RENEW_EVERY - (time.monotonic() - started)))
        if self.connection is not None:
            self.store.quietly_close(self.connection)

    def execute(self, statement, arguments=()):
        cursor = self.connection.cursor()
        try:
            cursor.execute(statement, arguments)
            rows = cursor.fetchall() if cursor.description else None
            return rows, cursor.rowcount
        finally:
            cursor.close()

    def try_lock(self, member):
        rows, _ = self.execute(self.store.try_lock_sql,
                               (self.store.lock_key(lock_name(self.name, member)),))
        return bool(rows[0][0])

    def unlock(self, member):
        self.execute(self.store.unlock_sql, (self.store.lock_key(lock_name(self.name, member)),))

    def sessions(self):
        rows, _ = self.execute(self.store.session_sql)
        return f"{rows[0][0]},{self.store.session or ''}"

    def round(self):
        store, name, member = self.store, self.name, self.member
        now = store.now_sql
        while self.releasing:
            other = self.releasing.popleft()
            self.held.pop(other, None)
            self.unlock(other)
            self.execute(f"UPDATE {CLUSTER_TABLE} SET owner = member, lease_expires = {now}"
                         f" WHERE cluster = %s AND member = %s", (name, other))
            self.connection.commit()
        if not self.owning:
            if self.try_lock(member):
                self.take_own_table()
            else:
                self.execute(f"UPDATE {CLUSTER_TABLE} SET wanted = 1 WHERE cluster = %s"
                             f" AND member = %s", (name, member))
                self.connection.commit()
        else:
            sent = time.monotonic()
            _, count = self.execute(
                f"UPDATE {CLUSTER_TABLE} SET lease_expires = {now} + %s, sessions = %s,"
                f" address = %s WHERE cluster = %s AND member = %s AND owner = %s"
                f" AND epoch = %s", (self.lease, self.sessions(), self.address, name, member,
                                     member, self.epoch))
            self.connection.commit()
            if count == 1:
                self.cluster.renewed(sent)
            else:
                self.owning = False
                self.unlock(member)
                self.connection.commit()
                self.cluster.event("lost", None)
        rows, _ = self.execute(f"SELECT member, owner, epoch, lease_expires - {now}, wanted,"
                               f" sessions, address FROM {CLUSTER_TABLE} WHERE cluster = %s"
                               f" ORDER BY member", (name,))
        self.connection.commit()
        rows = [(text_of(member), text_of(owner), epoch, None if left is None else float(left),
                 wanted, text_of(sessions), text_of(address))
                for member, owner, epoch, left, wanted, sessions, address in rows]
        self.members = rows
        if not self.owning or time.monotonic() - self.connected_at < self.lease:
            return        # after a reconnection, give the others the time to reconnect too
        for other, owner, epoch, left, wanted, sessions, _ in rows:
            if other == member:
                continue
            if owner == member and other in self.held:
                if wanted:
                    self.cluster.event("give back", other)
                continue
            if wanted and owner == other:
                continue                  # it is back and takes its table itself
            if self.try_lock(other):
                self.adopt(other, epoch)
            elif left is not None and left < 0 and owner == other:
                # Its lease ran out and its session still holds the lock: a paused or
                # cut-off server. End its sessions; the lock is free at the next round.
                for session in (sessions or "").split(","):
                    if session.strip().isdigit():
                        try:
                            self.execute(store.kill_sql % int(session))
                        except store.driver_error:
                            pass          # gone already
                self.connection.commit()

    def take_own_table(self):
        store, name, member = self.store, self.name, self.member
        sent = time.monotonic()
        _, count = self.execute(
            f"UPDATE {CLUSTER_TABLE} SET owner = member, epoch = epoch + 1, wanted = 0,"
            f" lease_expires = {store.now_sql} + %s, sessions = %s, address = %s"
            f" WHERE cluster = %s AND member = %s",
            (self.lease, self.sessions(), self.address, name, member))
        if count == 0:
            self.execute(f"INSERT INTO {CLUSTER_TABLE} (cluster, member, owner, epoch,"
                         f" lease_expires, sessions, wanted, address) VALUES (%s, %s, %s, 1,"
                         f" {store.now_sql} + %s, %s, 0, %s)",
                         (name, member, member, self.lease, self.sessions(), self.address))
        rows, _ = self.execute(f"SELECT epoch FROM {CLUSTER_TABLE} WHERE cluster = %s"
                               f" AND member = %s", (name, member))
        self.connection.commit()
        self.owning = True
        self.epoch = rows[0][0]
        self.cluster.renewed(sent)
        self.cluster.event("own", self.epoch)

    def adopt(self, other, epoch):
        _, count = self.execute(
            f"UPDATE {CLUSTER_TABLE} SET owner = %s, epoch = epoch + 1, wanted = 0"
            f" WHERE cluster = %s AND member = %s AND epoch = %s",
            (self.member, self.name, other, epoch))
        self.connection.commit()
        if count != 1:
            self.unlock(other)            # it changed meanwhile: look again next round
            self.connection.commit()
            return
        self.held[other] = epoch + 1
        self.cluster.event("adopt", (other, epoch + 1))


class Adoption:
    """Another member's table, served here since its server died or hung: a store
    and writer thread of its own, its jobs fed into the queues a window at a time,
    in their order, and deleted from that table as they end."""

    def __init__(self, cluster, member, store):
        self.cluster = cluster
        self.member = member
        self.store = store
        self.writer = StoreWriter(store, cluster.writer_finished, cluster.log, cluster.stats)
        self.seqs = {}                    # job in memory -> its row's seq in that table
        self.after = 0                    # the last seq fed in
        self.exhausted = False
        self.paging = False
        self.dones = []
        self.ending = None                # when it goes back, at the latest (monotonic)

    def start(self):
        self.writer.start()
        self.feed()

    def feed(self):
        if self.paging or self.exhausted or self.ending is not None:
            return
        if len(self.seqs) * 2 < ADOPTED_WINDOW:
            self.paging = True
            self.writer.submit(Batch([], set(), [], [StoreRequest(
                "page_all", (self.after, ADOPTED_WINDOW), self.paged)]))

    def paged(self, rows):
        self.paging = False
        if isinstance(rows, StoreError):
            self.cluster.log.error(f"cluster: cannot read {self.member}'s table: {rows}")
            self.cluster.loop.timers.add(1.0, lambda _: self.feed(), None)
            return
        if self.ending is not None:
            return
        queues = self.cluster.queues
        for seq, name, unique, priority, data, when in rows:
            self.after = seq
            unique, row_unique = read_row_unique(unique)
            function = queues.find_or_add_function(name)
            queues.job_count += 1
            function.total += 1
            job = queues.stored_job(function, queues.job_count, unique, data,
                                    priority if priority in (HIGH, NORMAL, LOW) else NORMAL,
                                    when)
            job.row = ADOPTED
            job.row_unique = row_unique
            self.seqs[job] = seq
            queues.enqueue(job)
        if len(rows) < ADOPTED_WINDOW:
            self.exhausted = True

    def forget(self, job):
        seq = self.seqs.pop(job, None)
        if seq is not None:
            self.dones.append((job.row_unique or job.unique, job.function.name, seq))
        job.row = NO_ROW
        job.queued = False
        self.feed()

    def flush(self):
        if self.dones:
            self.writer.submit(Batch([], set(), self.dones, []))
            self.dones = []

    def running(self):
        return any(job.worker is not None for job in self.seqs)

    def withdraw(self):
        """Stop serving it: its queued jobs leave memory; their rows stay for their member."""
        queues = self.cluster.queues
        self.ending = self.ending or time.monotonic()
        for job in list(self.seqs):
            if job.worker is None:
                del self.seqs[job]
                queues.withdraw(job)      # its row is its member's again

    def close(self):
        self.flush()
        self.writer.submit(None)
        self.writer.join(10)
        self.store.close()


class Cluster:
    """The loop's side of --cluster: whether this member holds its table (and may
    hand out and write stored jobs), the tables it adopted, and what admin, /status
    and /metrics show of it."""

    def __init__(self, server, name, lease, address):
        self.server = server
        self.queues = server.queues
        self.journal = server.journal
        self.loop = server.loop
        self.log = server.log
        self.stats = server.stats
        self.name = name
        self.lease = lease
        self.member = server.store.table
        self.events = collections.deque()     # from the lease and the adoptions' writers
        self.adoptions = {}               # member -> Adoption
        self.owning = False
        self.fenced_since = time.monotonic()
        self.renewed_at = None
        self.epoch = None
        self.adopted_total = 0
        self.handed_back_total = 0
        server.journal.cluster = self
        self.queues.lease_until = 0.0     # nothing is handed out before the table is ours
        server.store.fence = (name, self.member, self.member, None)   # nor written
        if server.store.connection is not None:
            server.store.connected(server.store.connection)
        self.lease_thread = Lease(self, server.store, name, self.member, lease, address)

    def start(self):
        self.lease_thread.start()
        self.loop.timers.add(0.25, self.check, None)

    def stop(self):
        self.lease_thread.stopping = True
        for adoption in self.adoptions.values():
            adoption.close()

    # -- from other threads

    def event(self, kind, argument):
        self.events.append((kind, argument))
        self.loop.wake()

    def renewed(self, sent):
        """The lease was renewed by a statement sent at `sent` (monotonic). No other
        member may adopt this member's tables before a lease has passed since."""
        self.renewed_at = sent
        self.queues.lease_until = sent + self.lease
        fresh_until = sent + self.lease / 2
        self.server.store.fence_fresh_until = fresh_until
        for adoption in list(self.adoptions.values()):
            adoption.store.fence_fresh_until = fresh_until

    def writer_finished(self, batch, failed, joins):
        self.event("written", batch)

    # -- in the loop

    def collect(self):
        while self.events:
            kind, argument = self.events.popleft()
            if kind == "own":
                self.owned(argument)
            elif kind == "lost":
                self.fence("its lease could not be renewed")
            elif kind == "adopt":
                self.adopt(*argument)
            elif kind == "give back":
                self.give_back(argument)
            elif kind == "written":
                for request in argument.requests:
                    request.answer(request.result)
            elif kind == "error":
                self.log.error(f"cluster {self.name}: {argument}")
        self.flush()

    def flush(self):
        for adoption in self.adoptions.values():
            adoption.flush()

    def check(self, _):
        """Every quarter second: fence at the end of the lease; hand back what is done."""
        self.loop.timers.add(0.25, self.check, None)
        if self.owning and not self.queues.may_dispatch() and self.queues.dispatching:
            self.fence("its lease ran out")
        for member, adoption in list(self.adoptions.items()):
            if adoption.ending is not None and (
                    not adoption.running() or time.monotonic() - adoption.ending > 2 * self.lease):
                adoption.close()
                del self.adoptions[member]
                self.lease_thread.releasing.append(member)
                self.handed_back_total += 1
                self.log.notice(f"cluster {self.name}: handed {member}'s table back")

    def owned(self, epoch):
        """The lease thread holds this member's table at `epoch`: serve it."""
        self.epoch = epoch
        self.server.store.fence = (self.name, self.member, self.member, epoch)
        if not self.owning:
            self.owning = True
            self.log.notice(f"cluster {self.name}: serving the table {self.member} "
                            f"(epoch {epoch})")
            self.reload()

    def fence(self, why):
        if not self.owning:
            return
        self.owning = False
        self.fenced_since = time.monotonic()
        self.queues.lease_until = 0.0
        self.server.store.fence = (self.name, self.member, self.member, None)
        self.log.error(f"cluster {self.name}: {why}; no stored job is handed out or "
                       f"written until this server holds its table again")
        for adoption in self.adoptions.values():
            adoption.withdraw()

    def reload(self):
        """Take in the table afresh: what is in memory of it may have run elsewhere."""
        queues = self.queues
        running = set()
        for job in list(queues.jobs.values()):
            if job.row == STORED:
                if job.worker is None:
                    queues.withdraw(job)  # it comes back from the table, if still there
                else:
                    running.add(job.number)
        self.journal.pager.forget_stored(running)
        self.journal.ask("counts", (), self.counted)

    def counted(self, counts):
        """The counts of the table taken back came in: page it in (or ask again)."""
        if isinstance(counts, StoreError):
            self.log.error(f"cluster {self.name}: cannot count {self.member}'s jobs: {counts}; "
                           f"again in 1 s")
            self.loop.timers.add(1.0, lambda _: self.journal.ask("counts", (), self.counted),
                                 None)
            return
        if not self.owning:
            return
        pager = self.journal.pager
        pager.take_counts(counts)
        pager.start()

    def adopt(self, member, epoch):
        if member in self.adoptions:
            return
        store = type(self.server.store).open_table(self.server.options, member)
        store.fence = (self.name, member, self.member, epoch)
        adoption = self.adoptions[member] = Adoption(self, member, store)
        adoption.start()
        self.adopted_total += 1
        self.log.notice(f"cluster {self.name}: adopted {member}'s table (epoch {epoch}): "
                        f"its server stopped renewing its lease")

    def give_back(self, member):
        adoption = self.adoptions.get(member)
        if adoption is not None and adoption.ending is None:
            adoption.withdraw()

    def forget(self, job):
        for adoption in self.adoptions.values():
            if job in adoption.seqs:
                adoption.forget(job)
                return
        job.row = NO_ROW

    def snapshot(self):
        """Members, owners and lease ages, for admin, /status and /metrics."""
        members = []
        for member, owner, epoch, left, wanted, _, address in self.lease_thread.members:
            members.append({"member": member, "owner": owner,
                            "epoch": epoch, "lease_left_seconds": round(float(left or 0), 3),
                            "wants_its_table": bool(wanted), "address": address})
        age = None if self.renewed_at is None else round(time.monotonic() - self.renewed_at, 3)
        return {"name": self.name, "member": self.member, "holds_its_table": self.owning,
                "epoch": self.epoch, "lease_seconds": self.lease, "lease_age_seconds": age,
                "adopted": sorted(self.adoptions), "adoptions_total": self.adopted_total,
                "handed_back_total": self.handed_back_total, "members": members}


# --- logging and stats --------------------------------------------------------

class Log:
    """C gearmand's log levels and line format, e.g.
    `  ERROR 2026-01-02 03:04:05.123456 [  main ] message`; SIGHUP reopens the file.

    `debug` and `info` are plain attributes, so a hot path pays one attribute check
    when its level is off: `if log.debug: log.write("DEBUG", ...)`. `limited()` keeps
    a flood (a TLS scan, a misbehaving client) from filling the disk."""

    LEVELS = ("FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
    THREADS = {"MainThread": "main", "store-writer": "writer"}

    def __init__(self, target="stderr", level="ERROR", use_syslog=False):
        self.target = target
        self.level = self.LEVELS.index(level)
        self.level_name = level
        self.debug = self.level >= self.LEVELS.index("DEBUG")
        self.info_on = self.level >= self.LEVELS.index("INFO")
        self.file = None
        self.syslog = None
        self.lock = threading.RLock()     # the writer thread logs too; a signal handler may
        self.windows = {}                 # limited(): key -> [window start, lines, suppressed]
        if use_syslog:
            import syslog
            syslog.openlog("gearmand", syslog.LOG_PID, syslog.LOG_USER)
            self.syslog = syslog
        self.reopen()

    def reopen(self):
        with self.lock:
            if self.file not in (None, sys.stderr):
                self.file.close()
            if self.target == "stderr":
                self.file = sys.stderr
            elif self.target == "none":
                self.file = None
            else:
                try:
                    self.file = open(self.target, "a", buffering=1, encoding="utf-8",
                                     errors="backslashreplace")
                except OSError as error:
                    print(f"Could not open log file {self.target}: {error.strerror}, "
                          "logging to stderr", file=sys.stderr)
                    self.file = sys.stderr

    def write(self, level, message, force=False):
        """One line at `level`; `force` writes it whatever --verbose says (the few
        lines an operator needs at the default level: start, stop, SIGHUP)."""
        number = self.LEVELS.index(level)
        if number > self.level and not force:
            return
        now = time.time()
        thread = threading.current_thread().name
        line = (f"{level:>7} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}."
                f"{int(now % 1 * 1e6):06d} [{self.THREADS.get(thread, thread):>6} ] {message}\n")
        with self.lock:
            if self.file is not None:
                try:
                    self.file.write(line)
                    self.file.flush()
                except (OSError, ValueError):
                    pass
            if self.syslog is not None:
                self.syslog.syslog(min(number, 7), message)

    def limited(self, key, level, message, burst=10, every=10.0):
        """Write at most `burst` lines of one kind (`key`) every `every` seconds; then
        one line says how many were left out."""
        if self.LEVELS.index(level) > self.level:
            return
        now = time.monotonic()
        with self.lock:
            window = self.windows.get(key)
            if window is None or now - window[0] >= every:
                if window is not None and window[2]:
                    self.write(level, f"... {window[2]} more lines like the last "
                                      f"({key}) left out in {every:g} s")
                window = self.windows[key] = [now, 0, 0]
            if window[1] < burst:
                window[1] += 1
                self.write(level, message)
            else:
                window[2] += 1

    def error(self, message):
        self.write("ERROR", message)

    def warning(self, message):
        self.write("WARNING", message)

    def notice(self, message):
        self.write("NOTICE", message)

    def info(self, message):
        self.write("INFO", message)


class Histogram:
    """Cumulative buckets for the Prometheus exposition; the writer thread observes."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value):
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += value


# The status page's charts: a sample of the queues and the totals every
# SAMPLE_INTERVAL seconds, the last SAMPLES of them (ten minutes).
SAMPLE_INTERVAL = 5.0
SAMPLES = 120


class Stats:
    """Totals since start, for /metrics and /status. Plain counters: the loop
    thread counts jobs, the writer thread counts store work and sets store_health."""

    def __init__(self, log=None):
        self.started = time.time()
        self.store_health = StoreHealth(log)
        # (time, jobs waiting, jobs running, submitted, completed, failed) samples
        self.samples = collections.deque(maxlen=SAMPLES)
        self.submitted = {"foreground": 0, "background": 0}
        self.completed = {"foreground": 0, "background": 0}
        self.failed = {"foreground": 0, "background": 0}
        self.accepted = 0
        self.replayed = 0
        self.store_errors = 0
        self.store_last_error = ""
        self.store_last_error_time = 0.0
        self.batch_sizes = Histogram((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
        self.commit_seconds = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                         0.1, 0.25, 0.5, 1.0, 2.5, 5.0))

    def sample(self, functions):
        """Add one sample of the queues (FunctionQueues) and the totals to the ring."""
        running = sum(f.running for f in functions)
        waiting = sum(f.total for f in functions) - running
        self.samples.append((time.time(), waiting, running, sum(self.submitted.values()),
                             sum(self.completed.values()), sum(self.failed.values())))

    def rates(self, seconds=60.0):
        """Jobs per second submitted, completed and failed over the last `seconds`,
        from the samples and the totals now; None before the first sample."""
        if not self.samples:
            return None
        now = time.time()
        first = self.samples[0]
        for sample in self.samples:
            if now - sample[0] <= seconds:
                first = sample
                break
        elapsed = now - first[0]
        if elapsed <= 0:
            return None
        totals = (sum(self.submitted.values()), sum(self.completed.values()),
                  sum(self.failed.values()))
        return tuple((total - then) / elapsed for total, then in zip(totals, first[3:]))


# --- event loop: connections, timers, the reactor ----------------------------

class Connection(Peer):
    """One accepted socket: its protocol, the input not yet parsed, the output not
    yet sent, and the output held back until a store commit."""

    __slots__ = ("sock", "fd", "address", "port", "tls", "handshaking", "protocol", "http",
                 "inbuf", "chunks", "chunks_size", "need", "out", "out_size", "held", "writing",
                 "closing", "closed", "exceptions", "client_id")

    def __init__(self, sock, address, protocol, tls=False, port=0):
        super().__init__()
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address            # the peer's IP address, as text
        self.port = port                  # and its port
        self.tls = tls
        self.handshaking = tls            # a TLS handshake runs before any packet
        self.protocol = protocol          # BinaryProtocol or HttpProtocol
        self.http = None                  # an HttpExchange on the HTTP port
        self.inbuf = b""                  # unparsed input
        self.chunks = None                # input gathered until `need` bytes are in
        self.chunks_size = 0
        self.need = 0
        self.out = []                     # output waiting for the end of the loop turn
        self.out_size = 0
        self.held = None                  # output queued behind a JOB_CREATED that waits for the store
        self.writing = False              # polled for EPOLLOUT too
        self.closing = False              # close once the output is sent
        self.closed = False
        self.exceptions = False           # the `exceptions` option: WORK_EXCEPTION is passed on
        self.client_id = b"-"


class Listener:
    """A listening socket and the protocol its connections speak."""

    __slots__ = ("sock", "protocol", "tls_context")

    def __init__(self, sock, protocol, tls_context):
        self.sock = sock
        self.protocol = protocol
        self.tls_context = tls_context


class Timer:
    __slots__ = ("callback", "argument", "active")

    def __init__(self, callback, argument):
        self.callback = callback
        self.argument = argument
        self.active = True


class Timers:
    """Callbacks due later, on the loop's thread: a heap of (when, sequence, Timer)."""

    def __init__(self, on_error=None):
        self.heap = []
        self.sequence = 0
        self.cancelled = 0                # cancelled timers still in the heap
        self.on_error = on_error or (lambda what: None)   # logs a callback's exception

    def add(self, delay, callback, argument):
        timer = Timer(callback, argument)
        self.sequence += 1
        heapq.heappush(self.heap, (time.monotonic() + delay, self.sequence, timer))
        return timer

    def cancel(self, timer):
        """Let go of what the timer holds. It stays in the heap until it comes up,
        unless cancelled timers make up most of the heap (hour-long CAN_DO_TIMEOUTs)."""
        if not timer.active:
            return                        # it has fired already
        timer.active = False
        timer.callback = timer.argument = None
        self.cancelled += 1
        heap = self.heap
        if self.cancelled > 1000 and self.cancelled * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[2].active]
            heapq.heapify(heap)
            self.cancelled = 0

    def run_due(self):
        heap = self.heap
        now = time.monotonic()
        while heap and (heap[0][0] <= now or not heap[0][2].active):
            timer = heapq.heappop(heap)[2]
            if timer.active:
                timer.active = False
                try:
                    timer.callback(timer.argument)
                except Exception:
                    # A bug must cost what the timer was for, never the server.
                    self.on_error("a timer")
            else:
                self.cancelled -= 1

    def next_timeout(self):
        """Seconds until the next live timer is due (None: no timer)."""
        heap = self.heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
            self.cancelled -= 1
        if not heap:
            return None
        return min(max(heap[0][0] - time.monotonic(), 0), TIMER_WAIT_MAX)


class PollPoller:
    """epoll's interface over poll(2), where there is no epoll (macOS, the BSDs)."""

    def __init__(self):
        self.poller = select.poll()
        self.register = self.poller.register
        self.modify = self.poller.modify
        self.unregister = self.poller.unregister

    def poll(self, timeout):
        return self.poller.poll(None if timeout is None else timeout * 1000)   # milliseconds

    def close(self):
        pass


class EventLoop:
    """One thread, one epoll (poll(2) where there is none): accepts connections,
    reads what they send to their protocol, sends what is queued for them once per
    turn, runs the timers, and stops when asked. Its owner (the Server) is told when
    a turn ends, when the writer thread woke it, and when a connection closes."""

    def __init__(self, owner, options, log, stats):
        self.owner = owner
        self.log = log
        self.stats = stats
        self.max_output = options.max_output
        self.max_input_buffer = options.max_input_buffer
        self.gathering = 0                # bytes of large packets still arriving, all peers
        # epoll reports file descriptors: each is looked up in one of these.
        self.connections = {}             # fd -> Connection, oldest first
        self.listeners = {}               # fd -> Listener
        self.poller = select.epoll() if hasattr(select, "epoll") else PollPoller()
        self.timers = Timers(self.internal_error)
        self.dirty = []                   # connections with output to send this turn
        self.resuming = []                # paused connections whose input may go on
        self.stopping = None              # None, "now" or "graceful"
        self.stop_requested = None        # set by signal handlers, applied by the loop
        self.stop_reason = ""
        self.flush_deadline = None        # graceful stop: give up on unread output then
        self.accept_paused = False
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.wake_fd = self.wake_reader.fileno()
        self.poller.register(self.wake_fd, READABLE)

    # -- listening and accepting

    def listen(self, sockets, protocol, tls_context=None):
        """Serve a protocol on sockets bound by bind_listeners()."""
        for sock in sockets:
            sock.setblocking(False)
            self.listeners[sock.fileno()] = Listener(sock, protocol, tls_context)
            self.poller.register(sock.fileno(), READABLE)
            address = sock.getsockname()
            self.log.info(f"Listening on {address[0]}:{address[1]} ({sock.fileno()}), "
                          f"{protocol.name}{' over TLS' if tls_context else ''}")

    def accept(self, listener):
        for _ in range(64):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self.log.limited("accept", "ERROR", f"accept: {error.strerror} "
                                     f"({len(self.connections)} connections open; -f raises "
                                     f"the limit); refusing connections for 1 s")
                    self.pause_accepting(1.0)
                return
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # As C does, with or without --keepalive (which sets its timings): a
                # peer whose host died gives back its jobs in the end.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if listener.tls_context is not None:
                sock = listener.tls_context.wrap_socket(sock, server_side=True,
                                                        do_handshake_on_connect=False)
            conn = Connection(sock, address[0], listener.protocol,
                              sock.__class__ is not socket.socket, address[1])
            if self.log.debug:
                self.log.limited("connections", "DEBUG", f"Accepted connection from "
                                 f"{conn.address}:{conn.port} ({conn.fd}), "
                                 f"{listener.protocol.name}", burst=500, every=1.0)
            listener.protocol.opened(conn)
            self.stats.accepted += 1
            self.connections[conn.fd] = conn
            self.poller.register(conn.fd, READABLE)

    def pause_accepting(self, seconds):
        if not self.accept_paused:
            self.hold_accepting()
            self.timers.add(seconds, self.resume_accepting, None)

    def hold_accepting(self):
        """Accept nobody until resume_accepting(); meanwhile the kernel keeps new
        connections in the listen backlog."""
        self.accept_paused = True
        for fd in self.listeners:
            self.poller.unregister(fd)

    def resume_accepting(self, _=None):
        self.accept_paused = False
        if self.stopping is None:
            for fd in self.listeners:
                self.poller.register(fd, READABLE)

    def stop_listening(self):
        for fd, listener in self.listeners.items():
            if not self.accept_paused:
                self.poller.unregister(fd)
            listener.sock.close()
        self.listeners = {}

    # -- the loop

    def serve_forever(self):
        poll = self.poller.poll
        connections = self.connections
        timers = self.timers
        while True:
            if self.stop_requested:
                self.begin_stop()
            timers.run_due()
            self.end_turn()
            if self.stopping and self.ready_to_stop():
                return
            # Measured after end_turn, which may have added a timer.
            for fd, mask in poll(timers.next_timeout()):
                conn = connections.get(fd)
                if conn is not None:
                    # A hang-up or an error comes without EPOLLIN: a read or a
                    # send finds out which.
                    if conn.handshaking:
                        self.handshake(conn)
                    elif mask != select.POLLOUT:
                        self.read(conn)
                    if mask != select.POLLIN and conn.writing and not conn.closed:
                        self.send_output(conn)
                elif fd == self.wake_fd:
                    self.on_wakeup()
                elif fd in self.listeners:
                    self.accept(self.listeners[fd])

    def end_turn(self):
        """Let the owner finish the turn (store work, requests to resume), then send
        every reply at once. Closing a connection here requeues or drops its jobs,
        which makes more of both (NOOPs, WORK_FAILs, deletes): repeat until there is none."""
        while True:
            if self.resuming:
                resuming, self.resuming = self.resuming, []
                for conn in resuming:
                    if not conn.closed and not conn.paused:
                        conn.protocol.resume(conn)
            self.owner.turn_ended()
            if not self.dirty and not self.resuming:
                return
            dirty = self.dirty
            self.dirty = []
            for conn in dirty:
                if not conn.closed and not conn.writing and conn.out:
                    self.send_output(conn)
                if conn.out_size > self.max_output and not conn.closed:
                    self.log.limited("limits", "WARNING", f"{conn.address}:{conn.port}: not "
                                     f"reading its replies ({conn.out_size} bytes waiting, "
                                     f"over --max-output), closing")
                    self.close(conn)

    def wake(self):
        """Make the loop's select() return; safe from any thread and in a signal handler."""
        try:
            self.wake_writer.send(b"\0")
        except OSError:
            pass

    def on_wakeup(self):
        try:
            while self.wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        try:
            self.owner.woken()
        except Exception:
            self.internal_error("the writer's news")

    def internal_error(self, what):
        """A bug in `what` costs what it was doing, never the server and its queue."""
        self.log.error(f"internal error in {what}:\n" + traceback.format_exc())

    # -- stopping

    def request_stop(self, how, why=""):
        """Ask the loop to stop ("now" or "graceful") for a reason the log gives
        (a signal's name, an admin's address); safe in a signal handler."""
        if self.stop_requested != "now":
            self.stop_requested = how
            self.stop_reason = why
        self.wake()

    def begin_stop(self):
        if self.stopping != self.stop_requested and self.stopping != "now":
            how = ("at once" if self.stop_requested == "now" else
                   "gracefully: running jobs finish, no new connections")
            self.log.write("NOTICE", f"stopping {how} ({self.stop_reason or 'asked to'})",
                           force=True)
        if self.stopping != "now":
            self.stopping = self.stop_requested
        if self.stopping == "graceful":
            self.owner.stopping_gracefully()
        self.stop_requested = None
        if self.listeners:
            self.stop_listening()

    def ready_to_stop(self):
        if self.stopping == "now":
            return True
        if self.owner.work_pending():
            return False
        # Let the last results reach their clients, for at most FLUSH_PATIENCE seconds.
        if not any(conn.out for conn in self.connections.values()):
            return True
        if self.flush_deadline is None:
            self.flush_deadline = time.monotonic() + FLUSH_PATIENCE
            self.timers.add(FLUSH_PATIENCE, lambda _: None, None)   # wakes the loop
        return time.monotonic() >= self.flush_deadline

    # -- input

    def pause(self, conn):
        """Read no further requests of this peer until resume(): its last one waits
        for the store, and its replies must come in order."""
        conn.paused = True

    def resume(self, conn):
        conn.paused = False
        self.resuming.append(conn)

    def handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.poller.modify(conn.fd, READABLE)
            return
        except ssl.SSLWantWriteError:
            self.poller.modify(conn.fd, WRITABLE)
            return
        except (OSError, ValueError) as error:
            # A scan or a client without a certificate: worth a line, not a flood of them.
            self.log.limited("TLS", "WARNING", f"{conn.address}:{conn.port}: TLS handshake "
                             f"failed, closing: {error}")
            self.close(conn)
            return
        conn.handshaking = False
        self.poller.modify(conn.fd, READABLE)

    def read(self, conn):
        try:
            data = conn.sock.recv(262144)
            if conn.tls:
                # TLS may hold decrypted bytes that select() cannot see.
                while data and conn.sock.pending():
                    data += conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.chunks is not None:
            # A large packet is arriving: gather its pieces and join them once.
            conn.chunks.append(data)
            conn.chunks_size += len(data)
            self.gathering += len(data)
            if self.gathering > self.max_input_buffer:
                self.log.limited("limits", "WARNING", f"{conn.address}:{conn.port}: large "
                                 f"packets being received hold over --max-input-buffer, closing")
                self.close(conn)
                return
            if conn.chunks_size < conn.need:
                return
            data = b"".join(conn.chunks)
            self.stop_gathering(conn)
        elif conn.inbuf:
            data = conn.inbuf + data
        if conn.paused:
            conn.inbuf = data
            if len(data) > self.max_input_buffer:
                self.log.warning(f"{conn.address}: sent over --max-input-buffer while its "
                                 f"request waits for the store, closing")
                self.close(conn)
            return
        try:
            conn.protocol.receive(conn, data)
        except Exception:
            # A bug must cost one connection, never the server and its queue.
            self.log.error(f"{conn.address}: closing after an internal error:\n"
                           + traceback.format_exc())
            self.close(conn)

    def gather(self, conn, first, need):
        """Collect the pieces of a large packet until `need` bytes are in."""
        conn.chunks = [first]
        conn.chunks_size = len(first)
        conn.need = need
        self.gathering += len(first)

    def stop_gathering(self, conn):
        self.gathering -= conn.chunks_size
        conn.chunks = None

    # -- output

    def send(self, conn, data):
        """Queue bytes for a peer; they go out at the end of the loop turn."""
        if conn.held is not None:
            conn.held.append(data)
            return
        if not conn.out:
            self.dirty.append(conn)
        conn.out.append(data)
        conn.out_size += len(data)
        if conn.out_size > self.max_output:
            self.dirty.append(conn)       # end_turn closes it; never mid-iteration

    def emit(self, conn, ptype, payload):
        """News of a job for a peer, put in its protocol's terms."""
        if conn.held is not None:
            conn.held.append((ptype, payload))
            return
        conn.protocol.event(conn, ptype, payload)

    def send_output(self, conn):
        """Send what the socket takes. Small replies go out in one send; a large
        backlog goes in slices, its remainder kept as a memoryview, never recopied."""
        out = conn.out
        if len(out) > 1:
            if conn.out_size <= SEND_SLICE:
                out[:] = [b"".join(out)]
            else:
                count = size = 0
                while size < SEND_SLICE:
                    size += len(out[count])
                    count += 1
                out[:count] = [b"".join(out[:count])]
        data = out[0] if out else b""
        try:
            sent = conn.sock.send(data) if data else 0
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.out_size -= sent
        if sent == len(data):
            if out:
                del out[0]
        else:
            out[0] = memoryview(data)[sent:]
        if out and not conn.writing:
            conn.writing = True
            self.poller.modify(conn.fd, WRITABLE)
        elif not out:
            if conn.writing:
                conn.writing = False
                self.poller.modify(conn.fd, READABLE)
            if conn.closing:
                self.close(conn)

    def close(self, conn):
        """Forget a peer; its owner puts back its jobs and abandons its waits."""
        if conn.closed:
            return
        conn.closed = True
        if self.log.debug:
            self.log.limited("connections", "DEBUG", f"Disconnected {conn.address}:{conn.port} "
                             f"({conn.fd})", burst=500, every=1.0)
        self.poller.unregister(conn.fd)
        del self.connections[conn.fd]
        if conn.chunks is not None:
            self.stop_gathering(conn)
        conn.sock.close()
        self.owner.connection_closed(conn)

    def close_all(self):
        for conn in list(self.connections.values()):
            conn.sock.close()
        for listener in self.listeners.values():
            listener.sock.close()
        self.poller.close()


# --- Gearman binary protocol: framing, dispatch, packet handlers ---------------

class BinaryProtocol:
    """The Gearman port: binary packets, with admin text lines between them
    (C's server.cc). Handlers check a packet's arguments and ask the queues."""

    name = "gearman"

    def __init__(self, server):
        self.loop = server.loop
        self.queues = server.queues
        self.admin = server.admin
        self.max_packet = server.options.max_packet_size
        self.exceptions = server.options.exceptions
        self.handlers = self.packet_handlers()
        self.debug = server.log.debug

    def opened(self, conn):
        conn.exceptions = self.exceptions

    def event(self, conn, ptype, payload):
        """News of a job, as a packet."""
        if ptype == WORK_EXCEPTION and not conn.exceptions:
            # A client that did not ask for exceptions hears that the job failed. C sends
            # the handle and a stray NUL here, which some clients cannot parse.
            ptype, payload = WORK_FAIL, payload.split(b"\0", 1)[0]
        if self.debug:
            self.debug_packet(conn, ptype, payload.split(b"\0", ARGUMENT_NULS[ptype]), "->")
        self.loop.send(conn, HEADER.pack(RES, ptype, len(payload)) + payload)

    def receive(self, conn, data):
        """Run every complete packet and text line in `data`; keep the rest."""
        start = 0
        end = len(data)
        unpack = HEADER.unpack_from
        handlers = self.handlers
        max_packet = self.max_packet
        debug = self.debug
        while start < end:
            if data[start] == 0:
                if end - start < 12:
                    break
                magic, ptype, size = unpack(data, start)
                if not 0 < ptype < PACKET_TYPES or magic != REQ and magic != RES:
                    self.loop.close(conn)
                    return
                if size > max_packet:
                    self.loop.log.limited("limits", "WARNING", f"{conn.address}:{conn.port}: "
                                          f"packet of {size} bytes is over --max-packet-size, "
                                          f"closing")
                    self.loop.close(conn)
                    return
                packet_end = start + 12 + size
                if packet_end > end:
                    if size > 65536:
                        self.loop.gather(conn, data[start:], 12 + size)
                        conn.inbuf = b""
                        return
                    break
                nuls = ARGUMENT_NULS[ptype]
                args = data[start + 12:packet_end].split(b"\0", nuls)   # nuls 0: [payload]
                start = packet_end
                if len(args) <= nuls:
                    # C would read past this packet looking for the missing NULs.
                    self.loop.close(conn)
                    return
                if size > ARGUMENT_MAX and not argument_sizes_fit(ptype, args):
                    self.loop.close(conn)
                    return
                if magic == REQ:
                    if debug:
                        self.debug_packet(conn, ptype, args)
                    handlers[ptype](conn, args)
                else:
                    self.loop.send(conn, ERROR_INVALID_MAGIC)
            else:
                newline = data.find(b"\n", start, start + TEXT_LINE_MAX)
                if newline < 0:
                    if end - start > TEXT_LINE_MAX:
                        self.loop.close(conn)
                        return
                    break
                line = data[start:newline]
                start = newline + 1
                self.admin.line(conn, line)
            if conn.closed:
                return
            if conn.paused:
                break
        conn.inbuf = data[start:] if start < end else b""

    def resume(self, conn):
        """Go on with the requests that came while the connection was paused."""
        if conn.inbuf:
            data, conn.inbuf = conn.inbuf, b""
            try:
                self.receive(conn, data)
            except Exception:
                self.loop.log.error(f"{conn.address}: closing after an internal error:\n"
                                    + traceback.format_exc())
                self.loop.close(conn)

    def debug_packet(self, conn, ptype, args, direction="<-"):
        """--verbose DEBUG: one line per request, and per job news sent (names and
        handles, no job data)."""
        shown = args[:-1] if ptype in DATA_TYPES else args
        words = " ".join(text(arg[:64]) for arg in shown)
        size = len(args[-1]) if ptype in DATA_TYPES else 0
        self.loop.log.limited("packets", "DEBUG", f"{conn.address}:{conn.port} {direction} "
                              f"{PACKET_NAMES.get(ptype, ptype)} {words}"
                              + (f" ({size} bytes of data)" if size else ""),
                              burst=1000, every=1.0)

    def packet_handlers(self):
        handlers = [self.reject] * PACKET_TYPES
        handlers[CAN_DO] = self.can_do
        handlers[CAN_DO_TIMEOUT] = self.can_do_timeout
        handlers[CANT_DO] = self.cant_do
        handlers[RESET_ABILITIES] = self.reset_abilities
        handlers[PRE_SLEEP] = self.pre_sleep
        for ptype, priority, background in (
                (SUBMIT_JOB, NORMAL, False), (SUBMIT_JOB_HIGH, HIGH, False),
                (SUBMIT_JOB_LOW, LOW, False), (SUBMIT_JOB_BG, NORMAL, True),
                (SUBMIT_JOB_HIGH_BG, HIGH, True), (SUBMIT_JOB_LOW_BG, LOW, True)):
            handlers[ptype] = self.submitter(priority, background)
        handlers[SUBMIT_JOB_EPOCH] = self.submit_job_epoch
        handlers[SUBMIT_REDUCE_JOB] = functools.partial(self.submit_reduce, background=False)
        handlers[SUBMIT_REDUCE_JOB_BACKGROUND] = functools.partial(self.submit_reduce,
                                                                   background=True)
        handlers[GRAB_JOB] = self.grab_job
        handlers[GRAB_JOB_UNIQ] = self.grab_job_uniq
        handlers[GRAB_JOB_ALL] = self.grab_job_all
        handlers[WORK_STATUS] = self.work_status
        handlers[WORK_DATA] = functools.partial(self.work_update, WORK_DATA)
        handlers[WORK_WARNING] = functools.partial(self.work_update, WORK_WARNING)
        handlers[WORK_COMPLETE] = self.work_complete
        handlers[WORK_FAIL] = self.work_fail
        handlers[WORK_EXCEPTION] = self.work_exception
        handlers[GET_STATUS] = self.get_status
        handlers[GET_STATUS_UNIQUE] = self.get_status_unique
        handlers[ECHO_REQ] = self.echo
        handlers[SET_CLIENT_ID] = self.set_client_id
        handlers[OPTION_REQ] = self.option_req
        return handlers

    def reject(self, conn, args):
        self.loop.send(conn, ERROR_INVALID_COMMAND)

    def echo(self, conn, args):
        self.loop.send(conn, packet(ECHO_RES, args[0]))

    def set_client_id(self, conn, args):
        conn.client_id = args[0][:CLIENT_ID_MAX]

    def option_req(self, conn, args):
        name = args[0]
        if len(name) > OPTION_NAME_MAX or name.split(b"\0", 1)[0].lower() != b"exceptions":
            self.loop.send(conn, ERROR_UNKNOWN_OPTION)
            return
        conn.exceptions = True
        self.loop.send(conn, packet(OPTION_RES, name))

    # -- workers

    def can_do(self, conn, args):
        self.queues.register(conn, args[0], 0)

    def can_do_timeout(self, conn, args):
        name, timeout = args
        milliseconds = c_integer(timeout, 64)
        # C closes on what strtol cannot tell from overflow: LONG_MAX and LONG_MIN.
        if (len(timeout) > TIMEOUT_DIGITS_MAX or milliseconds is None
                or milliseconds in (2 ** 63 - 1, -2 ** 63)):
            self.loop.close(conn)
            return
        self.queues.register(conn, name, milliseconds)

    def cant_do(self, conn, args):
        name = args[0]
        self.queues.unregister(conn, [r for r in conn.registrations if r.function.name == name])

    def reset_abilities(self, conn, args):
        self.queues.unregister(conn, list(conn.registrations))

    def pre_sleep(self, conn, args):
        self.queues.sleep(conn)

    def grab_job(self, conn, args):
        job = self.queues.grab(conn)
        self.loop.send(conn, NO_JOB_PACKET if job is None else packet(
            JOB_ASSIGN, b"\0".join((job.handle, job.function.name, job.data))))

    def grab_job_uniq(self, conn, args):
        self.loop.send(conn, self.assignment_uniq(self.queues.grab(conn)))

    def grab_job_all(self, conn, args):
        job = self.queues.grab(conn)
        if job is None or not job.reducer:    # as C: JOB_ASSIGN_ALL only for a reduce job
            self.loop.send(conn, self.assignment_uniq(job))
        else:
            self.loop.send(conn, packet(JOB_ASSIGN_ALL, b"\0".join((
                job.handle, job.function.name, job.unique, job.reducer, job.data))))

    @staticmethod
    def assignment_uniq(job):
        """JOB_ASSIGN_UNIQ of a grabbed job, or NO_JOB."""
        if job is None:
            return NO_JOB_PACKET
        return packet(JOB_ASSIGN_UNIQ,
                      b"\0".join((job.handle, job.function.name, job.unique, job.data)))

    def work_status(self, conn, args):
        job = self.queues.running_job(conn, args[0])
        if job is None:
            self.loop.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.queues.report_progress(job, atoi(args[1]) & 0xFFFFFFFF,
                                    atoi(args[2][:10]) & 0xFFFFFFFF, b"\0".join(args))

    def work_update(self, ptype, conn, args):
        job = self.queues.running_job(conn, args[0])
        if job is None:
            self.loop.send(conn, ERROR_NO_SUCH_JOB)
            return
        self.queues.notify(job, ptype, b"\0".join(args))

    def work_complete(self, conn, args):
        job = self.queues.running_job(conn, args[0])
        if job is None:
            self.loop.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.queues.complete(job, b"\0".join(args))

    def work_fail(self, conn, args):
        handle = args[0]
        if len(handle) > HANDLE_MAX:
            self.loop.send(conn, ERROR_HANDLE_TOO_LARGE)
            return
        job = self.queues.running_job(conn, handle)
        if job is None:
            self.loop.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.queues.fail(job)

    def work_exception(self, conn, args):
        job = self.queues.running_job(conn, args[0])
        if job is None:
            self.loop.send(conn, ERROR_NO_SUCH_EXCEPTION_JOB)
            return
        self.queues.throw(job, b"\0".join(args))

    # -- clients

    def submitter(self, priority, background):
        """The handler of one SUBMIT_JOB* type (arguments: function, unique, data),
        made once, so that a packet costs one call, as a method would."""
        submit = self.queues.submit

        def submit_job(conn, args):
            submit(conn, args[0], args[1], args[2], priority, background)
        return submit_job

    def submit_job_epoch(self, conn, args):
        """Function, unique, epoch time, data."""
        when = c_integer(args[2], 64)
        if when is None:
            self.loop.close(conn)
            return
        self.queues.submit(conn, args[0], args[1], args[3], NORMAL, True, when=when)

    def submit_reduce(self, conn, args, background):
        """Function, unique, reducer, aggregator (ignored, as by C), data."""
        # C checks the reducer's length where it means the unique's; we keep that.
        if len(args[2]) > UNIQUE_MAX:
            self.loop.emit(conn, ERROR, UNIQUE_TOO_LARGE)
            return
        self.queues.submit(conn, args[0], args[1], args[4], NORMAL, background,
                           reducer=args[2])

    def get_status(self, conn, args):
        handle = args[0]
        if len(handle) > HANDLE_MAX:
            self.loop.close(conn)
            return
        status = self.queues.job_status(handle)
        if status is None:
            pager = self.queues.pager
            number = stored_handle_number(handle, self.queues.handle_prefix)
            if pager is not None and number:
                pager.status_of_stored(conn, number, functools.partial(self.stored_status,
                                                                       handle))
                return
            self.loop.send(conn, packet(STATUS_RES, handle + b"\x000\x000\x000\x000"))
            return
        running, numerator, denominator = status
        self.loop.send(conn, packet(STATUS_RES, b"%s\x001\x00%d\x00%d\x00%d" % (
            handle, running, numerator, denominator)))

    def stored_status(self, handle, conn, known):
        self.loop.send(conn, packet(STATUS_RES, handle + (b"\x001\x000\x000\x000" if known
                                                          else b"\x000\x000\x000\x000")))

    def get_status_unique(self, conn, args):
        unique = args[0]
        if len(unique) >= UNIQUE_MAX:
            self.loop.close(conn)
            return
        status = self.queues.unique_status(unique)
        if status is None:
            self.loop.send(conn, packet(STATUS_RES_UNIQUE,
                                        unique + b"\x000\x000\x000\x000\x000"))
            return
        self.loop.send(conn, packet(STATUS_RES_UNIQUE,
                                    b"%s\x001\x00%d\x00%d\x00%d\x00%d" % ((unique,) + status)))


# --- admin text protocol ------------------------------------------------------

def admin_tokens(line):
    """Split as C does: single spaces separate, a run of spaces counts as one,
    a leading space gives an empty first token, trailing spaces one empty last token."""
    tokens = []
    start = 0
    size = len(line)
    while True:
        space = line.find(b" ", start)
        if space < 0:
            tokens.append(line[start:])
            return tokens
        tokens.append(line[start:space])
        start = space + 1
        while start < size and line[start] == 32:
            start += 1
        if len(tokens) > TEXT_TOKENS_MAX:
            return tokens


def is_loopback(address):
    return address in ("127.0.0.1", "::1") or address.startswith(("127.", "::ffff:127."))


def c_string(name):
    """What C prints of a name: up to its first NUL."""
    return name.split(b"\0", 1)[0] if b"\0" in name else name


def invalid_arguments(command):
    return (b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+"
            + command + b"\r\n")


def unknown_command(command):
    return b"ERR UNKNOWN_COMMAND Unknown+server+command" + command + b"\r\n"


WAIT = object()        # an admin command's answer comes later, once the store has said


class Admin:
    """The text admin protocol, byte for byte as C gearmand 1.1.20, plus `shutdown`."""

    # Commands that change the server; --admin-allow restricts who may send them.
    CHANGING = frozenset({b"shutdown", b"cancel", b"drop", b"create", b"maxqueue"})
    # Those of them C 1.1.20 does not have. Without --admin-allow only loopback peers
    # may send them: a drop-in replacement must not turn an unknown command into a
    # remote kill switch on a port that listens on every address.
    OURS = frozenset({b"shutdown"})

    def __init__(self, server):
        self.loop = server.loop
        self.queues = server.queues
        self.server = server
        self.log = server.log
        self.allow = server.options.admin_allow
        self.commands = {
            b"status": self.status,
            b"prioritystatus": self.priority_status,
            b"workers": self.workers,
            b"show": self.show,
            b"cancel": self.cancel,
            b"create": self.create,
            b"drop": self.drop,
            b"maxqueue": self.maxqueue,
            b"getpid": lambda conn, tokens, bare: b"OK %d\n" % os.getpid(),
            b"verbose": lambda conn, tokens, bare: b"OK %s\n" % server.log.level_name.encode(),
            b"version": lambda conn, tokens, bare: b"OK %s\n" % GEARMAND_VERSION.encode(),
            b"shutdown": self.shutdown,
            b"cluster": self.cluster,
        }

    def line(self, conn, line):
        bare_newline = not line.endswith(b"\r")
        if not bare_newline:
            line = line[:-1]
        tokens = admin_tokens(line)
        if len(tokens) > TEXT_TOKENS_MAX:
            self.loop.close(conn)
            return
        # C compares NUL-terminated strings, so a NUL ends each token.
        tokens = [token.split(b"\0", 1)[0] for token in tokens]
        word = tokens[0].lower()
        command = self.commands.get(word)
        if self.log.debug:
            self.log.limited("admin", "DEBUG", f"{conn.address}:{conn.port} admin: "
                             f"{text(line[:200])}", burst=100, every=1.0)
        if command is None:
            reply = unknown_command(tokens[0])
        elif word in self.CHANGING and not self.allowed(conn, word):
            self.log.limited("admin denied", "WARNING", f"{conn.address}:{conn.port}: admin "
                             f"command {text(word)} refused (--admin-allow)")
            reply = (b"ERR PERMISSION_DENIED " + word + b"+is+not+allowed+from+"
                     + conn.address.encode() + b"\r\n")
        else:
            reply = command(conn, tokens, bare_newline)
            if reply is WAIT:
                return                    # it answers once the store has
        self.loop.send(conn, reply or b"ERR UNKNOWN_ERROR\r\n")

    def allowed(self, conn, word):
        if self.allow is None:            # the default: C's commands from anyone, ours not
            return word not in self.OURS or is_loopback(conn.address)
        if self.allow == "any":
            return True
        if self.allow == "loopback":
            return is_loopback(conn.address)
        return False

    def status(self, conn, tokens, bare):
        rows = [b"%s\t%d\t%d\t%d\n" % (c_string(f.name), f.total, f.running,
                                         len(f.registrations))
                for f in self.queues.functions_in_c_order()]
        return b"".join(rows) + b".\n"

    def priority_status(self, conn, tokens, bare):
        rows = [b"%s\t%d\t%d\t%d\t%d\n" % (c_string(f.name), f.queued(HIGH), f.queued(NORMAL),
                                           f.queued(LOW), len(f.registrations))
                for f in self.queues.functions_in_c_order()]
        return b"".join(rows) + b".\n"

    def workers(self, conn, tokens, bare):
        rows = []
        for conn in reversed(list(self.loop.connections.values())):
            names = b"".join(b" " + c_string(r.function.name) for r in conn.registrations)
            rows.append(b"%d %s %s :%s\n" % (conn.fd, conn.address.encode(),
                                             c_string(conn.client_id), names))
        return b"".join(rows) + b".\n"

    def show(self, conn, tokens, bare):
        words = [token.lower() for token in tokens]
        if len(tokens) == 1:
            return unknown_command(tokens[0])
        if words[1:] == [b"jobs"]:
            return self.show_jobs()
        if words[1:] == [b"unique", b"jobs"]:
            return self.show_unique_jobs()
        return b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"

    def show_jobs(self):
        rows = [b"%s\t%d\t%d\t%d\n" % (job.handle, job.retries, job.ignore, job.queued)
                for job in self.queues.jobs_in_c_order(lambda job: gm_hash(job.handle))]
        return b"".join(rows) + self.stored_line() + b".\n"

    def stored_line(self):
        """What `show jobs` cannot list: the jobs that are in the store only."""
        pager = self.queues.pager
        stored = pager.stored_count() if pager is not None else 0
        return b"# and %d more in the persistent queue only\n" % stored if stored else b""

    def show_unique_jobs(self):
        def key(job):
            if job.unique == b"-":
                return gm_hash(job.data) if job.data else 0
            return gm_hash(job.unique) if job.unique else 0
        rows = [job.unique + b"\n" for job in self.queues.jobs_in_c_order(key)]
        return b"".join(rows) + self.stored_line() + b".\n"

    def cancel(self, conn, tokens, bare):
        if len(tokens) < 3:
            return unknown_command(tokens[0])
        if len(tokens) != 3 or tokens[1].lower() != b"job":
            return b"ERR UNKNOWN_ERROR\r\n"
        job = self.queues.jobs.get(tokens[2])
        if job is None:
            pager = self.queues.pager
            number = stored_handle_number(tokens[2], self.queues.handle_prefix)
            if pager is None or not number:
                return b"ERR UNKNOWN_JOB\r\n"
            pager.cancel_stored(conn, number, self.stored_cancelled)
            return WAIT
        self.queues.cancel(job)
        return b"OK\r\n"

    def cluster(self, conn, tokens, bare):
        """Ours: each member's table, who serves it, its epoch and the seconds left on
        its lease (negative: run out), and whether its server wants it back."""
        cluster = self.server.cluster
        if cluster is None:
            return b"ERR NO_CLUSTER this+server+is+in+no+cluster+(--cluster)\r\n"
        rows = [b"%s\t%s\t%d\t%.3f\t%s\n" % (
            m["member"].encode(), m["owner"].encode(), m["epoch"], m["lease_left_seconds"],
            b"wants-it-back" if m["wants_its_table"] else b"-")
            for m in cluster.snapshot()["members"]]
        return b"".join(rows) + b".\n"

    def stored_cancelled(self, conn, found):
        self.loop.send(conn, b"OK\r\n" if found else b"ERR UNKNOWN_JOB\r\n")

    def create(self, conn, tokens, bare):
        if len(tokens) != 3 or tokens[1].lower() != b"function":
            return invalid_arguments(tokens[0])
        # C drops two bytes it takes for CRLF, so a bare LF costs the name its last byte.
        name = tokens[2][:-1] if bare else tokens[2]
        self.queues.find_or_add_function(name)
        return b"OK\r\n"

    def drop(self, conn, tokens, bare):
        if len(tokens) != 3 or tokens[1].lower() != b"function":
            return invalid_arguments(tokens[0])
        wanted = tokens[2].lower()
        matches = [f for f in self.queues.functions_in_c_order()
                   if c_string(f.name).lower() == wanted]
        if not matches:
            return b"ERR function not found\r\n"
        replies = []
        for function in matches:
            if function.registrations or function.running:
                replies.append(b"ERR there are still connected workers or executing clients\r\n")
            else:
                self.queues.remove_function(function)
                replies.append(b"OK\r\n")
        return b"".join(replies)

    def maxqueue(self, conn, tokens, bare):
        if len(tokens) < 2:
            return invalid_arguments(tokens[0])
        function = self.queues.functions.get(tokens[1])
        if function is not None:
            limits = [max(atoi(token), 0) for token in tokens[2:]]
            if len(limits) == 1:
                limits *= 3
            function.max_queue = (limits + [0, 0, 0])[:3]
        return b"OK\r\n"

    def shutdown(self, conn, tokens, bare):
        why = f"admin shutdown from {conn.address}:{conn.port}"
        if len(tokens) == 1:
            self.loop.request_stop("now", why)
        elif len(tokens) == 2 and tokens[1].lower() == b"graceful":
            self.loop.request_stop("graceful", why + " graceful")
        else:
            return invalid_arguments(tokens[0])
        return b"OK\r\n"




# --- HTTP: job submission, metrics and a status page -------------------------

HTTP_HEAD_MAX = 16384
HTTP_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                411: b"Length Required", 413: b"Payload Too Large",
                431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
                503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
HTTP_PRIORITIES = {b"high": HIGH, b"low": LOW}
HTTP_BACKGROUND = {b"true": True, b"1": True, b"yes": True, b"false": False, b"0": False,
                   b"no": False, b"": False}


class HttpExchange:
    """One HTTP connection: its unread input and the request being answered."""

    __slots__ = ("buffer", "busy", "keep_alive", "version", "head", "background", "handle",
                 "body")

    def __init__(self):
        self.buffer = b""
        self.busy = False                 # a request waits for its job
        self.keep_alive = True
        self.version = b"HTTP/1.1"
        self.head = False                 # HEAD: headers only
        self.background = False
        self.handle = b""
        self.body = []                    # WORK_DATA received so far


class HttpProtocol:
    """HTTP/1.1 on --http-port, on the same loop. POST /FUNCTION submits a job as
    C gearmand's HTTP module does (its response is the job's result, or the
    handle at once for X-Gearman-Background: true); GET /metrics, /status and /
    show the server. The news of a job becomes its response as it arrives."""

    name = "HTTP"

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.queues = server.queues
        self.log = server.log
        self.max_packet = server.options.max_packet_size
        self.routes = {b"/": self.page, b"/metrics": self.metrics, b"/status": self.status}

    def opened(self, conn):
        conn.http = HttpExchange()
        conn.exceptions = True            # the response carries a job's exception

    # -- requests

    def receive(self, conn, data):
        exchange = conn.http
        exchange.buffer += data
        if not exchange.busy:
            self.next_request(conn)
        elif len(exchange.buffer) > HTTP_HEAD_MAX + self.max_packet:
            self.loop.close(conn)        # pipelining far ahead of its answers

    def resume(self, conn):
        data, conn.inbuf = conn.inbuf, b""
        self.receive(conn, data)

    def next_request(self, conn):
        """Answer buffered requests in order; stop at one that waits for its job."""
        exchange = conn.http
        while not (exchange.busy or conn.closing or conn.closed):
            exchange.head = False
            buffer = exchange.buffer
            end = buffer.find(b"\r\n\r\n", 0, HTTP_HEAD_MAX)
            if end < 0:
                if len(buffer) >= HTTP_HEAD_MAX:
                    self.error(conn, 431, b"request head over 16 KiB")
                return
            lines = buffer[:end].split(b"\r\n")
            request = lines[0].split(b" ")
            if len(request) != 3:
                self.error(conn, 400, b"malformed request line")
                return
            method, target, version = request
            exchange.head = method == b"HEAD"
            exchange.version = version if version in (b"HTTP/1.0", b"HTTP/1.1") else b"HTTP/1.1"
            if version not in (b"HTTP/1.0", b"HTTP/1.1"):
                self.error(conn, 505, b"HTTP/1.0 or HTTP/1.1 only")
                return
            headers = {}
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or not name or name != name.strip():
                    self.error(conn, 400, b"malformed header")
                    return
                headers[name.lower()] = value.strip()
            if b"transfer-encoding" in headers:
                self.error(conn, 411, b"send a Content-Length, not chunked data")
                return
            length = headers.get(b"content-length", b"0")
            if not length.isdigit():
                self.error(conn, 400, b"bad Content-Length")
                return
            length = int(length)
            if length > self.max_packet:
                self.error(conn, 413, b"body over --max-packet-size")
                return
            start = end + 4
            if len(buffer) < start + length:
                if start + length > 65536:
                    # A large body: let read() gather its pieces and join them once.
                    self.loop.gather(conn, buffer, start + length)
                    exchange.buffer = b""
                return
            body = buffer[start:start + length]
            exchange.buffer = buffer[start + length:]
            connection = headers.get(b"connection", b"").lower()
            exchange.keep_alive = (connection != b"close" if version == b"HTTP/1.1"
                                   else connection == b"keep-alive")
            self.request(conn, method, target, headers, body)

    def request(self, conn, method, target, headers, body):
        if self.log.debug:
            self.log.limited("http", "DEBUG", f"{conn.address}:{conn.port} HTTP {text(method)} "
                             f"{text(target[:200])} ({len(body)} bytes)", burst=500, every=1.0)
        if method not in (b"GET", b"HEAD", b"POST", b"PUT"):
            self.error(conn, 405, b"GET, HEAD, POST or PUT")
            return
        # A query string is not part of the function's name (C made it part of it).
        path = target.split(b"?", 1)[0]
        route = self.routes.get(path)
        if route is not None and method in (b"GET", b"HEAD"):
            content_type, content = route()
            self.loop.send(conn, self.response(conn, 200, [(b"Content-Type", content_type)],
                                                 content))
            return
        name = path.lstrip(b"/")          # the function, otherwise verbatim, as in C
        if not name:
            self.error(conn, 404, b"no function named in the path")
            return
        background = HTTP_BACKGROUND.get(headers.get(b"x-gearman-background", b"").lower())
        if background is None:
            self.error(conn, 400, b"X-Gearman-Background must be true, 1, yes, false, 0 or no",
                       keep=True)
            return
        function = self.queues.functions.get(name)
        if not background and (function is None or not function.registrations):
            # A foreground request would wait for a worker that may never come.
            self.error(conn, 503, b"no worker can do " + name, keep=True)
            return
        exchange = conn.http
        exchange.busy = True
        exchange.background = background
        exchange.handle = b""
        exchange.body = []
        priority = HTTP_PRIORITIES.get(headers.get(b"x-gearman-priority", b"").lower(), NORMAL)
        unique = headers.get(b"x-gearman-unique", b"-")
        data = body if method in (b"POST", b"PUT") else b""
        self.queues.submit(conn, name, unique, data, priority, background)

    # -- responses

    def event(self, conn, ptype, payload):
        """News of the connection's job: part of its response, or all of it."""
        exchange = conn.http
        if not exchange.busy:
            return
        if ptype == JOB_CREATED:
            exchange.handle = payload
            if exchange.background:
                self.job_response(conn, 200, b"JOB_CREATED", b"")
        elif ptype == WORK_DATA:
            exchange.body.append(payload.split(b"\0", 1)[1])
        elif ptype == WORK_COMPLETE:
            exchange.body.append(payload.split(b"\0", 1)[1])
            self.job_response(conn, 200, b"WORK_COMPLETE", b"".join(exchange.body))
        elif ptype == WORK_FAIL:
            self.job_response(conn, 500, b"WORK_FAIL", b"")
        elif ptype == WORK_EXCEPTION:
            self.job_response(conn, 500, b"WORK_EXCEPTION", payload.split(b"\0", 1)[1])
        elif ptype == ERROR:
            code, _, text = payload.partition(b"\0")
            status = 400 if code == b"ARGUMENT_TOO_LARGE" else 503
            self.finished(conn, self.response(
                conn, status, [(b"X-Gearman-Command", b"ERROR"), (b"X-Gearman-Error", code)],
                text + b"\n"))
        # WORK_STATUS, WORK_WARNING: nothing to show

    def job_response(self, conn, status, command, content):
        headers = [(b"X-Gearman-Job-Handle", conn.http.handle), (b"X-Gearman-Command", command),
                   (b"Content-Type", b"application/octet-stream")]
        self.finished(conn, self.response(conn, status, headers, content))

    def finished(self, conn, response):
        """The job's response is complete: send it, and go on to the next request."""
        exchange = conn.http
        exchange.busy = False
        if exchange.buffer and not conn.closing:
            self.loop.resume(conn)        # a request left to read
        self.loop.send(conn, response)

    def error(self, conn, status, message, keep=False):
        """Answer a request we refuse; a malformed one also ends the connection."""
        if not keep:
            conn.http.keep_alive = False
        self.loop.send(conn, self.response(conn, status, [(b"Content-Type", b"text/plain")],
                                             message + b"\n"))

    def response(self, conn, status, headers, content):
        exchange = conn.http
        if not exchange.keep_alive:
            conn.closing = True
        head = [b"%s %d %s" % (exchange.version, status, HTTP_REASONS[status])]
        head += [name + b": " + value for name, value in headers]
        head.append(b"Content-Length: %d" % len(content))
        head.append(b"Server: Gearman/" + GEARMAND_VERSION.encode())
        head.append(b"Connection: keep-alive" if exchange.keep_alive else b"Connection: close")
        return b"\r\n".join(head) + b"\r\n\r\n" + (b"" if exchange.head else content)

    # -- what the server looks like

    def snapshot(self):
        """Functions, workers, totals and store health, as plain data."""
        server = self.server
        stats = server.stats
        functions = [{"name": text(f.name), "jobs": f.total, "running": f.running,
                      "workers": len(f.registrations),
                      "queued": {name: f.queued(priority)
                                 for priority, name in enumerate(PRIORITY_NAMES)}}
                     for f in self.queues.functions_in_c_order()]
        workers = [{"fd": conn.fd, "address": conn.address, "port": conn.port,
                    "id": text(conn.client_id),
                    "functions": [text(r.function.name) for r in conn.registrations],
                    "running": sum(len(r.jobs) for r in conn.registrations)}
                   for conn in self.loop.connections.values() if conn.registrations]
        health = stats.store_health
        rates = stats.rates()
        return {
            "server": f"gearmand.py {__version__}",
            "version": GEARMAND_VERSION,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - stats.started, 3),
            "connections": len(self.loop.connections),
            "functions": functions,
            "workers": workers,
            "jobs": {"submitted": stats.submitted, "completed": stats.completed,
                     "failed": stats.failed,
                     "per_second": None if rates is None else dict(zip(
                         ("submitted", "completed", "failed"), (round(r, 3) for r in rates)))},
            "store": {"queue_type": server.options.queue_type,
                      "persistent": server.store.persistent,
                      "durable": server.store.durable,
                      # the last write or probe (every PROBE_INTERVAL s when idle) reached it
                      "healthy": health.healthy,
                      "since": round(health.since, 3),   # healthy, or failing, since
                      "errors": stats.store_errors,
                      "last_error": health.error or stats.store_last_error,
                      "writes_in_flight": server.journal.adds_in_flight,
                      "replayed_jobs": stats.replayed},
            **({"cluster": server.cluster.snapshot()} if server.cluster else {}),
        }

    def status(self):
        import json
        return b"application/json", json.dumps(self.snapshot(), indent=1).encode() + b"\n"

    def metrics(self):
        """The Prometheus text exposition (format 0.0.4)."""
        server = self.server
        stats = server.stats
        functions = self.queues.functions_in_c_order()
        lines = []

        def family(name, kind, description, samples):
            lines.append(f"# HELP {name} {description}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        def per_function(value):
            return [(labels(function=f.name), value(f)) for f in functions]

        def histogram(name, description, histogram):
            lines.append(f"# HELP {name} {description}")
            lines.append(f"# TYPE {name} histogram")
            cumulative = 0
            for bound, count in zip(histogram.bounds + (float("inf"),), histogram.counts):
                cumulative += count
                lines.append(f'{name}_bucket{{le="{bound if bound != float("inf") else "+Inf"}"}}'
                             f" {cumulative}")
            lines.append(f"{name}_sum {histogram.total}")
            lines.append(f"{name}_count {cumulative}")

        family("gearman_up", "gauge", "The job server answers.", [("", 1)])
        family("gearman_info", "gauge", "Server version.",
               [(labels(version=GEARMAND_VERSION, server=f"gearmand.py {__version__}"), 1)])
        family("gearman_jobs", "gauge", "Jobs of a function in memory, queued and running.",
               per_function(lambda f: f.total))
        family("gearman_jobs_running", "gauge", "Jobs of a function a worker is running.",
               per_function(lambda f: f.running))
        family("gearman_jobs_waiting", "gauge", "Jobs of a function waiting for a worker.",
               per_function(lambda f: f.total - f.running))
        family("gearman_jobs_queued", "gauge", "Jobs waiting for a worker, by priority.",
               [(labels(function=f.name, priority=name), f.queued(priority))
                for f in functions for priority, name in enumerate(PRIORITY_NAMES)])
        family("gearman_workers", "gauge", "Worker registrations (CAN_DO) of a function.",
               per_function(lambda f: len(f.registrations)))
        for what, counts in (("submitted", stats.submitted), ("completed", stats.completed),
                             ("failed", stats.failed)):
            family(f"gearman_jobs_{what}_total", "counter", f"Jobs {what} since start.",
                   [(labels(kind=kind), count) for kind, count in counts.items()])
        family("gearman_connections", "gauge", "Open connections.",
               [("", len(self.loop.connections))])
        family("gearman_connections_accepted_total", "counter", "Connections accepted.",
               [("", stats.accepted)])
        histogram("gearman_store_batch_size", "Jobs added and deleted per store commit.",
                  stats.batch_sizes)
        histogram("gearman_store_commit_seconds", "Time one store commit took.",
                  stats.commit_seconds)
        family("gearman_store_replayed_jobs", "gauge", "Jobs replayed from the store at start.",
               [("", stats.replayed)])
        family("gearman_store_errors_total", "counter", "Store commits that failed.",
               [("", stats.store_errors)])
        family("gearman_store_healthy", "gauge", "1 if the last store write or probe "
               "reached the store, else 0.", [("", int(stats.store_health.healthy))])
        family("gearman_store_writes_in_flight", "gauge", "Batches of new jobs being written.",
               [("", server.journal.adds_in_flight)])
        if server.cluster is not None:
            cluster = server.cluster.snapshot()
            family("gearman_cluster_holds_its_table", "gauge",
                   "1 while this member holds its own table (else it is fenced).",
                   [("", int(cluster["holds_its_table"]))])
            family("gearman_cluster_lease_age_seconds", "gauge",
                   "Seconds since this member's lease was last renewed.",
                   [("", cluster["lease_age_seconds"] if cluster["lease_age_seconds"] is not None
                     else "NaN")])
            family("gearman_cluster_adopted_tables", "gauge",
                   "Tables of other members this member serves now.",
                   [("", len(cluster["adopted"]))])
            family("gearman_cluster_adoptions_total", "counter",
                   "Tables of other members this member has adopted.",
                   [("", cluster["adoptions_total"])])
            family("gearman_cluster_table_owner", "gauge",
                   "1 for each member's table and the member that serves it.",
                   [(labels(table=m["member"], owner=m["owner"]), 1)
                    for m in cluster["members"]])
        family("gearman_uptime_seconds", "gauge", "Seconds since the server started.",
               [("", round(time.time() - stats.started, 3))])
        return b"text/plain; version=0.0.4; charset=utf-8", ("\n".join(lines) + "\n").encode()

    def page(self):
        return b"text/html; charset=utf-8", status_page(self.snapshot(),
                                                       list(self.server.stats.samples))


def text(name):
    """A name (bytes) for JSON and labels: UTF-8, undecodable bytes escaped."""
    return name.decode("utf-8", "backslashreplace")


def labels(**values):
    def escape(value):
        value = text(value) if isinstance(value, bytes) else str(value)
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in values.items()) + "}"


# The status page: rendered here, whole, so it works without JavaScript (a
# <noscript> refresh reloads it); with JavaScript it replaces its <main> with a
# fresh copy every 3 s. No external files: the charts are inline SVG.
PAGE_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;min-width:36em} th,td{padding:.25em .7em;text-align:right}
th{background:#eee} td:first-child,th:first-child{text-align:left}
tr:nth-child(even){background:#f7f7f7} tr.orphan td{background:#fde8e8;color:#900}
.bad{color:#b00;font-weight:bold} .good{color:#070} #meta,.note{color:#666}
.charts{display:flex;flex-wrap:wrap;gap:1.5em} figure{margin:0}
figcaption{font-weight:bold;margin-bottom:.2em} svg{background:#fafafa;border:1px solid #ddd}
"""
PAGE_SCRIPT = """
function refresh() {
  fetch("/").then(function (r) { return r.text(); }).then(function (html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    document.querySelector("main").replaceWith(fresh.querySelector("main"));
    document.getElementById("live").textContent =
      "live, updated " + new Date().toLocaleTimeString();
  }).catch(function (e) {
    document.getElementById("live").textContent = "server unreachable: " + e;
  });
}
setInterval(refresh, 3000);
"""
CHART_COLOURS = ("#1f6fb4", "#e07b00", "#b00020")


def status_page(s, samples):
    """The page for a snapshot (HttpProtocol.snapshot) and the samples (Stats.sample)."""
    from html import escape

    def row(cells, css=""):
        return (f"<tr{f' class={css!r}' if css else ''}>"
                + "".join(f"<td>{escape(str(cell))}</td>" for cell in cells) + "</tr>")

    def table(id_, heads, rows, empty):
        body = "".join(rows) or f'<tr><td colspan="{len(heads)}" class="note">{empty}</td></tr>'
        return (f'<table id="{id_}"><thead><tr>' + "".join(f"<th>{h}</th>" for h in heads)
                + f"</tr></thead><tbody>{body}</tbody></table>")

    functions = []
    for f in s["functions"]:
        orphan = f["jobs"] > f["running"] and not f["workers"]
        functions.append(row([f["name"], f["jobs"], f["running"], f["queued"]["high"],
                              f["queued"]["normal"], f["queued"]["low"],
                              "0 (no worker)" if orphan else f["workers"]],
                             "orphan" if orphan else ""))
    workers = [row([f"{w['address']}:{w['port']} (fd {w['fd']})", w["id"],
                    " ".join(w["functions"]), w["running"]]) for w in s["workers"]]
    jobs = s["jobs"]
    rates = jobs["per_second"] or {}
    totals = [row([what] + [sum(jobs[what].values())]
                  + [jobs[what][kind] for kind in KINDS]
                  + [f"{rates[what]:.2f}" if what in rates else "-"])
              for what in ("submitted", "completed", "failed")]
    st = s["store"]
    kind = (" (durable)" if st["durable"] else " (persistent, not durable)" if st["persistent"]
            else " (not persistent)")
    health = ("healthy" if st["healthy"] else "failing: " + st["last_error"])
    store = (f'<div id="store" class="{"good" if st["healthy"] else "bad"}">'
             f'{escape(st["queue_type"] + kind + ": " + health)}, {st["errors"]} errors, '
             f'{st["replayed_jobs"]} jobs replayed at start</div>')
    # Queue depth: the samples, and now. Throughput: between consecutive samples.
    now = (time.time(), sum(f["jobs"] - f["running"] for f in s["functions"]),
           sum(f["running"] for f in s["functions"]), sum(jobs["submitted"].values()),
           sum(jobs["completed"].values()), sum(jobs["failed"].values()))
    points = samples + [now]
    depth = [(t, (waiting, running)) for t, waiting, running, *_ in points]
    throughput = [(b[0], tuple(max(after - before, 0) / max(b[0] - a[0], 1e-9)
                               for after, before in zip(b[3:], a[3:])))
                  for a, b in zip(points, points[1:])]
    charts = (chart("depth", "Jobs waiting and running", ("waiting", "running"), depth)
              + chart("throughput", "Jobs per second", ("submitted", "completed", "failed"),
                      throughput))
    uptime = int(s["uptime_seconds"])
    main = (f'<main><div id="meta">{escape(s["server"])} (gearmand {escape(s["version"])}), '
            f'pid {s["pid"]}, up {uptime // 3600}h {uptime // 60 % 60}m {uptime % 60}s, '
            f'{s["connections"]} connections, at {time.strftime("%H:%M:%S")}</div>'
            f'<h2>Jobs since start</h2>'
            + table("totals", ["jobs", "total", "foreground", "background",
                               "per second (last minute)"], totals, "")
            + f'<div class="charts">{charts}</div>'
            + "<h2>Functions</h2>"
            + table("functions", ["function", "jobs", "running", "high", "normal", "low",
                                  "workers"], functions, "no functions yet")
            + "<h2>Workers</h2>"
            + table("workers", ["address", "id", "functions", "running"], workers,
                    "no workers connected")
            + f"<h2>Store</h2>{store}</main>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<title>gearmand.py status</title>'
            '<noscript><meta http-equiv="refresh" content="10"></noscript>'
            f"<style>{PAGE_STYLE}</style></head><body>"
            '<h1>gearmand.py</h1><p class="note"><span id="live">reloads every 10 s</span>'
            ' &middot; <a href="/status">/status</a> (JSON) &middot; '
            '<a href="/metrics">/metrics</a> (Prometheus)</p>'
            f"{main}<script>{PAGE_SCRIPT}</script></body></html>\n").encode()


def chart(id_, title, names, series, width=460, height=130):
    """An SVG line chart of [(time, (value per name))], the last SAMPLES * SAMPLE_INTERVAL s."""
    from html import escape
    span = SAMPLES * SAMPLE_INTERVAL
    end = series[-1][0] if series else time.time()
    top = max([max(values) for _, values in series] + [1])
    left, bottom = 34, height - 16
    lines = []
    for index, name in enumerate(names):
        coords = " ".join(f"{left + (width - left - 4) * (1 - (end - t) / span):.1f},"
                          f"{bottom - (bottom - 8) * values[index] / top:.1f}"
                          for t, values in series if end - t <= span)
        if coords:
            lines.append(f'<polyline fill="none" stroke="{CHART_COLOURS[index]}" '
                         f'stroke-width="1.8" points="{coords}"/>')
    label = f"{top:.3g}"
    legend = " ".join(f'<span style="color:{CHART_COLOURS[index]}">&#9632; {escape(name)}</span>'
                      for index, name in enumerate(names))
    return (f'<figure><figcaption>{escape(title)}</figcaption>'
            f'<svg id="chart-{id_}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(title)}">'
            f'<line x1="{left}" y1="{bottom}" x2="{width - 4}" y2="{bottom}" stroke="#999"/>'
            f'<line x1="{left}" y1="8" x2="{left}" y2="{bottom}" stroke="#999"/>'
            f'<text x="{left - 4}" y="14" font-size="10" text-anchor="end">{label}</text>'
            f'<text x="{left - 4}" y="{bottom}" font-size="10" text-anchor="end">0</text>'
            f'<text x="{left}" y="{height - 3}" font-size="10">{int(span // 60)} min ago</text>'
            f'<text x="{width - 4}" y="{height - 3}" font-size="10" text-anchor="end">now</text>'
            + "".join(lines) + f"</svg><div>{legend}</div></figure>")


# --- the server: every room wired together -----------------------------------

class Server:
    """One job server: the queues, the journal of the store, the event loop and the
    protocols, wired together. The loop tells it when a turn ends, when the
    writer woke it, and when a connection closed."""

    def __init__(self, options, store, log):
        self.options = options
        self.store = store
        self.log = log
        self.stats = Stats(log)
        self.loop = EventLoop(self, options, log, self.stats)
        self.queues = Queues(options, self.loop.emit, self.loop.timers, log, self.stats)
        self.journal = Journal(store, self.queues, self.loop, log, self.stats,
                               options.store_queue_on_shutdown, options.queue_memory)
        self.cluster = None
        if options.cluster:
            address = f"{socket.gethostname()}:{options.port}"
            self.cluster = Cluster(self, options.cluster, options.cluster_lease, address)
        self.admin = Admin(self)
        self.gearman = BinaryProtocol(self)
        self.http = HttpProtocol(self)

    def listen(self, sockets, http=False, tls_context=None):
        self.loop.listen(sockets, self.http if http else self.gearman, tls_context)
        if http and not self.stats.samples:
            self.sample(None)             # the status page's charts start now

    def sample(self, _):
        self.stats.sample(self.queues.functions.values())
        self.loop.timers.add(SAMPLE_INTERVAL, self.sample, None)

    def serve(self):
        """Run until stopped; then stop the writer, write what must be, close all."""
        self.journal.start()
        if self.cluster is not None:
            self.cluster.start()
        try:
            self.loop.serve_forever()
        finally:
            self.loop.end_turn()
            if self.cluster is not None:
                self.cluster.stop()
            self.journal.close()
            self.loop.close_all()
            self.log.info("Shutdown complete")

    # -- what the loop tells its owner

    def turn_ended(self):
        self.journal.end_turn()
        if self.cluster is not None:
            self.cluster.flush()

    def woken(self):
        self.journal.collect()
        if self.cluster is not None:
            self.cluster.collect()

    def connection_closed(self, conn):
        self.queues.peer_left(conn)

    def work_pending(self):
        return self.journal.adds_in_flight or self.queues.any_running()

    def stopping_gracefully(self):
        if self.store.persistent:
            # Running jobs finish; queued ones wait in the store for the next start.
            self.queues.dispatching = False


# --- command line and main() --------------------------------------------------

class OptionError(Exception):
    """A bad command line: one line for the user, exit status 1."""


class OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise OptionError(message)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, as C's help does (`arg (=4730)`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and "(default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


def build_parser():
    parser = OptionParser(prog="gearmand", add_help=False, allow_abbrev=False,
                          formatter_class=HelpFormatter,
                          description="Gearman job server (gearmand.py, compatible with "
                                      f"gearmand {GEARMAND_VERSION}).")
    general = parser.add_argument_group("General options")
    general.add_argument("-b", "--backlog", type=int, default=32,
                         help="Number of backlog connections for listen.")
    general.add_argument("-d", "--daemon", action="store_true",
                         help="Daemon, detach and run in the background.")
    general.add_argument("--exceptions", action="store_true",
                         help="Enable protocol exceptions by default.")
    general.add_argument("-f", "--file-descriptors", type=int,
                         help="Number of file descriptors to allow for the process.")
    general.add_argument("-h", "--help", action="store_true", help="Print this help menu.")
    general.add_argument("-j", "--job-retries", type=int, default=0,
                         help="Number of attempts to run the job before the job server "
                              "removes it. Default is no limit.")
    general.add_argument("--job-handle-prefix",
                         help='Prefix used to generate a job handle string (default "H:<host_name>").')
    general.add_argument("--hashtable-buckets", type=int, default=991,
                         help="Number of buckets of the job hash tables (orders `show jobs`).")
    general.add_argument("--keepalive", action="store_true", help="Enable keepalive on sockets.")
    general.add_argument("--keepalive-idle", type=int, default=-1, help="TCP_KEEPIDLE.")
    general.add_argument("--keepalive-interval", type=int, default=-1, help="TCP_KEEPINTVL.")
    general.add_argument("--keepalive-count", type=int, default=-1, help="TCP_KEEPCNT.")
    general.add_argument("-l", "--log-file", default="/var/log/gearmand.log",
                         help="Log file; 'stderr' or 'none' are special (if the file cannot "
                              "be opened, stderr).")
    general.add_argument("-L", "--listen", action="append",
                         help="Address the server should listen on. Default is all.")
    general.add_argument("-P", "--pid-file", default="/var/gearmand.pid",
                         help="File to write process ID out to.")
    general.add_argument("-r", "--protocol", help="Load protocol module (only 'http').")
    general.add_argument("-R", "--round-robin", action="store_true",
                         help="Assign work in round-robin order per worker connection.")
    general.add_argument("-q", "--queue-type", default="builtin",
                         help="Persistent queue type to use (" + ", ".join(QUEUE_TYPE_NAMES)
                              + ").")
    general.add_argument("--config-file", default="/etc/gearmand.conf",
                         help="File of further options, one or more per line.")
    general.add_argument("--syslog", action="store_true", help="Use syslog.")
    general.add_argument("--coredump", action="store_true", help="Accepted; no effect.")
    general.add_argument("-t", "--threads", type=int, default=4,
                         help="Accepted for compatibility; one event loop serves all.")
    general.add_argument("-u", "--user", help="Switch to given user after startup.")
    general.add_argument("--verbose", default="ERROR",
                         help="Set verbose level (FATAL, ALERT, CRITICAL, ERROR, WARNING, "
                              "NOTICE, INFO, DEBUG). Start, stop and SIGHUP are logged at "
                              "every level.")
    general.add_argument("-V", "--version", action="store_true",
                         help="Display the version of gearmand and exit.")
    general.add_argument("-w", "--worker-wakeup", type=int, default=0,
                         help="Number of workers to wakeup for each job received "
                              "(0 = all sleeping workers).")
    general.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    general.add_argument("--max-packet-size", type=int, default=64 << 20,
                         help="Close connections that send a larger packet (bytes).")
    general.add_argument("--admin-allow", choices=("any", "loopback", "none"),
                         help="Who may use the admin commands that change the server (shutdown, "
                              "cancel job, drop function, create function, maxqueue): any "
                              "peer, loopback peers only, or none. Default: C's commands from "
                              "any peer (as C), shutdown (C has none) from loopback only.")
    general.add_argument("--max-input-buffer", type=int, default=512 << 20,
                         help="Bytes of large packets still arriving that all connections "
                              "together may hold; past it the connection adding more is "
                              "closed.")
    general.add_argument("--queue-memory", type=memory_size, default=128 << 20,
                         help="With a libsqlite3, MySQL or Postgres queue: memory for queued "
                              "jobs (bytes, or with K, M, G; default 128M; 0 = no limit). Past "
                              "it a queue's tail stays in the store only, paged in as needed. "
                              "redis, libmemcached and libtokyocabinet queues are held in "
                              "memory whole.")
    general.add_argument("--cluster", metavar="NAME",
                         help="With a MySQL or Postgres queue: be a member of the cluster "
                              "NAME, the servers with this NAME on the same database, each "
                              "with its own table: when one dies or hangs, another serves its "
                              "table's jobs (docs/cluster.md).")
    general.add_argument("--cluster-lease", type=float, default=5.0, metavar="SECONDS",
                         help="How long a member's table stays its own without a renewal "
                              "(renewed every second; default 5): past it the member stops "
                              "and another may adopt the table.")
    general.add_argument("--max-output", type=int, default=256 << 20,
                         help="Close connections that leave more unread replies (bytes).")

    http = parser.add_argument_group("HTTP")
    http.add_argument("--http-port", type=int,
                      help="Port of the HTTP interface (job submission, /metrics, /status, /); "
                           "given, or with -r http (then the default 8080), it is opened. "
                           "With --ssl it speaks HTTPS.")

    gear = parser.add_argument_group("Gear")
    gear.add_argument("-p", "--port", default="4730",
                      help="Port the server should listen on (1-65535 or a service name; "
                           "env GEARMAND_PORT overrides 4730).")
    gear.add_argument("--ssl", action="store_true",
                      help="Enable ssl connections (TLS on every port: the Gearman port, "
                           "admin included, and --http-port).")
    gear.add_argument("--ssl-ca-file",
                      default=os.environ.get("GEARMAND_CA_CERTIFICATE",
                                             "/etc/ssl/certs/gearmand-ca.pem"),
                      help="CA file (env GEARMAND_CA_CERTIFICATE).")
    gear.add_argument("--ssl-certificate",
                      default=os.environ.get("GEARMAND_SERVER_PEM", "/etc/ssl/certs/gearmand.pem"),
                      help="SSL certificate (env GEARMAND_SERVER_PEM).")
    gear.add_argument("--ssl-key",
                      default=os.environ.get("GEARMAND_SERVER_KEY", "/etc/ssl/certs/gearmand.key"),
                      help="SSL key for certificate (env GEARMAND_SERVER_KEY).")
    gear.add_argument("--ssl-verify-client", action="store_true",
                      help="Require client certificates signed by --ssl-ca-file "
                           "(C gearmand never checks them).")

    sqlite = parser.add_argument_group("libsqlite3")
    sqlite.add_argument("--libsqlite3-db", "--sqlite-db", dest="sqlite_db",
                        help="Database file to use.")
    sqlite.add_argument("--libsqlite3-table", "--sqlite-table", dest="sqlite_table",
                        default="gearman_queue", help="Table to use.")
    sqlite.add_argument("--sqlite-sync", choices=("full", "normal"), default="full",
                        help="full (default): each commit survives power loss; normal: "
                             "faster, survives a crash of the server but not of the machine.")
    sqlite.add_argument("--store-queue-on-shutdown", action="store_true",
                        help="Store the queue only when the server stops (fast, "
                             "but a crash loses every background job).")

    mysql = parser.add_argument_group("MySQL")
    mysql.add_argument("--mysql-host", default="localhost",
                       help="MySQL host ('localhost' = the local Unix socket).")
    mysql.add_argument("--mysql-port", type=int, default=3306, help="Port of server.")
    mysql.add_argument("--mysql-user", default="", help="MySQL user.")
    mysql.add_argument("--mysql-password", default="", help="MySQL user password.")
    mysql.add_argument("--mysql-db", default="", help="MySQL database.")
    mysql.add_argument("--mysql-table", default="gearman_queue", help="MySQL table name.")

    drizzle = parser.add_argument_group("libdrizzle (served by the MySQL store)")
    drizzle.add_argument("--libdrizzle-host", default="localhost", help="Host.")
    drizzle.add_argument("--libdrizzle-port", type=int, default=3306, help="Port.")
    drizzle.add_argument("--libdrizzle-uds", default="", help="Unix domain socket.")
    drizzle.add_argument("--libdrizzle-user", default="root", help="User.")
    drizzle.add_argument("--libdrizzle-password", default="", help="Password.")
    drizzle.add_argument("--libdrizzle-db", default="gearman", help="Database.")
    drizzle.add_argument("--libdrizzle-table", default="queue", help="Table.")
    drizzle.add_argument("--libdrizzle-mysql", action="store_true",
                         help="Accepted; the MySQL protocol is always used.")

    postgres = parser.add_argument_group("Postgres")
    postgres.add_argument("--libpq-conninfo", default="",
                          help="PostgreSQL connection information string.")
    postgres.add_argument("--libpq-table", default="queue", help="Table to use.")

    memcached = parser.add_argument_group("libmemcached")
    memcached.add_argument("--libmemcached-servers", help="List of Memcached servers to use.")
    memcached.add_argument("--libmemcached-prefix", default="gear_",
                           help="Prefix to use in memcached keys.")

    redis = parser.add_argument_group("redis")
    redis.add_argument("--redis-server", default="127.0.0.1", help="Redis server.")
    redis.add_argument("--redis-port", default="6379", help="Redis server port.")
    redis.add_argument("--redis-password", help="Redis server password.")
    redis.add_argument("--redis-prefix", default="_gear_", help="Prefix to use in redis keys.")

    tokyo = parser.add_argument_group("libtokyocabinet")
    tokyo.add_argument("--libtokyocabinet-file", help="File name of the database.")
    tokyo.add_argument("--libtokyocabinet-optimize", nargs="?", const="true", default="true",
                       help="Optimize the database on open (default true).")
    return parser


def memory_size(text):
    """256M, 1G, 1048576: bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 256M, 1G or bytes)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def config_file_tokens(argv):
    """Options from --config-file FILE or @FILE (default /etc/gearmand.conf,
    skipped if missing)."""
    path, explicit = "/etc/gearmand.conf", False
    for index, arg in enumerate(argv):
        if arg == "--config-file" and index + 1 < len(argv):
            path, explicit = argv[index + 1], True
        elif arg.startswith("--config-file="):
            path, explicit = arg.split("=", 1)[1], True
        elif arg.startswith("@") and len(arg) > 1:
            path, explicit = arg[1:], True
    try:
        with open(path, encoding="utf-8") as config:
            return config.read().split()
    except OSError:
        if explicit:
            raise OptionError("Could not open configuration file.")
        return []


def given_options(tokens):
    """The names (dests) of the options that `tokens` set, defaults left out."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(tokens)[0]))


def check_port(value, what):
    """A port number must be 1-65535 (a name is looked up when binding)."""
    if str(value).isdigit() and not 0 < int(value) < 65536:
        raise OptionError(f"{what} {value} is out of range: a port is 1-65535")


def parse_options(argv):
    """Parse like C gearmand: command-line values win over the config file's."""
    if "-v" in argv:
        raise OptionError("Option -v has been deprecated, please use --verbose")
    parser = build_parser()
    from_file = config_file_tokens(argv)
    argv = [arg for arg in argv if not (arg.startswith("@") and len(arg) > 1)]
    options, unknown = parser.parse_known_args(from_file + argv)
    if unknown:
        raise OptionError(f"unrecognised option '{unknown[0]}'")
    if options.help or options.version:
        return options
    options.given = given_options(from_file + argv)
    # Without --ssl every port is plain TCP: options that ask for TLS must not be
    # ignored, least of all --ssl-verify-client.
    tls_given = [name for name in ("ssl_verify_client", "ssl_ca_file", "ssl_certificate",
                                   "ssl_key") if name in options.given]
    if tls_given and not options.ssl:
        raise OptionError(f"--{tls_given[0].replace('_', '-')} needs --ssl: without it "
                          f"every port serves plain TCP")
    if options.verbose not in Log.LEVELS:
        raise OptionError("Invalid value for --verbose supplied")
    if options.hashtable_buckets <= 0:
        raise OptionError("hashtable-buckets has to be greater than 0")
    if options.protocol not in (None, "http"):
        raise OptionError(f"Unknown protocol module : {options.protocol}")
    if options.job_handle_prefix is None:
        options.job_handle_prefix = "H:" + os.uname().nodename
    if len(options.job_handle_prefix) >= 64:
        raise OptionError("--job-handle-prefix must be shorter than 64 characters")
    if options.port == "4730" and os.environ.get("GEARMAND_PORT"):
        options.port = os.environ["GEARMAND_PORT"]
    check_port(options.port, "port (-p)")
    if options.protocol == "http" and options.http_port is None:
        options.http_port = 8080
    if options.http_port is not None:
        check_port(options.http_port, "--http-port")
        if str(options.http_port) == options.port:
            raise OptionError(f"--http-port {options.http_port} is the Gearman port (-p) too: "
                              f"give them different ports")
    if options.queue_type.lower() == "libdrizzle":
        options.mysql_host = options.libdrizzle_uds or options.libdrizzle_host
        options.mysql_port = options.libdrizzle_port
        options.mysql_user = options.libdrizzle_user
        options.mysql_password = options.libdrizzle_password
        options.mysql_db = options.libdrizzle_db
        options.mysql_table = options.libdrizzle_table
    if options.cluster is not None:
        if options.queue_type.lower() not in CLUSTER_QUEUE_TYPES:
            raise OptionError("--cluster needs a MySQL or Postgres queue (-q MySQL or "
                              "-q Postgres): the members share its database")
        if options.store_queue_on_shutdown:
            raise OptionError("--cluster cannot go with --store-queue-on-shutdown: a member's "
                              "jobs must be in its table for another to adopt them")
        if not options.cluster or len(options.cluster) > 200:
            raise OptionError("--cluster NAME: 1 to 200 characters")
        if not 1.0 <= options.cluster_lease <= 3600:
            raise OptionError("--cluster-lease: from 1 to 3600 seconds")
    if min(options.max_packet_size, options.max_output, options.max_input_buffer) <= 0:
        raise OptionError("--max-packet-size, --max-input-buffer and --max-output "
                          "must be positive")
    return options


class Startup:
    """How the start-up ends, told to the process that launched a daemon (-d). That
    process waits on a pipe until the daemon has opened its log and its store,
    replayed the queue and written its pid file, then exits 0; or it prints the
    one line the daemon sends it and exits 1. Without -d nobody waits."""

    def __init__(self, fd=None):
        self.fd = fd
        self.signal = None                # the stop signal that ended the start-up
        self.log = None                   # once it is open

    def report(self, message):
        if self.fd is not None:
            try:
                os.write(self.fd, message.encode("utf-8", "backslashreplace"))
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def ready(self):
        self.report("OK\n")

    def failed(self, message):
        self.report("ERR " + " ".join(message.split()) + "\n")

    def stop(self, signum, _):
        """A stop signal before the loop runs ends the start-up (the queue stays stored)."""
        self.signal = signal.Signals(signum).name
        raise SystemExit(0)


def daemonize():
    """Detach: double fork, new session, standard streams to /dev/null. The
    launching process exits only when the daemon reports (Startup); the daemon
    gets the Startup to report with."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_end)
        os.waitpid(first, 0)
        os._exit(wait_for_daemon(read_end))
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return Startup(write_end)


def wait_for_daemon(fd):
    """In the launching process: the daemon's word, as an exit status."""
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    message = b"".join(chunks).decode("utf-8", "replace")
    if message.startswith("OK"):
        return 0
    line = (message[4:].strip() if message.startswith("ERR ") else
            "the daemon exited during start-up without saying why; see its log file")
    print(f"gearmand: {line}", file=sys.stderr, flush=True)
    return 1


def switch_user(name):
    import pwd
    if os.getuid() != 0:
        raise OptionError("Must be root to switch users.")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise OptionError(f"Could not find user {name}") from None
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def write_pid_file(path, default, log):
    try:
        with open(path, "w") as pid_file:
            pid_file.write(f"{os.getpid()}\n")
        return True
    except OSError as error:
        if path != default:
            raise OptionError(f"Could not open pid file {path}: {error.strerror}") from None
        log.warning(f"no pid file: could not open {path}: {error.strerror} (-P names another)")
        return False


# The TLS files: (option's dest, option, environment variable that sets its default, what).
TLS_FILES = (("ssl_certificate", "--ssl-certificate", "GEARMAND_SERVER_PEM", "TLS certificate"),
             ("ssl_key", "--ssl-key", "GEARMAND_SERVER_KEY", "TLS key"),
             ("ssl_ca_file", "--ssl-ca-file", "GEARMAND_CA_CERTIFICATE", "CA file"))


def tls_file(options, dest):
    """'the TLS key /x.key (--ssl-key)': a file, what it is and where its name came from."""
    _, option, env, what = next(entry for entry in TLS_FILES if entry[0] == dest)
    if dest in getattr(options, "given", ()):
        source = option
    elif os.environ.get(env):
        source = f"{env}, the default of {option}"
    else:
        source = f"the default of {option}"
    return f"the {what} {getattr(options, dest)} ({source})"


def tls_context(options):
    """The server's TLS context, or None without --ssl."""
    if not options.ssl:
        return None
    use_ca = options.ssl_verify_client or os.path.exists(options.ssl_ca_file)
    for dest, *_ in TLS_FILES:
        if dest != "ssl_ca_file" or use_ca:
            try:
                with open(getattr(options, dest), "rb"):
                    pass
            except OSError as error:
                raise OptionError(f"cannot read {tls_file(options, dest)}: "
                                  f"{error.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(options.ssl_certificate, options.ssl_key)
    except (OSError, ssl.SSLError) as error:
        raise OptionError(f"cannot load {tls_file(options, 'ssl_certificate')} with "
                          f"{tls_file(options, 'ssl_key')}: {error}") from None
    if use_ca:
        try:
            context.load_verify_locations(options.ssl_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise OptionError(f"cannot load {tls_file(options, 'ssl_ca_file')}: "
                              f"{error}") from None
    context.verify_mode = ssl.CERT_REQUIRED if options.ssl_verify_client else ssl.CERT_NONE
    return context


def set_keepalive(sock, options):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", options.keepalive_idle),
                          ("TCP_KEEPINTVL", options.keepalive_interval),
                          ("TCP_KEEPCNT", options.keepalive_count)):
        if value != -1 and hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def bind_listeners(addresses, port, options):
    """Listening sockets on every address getaddrinfo gives (all when none is named)."""
    sockets = []
    seen = set()
    for host in addresses or [None]:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if options.keepalive:
                set_keepalive(sock, options)
            bind_with_retry(sock, address)
            sock.listen(options.backlog)
            sockets.append(sock)
    return sockets


def listening_on(port):
    """Does a socket of this machine (this network namespace) listen on TCP `port`?
    Linux's /proc/net says; elsewhere we cannot tell, and say no."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                for line in table:
                    fields = line.split()
                    if (len(fields) > 3 and fields[3] == "0A"
                            and int(fields[1].rsplit(":", 1)[1], 16) == port):
                        return True
        except (OSError, ValueError):
            pass
    return False


def bind_with_retry(sock, address, patience=20.0):
    """Bind. A port another socket listens on fails at once; one that is busy
    otherwise (a server that is still closing) is retried for up to `patience`
    seconds, as C does, saying so on stderr (the log is not open yet)."""
    try:
        sock.bind(address)
        return
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        if listening_on(address[1]):
            raise OSError(errno.EADDRINUSE, "another process is listening on it") from None
        print(f"gearmand: {address[0]} port {address[1]} is busy ({error.strerror}); "
              f"retrying for up to {patience:g} s", file=sys.stderr, flush=True)
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
        try:
            sock.bind(address)
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() + delay > deadline:
                raise


def set_file_limit(options):
    if options.file_descriptors:
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (options.file_descriptors, options.file_descriptors))
        except (ValueError, OSError) as error:
            raise OptionError(f"Could not set the file descriptor limit: {error}") from None


def bind_ports(options):
    """[(listening sockets, is HTTP)] for the Gearman port and the HTTP port if any."""
    ports = [(options.port, False)]
    if options.http_port is not None:
        ports.append((options.http_port, True))
    listeners = []
    for port, http in ports:
        try:
            listeners.append((bind_listeners(options.listen, port, options), http))
        except OSError as error:
            for sockets, _ in listeners:
                for sock in sockets:
                    sock.close()
            raise OptionError(f"Could not listen on {'HTTP ' if http else ''}port {port}: "
                              f"{error.strerror or error}") from None
    return listeners


def lock_store(cls, options):
    """Hold the store's lock file (Store.lock_path) for the rest of the process's life,
    so that two servers never replay and run the same queue; OptionError if another
    server holds it. Taken by the process that serves: after -d's fork."""
    path = cls.lock_path(options)
    if path is None:
        return None
    import fcntl
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise OptionError(f"cannot open the queue's lock file {path}: {error.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise OptionError(f"cannot lock the queue's lock file {path}: "
                              f"{error.strerror}") from None
        raise OptionError(f"another server uses this queue: {path} is locked"
                          + (f" by pid {holder}" if holder.isdigit() else "")
                          + "; stop it first, or give each server a queue of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd                             # never closed: the lock lasts as long as we do


def open_store(cls, options):
    options.store_lock = lock_store(cls, options)
    try:
        return cls.open(options)
    except StoreError as error:
        raise OptionError(str(error)) from None


def ready_line(server, options, context):
    ports = f"port {options.port}"
    if options.http_port is not None:
        ports += f", HTTP port {options.http_port}"
    if context is not None:
        ports += (", TLS" + (" with client certificates" if options.ssl_verify_client else ""))
    store = server.store
    kind = "durable" if store.durable else "not durable" if store.persistent else "in memory"
    return (f"gearmand.py {__version__} (gearmand {GEARMAND_VERSION}) ready, {ports}, "
            f"pid {os.getpid()}, queue {options.queue_type} ({kind}), "
            f"{server.stats.replayed} jobs replayed, verbose {options.verbose}")


def start(cls, context, listeners, options, startup):
    """Everything between binding the ports and serving: the log, the store and its
    lock, the listeners, the replay and the pid file. Returns (server, pid written)."""
    log = startup.log = Log(options.log_file, options.verbose, options.syslog)

    def reopen(*_):                       # logrotate's SIGHUP: C's line, in the new file
        log.reopen()
        log.write("NOTICE", "SIGHUP, reopening log file", force=True)
    signal.signal(signal.SIGHUP, reopen)
    log.info(f"Initializing Gear on port {options.port} with SSL: "
             f"{'true' if context else 'false'}")
    log.info(f"Starting up with pid {os.getpid()}, verbose is set to {options.verbose}")
    server = Server(options, open_store(cls, options), log)
    log.info(f"queue {options.queue_type}: {getattr(server.store, 'label', 'builtin')}")
    for sockets, http in listeners:
        server.listen(sockets, http, context)
    for notice in server.store.notices:
        log.warning(notice)
    try:
        if server.cluster is None:        # a member takes in its table once it holds it
            server.journal.replay()
    except StoreError as error:
        raise OptionError(str(error)) from None
    pid_written = write_pid_file(options.pid_file, os.path.abspath("/var/gearmand.pid"), log)
    if options.daemon:
        os.chdir("/")                     # every path the server needs is open or absolute
    return server, pid_written


def run(options):
    """Start serving as the options say; the exit status once stopped."""
    set_file_limit(options)
    try:
        cls = store_class(options.queue_type)
    except StoreError as error:
        raise OptionError(str(error)) from None
    context = tls_context(options)
    startup = Startup()
    # Once the port accepts, signals may come at any time: before the log is open
    # SIGHUP has nothing to reopen, and a stop request simply ends the start-up.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(stop_signal, startup.stop)
    listeners = bind_ports(options)
    # The port is bound: from here on, work as the user asked for, with its files.
    if options.user:
        switch_user(options.user)
    if options.log_file not in ("stderr", "none"):
        options.log_file = os.path.abspath(options.log_file)
    options.pid_file = os.path.abspath(options.pid_file)
    if options.daemon:
        startup = daemonize()
        for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(stop_signal, startup.stop)
    try:
        server, pid_written = start(cls, context, listeners, options, startup)
    except OptionError as error:
        if options.daemon and startup.log is not None:
            startup.log.error(str(error))     # the terminal is gone; the log keeps it
        startup.failed(str(error))
        raise
    except SystemExit:
        why = f"stopped by {startup.signal or 'a signal'} during start-up"
        if startup.log is not None:
            startup.log.write("NOTICE", why, force=True)
        startup.failed(why)
        raise
    except BaseException as error:
        startup.failed(f"internal error during start-up: {error!r}")
        raise
    log = server.log
    signal.signal(signal.SIGTERM, lambda *_: server.loop.request_stop("now", "SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: server.loop.request_stop("now", "SIGINT"))
    signal.signal(signal.SIGUSR1, lambda *_: server.loop.request_stop("graceful", "SIGUSR1"))
    # A signal the kernel hands to the writer thread must still end the main thread's select().
    signal.set_wakeup_fd(server.loop.wake_writer.fileno(), warn_on_full_buffer=False)
    log.write("NOTICE", ready_line(server, options, context), force=True)
    startup.ready()
    try:
        server.serve()
    finally:
        if pid_written:
            try:
                os.unlink(options.pid_file)
            except OSError:
                pass
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_options(argv)
    except OptionError as error:
        print(f"gearmand: {error}", file=sys.stderr)
        return 1
    if options.help:
        build_parser().print_help()
        return 0
    if options.version:
        print(f"\ngearmand {GEARMAND_VERSION} - gearmand.py {__version__}")
        return 0
    if options.check_args:
        return 0
    try:
        return run(options)
    except OptionError as error:
        print(f"gearmand: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Backends in extras/ import this module by name (gearmand, or myproj.gearmand when
    # vendored and run as python -m myproj.gearmand): let them find this copy, not load
    # a second one whose StoreError the server would not catch.
    sys.modules.setdefault("gearmand", sys.modules[__name__])
    if __spec__ is not None:
        sys.modules.setdefault(__spec__.name, sys.modules[__name__])
    sys.exit(main())
