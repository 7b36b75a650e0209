"""MySQL / MariaDB persistent queue (-q MySQL, also mysql and libdrizzle), with
mysql-connector-python.

C gearmand 1.1.20's table, plus what paging needs (docs/backends.md#mysql--mariadb):
an invisible AUTO_INCREMENT column gearmand_seq, each row's place in its queue and
its job's handle number (the primary key where the table has none), and two
indexes. C still reads and writes such a table: its statements name their columns.
Each write() is one transaction: multi-row DELETEs by seq (DELETE_KEYS_MAX each) and
multi-row INSERTs, each under max_allowed_packet, then COMMIT. An insert leaves a
stored job's row as it is: the new job joins that one.
"""
import argparse
import binascii
import configparser
import contextlib
import getpass
import os
import re
import time

import mysql.connector
from mysql.connector import constants as mysql_constants
from mysql.connector.optionfiles import MySQLOptionsParser

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import SqlStore, StoreError
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import SqlStore, StoreError

CONNECT_TIMEOUT = 2          # seconds to open a connection
IO_TIMEOUT = 10              # seconds one read or write on the connection may take
STATEMENT_MAX = 4 << 20      # bytes per multi-row statement (less if max_allowed_packet is smaller)
DELETE_KEYS_MAX = 1000       # keys per multi-row DELETE
LONG_TIMEOUT = 600           # seconds for what may take long: ALTER TABLE at start, drop function

# Error numbers that mean the connection is gone (client errors are 2000-2999).
SERVER_GONE = {1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161, 1927, 4031}
LOCK_WAIT_TIMEOUT = 1205     # innodb_lock_wait_timeout passed
COLLISION = 1242             # our ON DUPLICATE KEY guard: the key collates equal to another job's
PARSE_ERROR = 1064
DIAGNOSE_MAX = 1000          # jobs of a batch looked up to name a collision
JOB_KEY = ("unique_key", "function_name")

OPTION_FILES = ("/etc/my.cnf", "/etc/mysql/my.cnf", "~/.my.cnf")
OPTION_GROUPS = ("client", "client-server", "client-mariadb", "gearmand")   # later ones win

# Escapes in option file values; libmariadb keeps an unknown one as it is.
OPTION_ESCAPE = re.compile(r"\\(.)")
OPTION_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "s": " ", '"': '"', "'": "'",
                  "\\": "\\"}

SOCKET_PATHS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock",
                "/var/lib/mysql/mysql.sock", "/tmp/mysql.sock")


def local_socket():
    """The Unix socket libmysqlclient uses for host `localhost`."""
    path = os.environ.get("MYSQL_UNIX_PORT")
    if path:
        return path
    for path in SOCKET_PATHS:
        if os.path.exists(path):
            return path
    return SOCKET_PATHS[0]


def option_file_settings():
    """The options of the MySQL option files' client groups, as a dict."""
    files = [path for path in map(os.path.expanduser, OPTION_FILES) if os.path.isfile(path)]
    if not files:
        return {}
    try:
        settings = MySQLOptionsParser(files=files, keep_dashes=False).get_groups(*OPTION_GROUPS)
    except (ValueError, OSError, configparser.Error):
        # Unreadable for this user (after -u) or not understood: like libmysqlclient,
        # go on without them; the connection says what is missing, if anything is.
        return {}
    return {name: option_value(value) for name, value in settings.items()}


def option_value(text):
    """An option file's value as libmariadb (C gearmand's client library) reads it: a
    leading quote dropped and then a trailing one (of either kind), escapes decoded."""
    if text[:1] in ("'", '"'):
        text = text[1:]
        if text[-1:] in ("'", '"'):
            text = text[:-1]
    return OPTION_ESCAPE.sub(lambda match: OPTION_ESCAPES.get(match[1], match[0]), text)


def shown(value):
    """A unique or function name as a log message shows it."""
    return repr(bytes(value).decode("utf-8", "backslashreplace"))


def text(value):
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) \
        else value


class TableKey:
    """One unique key of the table: its name and [(column, prefix length or None)]."""

    def __init__(self, name, parts):
        self.name = name
        self.parts = parts
        self.columns = {column.lower() for column, _ in parts}

    @property
    def primary(self):
        return self.name == "PRIMARY"

    def on_job_key(self):
        """Made of unique_key and function_name only: an insert of ours can collide on it."""
        return self.columns <= set(JOB_KEY)

    def narrower(self):
        """It holds apart fewer jobs than (unique_key, function_name) does."""
        return self.on_job_key() and (self.columns != set(JOB_KEY)
                                      or any(length for _, length in self.parts))

    def __str__(self):
        columns = ", ".join(column if length is None else f"{column}({length})"
                            for column, length in self.parts)
        return f"PRIMARY KEY ({columns})" if self.primary else f"UNIQUE KEY {self.name} ({columns})"


class MySQLStore(SqlStore):
    """Pages (see gearmand.Pager): each row has a seq, the column gearmand_seq (see
    ensure_paging), and the job's handle number is its row's seq."""

    pages = True
    driver_error = mysql.connector.Error
    create_sql = ("CREATE TABLE {table}(unique_key VARCHAR(64),function_name VARCHAR(255),"
                  "priority INT,data LONGBLOB,when_to_run INT,"
                  "unique key (unique_key, function_name))")
    # %s is the list of rows. A key a stored job holds is left as it is (the new job
    # joins that one: see joined()); the guard makes a key that only collates equal
    # fail (error 1242) instead of joining another job's row.
    insert_sql = ("INSERT INTO {table} (gearmand_seq, unique_key, function_name, priority,"
                  " data, when_to_run) VALUES %s ON DUPLICATE KEY UPDATE"
                  " priority = IF(BINARY unique_key = BINARY VALUES(unique_key)"
                  " AND BINARY function_name = BINARY VALUES(function_name),"
                  " priority, (SELECT 1 UNION SELECT 2))")
    delete_sql = "DELETE FROM {table} WHERE gearmand_seq IN (%s)"
    # With --store-queue-on-shutdown the queue is read whole at start.
    select_sql = ("SELECT IFNULL(unique_key, ''), IFNULL(function_name, ''), priority,"
                  " IFNULL(data, ''), IFNULL(when_to_run, 0), gearmand_seq FROM {table}"
                  " ORDER BY gearmand_seq")
    # Paging. Function names and uniques are compared under the columns' collation,
    # which the indexes follow, and then byte for byte, as jobs are told apart.
    # In the queue index's order, so without a temporary table: GROUP BY BINARY takes
    # one, and three to four times as long, so it counts only where a group's names
    # differ in bytes (`f` and `F` under a case-insensitive collation).
    counts_sql = ("SELECT function_name, priority, COUNT(*), SUM(when_to_run != 0),"
                  " MIN(BINARY function_name) = MAX(BINARY function_name)"
                  " FROM {table} FORCE INDEX (gearmand_queue) GROUP BY function_name, priority")
    names_counts_sql = ("SELECT BINARY function_name, priority, COUNT(*), SUM(when_to_run != 0), 1"
                        " FROM {table} FORCE INDEX (gearmand_queue) GROUP BY 1, 2")
    page_sql = ("SELECT gearmand_seq, IFNULL(unique_key, ''), IFNULL(data, '')"
                " FROM {table} FORCE INDEX (gearmand_queue)"
                " WHERE function_name = %s AND BINARY function_name = BINARY %s"
                " AND priority = %d AND when_to_run = 0 AND gearmand_seq > %d"
                " ORDER BY gearmand_seq LIMIT %d")
    page_scheduled_sql = ("SELECT when_to_run, gearmand_seq, function_name,"
                          " IFNULL(unique_key, ''), priority, IFNULL(data, '')"
                          " FROM {table} FORCE INDEX (gearmand_scheduled) WHERE when_to_run != 0"
                          " AND (when_to_run > %d OR when_to_run = %d AND gearmand_seq > %d)"
                          " ORDER BY when_to_run, gearmand_seq LIMIT %d")
    find_sql = ("SELECT gearmand_seq, priority, IFNULL(data, ''), IFNULL(when_to_run, 0)"
                " FROM {table} WHERE unique_key = %s AND function_name = %s"
                " AND BINARY unique_key = BINARY %s AND BINARY function_name = BINARY %s")
    find_sequence_sql = ("SELECT function_name, IFNULL(unique_key, ''), priority,"
                         " IFNULL(data, ''), IFNULL(when_to_run, 0) FROM {table}"
                         " WHERE gearmand_seq = %d")

    # --cluster: GET_LOCK, connection ids, the database's clock (see gearmand.Lease).
    clusters = True
    try_lock_sql = "SELECT GET_LOCK(%s, 0)"
    unlock_sql = "SELECT RELEASE_LOCK(%s)"
    session_sql = "SELECT CONNECTION_ID()"
    kill_sql = "KILL CONNECTION %s"
    now_sql = "UNIX_TIMESTAMP(NOW(6))"
    share_sql = " LOCK IN SHARE MODE"
    cluster_session_sql = "SET SESSION innodb_lock_wait_timeout = 5"
    page_all_sql = ("SELECT gearmand_seq, function_name, unique_key, priority, data,"
                    " IFNULL(when_to_run, 0) FROM {table} WHERE gearmand_seq > %s"
                    " ORDER BY gearmand_seq LIMIT %s")

    @classmethod
    def open_table(cls, options, table):
        return cls.open(argparse.Namespace(**dict(vars(options), mysql_table=table)))

    def __init__(self, table, settings, where):
        super().__init__(table, f"MySQL queue {where}")
        self.settings = settings           # keyword arguments of mysql.connector.connect
        self.packet_max = STATEMENT_MAX
        self.backslash_escapes = True
        self.keys = []                     # the table's unique keys on our columns
        self.collations = {}               # column -> collation name
        self.notices = []                  # said once at start; the server logs them as WARNINGs

    @classmethod
    def open(cls, options):
        host = options.mysql_host or "localhost"
        defaults = option_file_settings()
        database = options.mysql_db or defaults.get("database", "")
        password = options.mysql_password
        if not (options.mysql_user or password):
            password = defaults.get("password", "")
        settings = dict(user=options.mysql_user or defaults.get("user") or getpass.getuser(),
                        password=password,
                        charset="utf8mb4", collation="utf8mb4_general_ci",
                        use_unicode=False, autocommit=False, use_pure=True,
                        connection_timeout=CONNECT_TIMEOUT, get_warnings=False)
        if "read_timeout" in mysql_constants.DEFAULT_CONFIGURATION:
            settings.update(read_timeout=IO_TIMEOUT, write_timeout=IO_TIMEOUT)
        else:       # before 9.x connection_timeout also bounds every read and write
            settings["connection_timeout"] = IO_TIMEOUT
        if database:
            settings["database"] = database
        if host == "localhost" or host.startswith("/"):
            settings["unix_socket"] = host if host.startswith("/") else \
                defaults.get("socket") or local_socket()
            place = settings["unix_socket"]
        else:
            settings.update(host=host, port=options.mysql_port)
            place = f"{host}:{options.mysql_port}"
        where = f"{settings['user']}@{place}/{database}"
        store = cls(options.mysql_table, settings, where)
        if not database and "." not in store.table:
            raise StoreError("MySQL queue: missing --mysql-db (the database of the queue table)")
        store.setup()
        return store

    # -- connection

    def connect(self):
        connection = mysql.connector.connect(**self.settings)
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT @@max_allowed_packet, @@sql_mode")
            packet_max, sql_mode = cursor.fetchone()
            cursor.close()
            connection.commit()
        except BaseException:
            connection.close()
            raise
        self.packet_max = max(64 << 10, int(packet_max) - 8192)
        self.backslash_escapes = b"NO_BACKSLASH_ESCAPES" not in bytes(sql_mode or b"")
        return connection

    def table_exists(self, cursor):
        schema, _, name = self.table.rpartition(".")
        cursor.execute("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
                       + ("%s" if schema else "DATABASE()") + " AND TABLE_NAME = %s",
                       (schema, name) if schema else (name,))
        found = cursor.fetchone() is not None
        cursor.fetchall()
        return found

    def setup(self):
        super().setup()
        try:
            cursor = self.connection.cursor()
            try:
                indexes, columns = self.read_keys(cursor)
                with self.patience():
                    self.ensure_paging(cursor, indexes, columns)
                    # C reads a NULL when_to_run (tables older than gearmand 0.22) as 0.
                    cursor.execute(self.sql("UPDATE {table} SET when_to_run = 0"
                                            " WHERE when_to_run IS NULL"))
            finally:
                cursor.close()
            self.connection.commit()
        except mysql.connector.Error as error:
            self.disconnect()
            raise self.error(error) from None
        narrow = self.narrow_key()
        if narrow is not None:
            self.notices.append(
                f"{self.label}: table {self.table} has {narrow}, narrower than C gearmand's"
                f" key (unique_key, function_name): a unique can be used by one function at"
                f" a time, and a background job whose unique a queued job of another"
                f" function holds gets QUEUE_ERROR. To key rows as C does: {self.widen_sql()}")

    def ensure_paging(self, cursor, indexes, columns):
        """Give C's table (or a hand-made one) what paging needs, once: the column
        gearmand_seq, the job's place in its queue, and the indexes the pages are read
        from. C's INSERT names its five columns, so its rows get AUTO_INCREMENT
        values, after ours (an explicit value moves the counter past it); INVISIBLE
        keeps the column out of SELECT * and of an INSERT without a column list.
        Existing rows are numbered in the order ALTER TABLE copies them, InnoDB's
        clustered order: insertion order (its hidden row id) where the table has no
        primary key, as C's has not; else the key's order, which C replays in too.
        The seq becomes the primary key where there is none, so that C's un-ORDERed
        replay reads in it too."""
        changes = []
        if "gearmand_seq" not in columns:
            changes.append("ADD COLUMN gearmand_seq BIGINT NOT NULL AUTO_INCREMENT INVISIBLE")
            changes.append("ADD UNIQUE KEY gearmand_seq (gearmand_seq)" if "primary" in indexes
                           else "ADD PRIMARY KEY (gearmand_seq)")
        if "gearmand_queue" not in indexes:
            changes.append("ADD INDEX gearmand_queue (function_name, priority, when_to_run,"
                           " gearmand_seq)")
        if "gearmand_scheduled" not in indexes:
            changes.append("ADD INDEX gearmand_scheduled (when_to_run, gearmand_seq)")
        if not changes:
            return
        statement = self.sql("ALTER TABLE {table} ") + ", ".join(changes)
        try:
            cursor.execute(statement)
        except mysql.connector.Error as error:
            if getattr(error, "errno", None) != PARSE_ERROR or " INVISIBLE" not in statement:
                raise
            # Before MariaDB 10.3 and MySQL 8.0.23 a column cannot be invisible.
            cursor.execute(statement.replace(" INVISIBLE", ""))

    def read_keys(self, cursor):
        """The table's unique keys made of unique_key and function_name only, and the
        collations of those columns. Returns the names of all its indexes and of all
        its columns, in lower case."""
        schema, _, name = self.table.rpartition(".")
        where = (" WHERE TABLE_SCHEMA = " + ("%s" if schema else "DATABASE()")
                 + " AND TABLE_NAME = %s")
        params = (schema, name) if schema else (name,)
        cursor.execute("SELECT INDEX_NAME, COLUMN_NAME, SUB_PART, NON_UNIQUE"
                       " FROM information_schema.STATISTICS" + where
                       + " ORDER BY INDEX_NAME = 'PRIMARY' DESC, INDEX_NAME, SEQ_IN_INDEX", params)
        parts = {}
        indexes = set()
        for index, column, length, non_unique in cursor.fetchall():
            indexes.add(text(index).lower())
            if not int(non_unique):
                parts.setdefault(text(index), []).append((text(column), length))
        self.keys = [key for key in (TableKey(index, columns) for index, columns in parts.items())
                     if key.on_job_key()]
        cursor.execute("SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS"
                       + where, params)
        self.collations = {text(column).lower(): text(collation)
                           for column, collation in cursor.fetchall()}
        return indexes, set(self.collations)

    def narrow_key(self):
        return next((key for key in self.keys if key.narrower()), None)

    def widen_sql(self):
        """The ALTER TABLE that gives the table C's key in place of its narrow ones."""
        drops = ["DROP PRIMARY KEY" if key.primary else f"DROP INDEX `{key.name}`"
                 for key in self.keys if key.narrower()]
        if not any(not key.narrower() for key in self.keys):
            primary = any(key.primary and key.narrower() for key in self.keys)
            drops.append(("ADD PRIMARY KEY" if primary else "ADD UNIQUE KEY")
                         + " (unique_key, function_name)")
        return f"ALTER TABLE {self.table} " + ", ".join(drops)

    def collision(self, cursor, adds):
        """StoreError for error 1242 (our guard): which job collides with which row,
        on which key, and why. Looks the jobs up in the table, in order."""
        for unique, function, *_ in adds[:DIAGNOSE_MAX]:
            for key in sorted(self.keys, key=lambda key: not key.narrower()):
                found = self.colliding_row(cursor, key, unique, function)
                if found is not None:
                    return StoreError(f"{self.label}: job (unique {shown(unique)}, function"
                                      f" {shown(function)}) collides with the row of job (unique"
                                      f" {shown(found[0])}, function {shown(found[1])}) on the"
                                      f" table's {key}: "
                                      + self.why(key, (unique, function), found))
        # Not in the table: the statement that failed held both jobs.
        for key in self.keys:
            columns = [JOB_KEY.index(column.lower()) for column, length in key.parts
                       if length is None]
            if len(columns) < len(key.parts):
                continue                        # a prefix: no telling in Python
            held = {}
            for job in adds:
                job = tuple(job[:2])
                first = held.setdefault(tuple(job[i] for i in columns), job)
                if first != job:
                    return StoreError(f"{self.label}: job (unique {shown(job[0])}, function"
                                      f" {shown(job[1])}) collides with job (unique"
                                      f" {shown(first[0])}, function {shown(first[1])}) of the"
                                      f" same batch on the table's {key}: "
                                      + self.why(key, job, first))
        # Or the seq of a job is another row's (a row this server did not write).
        taken = self.seq_holders(cursor, adds[:DIAGNOSE_MAX])
        if taken:
            (unique, function), row = taken[0]
            return StoreError(f"{self.label}: job (unique {shown(unique)}, function"
                              f" {shown(function)}) cannot take its seq: the row of job (unique"
                              f" {shown(row[0])}, function {shown(row[1])}) holds it (a row"
                              f" that this server did not write)")
        return StoreError(f"{self.label}: {self.describe_collision()}")

    def seq_holders(self, cursor, adds):
        """[((unique, function) of a job, (unique, function) of the other job's row that
        holds its seq)]."""
        jobs = {seq: (unique, function) for unique, function, _, _, _, seq in adds}
        try:
            cursor.execute(self.sql("SELECT gearmand_seq, unique_key, function_name FROM {table}"
                                    " WHERE gearmand_seq IN (").encode()
                           + b",".join(b"%d" % seq for seq in jobs) + b")")
            rows = cursor.fetchall()
        except mysql.connector.Error:
            return []                       # the error already being reported says enough
        return [(jobs[seq], (bytes(unique or b""), bytes(function or b"")))
                for seq, unique, function in rows
                if (bytes(unique or b""), bytes(function or b"")) != jobs[seq]]

    def colliding_row(self, cursor, key, unique, function):
        """The row that (unique, function) would take the place of on `key`, if it is
        another job's; None if there is none."""
        literals = {"unique_key": self.key_literal(unique),
                    "function_name": self.key_literal(function)}
        conditions = [b"%s = %s" % (column.encode(), literals[column.lower()]) if length is None
                      else b"LEFT(%s, %d) = LEFT(%s, %d)" % (column.encode(), length,
                                                             literals[column.lower()], length)
                      for column, length in key.parts]
        statement = (self.sql("SELECT unique_key, function_name FROM {table} WHERE ").encode()
                     + b" AND ".join(conditions)
                     + b" AND NOT (BINARY unique_key = BINARY %s AND BINARY function_name ="
                       b" BINARY %s) LIMIT 1" % (literals["unique_key"],
                                                 literals["function_name"]))
        try:
            cursor.execute(statement)
            row = cursor.fetchone()
            cursor.fetchall()
        except mysql.connector.Error:
            return None                     # the error already being reported says enough
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def why(self, key, job, row):
        reasons = []
        if job[1] != row[1] and "function_name" not in key.columns:
            reasons.append("with this key a unique can be used by one function at a time"
                           f" (to key rows as C does: {self.widen_sql()})")
        lengths = {column.lower(): length for column, length in key.parts}
        for column, mine, theirs in zip(JOB_KEY, job, row):
            if mine != theirs and column in key.columns:
                prefix = f" over its first {lengths[column]} characters" if lengths[column] else ""
                reasons.append(f"the collation of {column} ({self.collations.get(column, '?')})"
                               f"{prefix} compares the two equal")
        return "; ".join(reasons) or "the key holds one row for both"

    def describe_collision(self):
        keys = ", ".join(map(str, self.keys)) or "unique key"
        narrow = self.narrow_key()
        why = ("under its collation, or because with the narrow key a unique can be used by"
               " one function at a time") if narrow else "under its case-insensitive collation"
        return f"a job of the batch collides with another job's row on the table's {keys} {why}"

    def lost(self, error):
        """True if `error` means the connection (or the server) is gone."""
        errno = getattr(error, "errno", None) or -1
        return (errno < 0 or 2000 <= errno < 3000 or errno in SERVER_GONE
                or not isinstance(error, mysql.connector.DatabaseError))   # interface, timeouts

    def blocked(self, error):
        # A lock wait past its timeout, the table gone, full, or the server read-only.
        return getattr(error, "errno", None) in (LOCK_WAIT_TIMEOUT, 1146, 1114, 1290)

    def describe(self, error):
        if getattr(error, "errno", None) == COLLISION:
            return self.describe_collision()
        if type(error).__name__.endswith("TimeoutError"):
            return f"timed out ({type(error).__name__})"
        message = " ".join(str(getattr(error, "msg", None) or error).split())
        return f"{message} ({error.errno})" if getattr(error, "errno", None) else message

    # -- statements

    def key_literal(self, value):
        return b"_utf8mb4 X'" + binascii.hexlify(value) + b"'"

    def data_literal(self, data):
        if self.backslash_escapes:
            data = data.replace(b"\\", b"\\\\").replace(b"'", b"\\'").replace(b"\0", b"\\0")
        else:
            data = data.replace(b"'", b"''")
        return b"_binary'" + data + b"'"

    def statements(self, template, rows, rows_max):
        """Yield (`template` % (rows joined by commas), how many rows), each under
        max_allowed_packet."""
        template = self.sql(template).encode()
        budget = min(self.packet_max, STATEMENT_MAX) - len(template)
        chunk, size = [], 0
        for row in rows:
            if len(row) > self.packet_max - len(template):
                raise StoreError(f"{self.label}: a job of {len(row)} bytes exceeds "
                                 f"max_allowed_packet")
            if chunk and (size + len(row) + 1 > budget or len(chunk) >= rows_max):
                yield template % b",".join(chunk), len(chunk)
                chunk, size = [], 0
            chunk.append(row)
            size += len(row) + 1
        if chunk:
            yield template % b",".join(chunk), len(chunk)

    def write_batch(self, adds, dones):
        key = self.key_literal
        joins = {}
        cursor = self.connection.cursor()
        try:
            self.check_fence(cursor)
            if dones:
                rows = (b"%d" % seq for _, _, seq in dones)
                for statement, _ in self.statements(self.delete_sql, rows, DELETE_KEYS_MAX):
                    cursor.execute(statement)
            if adds:
                rows = (b"(%d,%s,%s,%d,%s,%d)" % (seq, key(unique), key(function), priority,
                                                  self.data_literal(data), when)
                        for unique, function, priority, data, when, seq in adds)
                done = 0
                for statement, count in self.statements(self.insert_sql, rows, len(adds)):
                    try:
                        cursor.execute(statement)
                    except mysql.connector.Error as error:
                        if getattr(error, "errno", None) != COLLISION:
                            raise
                        raise self.collision(cursor, adds) from None
                    # An insert counts 1, a key left as it was 0 (no CLIENT_FOUND_ROWS).
                    if cursor.rowcount != count:
                        joins.update(self.joined(cursor, adds[done:done + count]))
                    done += count
            self.connection.commit()
        finally:
            cursor.close()
        return joins

    def joined(self, cursor, chunk):
        """{seq: seq of the stored row} for the jobs of `chunk` whose key a stored job
        held, so that they were not inserted."""
        cursor.execute(self.sql("SELECT gearmand_seq FROM {table} WHERE gearmand_seq IN (")
                       .encode() + b",".join(b"%d" % row[5] for row in chunk) + b")")
        inserted = {seq for seq, in cursor.fetchall()}
        joins = {}
        for unique, function, _, _, _, seq in chunk:
            if seq in inserted:
                continue                # ours (written before, if a retry wrote it again)
            found = self.find_row(cursor, function, unique)
            if found is None:
                raise StoreError(f"{self.label}: the table refused the job (unique"
                                 f" {shown(unique)}, function {shown(function)}) without"
                                 f" naming a row that holds its key")
            joins[seq] = found[0]
        return joins

    # -- paging: reads run in the writer thread, between its writes (see read())

    def query(self, cursor, statement):
        cursor.execute(statement if isinstance(statement, bytes) else statement.encode())
        return cursor.fetchall()

    def groups(self, cursor):
        """[(function, priority, rows, of which scheduled)]."""
        groups = self.query(cursor, self.sql(self.counts_sql))
        if not all(alike for *_, alike in groups):
            groups = self.query(cursor, self.sql(self.names_counts_sql))
        return [(bytes(function or b""), priority, count, int(later))
                for function, priority, count, later, _ in groups]

    def counts(self):
        def work(cursor):
            # Epoch jobs due already take their place in the FIFO, as C's replay queues them.
            cursor.execute(self.sql("UPDATE {table} SET when_to_run = 0 WHERE when_to_run <> 0"
                                    " AND when_to_run <= %s"), (int(time.time()),))
            highest = self.query(cursor, self.sql("SELECT MAX(gearmand_seq) FROM {table}"))
            groups = self.groups(cursor)
            odd = [(function, priority) for function, priority, count, later in groups
                   if count > later and priority not in (0, 1, 2)]
            if odd:
                # C replays other priorities as NORMAL: make them so, and count them again.
                for function, priority in odd:
                    cursor.execute(self.sql("UPDATE {table} SET priority = 1 WHERE"
                                            " function_name = ").encode()
                                   + self.key_literal(function)
                                   + b" AND BINARY function_name = BINARY "
                                   + self.key_literal(function)
                                   + b" AND when_to_run = 0 AND priority <=> "
                                   + (b"NULL" if priority is None else b"%d" % priority))
                groups = self.groups(cursor)
            return highest[0][0] or 0, groups
        highest, groups = self.read(work)
        due, scheduled = [], {}
        for function, priority, count, later in groups:
            if later:
                scheduled[function] = scheduled.get(function, 0) + later
            if count > later:
                due.append((function, priority, count - later))
        return highest, due, list(scheduled.items())

    def page(self, function, priority, after, limit):
        name = self.key_literal(function)
        statement = self.sql(self.page_sql).encode() % (name, name, priority, after, limit)
        return [(seq, bytes(unique), bytes(data))
                for seq, unique, data in self.read(lambda cursor: self.query(cursor, statement))]

    def page_scheduled(self, after, limit):
        when, seq = after
        when = max(when, -2 ** 63)
        statement = self.sql(self.page_scheduled_sql).encode() % (when, when, seq, limit)
        return [(when, seq, bytes(function), bytes(unique), priority, bytes(data))
                for when, seq, function, unique, priority, data
                in self.read(lambda cursor: self.query(cursor, statement))]

    def find_row(self, cursor, function, unique):
        unique, function = self.key_literal(unique), self.key_literal(function)
        rows = self.query(cursor, self.sql(self.find_sql).encode()
                          % (unique, function, unique, function))
        if not rows:
            return None
        seq, priority, data, when = rows[0]
        return seq, priority, bytes(data), when

    def find(self, function, unique):
        return self.read(lambda cursor: self.find_row(cursor, function, unique))

    def find_sequence(self, seq):
        rows = self.read(lambda cursor: self.query(cursor, self.sql(self.find_sequence_sql)
                                                   % seq))
        if not rows:
            return None
        function, unique, priority, data, when = rows[0]
        return bytes(function), bytes(unique), priority, bytes(data), when

    def delete_sequence(self, seq):
        def work(cursor):
            rows = self.query(cursor, self.sql("SELECT function_name, priority,"
                                               " IFNULL(when_to_run, 0) FROM {table}"
                                               " WHERE gearmand_seq = %d FOR UPDATE") % seq)
            cursor.execute(self.sql("DELETE FROM {table} WHERE gearmand_seq = %d") % seq)
            return rows
        rows = self.read(work)
        if not rows:
            return None
        function, priority, when = rows[0]
        return bytes(function), priority, when

    def delete_function(self, function):
        """One DELETE, which may take longer than IO_TIMEOUT: a million rows take
        InnoDB some 6 s (in chunks, about twice as long)."""
        name = self.key_literal(function)
        statement = (self.sql("DELETE FROM {table} WHERE function_name = %s AND BINARY"
                              " function_name = BINARY %s").encode() % (name, name))

        def work(cursor):
            with self.patience():
                cursor.execute(statement)
        self.read(work)

    @contextlib.contextmanager
    def patience(self):
        """Statements that may take longer than IO_TIMEOUT: an ALTER TABLE that
        rebuilds a big table (a million rows take some 15 s), a drop function."""
        connection = self.connection
        longer = hasattr(type(connection), "read_timeout")     # mysql-connector 9.x
        if longer:
            connection.read_timeout = LONG_TIMEOUT
        try:
            yield
        finally:
            if longer:
                connection.read_timeout = IO_TIMEOUT
