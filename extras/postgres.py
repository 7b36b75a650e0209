"""PostgreSQL persistent queue (-q Postgres, also postgresql and libpq), with psycopg2.

C gearmand 1.1.20's table; the differences from C and the timeouts:
docs/backends.md#postgresql. Each write() is one transaction: DELETE ... USING
(VALUES ...) and multi-row INSERT statements, of up to PAGE_SIZE rows each
(psycopg2.extras.execute_values), then COMMIT.
"""
import os

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
    driver_error = psycopg2.Error
    create_sql = ("CREATE TABLE IF NOT EXISTS {table} (unique_key VARCHAR(64), "
                  "function_name VARCHAR(255), priority INTEGER, data BYTEA, "
                  "when_to_run INTEGER, UNIQUE (unique_key, function_name))")
    insert_sql = ("INSERT INTO {table} (unique_key, function_name, priority, data, when_to_run)"
                  " VALUES %s ON CONFLICT (unique_key, function_name) DO UPDATE SET"
                  " priority = EXCLUDED.priority, data = EXCLUDED.data,"
                  " when_to_run = EXCLUDED.when_to_run")
    delete_sql = ("DELETE FROM {table} AS q USING (VALUES %s) AS d (u, f)"
                  " WHERE q.unique_key = d.u AND q.function_name = d.f")

    # With a narrow key: upsert on it, replacing only the same job's row; RETURNING
    # names the rows written, so a job another job's row holds is found missing.
    narrow_insert_sql = ("INSERT INTO {table} AS q (unique_key, function_name, priority, data,"
                         " when_to_run) VALUES %s ON CONFLICT ({key}) DO UPDATE SET"
                         " priority = EXCLUDED.priority, data = EXCLUDED.data,"
                         " when_to_run = EXCLUDED.when_to_run"
                         " WHERE q.unique_key = EXCLUDED.unique_key"
                         " AND q.function_name = EXCLUDED.function_name"
                         " RETURNING unique_key, function_name")

    def __init__(self, table, conninfo, settings, label):
        super().__init__(table, label)
        self.conninfo = conninfo
        self.settings = settings           # keyword arguments added to the conninfo
        self.narrow = None                 # (primary?, constraint, index, columns) or None
        self.full_key = True               # the table has C's key (unique_key, function_name)
        self.notices = []                  # said once at start; the server logs them as WARNINGs

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
                cursor.execute(KEYS_SQL, (self.table,))
                keys = [(primary, text(constraint), text(index), [text(c) for c in columns])
                        for primary, constraint, index, columns in cursor.fetchall()]
            self.connection.commit()
        except psycopg2.Error as error:
            self.drop()
            raise self.error(error) from None
        narrow = [key for key in keys if set(key[3]) < set(JOB_KEY)]
        if not narrow:
            return                 # C's key (or none to upsert on: PostgreSQL says so)
        # A conflict on C's key is one on the narrow key too: that one arbitrates.
        self.narrow = narrow[0]
        self.full_key = any(set(key[3]) == set(JOB_KEY) for key in keys)
        self.notices.append(
            f"{self.label}: table {self.table} has {self.key_name()}, narrower than C"
            f" gearmand's key (unique_key, function_name): a unique can be used by one"
            f" function at a time, and a background job whose unique a queued job of"
            f" another function holds gets QUEUE_ERROR. To key rows as C does:"
            f" {self.widen_sql()}")

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
        # statement_timeout (57014) or lock_timeout (55P03)
        return getattr(error, "pgcode", None) in ("57014", "55P03")

    # -- statements

    def write_batch(self, adds, dones):
        cursor = self.connection.cursor()
        try:
            if dones:
                psycopg2.extras.execute_values(
                    cursor, self.sql(self.delete_sql),
                    [(Text(unique), Text(function)) for unique, function, _ in dones],
                    page_size=PAGE_SIZE)
            if adds:
                # ON CONFLICT cannot touch one row twice in a statement: keep the last.
                rows = {}
                for unique, function, priority, data, when, _ in adds:
                    rows.pop((unique, function), None)
                    rows[unique, function] = (Text(unique), Text(function), priority,
                                              data, when)
                if self.narrow is None:
                    psycopg2.extras.execute_values(cursor, self.sql(self.insert_sql),
                                                   list(rows.values()), page_size=PAGE_SIZE)
                else:
                    self.insert_narrow(cursor, rows)
            self.connection.commit()
        finally:
            cursor.close()

    def insert_narrow(self, cursor, rows):
        """Insert `rows` ({(unique, function): row}) into a table with a narrow key;
        StoreError naming the first job whose key another job's row (or an earlier job
        of these rows) holds."""
        columns = self.narrow[3]
        held = {}                           # narrow key -> the job that takes it first
        for job in rows:
            value = tuple(dict(zip(JOB_KEY, job))[column] for column in columns)
            if held.setdefault(value, job) != job:
                raise self.collision(job, held[value])
        statement = self.narrow_insert_sql.format(table=self.table, key=", ".join(columns))
        written = psycopg2.extras.execute_values(cursor, statement, list(rows.values()),
                                                 page_size=PAGE_SIZE, fetch=True)
        written = {(bytes(unique), bytes(function)) for unique, function in written}
        for job in rows:
            if job not in written:
                cursor.execute(self.sql("SELECT unique_key, function_name FROM {table} WHERE ")
                               + " AND ".join(f"{column} = %s" for column in columns),
                               [Text(dict(zip(JOB_KEY, job))[column]) for column in columns])
                found = cursor.fetchone()
                raise self.collision(job, (bytes(found[0]), bytes(found[1])) if found else None)

    def collision(self, job, other):
        other = ("another job's row" if other is None else
                 f"the row of job (unique {shown(other[0])}, function {shown(other[1])})")
        return StoreError(f"{self.label}: job (unique {shown(job[0])}, function"
                          f" {shown(job[1])}) collides with {other} on the table's"
                          f" {self.key_name()}: with this key a unique can be used by one"
                          f" function at a time (to key rows as C does: {self.widen_sql()})")

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
