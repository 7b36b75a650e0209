#!/usr/bin/env python3
"""gearmand.py: a Gearman job server in one file, standard library only.

A drop-in replacement for the C gearmand 1.1.20: the same binary protocol, the
same text admin protocol byte for byte, the same command line, and the same
persistent-queue schemas, so a store written by one replays in the other.
Background jobs are written to the store before the client hears JOB_CREATED,
the jobs of one or more loop turns in one transaction, by a writer thread that
never stalls the loop.

Run it:  python gearmand.py --queue-type=sqlite --sqlite-db=queue.db
"""

import argparse
import collections
import errno
import functools
import gc
import heapq
import importlib
import importlib.util
import os
import queue
import re
import selectors
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


# --- protocol: packet numbers, shapes, encoding -------------------------------

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")
TYPE_SIZE = struct.Struct(">II")

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
TIMER_WAIT_MAX = 3600.0   # select() overflows past ~24 days; far timers are re-checked hourly

HIGH, NORMAL, LOW = 0, 1, 2
PRIORITY_NAMES = ("high", "normal", "low")
KINDS = ("foreground", "background")   # indexed by a job's `background`


def packet(ptype, payload=b""):
    """One server-to-client packet."""
    return RES + TYPE_SIZE.pack(ptype, len(payload)) + payload


def error_packet(code, text):
    return packet(ERROR, code + b"\0" + text)


NOOP_PACKET = packet(NOOP)
NO_JOB_PACKET = packet(NO_JOB)
ERROR_INVALID_MAGIC = error_packet(b"INVALID_MAGIC", b"Request magic expected")
ERROR_INVALID_COMMAND = error_packet(b"INVALID_COMMAND", b"Command not expected")
ERROR_UNIQUE_TOO_LARGE = error_packet(b"ARGUMENT_TOO_LARGE", b"Unique value too large")
ERROR_QUEUE_FULL = error_packet(b"QUEUE_ERROR", b"Job queue is full")
ERROR_STORE_FAILED = error_packet(b"QUEUE_ERROR", b"QUEUE_ERROR")
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
    value = c_integer(text, 32)
    return 0 if value is None else value


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


# --- jobs, function queues and worker registrations ---------------------------

# Where a job stands with the persistent store, in order: from STORED up it is in
# the store or on its way there, from WRITING up its write is in flight.
NOT_STORED = 0
FAILED = 1        # its write failed: its submitters get ERROR
STORED = 2
WRITING = 3       # being written; already runnable (a foreground job a background one joined)
WRITING_NEW = 4   # being written; runs only once the write is done


class Job:
    """One job, queued or running. Foreground submitters are its `clients`."""

    __slots__ = ("handle", "function", "unique", "data", "priority", "when", "reducer",
                 "retries", "worker", "clients", "ignore", "background",
                 "store_state", "store_unique")

    def __init__(self, handle, function, unique, data, priority, when, reducer, background):
        self.handle = handle
        self.function = function          # its FunctionQueue
        self.unique = unique
        self.data = data
        self.priority = priority
        self.when = when                  # epoch seconds; 0 = now
        self.reducer = reducer
        self.retries = 0
        self.worker = None                # the Registration whose worker runs it
        self.clients = None               # Connections waiting for its result
        self.ignore = False               # abandoned or cancelled: discarded at the next grab
        self.background = background      # a background submission owns it
        self.store_state = NOT_STORED
        self.store_unique = None          # the key's unique in the store, if not `unique`

    def store_key(self):
        """(unique, function): what names its row in the store."""
        return (self.unique if self.store_unique is None else self.store_unique,
                self.function.name)

    def store_record(self):
        """(unique, function, priority, data, when): its row in the store."""
        return self.store_key() + (self.priority, self.data, self.when)


class Registration:
    """One CAN_DO (or CAN_DO_TIMEOUT) of one connection; duplicates are allowed.
    Jobs belong to the registration that grabbed them, as in C: it decides the
    order in which a departing worker's jobs go back to the queue."""

    __slots__ = ("connection", "function", "timeout", "jobs")

    def __init__(self, connection, function, timeout):
        self.connection = connection
        self.function = function
        self.timeout = timeout            # milliseconds; 0 = none
        self.jobs = []                    # jobs it is running, oldest first


class FunctionQueue:
    """A function's queued jobs, one FIFO per priority, and the workers that can run it."""

    __slots__ = ("name", "queues", "scheduled", "total", "running", "registrations",
                 "wake_next", "wakeable", "max_queue", "by_unique", "by_payload", "bucket")

    def __init__(self, name):
        self.name = name
        self.queues = (collections.deque(), collections.deque(), collections.deque())
        self.scheduled = 0                # epoch jobs waiting for their time
        self.total = 0                    # jobs in memory: queued, scheduled and running
        self.running = 0
        self.registrations = []           # the worker ring that wake-ups walk
        self.wake_next = 0                # where the next wake-up walk starts
        self.wakeable = 0                 # registrations whose connection waits for a NOOP
        self.max_queue = [0, 0, 0]        # per priority; 0 = unlimited
        self.by_unique = {}               # unique -> job, for coalescing
        self.by_payload = {}              # data -> job, for unique "-"
        self.bucket = gm_hash(name) % 991  # C lists functions in a 991-bucket table

    def queued(self, priority):
        count = len(self.queues[priority])
        return count + self.scheduled if priority == NORMAL else count


# --- stores: the interface, the builtin store and SQLite ----------------------

class StoreError(Exception):
    """A store could not do what was asked; the message is one clear line.
    `unavailable` means the backend is unreachable (so no record can be written
    now), as opposed to one record it refused."""

    def __init__(self, message, unavailable=False):
        super().__init__(message)
        self.unavailable = unavailable


class Store:
    """Keeps background jobs across restarts.

    A store is used by one thread at a time: replay() runs before serving, then
    the writer thread calls write() with the work of one or more loop turns.
    A record is (unique, function, priority, data, when_to_run), bytes for the
    first two and the data; a key is (unique, function).
    """

    durable = False   # the builtin store keeps nothing, so nothing waits for it

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
        reconnecting (with backoff) on a later call, never blocking for long."""

    def close(self):
        pass


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


class SqlStore(Store):
    """What the SQL stores share. A dialect supplies connect(), table_exists(),
    its statements, and says which driver errors mean a lost connection; the
    base reconnects with backoff, so a database outage fails writes fast
    (StoreError unavailable) and heals by itself."""

    durable = True
    driver_error = Exception          # the driver's base exception class
    # C gearmand's table; {table} is interpolated unquoted, as C does.
    create_sql = ("CREATE TABLE {table} ( unique_key TEXT, function_name TEXT, priority INTEGER,"
                  " data BLOB, when_to_run INTEGER, PRIMARY KEY (unique_key, function_name))")
    select_sql = "SELECT unique_key, function_name, priority, data, when_to_run FROM {table}"

    def __init__(self, table, label):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", table):
            raise StoreError(f"invalid table name {table!r}")
        self.table = table
        self.label = label            # names the database in messages, never a password
        self.connection = None
        self.backoff = Backoff()

    # -- what a dialect provides

    def connect(self):
        """Return a new DB-API connection with autocommit off."""
        raise NotImplementedError

    def table_exists(self, cursor):
        raise NotImplementedError

    def lost(self, error):
        """Does this driver error mean the connection is gone?"""
        return False

    def blocked(self, error):
        """Does this driver error hold for every row alike (a lock held elsewhere, a
        timeout)? Then no row of the batch is tried alone, each waiting as long."""
        return False

    def describe(self, error):
        return " ".join(str(error).split()) or type(error).__name__

    def write_batch(self, adds, dones):
        """One transaction: the deletes, then the inserts, then commit."""
        raise NotImplementedError

    def replay_cursor(self):
        return self.connection.cursor()

    # -- shared

    def sql(self, statement):
        return statement.format(table=self.table)

    def error(self, error, unavailable=False):
        return StoreError(f"{self.label}: {self.describe(error)}", unavailable)

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
            self.drop()
            raise self.error(error) from None

    def replay(self):
        try:
            cursor = self.replay_cursor()
            cursor.execute(self.sql(self.select_sql))
            for unique, function, priority, data, when in cursor:
                yield (bytes(unique or b""), bytes(function or b""), priority or 0,
                       bytes(data or b""), when or 0)
            cursor.close()
            self.connection.commit()
        except self.driver_error as error:
            raise self.error(error) from None

    def write(self, adds, dones):
        fresh = False
        while True:
            if self.connection is None:
                self.reconnect()
                fresh = True
            try:
                self.write_batch(adds, dones)
                return
            except StoreError:
                self.rollback()
                raise
            except self.driver_error as error:
                if not self.lost(error):
                    self.rollback()
                    raise self.error(error, self.blocked(error)) from None
                self.drop()
                if fresh:
                    raise self.backoff.failed(str(self.error(error))) from None
                # An old connection died (idle timeout, restart): try a new one now.
            except Exception:
                # Never leave half a transaction for the next write to commit.
                self.rollback()
                raise

    def reconnect(self):
        """Open a new connection, unless the last attempt failed moments ago."""
        self.backoff.check()
        try:
            self.connection = self.connect()
        except self.driver_error as error:
            self.drop()
            raise self.backoff.failed(str(self.error(error))) from None
        self.backoff.succeeded()

    def rollback(self):
        try:
            self.connection.rollback()
        except Exception:
            pass

    def drop(self):
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:
                pass
            self.connection = None

    def close(self):
        self.drop()


class SqliteStore(SqlStore):
    """SQLite in WAL mode, durable against power loss unless --sqlite-sync=normal."""

    driver_error = sqlite3.Error
    # Unique and function are bound as TEXT, as C binds them; C refuses BLOBs there on replay.
    # Many rows go in one statement: executemany would hand the GIL back and forth per row.
    insert_sql = ("INSERT OR REPLACE INTO {table} (unique_key, function_name, priority, data,"
                  " when_to_run) VALUES {rows}")
    insert_row = "(CAST(? AS TEXT), CAST(? AS TEXT), ?, ?, ?)"
    delete_sql = ("DELETE FROM {table} WHERE function_name = CAST(? AS TEXT)"
                  " AND unique_key IN ({uniques})")
    rows_per_statement = 200          # 1,000 parameters, well under SQLite's limit
    # NULLs (C writes empty data as NULL) become what the loop expects, in SQLite.
    select_sql = ("SELECT IFNULL(unique_key, ''), IFNULL(function_name, ''), priority,"
                  " IFNULL(data, X''), IFNULL(when_to_run, 0) FROM {table} ORDER BY rowid")

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
        self.ensure_when_to_run(connection)
        return connection

    def blocked(self, error):
        # Another process holds the database's lock past the 6 s busy timeout.
        return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)

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
        by_function = {}
        for unique, function in dones:
            by_function.setdefault(function, []).append(unique)
        cursor = self.connection.cursor()
        try:
            cursor.execute("BEGIN")
            for function, uniques in by_function.items():
                for start in range(0, len(uniques), step):
                    chunk = uniques[start:start + step]
                    cursor.execute(self.delete_sql.format(
                        table=self.table, uniques=", ".join(["CAST(? AS TEXT)"] * len(chunk))),
                        [function] + chunk)
            for start in range(0, len(adds), step):
                chunk = adds[start:start + step]
                cursor.execute(self.insert_sql.format(
                    table=self.table, rows=", ".join([self.insert_row] * len(chunk))),
                    [value for row in chunk for value in row])
            cursor.execute("COMMIT")
        finally:
            cursor.close()

    def rollback(self):
        if self.connection is not None and self.connection.in_transaction:
            super().rollback()


# Nobody waits for a delete, so the loop keeps them until DELETE_DELAY has passed
# or DELETE_BATCH have gathered, unless new jobs go to the writer anyway: the
# writer thread then wakes some twenty times a second during a drain, not at every
# loop turn. A crash in between only runs a finished job again.
DELETE_DELAY = 0.05
DELETE_BATCH = 2000


class StoreWriter(threading.Thread):
    """Owns the store after replay. Takes the batches of many loop turns, writes
    them in one transaction (group commit) and hands the outcome back to the loop.
    Deletes that fail are retried with backoff; adds that fail are reported, so
    their clients get ERROR.
    """

    RETRY_DELAY_MAX = 5.0

    def __init__(self, store, on_done, log, stats):
        super().__init__(name="store-writer", daemon=True)
        self.store = store
        self.on_done = on_done            # called from this thread with (batch, failed)
        self.log = log
        self.stats = stats
        self.batches = queue.Queue()

    def submit(self, batch):
        """batch = (jobs to add, keys to delete); None stops the thread."""
        self.batches.put(batch)

    def run(self):
        dones = []                        # keys whose delete failed, to retry
        due = None                        # when to retry them
        retry_delay = DELETE_DELAY
        while True:
            try:
                timeout = None if due is None else max(due - time.monotonic(), 0)
                batches = [self.batches.get(timeout=timeout)]
            except queue.Empty:
                batches = []
            while True:
                try:
                    batches.append(self.batches.get_nowait())
                except queue.Empty:
                    break
            stop = None in batches
            batches = [batch for batch in batches if batch is not None]
            retrying = due is not None and time.monotonic() < due
            for _, keys in batches:
                dones.extend(keys)
            adds = [job.store_record() for jobs, _ in batches for job in jobs]
            if not (adds or stop or (dones and not retrying)):
                continue
            failed = self.write(adds, dones, batches)
            if failed is None:
                dones, due, retry_delay = [], None, DELETE_DELAY
            else:
                # Rows written one by one since replaced what these deletes aimed at.
                written = {job.store_key() for jobs, _ in batches for job in jobs
                           if job not in failed}
                dones = [key for key in dones if key not in written]
                retry_delay = min(retry_delay * 2, self.RETRY_DELAY_MAX)
                due = time.monotonic() + retry_delay if dones else None
            for batch in batches:
                if batch[0]:
                    self.on_done(batch, failed or ())
            if stop:
                return

    def write(self, adds, dones, batches):
        """Write everything at once; on failure, find the adds that cannot be
        written one by one. Returns None if all was written, else the failed jobs."""
        started = time.monotonic()
        every_job = {job for jobs, _ in batches for job in jobs}
        try:
            self.store.write(adds, dones)
            self.stats.commit_seconds.observe(time.monotonic() - started)
            self.stats.batch_sizes.observe(len(adds) + len(dones))
            return None
        except Exception as error:        # a driver may raise anything; the thread must live
            self.log.error(f"persistent queue write failed: {error}")
            self.stats.store_errors += 1
            self.stats.store_last_error = str(error)
            self.stats.store_last_error_time = time.time()
            if getattr(error, "unavailable", False):
                return every_job
        if dones:
            # Perhaps only a delete fails: the adds alone must not fail with it.
            try:
                self.store.write(adds, [])
                return set()              # the deletes are retried later
            except Exception as error:
                if getattr(error, "unavailable", False):
                    return every_job
        if len(adds) < 2:
            return every_job
        failed = set()
        for jobs, _ in batches:           # in order: a later row may replace an earlier
            for job in jobs:
                try:
                    self.store.write([job.store_record()], [])
                except Exception:
                    failed.add(job)
        return failed


# Uniques that the store's (unique, function) key cannot hold apart. C lets such
# jobs overwrite or refuse each other; we give each a row under a generated
# unique that C replays as an ordinary one, and that we read back as it was.
STORE_NO_UNIQUE = b"gearmand.py:no-unique:"
STORE_PAYLOAD_UNIQUE = b"gearmand.py:payload-unique:"

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


def store_class(queue_type):
    """The Store class for a queue type name, importing its backend only now."""
    entry = QUEUE_TYPES.get(queue_type.lower())
    if entry is None:
        raise StoreError(f"Error while initializing the queue : {queue_type}")
    module_name, class_name, driver, extra, title = entry
    if module_name is None:
        return globals()[class_name]
    if driver and importlib.util.find_spec(driver.split(".")[0]) is None:
        raise StoreError(f"queue type {title} needs {DRIVER_PACKAGES[driver]}: "
                         f"pip install 'gearmand-py[{extra}]'")
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
        return StoreError(f"queue type {title}: cannot load its driver ({error}): "
                          f"pip install --upgrade 'gearmand-py[{extra or 'all'}]'")
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


# --- logging ------------------------------------------------------------------

class Log:
    """C gearmand's log levels and line format; SIGHUP reopens the file."""

    LEVELS = ("FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")

    def __init__(self, target="stderr", level="ERROR", use_syslog=False):
        self.target = target
        self.level = self.LEVELS.index(level)
        self.level_name = level
        self.file = None
        self.syslog = None
        if use_syslog:
            import syslog
            syslog.openlog("gearmand", syslog.LOG_PID, syslog.LOG_USER)
            self.syslog = syslog
        self.reopen()

    def reopen(self):
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

    def write(self, level, message):
        number = self.LEVELS.index(level)
        if number > self.level:
            return
        if self.file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            try:
                self.file.write(f"{level:>7} {stamp} {message}\n")
                self.file.flush()
            except (OSError, ValueError):
                pass
        if self.syslog is not None:
            priority = min(number, 7)
            self.syslog.syslog(priority, message)

    def error(self, message):
        self.write("ERROR", message)

    def warning(self, message):
        self.write("WARNING", message)

    def notice(self, message):
        self.write("NOTICE", message)

    def info(self, message):
        self.write("INFO", message)


# --- connections and the event loop -------------------------------------------

class Connection:
    """One peer. Client and worker roles are not enforced: any peer may do both."""

    __slots__ = ("sock", "fd", "peer", "tls", "handshaking", "http", "inbuf", "chunks",
                 "chunks_size", "need", "out", "out_size", "held", "writing", "closed",
                 "registrations", "client_jobs", "sleeping", "noop_sent", "exceptions",
                 "client_id")

    def __init__(self, sock, peer, exceptions, tls=False, http=None):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.tls = tls
        self.handshaking = tls            # a TLS handshake runs before any packet
        self.http = http                  # an HttpExchange on the HTTP port, else None
        self.inbuf = b""                  # unparsed input
        self.chunks = None                # input gathered until `need` bytes are in
        self.chunks_size = 0
        self.need = 0
        self.out = []                     # output waiting for the end of the loop turn
        self.out_size = 0
        self.held = None                  # output queued behind a JOB_CREATED that waits for the store
        self.writing = False              # registered for EVENT_WRITE
        self.closed = False
        self.registrations = []           # newest first, as C grabs
        self.client_jobs = []             # jobs whose results this peer waits for
        self.sleeping = False
        self.noop_sent = False
        self.exceptions = exceptions
        self.client_id = b"-"


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


class Stats:
    """Totals since start, for /metrics and /status. Plain counters: the loop
    thread counts jobs, the writer thread counts store work."""

    def __init__(self):
        self.started = time.time()
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


class Server:
    """The job server: functions, jobs, connections, one selectors loop."""

    def __init__(self, options, store, log, tls_context=None):
        self.options = options
        self.store = store
        self.log = log
        self.tls_context = tls_context
        self.handle_prefix = options.job_handle_prefix.encode() + b":"
        self.job_retries = options.job_retries & 0xFF
        self.worker_wakeup = options.worker_wakeup & 0xFF
        self.round_robin = options.round_robin
        self.buckets = options.hashtable_buckets
        self.max_packet = options.max_packet_size
        self.max_output = options.max_output
        self.max_input_buffer = options.max_input_buffer
        self.gathering = 0                # bytes of large packets still arriving, all peers
        # With --store-queue-on-shutdown jobs are written only when the server stops.
        self.write_ahead = store.durable and not options.store_queue_on_shutdown
        self.functions = {}               # name -> FunctionQueue
        self.jobs = {}                    # handle -> Job, oldest first
        # What only a few running jobs have, kept here rather than in every Job:
        self.progress = {}                # job -> (numerator, denominator) from WORK_STATUS
        self.timeouts = {}                # job -> its CAN_DO_TIMEOUT timer
        self.job_count = 0
        self.run_id = uuid.uuid4().hex[:12].encode()   # makes generated store uniques unique
        self.connections = {}             # fd -> Connection, oldest first
        self.listeners = []
        self.selector = selectors.DefaultSelector()
        self.timers = []                  # heap of [when, sequence, callback, argument, active]
        self.timer_sequence = 0
        self.cancelled_timers = 0         # still in the heap
        self.dirty = []                   # connections with output to send this turn
        self.holding = set()              # connections whose output waits for the store
        self.batch_adds = []              # jobs to store in this turn's batch
        self.batch_dones = []             # keys to delete, kept for DELETE_DELAY
        self.dones_timer = None           # sends them when DELETE_DELAY has passed
        self.writes_in_flight = 0
        self.finished_batches = collections.deque()   # filled by the writer thread
        self.writer = None
        self.stopping = None              # None, "now" or "graceful"
        self.assigning = True             # False once a graceful stop keeps the queue stored
        self.stop_requested = None        # set by signal handlers, applied by the loop
        self.flush_deadline = None        # graceful stop: give up on unread output then
        self.accept_paused = False
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, self.on_wakeup)
        self.handlers = self.packet_handlers()
        self.admin = Admin(self)
        self.http = Http(self)
        self.stats = Stats()

    # -- listening and accepting

    def listen(self, sockets, http=False):
        """Serve on sockets bound by bind_listeners()."""
        accept = self.accept_http if http else self.accept
        for sock in sockets:
            sock.setblocking(False)
            self.listeners.append((sock, accept))
            self.selector.register(sock, selectors.EVENT_READ, accept)
            address = sock.getsockname()
            self.log.info(f"listening on {address[0]}:{address[1]}" + (" (HTTP)" if http else ""))

    def accept_http(self, listener):
        self.accept(listener, http=True)

    def accept(self, listener, http=False):
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self.log.error(f"accept: {error.strerror}; refusing connections for 1 s")
                    self.pause_accepting(1.0)
                return
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if http:
                # HTTP clients are told of exceptions: the response carries them.
                conn = Connection(sock, peer[0], True, http=HttpExchange())
            else:
                if self.tls_context is not None:
                    sock = self.tls_context.wrap_socket(sock, server_side=True,
                                                        do_handshake_on_connect=False)
                conn = Connection(sock, peer[0], self.options.exceptions,
                                  sock.__class__ is not socket.socket)
            self.stats.accepted += 1
            self.connections[conn.fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def pause_accepting(self, seconds):
        if not self.accept_paused:
            self.accept_paused = True
            for listener, _ in self.listeners:
                self.selector.unregister(listener)
            self.add_timer(seconds, self.resume_accepting, None)

    def resume_accepting(self, _):
        self.accept_paused = False
        if self.stopping is None:
            for listener, accept in self.listeners:
                self.selector.register(listener, selectors.EVENT_READ, accept)

    def stop_listening(self):
        for listener, _ in self.listeners:
            if not self.accept_paused:
                self.selector.unregister(listener)
            listener.close()
        self.listeners = []

    # -- the loop

    def serve_forever(self):
        select = self.selector.select
        while True:
            if self.stop_requested:
                self.begin_stop()
            self.run_timers()
            self.end_turn()
            if self.stopping and self.ready_to_stop():
                return
            # Measured after end_turn, which may have added a timer.
            for key, mask in select(self.next_timeout()):
                target = key.data
                if target.__class__ is Connection:
                    if target.handshaking:
                        self.handshake(target)
                    elif mask & selectors.EVENT_READ:
                        self.read(target)
                    if mask & selectors.EVENT_WRITE and not target.closed:
                        self.send_output(target)
                else:
                    target(key.fileobj)

    def end_turn(self):
        """Hand this turn's store work to the writer, then send every reply at once.
        Closing a connection here requeues or drops its jobs, which makes more of
        both (NOOPs, WORK_FAILs, deletes): repeat until there is none."""
        while True:
            if self.http.resuming:
                self.http.resume()
            if self.batch_adds or len(self.batch_dones) >= DELETE_BATCH:
                self.send_batch()
            elif self.batch_dones and self.dones_timer is None:
                self.dones_timer = self.add_timer(DELETE_DELAY, self.send_dones, None)
            if not self.dirty:
                return
            dirty = self.dirty
            self.dirty = []
            for conn in dirty:
                if not conn.closed and not conn.writing and conn.out:
                    self.send_output(conn)
                if conn.out_size > self.max_output and not conn.closed:
                    self.log.warning(f"{conn.peer}: not reading its replies "
                                     f"({conn.out_size} bytes waiting), closing")
                    self.close(conn)

    def send_batch(self):
        """Hand the new jobs and the keys to delete to the writer thread."""
        if self.batch_adds:
            self.writes_in_flight += 1
        self.writer.submit((self.batch_adds, self.batch_dones))
        self.batch_adds = []
        self.batch_dones = []
        if self.dones_timer is not None:
            self.cancel_timer(self.dones_timer)
            self.dones_timer = None

    def send_dones(self, _):
        self.dones_timer = None
        if self.batch_dones:
            self.send_batch()

    def ready_to_stop(self):
        if self.stopping == "now":
            return True
        connections = self.connections.values()
        if self.writes_in_flight or any(registration.jobs for conn in connections
                                        for registration in conn.registrations):
            return False
        # Let the last results reach their clients, for at most FLUSH_PATIENCE seconds.
        if not any(conn.out for conn in connections):
            return True
        if self.flush_deadline is None:
            self.flush_deadline = time.monotonic() + FLUSH_PATIENCE
            self.add_timer(FLUSH_PATIENCE, lambda _: None, None)   # wakes the loop
        return time.monotonic() >= self.flush_deadline

    def request_stop(self, how):
        """Ask the loop to stop ("now" or "graceful"); safe in a signal handler."""
        if self.stop_requested != "now":
            self.stop_requested = how
        self.wake()

    def begin_stop(self):
        if self.stopping != "now":
            self.stopping = self.stop_requested
        if self.stopping == "graceful" and self.store.durable:
            # Running jobs finish; queued ones wait in the store for the next start.
            self.assigning = False
        self.stop_requested = None
        if self.listeners:
            self.stop_listening()

    def wake(self):
        try:
            self.wake_writer.send(b"\0")
        except OSError:
            pass

    def on_wakeup(self, sock):
        try:
            while sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.finished_batches:
            self.batch_written(*self.finished_batches.popleft())

    # -- timers

    def add_timer(self, delay, callback, argument):
        self.timer_sequence += 1
        timer = [time.monotonic() + delay, self.timer_sequence, callback, argument, True]
        heapq.heappush(self.timers, timer)
        return timer

    def cancel_timer(self, timer):
        """Let go of what the timer holds. It stays in the heap until it comes up,
        unless cancelled timers make up most of the heap (hour-long CAN_DO_TIMEOUTs)."""
        if not timer[4]:
            return                        # it has fired already
        timer[2:] = [None, None, False]
        self.cancelled_timers += 1
        timers = self.timers
        if self.cancelled_timers > 1000 and self.cancelled_timers * 2 > len(timers):
            timers[:] = [live for live in timers if live[4]]
            heapq.heapify(timers)
            self.cancelled_timers = 0

    def run_timers(self):
        """Fire due timers."""
        timers = self.timers
        now = time.monotonic()
        while timers and (timers[0][0] <= now or not timers[0][4]):
            timer = heapq.heappop(timers)
            if timer[4]:
                timer[4] = False
                timer[2](timer[3])
            else:
                self.cancelled_timers -= 1

    def next_timeout(self):
        """The select timeout until the next live timer (None: no timer)."""
        timers = self.timers
        while timers and not timers[0][4]:
            heapq.heappop(timers)
            self.cancelled_timers -= 1
        if not timers:
            return None
        return min(max(timers[0][0] - time.monotonic(), 0), TIMER_WAIT_MAX)

    # -- input

    def handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return
        except (OSError, ValueError) as error:
            self.log.warning(f"{conn.peer}: TLS handshake failed: {error}")
            self.close(conn)
            return
        conn.handshaking = False
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

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
                self.log.warning(f"{conn.peer}: large packets being received hold over "
                                 f"--max-input-buffer, closing")
                self.close(conn)
                return
            if conn.chunks_size < conn.need:
                return
            data = b"".join(conn.chunks)
            self.stop_gathering(conn)
        elif conn.inbuf:
            data = conn.inbuf + data
        try:
            if conn.http is None:
                self.parse(conn, data)
            else:
                self.http.receive(conn, data)
        except Exception:
            # A bug must cost one connection, never the server and its queue.
            self.log.error(f"{conn.peer}: closing after an internal error:\n"
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

    def parse(self, conn, data):
        """Run every complete packet and text line in `data`; keep the rest."""
        start = 0
        end = len(data)
        unpack = HEADER.unpack_from
        handlers = self.handlers
        while start < end:
            if data[start] == 0:
                if end - start < 12:
                    break
                magic, ptype, size = unpack(data, start)
                if ptype >= PACKET_TYPES or ptype == 0 or (magic != REQ and magic != RES):
                    self.close(conn)
                    return
                if size > self.max_packet:
                    self.log.warning(f"{conn.peer}: packet of {size} bytes is over "
                                     f"--max-packet-size, closing")
                    self.close(conn)
                    return
                if end - start - 12 < size:
                    if size > 65536:
                        self.gather(conn, data[start:], 12 + size)
                        conn.inbuf = b""
                        return
                    break
                payload = data[start + 12:start + 12 + size]
                start += 12 + size
                nuls = ARGUMENT_NULS[ptype]
                if nuls:
                    args = payload.split(b"\0", nuls)
                    if len(args) <= nuls:
                        # C would read past this packet looking for the missing NULs.
                        self.close(conn)
                        return
                else:
                    args = [payload]
                if size > ARGUMENT_MAX and not argument_sizes_fit(ptype, args):
                    self.close(conn)
                    return
                if magic == REQ:
                    handlers[ptype](conn, args)
                else:
                    self.send(conn, ERROR_INVALID_MAGIC)
            else:
                newline = data.find(b"\n", start, start + TEXT_LINE_MAX)
                if newline < 0:
                    if end - start > TEXT_LINE_MAX:
                        self.close(conn)
                        return
                    break
                line = data[start:newline]
                start = newline + 1
                self.admin.line(conn, line)
            if conn.closed:
                return
        conn.inbuf = data[start:] if start < end else b""

    # -- output

    def send(self, conn, data):
        if conn.held is not None:
            conn.held.append(data)
            return
        if conn.http is not None:
            data = self.http.response_part(conn, data)
            if not data:
                return
        if not conn.out:
            self.dirty.append(conn)
        conn.out.append(data)
        conn.out_size += len(data)
        if conn.out_size > self.max_output:
            self.dirty.append(conn)       # end_turn closes it; never mid-iteration

    def hold(self, conn, job):
        """Queue a JOB_CREATED that must wait until the job is in the store."""
        if conn.held is None:
            conn.held = collections.deque()
            self.holding.add(conn)
        conn.held.append(job)

    def release(self, conn):
        """Send the held output that no longer waits for the store."""
        held = conn.held
        conn.held = None
        while held:
            item = held[0]
            if item.__class__ is Job:
                if item.store_state >= WRITING:
                    break
                if item.store_state == FAILED:
                    item = ERROR_STORE_FAILED
                else:
                    item = packet(JOB_CREATED, item.handle)
            held.popleft()
            self.send(conn, item)
        if held:
            conn.held = held
        else:
            self.holding.discard(conn)

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
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif not out:
            if conn.writing:
                conn.writing = False
                self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            if conn.http is not None and conn.http.closing:
                self.close(conn)

    def close(self, conn):
        """Forget a peer: its jobs go back to the queue, its waits are abandoned."""
        if conn.closed:
            return
        conn.closed = True
        self.selector.unregister(conn.sock)
        del self.connections[conn.fd]
        self.holding.discard(conn)
        if conn.chunks is not None:
            self.stop_gathering(conn)
        conn.sock.close()
        self.set_wakeable(conn, False)
        self.drop(conn, list(conn.registrations))
        for job in conn.client_jobs:
            self.detach_client(job, conn)
        conn.client_jobs = []

    # -- functions and workers

    def function(self, name):
        function = self.functions.get(name)
        if function is None:
            function = self.functions[name] = FunctionQueue(name)
        return function

    def set_wakeable(self, conn, wakeable):
        """Count, per function, the workers a wake-up would NOOP."""
        was = conn.sleeping and not conn.noop_sent
        if wakeable:
            conn.sleeping = True
            conn.noop_sent = False
        elif was:
            conn.noop_sent = True
        if was != wakeable:
            step = 1 if wakeable else -1
            for registration in conn.registrations:
                registration.function.wakeable += step

    def add_registration(self, conn, name, timeout):
        function = self.function(name)
        registration = Registration(conn, function, timeout)
        conn.registrations.insert(0, registration)
        function.registrations.append(registration)
        if conn.sleeping and not conn.noop_sent:
            function.wakeable += 1

    def remove_registration(self, registration):
        function = registration.function
        ring = function.registrations
        index = ring.index(registration)
        del ring[index]
        if index < function.wake_next:
            function.wake_next -= 1
        conn = registration.connection
        if conn.sleeping and not conn.noop_sent:
            function.wakeable -= 1

    def wake_workers(self, function):
        """NOOP sleeping workers of a function, walking its ring from where the
        last walk stopped; at most -w of them (0 = all)."""
        if not function.wakeable or not self.assigning:
            return
        ring = function.registrations
        count = len(ring)
        start = function.wake_next % count
        limit = self.worker_wakeup
        woken = 0
        for step in range(count):
            conn = ring[(start + step) % count].connection
            if conn.sleeping and not conn.noop_sent:
                self.set_wakeable(conn, False)
                self.send(conn, NOOP_PACKET)
                woken += 1
                if woken == limit:
                    function.wake_next = (start + step + 1) % count
                    return
        function.wake_next = start

    # -- jobs

    def new_job(self, function, unique, data, priority, when, reducer, background):
        self.job_count += 1
        handle = b"%s%d" % (self.handle_prefix, self.job_count)
        job = Job(handle, function, unique, data, priority, when, reducer, background)
        self.jobs[handle] = job
        function.total += 1
        if unique:
            if unique != b"-":
                function.by_unique[unique] = job
            elif data:
                function.by_payload[data] = job
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

    def enqueue(self, job):
        """Make a job available to workers: now, or at its epoch time."""
        function = job.function
        if job.when > 0:
            delay = job.when - time.time()
            if delay > 0:
                function.scheduled += 1
                self.add_timer(delay, self.job_due, job)
                # C wakes workers at submission too; they find nothing yet and sleep again.
                self.wake_workers(function)
                return
        function.queues[job.priority].append(job)
        self.wake_workers(function)

    def job_due(self, job):
        function = job.function
        function.scheduled -= 1
        if self.jobs.get(job.handle) is not job:
            return                        # dropped with its function
        if job.ignore:
            self.discard(job)
            return
        function.queues[job.priority].append(job)
        self.wake_workers(function)

    def take_job(self, conn):
        """The next job for a grabbing worker: its newest registration first, then
        high, normal, low priority, FIFO within each."""
        for registration in conn.registrations:
            function = registration.function
            for jobs in function.queues:
                while jobs and jobs[0].ignore:
                    self.discard(jobs.popleft())
                if jobs:
                    if self.round_robin:
                        conn.registrations.remove(registration)
                        conn.registrations.append(registration)
                    return jobs.popleft(), registration
        return None, None

    def assign(self, job, registration):
        job.worker = registration
        job.function.running += 1
        registration.jobs.append(job)
        timeout = registration.timeout
        if timeout > 0:
            self.timeouts[job] = self.add_timer(max(timeout, 1000) / 1000.0,
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
            self.stats.failed[KINDS[job.background]] += 1
            self.discard(job)
            return
        self.progress.pop(job, None)
        job.function.queues[job.priority].append(job)
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
            self.cancel_timer(timer)

    def notify(self, job, ptype, payload):
        """Send a result packet to every client waiting for the job, newest first."""
        if job.clients:
            data = packet(ptype, payload)
            for client in reversed(job.clients):
                self.send(client, data)

    def finish(self, job):
        """The job is over (done, failed, dropped): forget it and delete its row."""
        if job.worker is not None:
            job.worker.jobs.remove(job)
        self.unassign(job)
        self.discard(job)

    def discard(self, job):
        if self.jobs.pop(job.handle, None) is None:
            return
        function = job.function
        function.total -= 1
        self.unindex(job)
        if not function.total:
            # Dicts never shrink and deques keep spare blocks: an empty function lets
            # go of what it grew while it was deep (it stays listed, as in C), and so
            # does the job table once no job is left. clear() frees a dict's table.
            freed = sys.getsizeof(function.by_unique) + sys.getsizeof(function.by_payload)
            function.by_unique.clear()
            function.by_payload.clear()
            function.queues = (collections.deque(), collections.deque(), collections.deque())
            if not self.jobs:
                freed += sys.getsizeof(self.jobs)
                self.jobs.clear()
            if freed > TRIM_AFTER_FREEING:
                trim_malloc()
        if self.progress:
            self.progress.pop(job, None)
        if job.clients:
            for client in job.clients:
                client.client_jobs.remove(job)
            job.clients = None
        self.store_done(job)

    def detach_client(self, job, conn):
        """A waiting client left. A job nobody waits for any more is abandoned,
        unless a background submission owns it (C drops those too; we keep them)."""
        if job.clients is None:
            return
        job.clients.remove(conn)
        if not job.clients:
            job.clients = None
            if not job.background:
                job.ignore = True
                self.unindex(job)

    def drop_function(self, function):
        """Admin `drop function`: C leaves the queued jobs behind, unreachable;
        we drop them with the function and delete their rows."""
        for job in [job for job in self.jobs.values() if job.function is function]:
            self.notify(job, WORK_FAIL, job.handle)
            self.discard(job)
        del self.functions[function.name]

    def cancel(self, job):
        """Admin `cancel job`: tell the clients it failed and delete its row; it is
        discarded when a worker next reaches it, or ends when its worker finishes."""
        self.notify(job, WORK_FAIL, job.handle)
        self.store_done(job)
        job.ignore = True
        self.unindex(job)

    # -- the persistent store

    def store_add(self, job, state):
        self.name_row(job)
        job.store_state = state
        self.batch_adds.append(job)

    def name_row(self, job):
        """A job without a unique of its own gets a generated one: a row of its own."""
        if job.store_unique is None and (job.unique == b"" or job.unique == b"-"):
            job.store_unique = b"%s%s.%d" % (
                STORE_PAYLOAD_UNIQUE if job.unique else STORE_NO_UNIQUE,
                self.run_id, handle_number(job))

    def store_done(self, job):
        """The job ended or was cancelled: delete its row. A row still being
        written is dealt with when the write is done (see batch_written)."""
        if job.store_state == STORED:
            if self.store.durable:
                self.batch_dones.append(job.store_key())
            job.store_state = NOT_STORED

    def batch_written(self, batch, failed):
        """The writer stored a batch, except the jobs in `failed`."""
        self.writes_in_flight -= 1
        for job in batch[0]:
            if job in failed:
                self.write_failed(job)
            elif self.jobs.get(job.handle) is not job:
                # It ended while being written: delete the row, unless a newer
                # job with the same key has replaced it already.
                job.store_state = NOT_STORED
                if not self.key_taken(job):
                    self.batch_dones.append(job.store_key())
            else:
                new = job.store_state == WRITING_NEW
                job.store_state = STORED
                if job.ignore:
                    self.store_done(job)  # cancelled while being written
                if new:
                    self.enqueue(job)
        for conn in list(self.holding):
            self.release(conn)

    def key_taken(self, job):
        """Does a newer job hold this job's store key (its row replaced this one's)?"""
        other = self.coalesce(job.function, job.unique, job.data)
        return (other is not None and other is not job and other.store_state >= STORED
                and other.store_key() == job.store_key())

    def write_failed(self, job):
        """Its background submitters get ERROR instead of JOB_CREATED. The job goes
        on as a foreground job if a client waits for it, else it is dropped."""
        new = job.store_state == WRITING_NEW
        job.store_state = FAILED
        job.background = False
        if job.clients:
            if new:
                self.enqueue(job)
        elif new:
            self.discard(job)
        else:
            job.ignore = True
            self.unindex(job)

    def replay(self):
        """Load every stored job before the first connection is served."""
        count = 0
        now = time.time()
        # The jobs live long: tracing them over and over while they load only costs time.
        gc.disable()
        try:
            for unique, name, priority, data, when in self.store.replay():
                stored_unique = None
                if unique.startswith(b"gearmand.py:"):
                    if unique.startswith(STORE_NO_UNIQUE):
                        stored_unique, unique = unique, b""
                    elif unique.startswith(STORE_PAYLOAD_UNIQUE):
                        stored_unique, unique = unique, b"-"
                elif len(unique) == UNIQUE_MAX and unique[-1] == 0:
                    stored_unique, unique = unique, unique[:-1]    # C's truncated 64-byte unique
                elif unique == b"" or unique == b"-":
                    stored_unique = unique        # C's row: its key stays what it is
                if priority != NORMAL and priority != HIGH and priority != LOW:
                    priority = NORMAL
                function = self.functions.get(name) or self.function(name)
                if self.coalesce(function, unique, data) is not None:
                    # Two rows for one job (written by an older server): keep one.
                    self.batch_dones.append((stored_unique or unique, name))
                    continue
                job = self.new_job(function, unique, data, priority, when, None, True)
                job.store_state = STORED
                job.store_unique = stored_unique
                if when > now:
                    self.enqueue(job)
                else:
                    function.queues[priority].append(job)
                count += 1
        finally:
            gc.enable()
        gc.freeze()
        self.stats.replayed = count
        if count:
            self.log.notice(f"replayed {count} jobs from the persistent queue")
        return count

    def start_writer(self):
        if self.store.durable:
            self.writer = StoreWriter(self.store, self.writer_finished, self.log, self.stats)
            self.writer.start()

    def writer_finished(self, batch, failed):
        """Called in the writer thread: pass the outcome to the loop."""
        self.finished_batches.append((batch, failed))
        self.wake()

    def shutdown(self):
        """Stop the writer, store the queue if asked to, close everything."""
        self.end_turn()
        if self.writer is not None:
            if self.batch_dones:
                self.send_batch()
            self.writer.submit(None)
            self.writer.join()
            self.writer = None
            # Jobs that ended while their batch was being written leave rows to delete.
            while self.finished_batches:
                self.batch_written(*self.finished_batches.popleft())
        records = []
        if self.options.store_queue_on_shutdown and self.store.durable:
            records = [job.store_record() for job in self.jobs.values()
                       if job.store_state == STORED]
        if records or self.batch_dones:
            try:
                self.store.write(records, self.batch_dones)
            except Exception as error:        # the rest of the stop must happen
                self.log.error(f"could not write to the store on shutdown: {error}")
        self.store.close()
        for conn in list(self.connections.values()):
            conn.sock.close()
        for listener, _ in self.listeners:
            listener.close()

    # -- packet handlers

    def packet_handlers(self):
        handlers = [self.reject] * PACKET_TYPES
        handlers[CAN_DO] = self.can_do
        handlers[CAN_DO_TIMEOUT] = self.can_do_timeout
        handlers[CANT_DO] = self.cant_do
        handlers[RESET_ABILITIES] = self.reset_abilities
        handlers[PRE_SLEEP] = self.pre_sleep
        handlers[SUBMIT_JOB] = functools.partial(self.submit, NORMAL, False)
        handlers[SUBMIT_JOB_HIGH] = functools.partial(self.submit, HIGH, False)
        handlers[SUBMIT_JOB_LOW] = functools.partial(self.submit, LOW, False)
        handlers[SUBMIT_JOB_BG] = functools.partial(self.submit, NORMAL, True)
        handlers[SUBMIT_JOB_HIGH_BG] = functools.partial(self.submit, HIGH, True)
        handlers[SUBMIT_JOB_LOW_BG] = functools.partial(self.submit, LOW, True)
        handlers[SUBMIT_JOB_EPOCH] = self.submit_epoch
        handlers[SUBMIT_REDUCE_JOB] = functools.partial(self.submit_reduce, False)
        handlers[SUBMIT_REDUCE_JOB_BACKGROUND] = functools.partial(self.submit_reduce, True)
        handlers[GRAB_JOB] = functools.partial(self.grab, JOB_ASSIGN)
        handlers[GRAB_JOB_UNIQ] = functools.partial(self.grab, JOB_ASSIGN_UNIQ)
        handlers[GRAB_JOB_ALL] = functools.partial(self.grab, JOB_ASSIGN_ALL)
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
        self.send(conn, ERROR_INVALID_COMMAND)

    def can_do(self, conn, args):
        self.add_registration(conn, args[0], 0)

    def can_do_timeout(self, conn, args):
        name, timeout = args
        milliseconds = c_integer(timeout, 64)
        # C closes on what strtol cannot tell from overflow: LONG_MAX and LONG_MIN.
        if (len(timeout) > TIMEOUT_DIGITS_MAX or milliseconds is None
                or milliseconds in (2 ** 63 - 1, -2 ** 63)):
            self.close(conn)
            return
        self.add_registration(conn, name, milliseconds)

    def cant_do(self, conn, args):
        self.drop_registrations(conn, lambda registration: registration.function.name == args[0])

    def reset_abilities(self, conn, args):
        self.drop_registrations(conn, lambda registration: True)

    def drop_registrations(self, conn, matches):
        self.drop(conn, [r for r in conn.registrations if matches(r)])

    def drop(self, conn, registrations):
        """Forget registrations in C's order: each in turn, newest first, requeues
        its jobs (most recently assigned first) while it is still registered, so
        a sleeping worker dropping a function hears the NOOP its own job makes."""
        for registration in registrations:
            jobs, registration.jobs = registration.jobs, []
            for job in reversed(jobs):
                self.requeue(job)
            conn.registrations.remove(registration)
            self.remove_registration(registration)

    def pre_sleep(self, conn, args):
        for registration in conn.registrations if self.assigning else ():
            for jobs in registration.function.queues:
                while jobs and jobs[0].ignore:
                    self.discard(jobs.popleft())
                if jobs:
                    self.send(conn, NOOP_PACKET)
                    return
        if self.timeouts:
            for registration in conn.registrations:
                for job in registration.jobs:
                    self.cancel_timeout(job)  # C cancels a sleeping worker's timer
        if conn.noop_sent:
            conn.sleeping = True          # one NOOP per sleep until the next grab
        else:
            self.set_wakeable(conn, True)

    def echo(self, conn, args):
        self.send(conn, packet(ECHO_RES, args[0]))

    def submit(self, priority, background, conn, args, when=0, reducer=None):
        name, unique, data = args[0], args[1], args[-1]
        if len(unique) > UNIQUE_MAX and reducer is None:
            self.send(conn, ERROR_UNIQUE_TOO_LARGE)
            return
        function = self.function(name)
        job = self.coalesce(function, unique, data)
        if job is not None:
            if background and not job.background:
                job.background = True
                if job.store_state < STORED:
                    self.keep(job)
            elif not background:
                self.attach_client(job, conn)
            if background and job.store_state >= WRITING:
                self.hold(conn, job)
            else:
                self.send(conn, packet(JOB_CREATED, job.handle))
            return
        limit = function.max_queue[priority]
        if limit and function.total >= limit:
            self.send(conn, ERROR_QUEUE_FULL)
            return
        job = self.new_job(function, unique, data, priority, when, reducer, background)
        self.stats.submitted[KINDS[background]] += 1
        if background:
            if self.write_ahead:
                self.store_add(job, WRITING_NEW)
                self.hold(conn, job)
                return
            job.store_state = STORED
            if self.store.durable:
                self.name_row(job)        # --store-queue-on-shutdown writes it at the end
        else:
            self.attach_client(job, conn)
        self.enqueue(job)
        self.send(conn, packet(JOB_CREATED, job.handle))

    def keep(self, job):
        """A background submission joined a foreground job: store it now, since
        that client is told JOB_CREATED and may never ask again (C does not)."""
        if self.write_ahead:
            self.store_add(job, WRITING)
        elif self.store.durable:
            self.name_row(job)
            job.store_state = STORED      # --store-queue-on-shutdown writes it at the end

    def attach_client(self, job, conn):
        if job.clients is None:
            job.clients = [conn]
        else:
            job.clients.append(conn)
        conn.client_jobs.append(job)

    def submit_epoch(self, conn, args):
        when = c_integer(args[2], 64)
        if when is None:
            self.close(conn)
            return
        self.submit(NORMAL, True, conn, args, when=when)

    def submit_reduce(self, background, conn, args):
        # C checks the reducer's length where it means the unique's; we keep that.
        if len(args[2]) > UNIQUE_MAX:
            self.send(conn, ERROR_UNIQUE_TOO_LARGE)
            return
        self.submit(NORMAL, background, conn, args, reducer=args[2])

    def grab(self, reply, conn, args):
        if conn.sleeping:
            self.set_wakeable(conn, False)
            conn.sleeping = conn.noop_sent = False
        if not self.assigning:
            self.send(conn, NO_JOB_PACKET)
            return
        job, registration = self.take_job(conn)
        if job is None:
            self.send(conn, NO_JOB_PACKET)
            return
        self.assign(job, registration)
        function = job.function.name
        if reply == JOB_ASSIGN_ALL and not job.reducer:
            reply = JOB_ASSIGN_UNIQ
        if reply == JOB_ASSIGN:
            payload = b"%s\0%s\0%s" % (job.handle, function, job.data)
        elif reply == JOB_ASSIGN_UNIQ:
            payload = b"%s\0%s\0%s\0%s" % (job.handle, function, job.unique, job.data)
        else:
            payload = b"%s\0%s\0%s\0%s\0%s" % (job.handle, function, job.unique,
                                               job.reducer, job.data)
        self.send(conn, packet(reply, payload))

    def running_job(self, conn, handle):
        job = self.jobs.get(handle)
        if job is None or job.worker is None or job.worker.connection is not conn:
            return None
        return job

    def work_status(self, conn, args):
        job = self.running_job(conn, args[0])
        if job is None:
            self.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.progress[job] = (atoi(args[1]) & 0xFFFFFFFF, atoi(args[2][:10]) & 0xFFFFFFFF)
        self.notify(job, WORK_STATUS, b"\0".join(args))

    def work_update(self, ptype, conn, args):
        job = self.running_job(conn, args[0])
        if job is None:
            self.send(conn, ERROR_NO_SUCH_JOB)
            return
        self.notify(job, ptype, b"\0".join(args))

    def work_complete(self, conn, args):
        job = self.running_job(conn, args[0])
        if job is None:
            self.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.notify(job, WORK_COMPLETE, b"\0".join(args))
        self.stats.completed[KINDS[job.background]] += 1
        self.finish(job)

    def work_fail(self, conn, args):
        handle = args[0]
        if len(handle) > HANDLE_MAX:
            self.send(conn, ERROR_HANDLE_TOO_LARGE)
            return
        job = self.running_job(conn, handle)
        if job is None:
            self.send(conn, ERROR_NO_SUCH_RESULT_JOB)
            return
        self.notify(job, WORK_FAIL, handle)
        self.stats.failed[KINDS[job.background]] += 1
        self.finish(job)

    def work_exception(self, conn, args):
        job = self.running_job(conn, args[0])
        if job is None:
            self.send(conn, ERROR_NO_SUCH_EXCEPTION_JOB)
            return
        if job.clients:
            exception = packet(WORK_EXCEPTION, b"\0".join(args))
            downgraded = packet(WORK_FAIL, job.handle)   # C 1.1.20 adds a stray NUL
            for client in reversed(job.clients):
                self.send(client, exception if client.exceptions else downgraded)
        self.stats.failed[KINDS[job.background]] += 1
        self.finish(job)

    def get_status(self, conn, args):
        handle = args[0]
        if len(handle) > HANDLE_MAX:
            self.close(conn)
            return
        job = self.jobs.get(handle)
        if job is None:
            self.send(conn, packet(STATUS_RES, handle + b"\x000\x000\x000\x000"))
            return
        numerator, denominator = self.progress.get(job, (0, 0))
        running = b"1" if job.worker is not None else b"0"
        self.send(conn, packet(STATUS_RES, b"%s\x001\x00%s\x00%d\x00%d" % (
            handle, running, numerator, denominator)))

    def get_status_unique(self, conn, args):
        unique = args[0]
        if len(unique) >= UNIQUE_MAX:
            self.close(conn)
            return
        found = None
        if unique:
            for function in self.functions.values():
                job = function.by_unique.get(unique)
                if job is not None and (found is None or handle_number(job) > handle_number(found)):
                    found = job
        if found is None:
            self.send(conn, packet(STATUS_RES_UNIQUE, unique + b"\x000\x000\x000\x000\x000"))
            return
        numerator, denominator = self.progress.get(found, (0, 0))
        running = b"1" if found.worker is not None else b"0"
        clients = len(found.clients) if found.clients else 0
        self.send(conn, packet(STATUS_RES_UNIQUE, b"%s\x001\x00%s\x00%d\x00%d\x00%d" % (
            unique, running, numerator, denominator, clients)))

    def set_client_id(self, conn, args):
        conn.client_id = args[0][:CLIENT_ID_MAX]

    def option_req(self, conn, args):
        name = args[0]
        if len(name) > OPTION_NAME_MAX or name.split(b"\0", 1)[0].lower() != b"exceptions":
            self.send(conn, ERROR_UNKNOWN_OPTION)
            return
        conn.exceptions = True
        self.send(conn, packet(OPTION_RES, name))


def handle_number(job):
    return int(job.handle.rsplit(b":", 1)[1])


def argument_sizes_fit(ptype, args):
    """C's 8 KiB limit on every argument that is not opaque data."""
    plain = args[:-1] if ptype in DATA_TYPES else args
    return all(len(arg) < ARGUMENT_MAX for arg in plain)


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


def bind_with_retry(sock, address, patience=20.0):
    """Bind, retrying while the address is in use for up to `patience` seconds, as C does."""
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            sock.bind(address)
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


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


def c_string(name):
    """What C prints of a name: up to its first NUL."""
    return name.split(b"\0", 1)[0] if b"\0" in name else name


def invalid_arguments(command):
    return (b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+"
            + command + b"\r\n")


def unknown_command(command):
    return b"ERR UNKNOWN_COMMAND Unknown+server+command" + command + b"\r\n"


class Admin:
    """The text admin protocol, byte for byte as C gearmand 1.1.20, plus `shutdown`."""

    # Commands that change the server; --admin-allow restricts who may send them.
    CHANGING = frozenset({b"shutdown", b"cancel", b"drop", b"create", b"maxqueue"})

    def __init__(self, server):
        self.server = server
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
            b"getpid": lambda tokens, bare: b"OK %d\n" % os.getpid(),
            b"verbose": lambda tokens, bare: b"OK %s\n" % server.log.level_name.encode(),
            b"version": lambda tokens, bare: b"OK %s\n" % GEARMAND_VERSION.encode(),
            b"shutdown": self.shutdown,
        }

    def line(self, conn, line):
        bare_newline = not line.endswith(b"\r")
        if not bare_newline:
            line = line[:-1]
        tokens = admin_tokens(line)
        if len(tokens) > TEXT_TOKENS_MAX:
            self.server.close(conn)
            return
        # C compares NUL-terminated strings, so a NUL ends each token.
        tokens = [token.split(b"\0", 1)[0] for token in tokens]
        word = tokens[0].lower()
        command = self.commands.get(word)
        if command is None:
            reply = unknown_command(tokens[0])
        elif word in self.CHANGING and not self.allowed(conn):
            reply = (b"ERR PERMISSION_DENIED " + word + b"+is+not+allowed+from+"
                     + conn.peer.encode() + b"\r\n")
        else:
            reply = command(tokens, bare_newline)
        self.server.send(conn, reply or b"ERR UNKNOWN_ERROR\r\n")

    def allowed(self, conn):
        if self.allow == "any":
            return True
        if self.allow == "loopback":
            return conn.peer in ("127.0.0.1", "::1") or conn.peer.startswith(("127.", "::ffff:127."))
        return False

    def functions_in_c_order(self):
        """C's 991-bucket function table: by bucket, newest first within one."""
        return sorted(reversed(list(self.server.functions.values())),
                      key=lambda function: function.bucket)

    def status(self, tokens, bare):
        rows = [b"%s\t%d\t%d\t%d\n" % (c_string(f.name), f.total, f.running,
                                         len(f.registrations))
                for f in self.functions_in_c_order()]
        return b"".join(rows) + b".\n"

    def priority_status(self, tokens, bare):
        rows = [b"%s\t%d\t%d\t%d\t%d\n" % (c_string(f.name), f.queued(HIGH), f.queued(NORMAL),
                                           f.queued(LOW), len(f.registrations))
                for f in self.functions_in_c_order()]
        return b"".join(rows) + b".\n"

    def workers(self, tokens, bare):
        rows = []
        for conn in reversed(list(self.server.connections.values())):
            names = b"".join(b" " + c_string(r.function.name) for r in conn.registrations)
            rows.append(b"%d %s %s :%s\n" % (conn.fd, conn.peer.encode(),
                                             c_string(conn.client_id), names))
        return b"".join(rows) + b".\n"

    def show(self, tokens, bare):
        words = [token.lower() for token in tokens]
        if len(tokens) == 1:
            return unknown_command(tokens[0])
        if words[1:] == [b"jobs"]:
            return self.show_jobs()
        if words[1:] == [b"unique", b"jobs"]:
            return self.show_unique_jobs()
        return b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"

    def jobs_in_c_order(self, key):
        """C's job hash tables: by bucket, newest first within one."""
        buckets = self.server.buckets
        return sorted(reversed(list(self.server.jobs.values())),
                      key=lambda job: key(job) % buckets)

    def show_jobs(self):
        rows = [b"%s\t%d\t%d\t%d\n" % (job.handle, job.retries, job.ignore,
                                       job.store_state >= STORED)
                for job in self.jobs_in_c_order(lambda job: gm_hash(job.handle))]
        return b"".join(rows) + b".\n"

    def show_unique_jobs(self):
        def key(job):
            if job.unique == b"-":
                return gm_hash(job.data) if job.data else 0
            return gm_hash(job.unique) if job.unique else 0
        rows = [job.unique + b"\n" for job in self.jobs_in_c_order(key)]
        return b"".join(rows) + b".\n"

    def cancel(self, tokens, bare):
        if len(tokens) < 3:
            return unknown_command(tokens[0])
        if len(tokens) != 3 or tokens[1].lower() != b"job":
            return b"ERR UNKNOWN_ERROR\r\n"
        job = self.server.jobs.get(tokens[2])
        if job is None:
            return b"ERR UNKNOWN_JOB\r\n"
        self.server.cancel(job)
        return b"OK\r\n"

    def create(self, tokens, bare):
        if len(tokens) != 3 or tokens[1].lower() != b"function":
            return invalid_arguments(tokens[0])
        # C drops two bytes it takes for CRLF, so a bare LF costs the name its last byte.
        name = tokens[2][:-1] if bare else tokens[2]
        self.server.function(name)
        return b"OK\r\n"

    def drop(self, tokens, bare):
        if len(tokens) != 3 or tokens[1].lower() != b"function":
            return invalid_arguments(tokens[0])
        wanted = tokens[2].lower()
        matches = [f for f in self.functions_in_c_order() if c_string(f.name).lower() == wanted]
        if not matches:
            return b"ERR function not found\r\n"
        replies = []
        for function in matches:
            if function.registrations or function.running:
                replies.append(b"ERR there are still connected workers or executing clients\r\n")
            else:
                self.server.drop_function(function)
                replies.append(b"OK\r\n")
        return b"".join(replies)

    def maxqueue(self, tokens, bare):
        if len(tokens) < 2:
            return invalid_arguments(tokens[0])
        function = self.server.functions.get(tokens[1])
        if function is not None:
            limits = [max(atoi(token), 0) for token in tokens[2:]]
            if len(limits) == 1:
                limits *= 3
            function.max_queue = (limits + [0, 0, 0])[:3]
        return b"OK\r\n"

    def shutdown(self, tokens, bare):
        if len(tokens) == 1:
            self.server.request_stop("now")
        elif len(tokens) == 2 and tokens[1].lower() == b"graceful":
            self.server.request_stop("graceful")
        else:
            return invalid_arguments(tokens[0])
        return b"OK\r\n"


# --- HTTP: job submission, metrics and a status page --------------------------

HTTP_HEAD_MAX = 16384
HTTP_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                411: b"Length Required", 413: b"Payload Too Large",
                431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
                503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
HTTP_PRIORITIES = {b"high": HIGH, b"low": LOW}


class HttpExchange:
    """One HTTP connection: its unread input and the request being answered."""

    __slots__ = ("buffer", "busy", "keep_alive", "version", "head", "background", "handle",
                 "body", "closing")

    def __init__(self):
        self.buffer = b""
        self.busy = False                 # a request waits for its job
        self.keep_alive = True
        self.version = b"HTTP/1.1"
        self.head = False                 # HEAD: headers only
        self.background = False
        self.handle = b""
        self.body = []                    # WORK_DATA received so far
        self.closing = False              # close once the response is out


class Http:
    """HTTP/1.1 on --http-port, on the same loop. POST /FUNCTION submits a job as
    C gearmand's HTTP module does (its response is the job's result, or the
    handle at once for X-Gearman-Background: true); GET /metrics, /status and /
    show the server. A job's packets become the response as they arrive."""

    def __init__(self, server):
        self.server = server
        self.resuming = []                # connections with a request left to read
        self.routes = {b"/": self.page, b"/metrics": self.metrics, b"/status": self.status}

    # -- requests

    def receive(self, conn, data):
        exchange = conn.http
        exchange.buffer += data
        if not exchange.busy:
            self.next_request(conn)
        elif len(exchange.buffer) > HTTP_HEAD_MAX + self.server.max_packet:
            self.server.close(conn)      # pipelining far ahead of its answers

    def resume(self):
        resuming, self.resuming = self.resuming, []
        for conn in resuming:
            if not conn.closed and not conn.http.busy:
                self.next_request(conn)

    def next_request(self, conn):
        """Answer buffered requests in order; stop at one that waits for its job."""
        exchange = conn.http
        while not (exchange.busy or exchange.closing or conn.closed):
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
            if length > self.server.max_packet:
                self.error(conn, 413, b"body over --max-packet-size")
                return
            start = end + 4
            if len(buffer) < start + length:
                if start + length > 65536:
                    # A large body: let read() gather its pieces and join them once.
                    self.server.gather(conn, buffer, start + length)
                    exchange.buffer = b""
                return
            body = buffer[start:start + length]
            exchange.buffer = buffer[start + length:]
            connection = headers.get(b"connection", b"").lower()
            exchange.keep_alive = (connection != b"close" if version == b"HTTP/1.1"
                                   else connection == b"keep-alive")
            self.request(conn, method, target, headers, body)

    def request(self, conn, method, target, headers, body):
        if method not in (b"GET", b"HEAD", b"POST", b"PUT"):
            self.error(conn, 405, b"GET, HEAD, POST or PUT")
            return
        route = self.routes.get(target.split(b"?", 1)[0])
        if route is not None and method in (b"GET", b"HEAD"):
            content_type, content = route()
            self.server.send(conn, self.response(conn, 200, [(b"Content-Type", content_type)],
                                                   content))
            return
        name = target.lstrip(b"/")        # the function, verbatim, as in C
        if not name:
            self.error(conn, 404, b"no function named in the path")
            return
        background = headers.get(b"x-gearman-background", b"").lower() == b"true"
        function = self.server.functions.get(name)
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
        self.server.submit(priority, background, conn, [name, unique, data])

    # -- responses

    def response_part(self, conn, packet):
        """The HTTP bytes a packet for this connection's job makes, if any."""
        if packet[:1] != b"\0":
            return packet                 # already HTTP: a response of ours
        exchange = conn.http
        if not exchange.busy:
            return b""
        ptype = TYPE_SIZE.unpack_from(packet, 4)[0]
        payload = packet[12:]
        if ptype == JOB_CREATED:
            exchange.handle = payload
            if not exchange.background:
                return b""
            return self.job_response(conn, 200, b"JOB_CREATED", b"")
        if ptype == WORK_DATA:
            exchange.body.append(payload.split(b"\0", 1)[1])
            return b""
        if ptype == WORK_COMPLETE:
            exchange.body.append(payload.split(b"\0", 1)[1])
            return self.job_response(conn, 200, b"WORK_COMPLETE", b"".join(exchange.body))
        if ptype == WORK_FAIL:
            return self.job_response(conn, 500, b"WORK_FAIL", b"")
        if ptype == WORK_EXCEPTION:
            return self.job_response(conn, 500, b"WORK_EXCEPTION", payload.split(b"\0", 1)[1])
        if ptype == ERROR:
            code, _, text = payload.partition(b"\0")
            status = 400 if code == b"ARGUMENT_TOO_LARGE" else 503
            return self.finished(conn, self.response(
                conn, status, [(b"X-Gearman-Command", b"ERROR"), (b"X-Gearman-Error", code)],
                text + b"\n"))
        return b""                        # WORK_STATUS, WORK_WARNING: nothing to show

    def job_response(self, conn, status, command, content):
        headers = [(b"X-Gearman-Job-Handle", conn.http.handle), (b"X-Gearman-Command", command),
                   (b"Content-Type", b"application/octet-stream")]
        return self.finished(conn, self.response(conn, status, headers, content))

    def finished(self, conn, response):
        exchange = conn.http
        exchange.busy = False
        if exchange.buffer and not exchange.closing:
            self.resuming.append(conn)
        return response

    def error(self, conn, status, message, keep=False):
        """Answer a request we refuse; a malformed one also ends the connection."""
        if not keep:
            conn.http.keep_alive = False
        self.server.send(conn, self.response(conn, status, [(b"Content-Type", b"text/plain")],
                                               message + b"\n"))

    def response(self, conn, status, headers, content):
        exchange = conn.http
        if not exchange.keep_alive:
            exchange.closing = True
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
                     for f in server.admin.functions_in_c_order()]
        workers = [{"fd": conn.fd, "address": conn.peer, "id": text(conn.client_id),
                    "functions": [text(r.function.name) for r in conn.registrations],
                    "running": sum(len(r.jobs) for r in conn.registrations)}
                   for conn in server.connections.values() if conn.registrations]
        error_age = time.time() - stats.store_last_error_time
        return {
            "server": f"gearmand.py {__version__}",
            "version": GEARMAND_VERSION,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - stats.started, 3),
            "connections": len(server.connections),
            "functions": functions,
            "workers": workers,
            "jobs": {"submitted": stats.submitted, "completed": stats.completed,
                     "failed": stats.failed},
            "store": {"queue_type": server.options.queue_type,
                      "durable": server.store.durable,
                      "healthy": not stats.store_last_error or error_age > 60,
                      "errors": stats.store_errors,
                      "last_error": stats.store_last_error,
                      "writes_in_flight": server.writes_in_flight,
                      "replayed_jobs": stats.replayed},
        }

    def status(self):
        import json
        return b"application/json", json.dumps(self.snapshot(), indent=1).encode() + b"\n"

    def metrics(self):
        """The Prometheus text exposition (format 0.0.4)."""
        server = self.server
        stats = server.stats
        functions = server.admin.functions_in_c_order()
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
               [("", len(server.connections))])
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
        family("gearman_store_writes_in_flight", "gauge", "Batches of new jobs being written.",
               [("", server.writes_in_flight)])
        family("gearman_uptime_seconds", "gauge", "Seconds since the server started.",
               [("", round(time.time() - stats.started, 3))])
        return b"text/plain; version=0.0.4; charset=utf-8", ("\n".join(lines) + "\n").encode()

    def page(self):
        return b"text/html; charset=utf-8", STATUS_PAGE


def text(name):
    """A name (bytes) for JSON and labels: UTF-8, undecodable bytes escaped."""
    return name.decode("utf-8", "backslashreplace")


def labels(**values):
    def escape(value):
        value = text(value) if isinstance(value, bytes) else str(value)
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in values.items()) + "}"


# The status page: no external assets; it reads /status every few seconds.
STATUS_PAGE = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gearmand.py</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;min-width:40em} th,td{padding:.25em .7em;text-align:right}
th{background:#eee} td:first-child,th:first-child{text-align:left} tr:nth-child(even){background:#f7f7f7}
.bad{color:#b00;font-weight:bold} .good{color:#070} #meta{color:#666}
</style></head><body>
<h1>gearmand.py</h1><div id="meta">loading&hellip;</div>
<h2>Functions</h2>
<table id="functions"><thead><tr><th>function</th><th>jobs</th><th>running</th>
<th>high</th><th>normal</th><th>low</th><th>workers</th></tr></thead><tbody></tbody></table>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>address</th><th>id</th><th>functions</th><th>running</th></tr>
</thead><tbody></tbody></table>
<h2>Store</h2><div id="store"></div>
<script>
function cell(row, value) { var td = document.createElement("td"); td.textContent = value; row.appendChild(td); }
function fill(id, rows) {
  var body = document.querySelector("#" + id + " tbody"); body.textContent = "";
  rows.forEach(function (values) { var tr = document.createElement("tr"); values.forEach(function (v) { cell(tr, v); }); body.appendChild(tr); });
}
function show(s) {
  document.getElementById("meta").textContent = s.server + " (gearmand " + s.version + "), pid " + s.pid +
    ", up " + Math.round(s.uptime_seconds) + " s, " + s.connections + " connections, updated " + new Date().toLocaleTimeString();
  fill("functions", s.functions.map(function (f) { return [f.name, f.jobs, f.running, f.queued.high, f.queued.normal, f.queued.low, f.workers]; }));
  fill("workers", s.workers.map(function (w) { return [w.address + " (fd " + w.fd + ")", w.id, w.functions.join(" "), w.running]; }));
  var st = s.store, el = document.getElementById("store");
  el.className = st.healthy ? "good" : "bad";
  el.textContent = st.queue_type + (st.durable ? " (durable)" : " (not persistent)") + ": " +
    (st.healthy ? "healthy" : "failing: " + st.last_error) + ", " + st.errors + " errors, " +
    st.replayed_jobs + " jobs replayed at start";
}
function refresh() {
  fetch("/status").then(function (r) { return r.json(); }).then(show)
    .catch(function (e) { document.getElementById("meta").textContent = "server unreachable: " + e; });
}
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""


# --- command line and main() --------------------------------------------------

class OptionError(Exception):
    """A bad command line: one line for the user, exit status 1."""


class OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise OptionError(message)


def build_parser():
    parser = OptionParser(prog="gearmand", add_help=False, allow_abbrev=False,
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
                         help="Log file; 'stderr' or 'none' are special.")
    general.add_argument("-L", "--listen", action="append",
                         help="Address the server should listen on. Default is all.")
    general.add_argument("-P", "--pid-file", default="/var/gearmand.pid",
                         help="File to write process ID out to.")
    general.add_argument("-r", "--protocol", help="Load protocol module (only 'http').")
    general.add_argument("-R", "--round-robin", action="store_true",
                         help="Assign work in round-robin order per worker connection.")
    general.add_argument("-q", "--queue-type", default="builtin",
                         help="Persistent queue type to use (builtin, libsqlite3/sqlite, MySQL, "
                              "libdrizzle, Postgres, libmemcached, redis, libtokyocabinet).")
    general.add_argument("--config-file", default="/etc/gearmand.conf",
                         help="File of further options, one or more per line.")
    general.add_argument("--syslog", action="store_true", help="Use syslog.")
    general.add_argument("--coredump", action="store_true", help="Accepted; no effect.")
    general.add_argument("-t", "--threads", type=int, default=4,
                         help="Accepted for compatibility; one event loop serves all.")
    general.add_argument("-u", "--user", help="Switch to given user after startup.")
    general.add_argument("--verbose", default="ERROR",
                         help="Set verbose level (FATAL, ALERT, CRITICAL, ERROR, WARNING, "
                              "NOTICE, INFO, DEBUG).")
    general.add_argument("-V", "--version", action="store_true",
                         help="Display the version of gearmand and exit.")
    general.add_argument("-w", "--worker-wakeup", type=int, default=0,
                         help="Number of workers to wakeup for each job received "
                              "(0 = all sleeping workers).")
    general.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    general.add_argument("--max-packet-size", type=int, default=64 << 20,
                         help="Close connections that send a larger packet (bytes; "
                              "default 64 MiB).")
    general.add_argument("--admin-allow", choices=("any", "loopback", "none"), default="any",
                         help="Who may use the admin commands that change the server (shutdown, "
                              "cancel job, drop function, create function, maxqueue): any "
                              "peer (default, as C), loopback peers only, or none.")
    general.add_argument("--max-input-buffer", type=int, default=512 << 20,
                         help="Bytes of large packets still arriving that all connections "
                              "together may hold; past it the connection adding more is "
                              "closed (default 512 MiB).")
    general.add_argument("--max-output", type=int, default=256 << 20,
                         help="Close connections that leave more unread replies (bytes; "
                              "default 256 MiB).")

    http = parser.add_argument_group("HTTP")
    http.add_argument("--http-port", type=int,
                      help="Port of the HTTP interface (job submission, /metrics, /status, /); "
                           "given, or with -r http (then 8080), it is opened.")

    gear = parser.add_argument_group("Gear")
    gear.add_argument("-p", "--port", default="4730", help="Port the server should listen on.")
    gear.add_argument("--ssl", action="store_true",
                      help="Enable ssl connections (TLS on the whole port, admin included).")
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
    if options.queue_type.lower() == "libdrizzle":
        options.mysql_host = options.libdrizzle_uds or options.libdrizzle_host
        options.mysql_port = options.libdrizzle_port
        options.mysql_user = options.libdrizzle_user
        options.mysql_password = options.libdrizzle_password
        options.mysql_db = options.libdrizzle_db
        options.mysql_table = options.libdrizzle_table
    if min(options.max_packet_size, options.max_output, options.max_input_buffer) <= 0:
        raise OptionError("--max-packet-size, --max-input-buffer and --max-output "
                          "must be positive")
    return options


def daemonize():
    """Detach: double fork, new session, standard streams to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


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


def write_pid_file(path, default):
    try:
        with open(path, "w") as pid_file:
            pid_file.write(f"{os.getpid()}\n")
        return True
    except OSError as error:
        if path != default:
            raise OptionError(f"Could not open pid file {path}: {error.strerror}") from None
        return False


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


def tls_context(options):
    """The server's TLS context, or None without --ssl."""
    if not options.ssl:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(options.ssl_certificate, options.ssl_key)
        if options.ssl_verify_client or os.path.exists(options.ssl_ca_file):
            context.load_verify_locations(options.ssl_ca_file)
    except (OSError, ssl.SSLError) as error:
        raise OptionError(f"cannot load TLS certificate, key or CA file: {error}") from None
    context.verify_mode = ssl.CERT_REQUIRED if options.ssl_verify_client else ssl.CERT_NONE
    return context


def run(options):
    if options.file_descriptors:
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (options.file_descriptors, options.file_descriptors))
        except (ValueError, OSError) as error:
            raise OptionError(f"Could not set the file descriptor limit: {error}") from None
    try:
        cls = store_class(options.queue_type)
    except StoreError as error:
        raise OptionError(str(error)) from None
    context = tls_context(options)
    ports = [(options.port, False)]
    if options.protocol == "http" or options.http_port is not None:
        ports.append((8080 if options.http_port is None else options.http_port, True))
    # Once the port accepts, signals may come at any time: before the log is open
    # SIGHUP has nothing to reopen, and a stop request simply ends the start-up.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    listeners = []
    for port, http in ports:
        try:
            listeners.append((bind_listeners(options.listen, port, options), http))
        except OSError as error:
            raise OptionError(f"Could not listen on {'HTTP ' if http else ''}port {port}: "
                              f"{error.strerror or error}") from None
    # The port is bound: from here on, work as the user asked for, with its files.
    if options.user:
        switch_user(options.user)
    if options.log_file not in ("stderr", "none"):
        options.log_file = os.path.abspath(options.log_file)
    log = Log(options.log_file, options.verbose, options.syslog)
    # A logrotate SIGHUP may come during a long replay.
    signal.signal(signal.SIGHUP, lambda *_: log.reopen())
    try:
        server = Server(options, cls.open(options), log, context)
        for sockets, http in listeners:
            server.listen(sockets, http)
        if options.daemon:
            options.pid_file = os.path.abspath(options.pid_file)
            # A store connection must not cross a fork (SQLite's locks stay with the
            # parent): the store opened to check the settings, the daemon opens its own.
            server.store.close()
            daemonize()
            server.store = cls.open(options)
            os.chdir("/")                 # every path the store needs is open or absolute
        server.replay()
    except StoreError as error:
        if options.daemon:
            log.error(str(error))         # the terminal is gone
        raise OptionError(str(error)) from None
    pid_written = write_pid_file(options.pid_file, "/var/gearmand.pid")
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop("now"))
    signal.signal(signal.SIGINT, lambda *_: server.request_stop("now"))
    signal.signal(signal.SIGUSR1, lambda *_: server.request_stop("graceful"))
    # A signal the kernel hands to the writer thread must still end the main thread's select().
    signal.set_wakeup_fd(server.wake_writer.fileno(), warn_on_full_buffer=False)
    server.start_writer()
    log.notice(f"gearmand.py {__version__} ready, port {options.port}")
    try:
        server.serve_forever()
    finally:
        server.shutdown()
        if pid_written:
            try:
                os.unlink(options.pid_file)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    # Backends in extras/ import this module by name (gearmand, or myproj.gearmand when
    # vendored and run as python -m myproj.gearmand): let them find this copy, not load
    # a second one whose StoreError the server would not catch.
    sys.modules.setdefault("gearmand", sys.modules[__name__])
    if __spec__ is not None:
        sys.modules.setdefault(__spec__.name, sys.modules[__name__])
    sys.exit(main())
