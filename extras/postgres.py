"""PostgreSQL persistent queue (-q Postgres, also postgresql and libpq), with psycopg2.

The table is C gearmand 1.1.20's, so either server replays what the other wrote.
Each write() is one transaction: DELETE ... USING (VALUES ...) and multi-row
INSERT statements, of up to PAGE_SIZE rows each (psycopg2.extras.execute_values),
then COMMIT.

Differences from C, on purpose:
* INSERT ... ON CONFLICT DO UPDATE, so a row left over from an earlier run never
  refuses a new job.
* Replay keeps priority and when_to_run (C 1.1.20 reads them as text from a
  binary result and replays every job as HIGH, due now).
* Empty data is stored as an empty BYTEA rather than NULL (C reads both); keys
  are escaped (C's DELETE fails on a quote in the unique or function).
* Unique and function go to the server as the bytes the client sent, in the
  connection's client encoding, exactly as libpq sends C's text parameters.
* Replay is an un-ORDERed SELECT, as in C. There is no rowid, so the order is the
  heap's: insertion order until deleted space is reused, not guaranteed.
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

    def __init__(self, table, conninfo, settings, label):
        super().__init__(table, label)
        self.conninfo = conninfo
        self.settings = settings           # keyword arguments added to the conninfo

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
                    [(Text(unique), Text(function)) for unique, function in dones],
                    page_size=PAGE_SIZE)
            if adds:
                # ON CONFLICT cannot touch one row twice in a statement: keep the last.
                rows = {}
                for unique, function, priority, data, when in adds:
                    rows.pop((unique, function), None)
                    rows[unique, function] = (Text(unique), Text(function), priority,
                                              data, when)
                psycopg2.extras.execute_values(cursor, self.sql(self.insert_sql),
                                               list(rows.values()), page_size=PAGE_SIZE)
            self.connection.commit()
        finally:
            cursor.close()

    def describe(self, error):
        return first_line(error)

    def replay_cursor(self):
        cursor = self.connection.cursor(name="gearmand_replay")
        cursor.itersize = REPLAY_FETCH
        return cursor


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
