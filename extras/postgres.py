"""PostgreSQL persistent queue (-q Postgres, also postgresql and libpq), with psycopg2.

C gearmand 1.1.20's table, plus what paging needs (docs/backends.md#postgresql): a
BIGSERIAL column gearmand_seq, each row's place in its queue and its job's handle
number, and three indexes. C still reads and writes such a table: its statements
name their columns, and its rows take the column's sequence, which we keep past our
own seqs. Each write() is one transaction: DELETEs by seq and multi-row INSERT ... ON
CONFLICT DO NOTHING statements of up to PAGE_SIZE rows each (a stored job's row
stays as it is: the new job joins that one), then COMMIT.
"""
import argparse
import hashlib
import os
import time

import psycopg2
import psycopg2.extensions
import psycopg2.extras

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import SqlStore, StoreError
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import SqlStore, StoreError

CONNECT_TIMEOUT = 2          # seconds to open a connection
# A statement (its lock waits included), or unacknowledged data on the TCP
# connection, fails after this: as long as MySQL's IO_TIMEOUT.
IO_TIMEOUT_MS = 10000
# TCP keepalives find a server gone silent (its host down, a dropped route) while
# we wait for a reply, which neither timeout above sees: after 5 + 5 x 1 s.
KEEPALIVES = {"keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 5}
PAGE_SIZE = 1000             # rows per multi-row statement
LONG_TIMEOUT_MS = 600000     # for what may take long: ALTER TABLE at start, drop function
REPLAY_FETCH = 5000          # rows fetched at once by the replay's server-side cursor
JOB_KEY = ("unique_key", "function_name")
# The table's unique keys (constraints or indexes, not partial, no expressions), each
# as (primary?, constraint name or None, index name, [columns]).
KEYS_SQL = ("SELECT i.indisprimary, con.conname, c.relname,"
            " ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY"
            " AS k(attnum, n) JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = k.attnum ORDER BY k.n)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid"
            " AND con.conrelid = i.indrelid"
            " WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL"
            " AND i.indexprs IS NULL ORDER BY i.indisprimary DESC, c.relname")


class Text(bytes):
    """Bytes sent as a quoted text literal, as they are (not as BYTEA)."""


def adapt_text(value):
    return psycopg2.extensions.QuotedString(bytes(value))


psycopg2.extensions.register_adapter(Text, adapt_text)


class PostgresStore(SqlStore):
    """Pages (see gearmand.Pager): each row has a seq, the column gearmand_seq (see
    ensure_paging), and the job's handle number is its row's seq."""

    pages = True
    driver_error = psycopg2.Error
    create_sql = ("CREATE TABLE IF NOT EXISTS {table} (unique_key VARCHAR(64), "
                  "function_name VARCHAR(255), priority INTEGER, data BYTEA, "
                  "when_to_run INTEGER, UNIQUE (unique_key, function_name))")
    # A key a stored job holds (on any of the table's unique keys) is left as it is:
    # RETURNING names the rows inserted, and the others join the stored job or are
    # refused (see joined()).
    insert_sql = ("INSERT INTO {table} (gearmand_seq, unique_key, function_name, priority,"
                  " data, when_to_run) VALUES %s ON CONFLICT DO NOTHING RETURNING gearmand_seq")
    delete_sql = "DELETE FROM {table} WHERE gearmand_seq = ANY(%s)"
    # With --store-queue-on-shutdown the queue is read whole at start.
    select_sql = ("SELECT COALESCE(unique_key, ''), COALESCE(function_name, ''), priority,"
                  " COALESCE(data, ''::bytea), COALESCE(when_to_run, 0), gearmand_seq"
                  " FROM {table} ORDER BY gearmand_seq")
    counts_sql = ("SELECT function_name, priority, when_to_run <> 0, count(*) FROM {table}"
                  " GROUP BY 1, 2, 3")
    page_sql = ("SELECT gearmand_seq, COALESCE(unique_key, ''), COALESCE(data, ''::bytea)"
                " FROM {table} WHERE function_name = %s AND priority = %s AND when_to_run = 0"
                " AND gearmand_seq > %s ORDER BY gearmand_seq LIMIT %s")
    page_scheduled_sql = ("SELECT when_to_run, gearmand_seq, function_name,"
                          " COALESCE(unique_key, ''), priority, COALESCE(data, ''::bytea)"
                          " FROM {table} WHERE when_to_run <> 0"
                          " AND (when_to_run, gearmand_seq) > (%s, %s)"
                          " ORDER BY when_to_run, gearmand_seq LIMIT %s")
    find_sql = ("SELECT gearmand_seq, priority, COALESCE(data, ''::bytea),"
                " COALESCE(when_to_run, 0) FROM {table}"
                " WHERE unique_key = %s AND function_name = %s")
    find_sequence_sql = ("SELECT function_name, COALESCE(unique_key, ''), priority,"
                         " COALESCE(data, ''::bytea), COALESCE(when_to_run, 0) FROM {table}"
                         " WHERE gearmand_seq = %s")
    # The indexes the pages are read from ({name}: the table's name without its schema).
    index_sql = {
        "{name}_gearmand_seq": "CREATE UNIQUE INDEX IF NOT EXISTS {name}_gearmand_seq"
                               " ON {table} (gearmand_seq)",
        "{name}_gearmand_queue": "CREATE INDEX IF NOT EXISTS {name}_gearmand_queue ON {table}"
                                 " (function_name, priority, when_to_run, gearmand_seq)",
        "{name}_gearmand_scheduled": "CREATE INDEX IF NOT EXISTS {name}_gearmand_scheduled"
                                     " ON {table} (when_to_run, gearmand_seq)"
                                     " WHERE when_to_run <> 0 OR when_to_run IS NULL",
    }

    # --cluster: advisory locks, backend pids, the database's clock (see gearmand.Lease).
    clusters = True
    try_lock_sql = "SELECT pg_try_advisory_lock(%s)"
    unlock_sql = "SELECT pg_advisory_unlock(%s)"
    session_sql = "SELECT pg_backend_pid()"
    kill_sql = "SELECT pg_terminate_backend(%s)"
    now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    share_sql = " FOR SHARE"
    cluster_session_sql = "SET lock_timeout = '5s'"
    page_all_sql = ("SELECT gearmand_seq, function_name, unique_key, priority, data,"
                    " COALESCE(when_to_run, 0) FROM {table} WHERE gearmand_seq > %s"
                    " ORDER BY gearmand_seq LIMIT %s")

    @staticmethod
    def lock_key(name):
        """An advisory lock's key: 63 bits of the name's hash."""
        return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)

    @classmethod
    def open_table(cls, options, table):
        return cls.open(argparse.Namespace(**dict(vars(options), libpq_table=table)))

    def __init__(self, table, conninfo, settings, label):
        super().__init__(table, label)
        self.conninfo = conninfo
        self.settings = settings           # keyword arguments added to the conninfo
        self.narrow = None                 # (primary?, constraint, index, columns) or None
        self.full_key = True               # the table has C's key (unique_key, function_name)
        self.notices = []                  # said once at start; the server logs them as WARNINGs
        self.sequence = None               # gearmand_seq's sequence: C's rows take their seq there
        self.sequence_at = 0               # that sequence is at least here

    @classmethod
    def open(cls, options):
        conninfo = options.libpq_conninfo or ""
        try:
            given = psycopg2.extensions.parse_dsn(conninfo)
        except psycopg2.Error as error:
            raise StoreError(f"Postgres queue: invalid --libpq-conninfo: "
                             f"{first_line(error)}") from None
        settings = {}
        if "connect_timeout" not in given:
            settings["connect_timeout"] = CONNECT_TIMEOUT
        if "tcp_user_timeout" not in given and psycopg2.extensions.libpq_version() >= 120000:
            settings["tcp_user_timeout"] = IO_TIMEOUT_MS
        settings.update((name, value) for name, value in KEEPALIVES.items() if name not in given)
        # Without a timeout a write waits as long as a lock is held, and its client with
        # it. Ours go first, so the user's own options (or PGOPTIONS) win.
        settings["options"] = (f"-c statement_timeout={IO_TIMEOUT_MS} "
                               + given.get("options", os.environ.get("PGOPTIONS", "")))
        if "application_name" not in given:
            settings["application_name"] = "gearmand.py"
        shown = " ".join(f"{k}={v}" for k, v in given.items() if k != "password")
        store = cls(options.libpq_table, conninfo, settings,
                    f"Postgres queue ({shown or 'libpq defaults'})")
        store.setup()
        return store

    # -- connection

    def connect(self):
        connection = psycopg2.connect(self.conninfo, **self.settings)
        # Text comes back as the bytes stored, whatever the encoding.
        psycopg2.extensions.register_type(psycopg2.extensions.BYTES, connection)
        return connection

    def table_exists(self, cursor):
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (self.table,))
        return cursor.fetchone()[0]

    def setup(self):
        super().setup()
        try:
            with self.connection.cursor() as cursor:
                # Adding the seq column to a big table rewrites it: a million rows, 13 s.
                cursor.execute(f"SET LOCAL statement_timeout = {LONG_TIMEOUT_MS}")
                cursor.execute(KEYS_SQL, (self.table,))
                keys = [(primary, text(constraint), text(index), [text(c) for c in columns])
                        for primary, constraint, index, columns in cursor.fetchall()]
                self.ensure_paging(cursor)
                # C reads a NULL when_to_run (tables older than gearmand 0.22) as 0: so do we.
                cursor.execute(self.sql("UPDATE {table} SET when_to_run = 0"
                                        " WHERE when_to_run IS NULL"))
            self.connection.commit()
        except psycopg2.Error as error:
            self.disconnect()
            raise self.error(error) from None
        narrow = [key for key in keys if set(key[3]) < set(JOB_KEY)]
        if not narrow:
            return                 # C's key (or none: then rows are not keyed at all)
        self.narrow = narrow[0]
        self.full_key = any(set(key[3]) == set(JOB_KEY) for key in keys)
        self.notices.append(
            f"{self.label}: table {self.table} has {self.key_name()}, narrower than C"
            f" gearmand's key (unique_key, function_name): a unique can be used by one"
            f" function at a time, and a background job whose unique a queued job of"
            f" another function holds gets QUEUE_ERROR. To key rows as C does:"
            f" {self.widen_sql()}")

    def ensure_paging(self, cursor):
        """Give C's table (or a hand-made one) what paging needs, once: the column
        gearmand_seq, the job's place in its queue, and the indexes the pages are read
        from. It is a BIGSERIAL: C's INSERT names its five columns, so its rows take
        the next value of the column's sequence, which write_batch keeps past our
        seqs. ALTER TABLE numbers the rows there are in the order it reads the heap:
        insertion order unless rows were deleted and their space reused (C's un-ORDERed
        replay reads in the same order)."""
        cursor.execute("SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                       " AND attnum > 0 AND NOT attisdropped", (self.table,))
        if "gearmand_seq" not in {text(name) for name, in cursor.fetchall()}:
            cursor.execute(self.sql("ALTER TABLE {table} ADD COLUMN gearmand_seq BIGSERIAL"))
        cursor.execute("SELECT c.relname::text FROM pg_index i JOIN pg_class c"
                       " ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s)",
                       (self.table,))
        indexes = {text(name) for name, in cursor.fetchall()}
        name = self.table.rpartition(".")[2].lower()
        for index, statement in self.index_sql.items():
            if index.format(name=name) not in indexes:
                cursor.execute(statement.format(name=name, table=self.table))
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'gearmand_seq')", (self.table,))
        sequence = cursor.fetchone()[0]
        if sequence is not None:
            self.sequence = text(sequence)
            cursor.execute(f"SELECT last_value, is_called FROM {self.sequence}")
            last, called = cursor.fetchone()
            self.sequence_at = last if called else last - 1

    def key_name(self):
        primary, constraint, index, columns = self.narrow
        kind = "PRIMARY KEY" if primary else f"UNIQUE key {constraint or index}"
        return f"{kind} ({', '.join(columns)})"

    def widen_sql(self):
        primary, constraint, index, _ = self.narrow
        drop = f"DROP CONSTRAINT {constraint}" if constraint else None
        add = ("ADD PRIMARY KEY" if primary else "ADD UNIQUE") + " (unique_key, function_name)"
        if drop:
            return f"ALTER TABLE {self.table} {drop}" + ("" if self.full_key else f", {add}")
        return f"DROP INDEX {index}" + ("" if self.full_key else
                                        f"; ALTER TABLE {self.table} {add}")

    def lost(self, error):
        """True if `error` means the connection (or the server) is gone."""
        code = getattr(error, "pgcode", None) or ""
        return (isinstance(error, psycopg2.InterfaceError) or self.connection is None
                or bool(self.connection.closed) or code.startswith(("08", "57P")))

    def blocked(self, error):
        # statement_timeout, lock_timeout, the table gone, the disk full, read-only
        return getattr(error, "pgcode", None) in ("57014", "55P03", "42P01", "53100", "25006")

    # -- statements

    def write_batch(self, adds, dones):
        joins = {}
        cursor = self.connection.cursor()
        try:
            self.check_fence(cursor)
            if dones:
                seqs = [seq for _, _, seq in dones]
                for start in range(0, len(seqs), PAGE_SIZE * 10):
                    cursor.execute(self.sql(self.delete_sql), (seqs[start:start + PAGE_SIZE * 10],))
            if adds:
                inserted = psycopg2.extras.execute_values(
                    cursor, self.sql(self.insert_sql),
                    [(seq, Text(unique), Text(function), priority, data, when)
                     for unique, function, priority, data, when, seq in adds],
                    page_size=PAGE_SIZE, fetch=True)
                if len(inserted) != len(adds):
                    joins = self.joined(cursor, adds, {seq for seq, in inserted})
                highest = max(row[5] for row in adds)
                if self.sequence is not None and highest > self.sequence_at:
                    # C's next row comes after ours (and never takes a seq of ours).
                    cursor.execute(f"SELECT setval(%s, GREATEST(%s, last_value)) FROM"
                                   f" {self.sequence}", (self.sequence, highest))
                    self.sequence_at = cursor.fetchone()[0]
            self.connection.commit()
        finally:
            cursor.close()
        return joins

    def joined(self, cursor, adds, inserted):
        """{seq: seq of the stored row} for the jobs of `adds` that were not inserted
        because a stored job holds their key; StoreError naming the first one whose
        key another job's row holds (on a narrow key), or whose seq is taken."""
        joins = {}
        for unique, function, _, _, _, seq in adds:
            if seq in inserted:
                continue
            found = self.find_row(cursor, function, unique)
            if found is not None:
                if found[0] != seq:         # else ours already (a retry that wrote it again)
                    joins[seq] = found[0]
                continue
            if self.narrow is not None:
                columns = self.narrow[3]
                cursor.execute(self.sql("SELECT unique_key, function_name FROM {table} WHERE ")
                               + " AND ".join(f"{column} = %s" for column in columns),
                               [Text(dict(zip(JOB_KEY, (unique, function)))[column])
                                for column in columns])
                other = cursor.fetchone()
                if other is not None:
                    raise self.collision((unique, function),
                                         (bytes(other[0]), bytes(other[1])))
            cursor.execute(self.sql("SELECT unique_key, function_name FROM {table}"
                                    " WHERE gearmand_seq = %s"), (seq,))
            other = cursor.fetchone()
            holder = ("another job's row" if other is None else
                      f"the row of job (unique {shown(other[0] or b'')}, function"
                      f" {shown(other[1] or b'')})")
            raise StoreError(f"{self.label}: job (unique {shown(unique)}, function"
                             f" {shown(function)}) cannot take its seq {seq}: {holder} holds"
                             f" it (a row that this server did not write)")
        return joins

    def collision(self, job, other):
        other = ("another job's row" if other is None else
                 f"the row of job (unique {shown(other[0])}, function {shown(other[1])})")
        return StoreError(f"{self.label}: job (unique {shown(job[0])}, function"
                          f" {shown(job[1])}) collides with {other} on the table's"
                          f" {self.key_name()}: with this key a unique can be used by one"
                          f" function at a time (to key rows as C does: {self.widen_sql()})")

    # -- paging: reads run in the writer thread, between its writes (see read())

    def query(self, statement, arguments):
        def work(cursor):
            cursor.execute(self.sql(statement), arguments)
            return cursor.fetchall() if cursor.description else None
        return self.read(work)

    def counts(self):
        def work(cursor):
            # Epoch jobs due already take their place in the FIFO, as C's replay queues them.
            cursor.execute(self.sql("UPDATE {table} SET when_to_run = 0 WHERE when_to_run <> 0"
                                    " AND when_to_run <= %s"), (int(time.time()),))
            cursor.execute(self.sql("SELECT MAX(gearmand_seq) FROM {table}"))
            highest = cursor.fetchone()[0] or 0
            cursor.execute(self.sql(self.counts_sql))
            groups = cursor.fetchall()
            odd = [(function, priority) for function, priority, later, _ in groups
                   if not later and priority not in (0, 1, 2)]
            if odd:
                # C replays other priorities as NORMAL: make them so, and count them again.
                for function, priority in odd:
                    cursor.execute(self.sql("UPDATE {table} SET priority = 1 WHERE function_name"
                                            " = %s AND when_to_run = 0"
                                            " AND priority IS NOT DISTINCT FROM %s"),
                                   (Text(bytes(function)), priority))
                cursor.execute(self.sql(self.counts_sql))
                groups = cursor.fetchall()
            return highest, groups
        highest, groups = self.read(work)
        due, scheduled = [], {}
        for function, priority, later, count in groups:
            function = bytes(function or b"")
            if later:
                scheduled[function] = scheduled.get(function, 0) + count
            else:
                due.append((function, priority, count))
        return highest, due, list(scheduled.items())

    def page(self, function, priority, after, limit):
        return [(seq, bytes(unique), bytes(data)) for seq, unique, data
                in self.query(self.page_sql, (Text(function), priority, after, limit))]

    def page_scheduled(self, after, limit):
        # when_to_run is an INTEGER: a bound outside its range would be NUMERIC, which
        # the index cannot compare with.
        bound = max(after[0], -2 ** 31 - 1)
        return [(when, seq, bytes(function), bytes(unique), priority, bytes(data))
                for when, seq, function, unique, priority, data
                in self.query(self.page_scheduled_sql, (bound, after[1], limit))]

    def find_row(self, cursor, function, unique):
        cursor.execute(self.sql(self.find_sql), (Text(unique), Text(function)))
        row = cursor.fetchone()
        if row is None:
            return None
        seq, priority, data, when = row
        return seq, priority, bytes(data), when

    def find(self, function, unique):
        return self.read(lambda cursor: self.find_row(cursor, function, unique))

    def find_sequence(self, seq):
        rows = self.query(self.find_sequence_sql, (seq,))
        if not rows:
            return None
        function, unique, priority, data, when = rows[0]
        return bytes(function), bytes(unique), priority, bytes(data), when

    def delete_sequence(self, seq):
        rows = self.query("DELETE FROM {table} WHERE gearmand_seq = %s"
                          " RETURNING function_name, priority, COALESCE(when_to_run, 0)", (seq,))
        if not rows:
            return None
        function, priority, when = rows[0]
        return bytes(function), priority, when

    def delete_function(self, function):
        """One DELETE, which may take longer than statement_timeout (a million rows
        take some 0.6 s; in chunks, ten times as long)."""
        def work(cursor):
            cursor.execute(f"SET LOCAL statement_timeout = {LONG_TIMEOUT_MS}")
            cursor.execute(self.sql("DELETE FROM {table} WHERE function_name = %s"),
                           (Text(function),))
        self.read(work)

    def describe(self, error):
        return first_line(error)

    def replay_cursor(self):
        cursor = self.connection.cursor(name="gearmand_replay")
        cursor.itersize = REPLAY_FETCH
        return cursor


def text(value):
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, memoryview)) \
        else value


def shown(value):
    """A unique or function name as a log message shows it."""
    return repr(bytes(value).decode("utf-8", "backslashreplace"))


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
