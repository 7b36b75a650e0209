"""MySQL / MariaDB persistent queue (-q MySQL, also mysql and libdrizzle), with
mysql-connector-python.

The table is C gearmand 1.1.20's, so either server replays what the other wrote.
Each write() is one transaction: multi-row DELETEs (DELETE_KEYS_MAX keys each)
and multi-row INSERTs, each under max_allowed_packet, then COMMIT.

Differences from C, on purpose:
* INSERT ... ON DUPLICATE KEY UPDATE, so a row left over from an earlier run
  (same unique and function, byte for byte) never refuses a new job. A row whose
  key only *collates* equal (the columns are case-insensitive: `abc` and `ABC`,
  or `a` and `a `) is another live job: that insert fails, as it does in C, so
  its client gets ERROR instead of silently sharing the row.
* Empty data is stored as an empty LONGBLOB rather than NULL (C reads both).
* Replay reads the table with an un-ORDERed SELECT as C does. InnoDB has no
  usable clustered key in this schema (the unique key is nullable), so it scans
  by its hidden row id: insertion order, which is the FIFO order we want.

As C does (libmysqlclient with the default group `gearmand`), the MySQL option
files /etc/my.cnf, /etc/mysql/my.cnf and ~/.my.cnf supply, from their [client]
and [gearmand] groups, the user and database that the command line leaves out
and the socket of host `localhost`. Unlike C, which passes an empty password
when --mysql-password is not given, the password there goes with the user there:
it is used when neither --mysql-user nor --mysql-password is given.
"""
import binascii
import configparser
import getpass
import os
import re

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

# Error numbers that mean the connection is gone (client errors are 2000-2999).
SERVER_GONE = {1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161, 1927, 4031}
LOCK_WAIT_TIMEOUT = 1205     # innodb_lock_wait_timeout passed
COLLISION = 1242             # our ON DUPLICATE KEY guard: the key collates equal to another job's

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


class MySQLStore(SqlStore):
    driver_error = mysql.connector.Error
    create_sql = ("CREATE TABLE {table}(unique_key VARCHAR(64),function_name VARCHAR(255),"
                  "priority INT,data LONGBLOB,when_to_run INT,"
                  "unique key (unique_key, function_name))")
    # %s is the list of rows. The guard makes a key that only collates equal fail
    # (error 1242) instead of overwriting another job's row.
    insert_sql = ("INSERT INTO {table} (unique_key, function_name, priority, data, when_to_run)"
                  " VALUES %s ON DUPLICATE KEY UPDATE"
                  " priority = IF(BINARY unique_key = BINARY VALUES(unique_key)"
                  " AND BINARY function_name = BINARY VALUES(function_name),"
                  " VALUES(priority), (SELECT 1 UNION SELECT 2)),"
                  " data = VALUES(data), when_to_run = VALUES(when_to_run)")
    delete_sql = "DELETE FROM {table} WHERE (unique_key, function_name) IN (%s)"

    def __init__(self, table, settings, where):
        super().__init__(table, f"MySQL queue {where}")
        self.settings = settings           # keyword arguments of mysql.connector.connect
        self.packet_max = STATEMENT_MAX
        self.backslash_escapes = True

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

    def lost(self, error):
        """True if `error` means the connection (or the server) is gone."""
        errno = getattr(error, "errno", None) or -1
        return (errno < 0 or 2000 <= errno < 3000 or errno in SERVER_GONE
                or not isinstance(error, mysql.connector.DatabaseError))   # interface, timeouts

    def blocked(self, error):
        return getattr(error, "errno", None) == LOCK_WAIT_TIMEOUT

    def describe(self, error):
        if getattr(error, "errno", None) == COLLISION:
            return ("(unique, function) collides with a stored job's under the table's "
                    "case-insensitive collation")
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
        """Yield `template` % (rows joined by commas), each under max_allowed_packet."""
        template = self.sql(template).encode()
        budget = min(self.packet_max, STATEMENT_MAX) - len(template)
        chunk, size = [], 0
        for row in rows:
            if len(row) > self.packet_max - len(template):
                raise StoreError(f"{self.label}: a job of {len(row)} bytes exceeds "
                                 f"max_allowed_packet")
            if chunk and (size + len(row) + 1 > budget or len(chunk) >= rows_max):
                yield template % b",".join(chunk)
                chunk, size = [], 0
            chunk.append(row)
            size += len(row) + 1
        if chunk:
            yield template % b",".join(chunk)

    def write_batch(self, adds, dones):
        key = self.key_literal
        cursor = self.connection.cursor()
        try:
            if dones:
                rows = (b"(%s,%s)" % (key(unique), key(function)) for unique, function in dones)
                for statement in self.statements(self.delete_sql, rows, DELETE_KEYS_MAX):
                    cursor.execute(statement)
            if adds:
                rows = (b"(%s,%s,%d,%s,%d)" % (key(unique), key(function), priority,
                                               self.data_literal(data), when)
                        for unique, function, priority, data, when in adds)
                for statement in self.statements(self.insert_sql, rows, len(adds)):
                    cursor.execute(statement)
            self.connection.commit()
        finally:
            cursor.close()
