"""memcached persistent queue (-q libmemcached), with pymemcache.

NOT DURABLE: memcached evicts items and forgets them on restart. Records (C's),
replay, several servers and the differences from C: docs/backends.md#memcached.

A write() is two round trips: the deletes of finished jobs, then the sets of new
ones. For a job C's key cannot describe (an epoch time, a `-` in the function, a
key cut at 250 bytes) a companion item `gearmand.py-extra:<prefix>:<sha1 of the
key>` holds `<function>\\0<unique>\\0<when>`; C never reads it.
"""
import collections
import hashlib
import socket
import time
import urllib.parse

from pymemcache.client.base import Client
from pymemcache.exceptions import (MemcacheClientError, MemcacheError, MemcacheServerError,
                                   MemcacheUnexpectedCloseError)

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import ReconnectingStore, StoreError
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import ReconnectingStore, StoreError

KEY_MAX = 250                # memcached's key limit; C cuts its keys there
SOCKET_TIMEOUT = 2.0         # seconds a connect, or one reply, may take
GET_KEYS = 100               # keys per `get` during replay
DEFAULT_PORT = 11211


class FlagsSerde:
    """Values are (bytes, flags): the flags carry the priority, as in C."""

    def serialize(self, key, value):
        return value

    def deserialize(self, key, value, flags):
        return value, flags


def parse_servers(text):
    """The servers of a libmemcached list (`host:port,host2 ...`), as addresses."""
    return [parse_server(entry) for entry in text.replace(" ", ",").split(",") if entry]


def parse_server(entry):
    if entry.startswith("/"):
        return entry                      # a Unix socket
    if entry.startswith("["):             # [v6 address]:port
        host, _, rest = entry[1:].partition("]")
        port = rest[1:].split(":")[0] if rest.startswith(":") else ""
    elif entry.count(":") > 2:            # a bare IPv6 address
        host, port = entry, ""
    else:                                 # host, host:port or host:port:weight
        host, _, rest = entry.partition(":")
        port = rest.split(":")[0]
    if port and not port.isdigit():
        raise StoreError(f"libmemcached queue: bad port in --libmemcached-servers: {entry}")
    return host or "localhost", int(port) if port else DEFAULT_PORT


def one_at_a_time(key):
    """libmemcached's default key hash (Jenkins' one-at-a-time over signed chars)."""
    value = 0
    for byte in key:
        value = (value + (byte if byte < 128 else byte + 0xFFFFFF00)) & 0xFFFFFFFF
        value = (value + (value << 10)) & 0xFFFFFFFF
        value ^= value >> 6
    value = (value + (value << 3)) & 0xFFFFFFFF
    value ^= value >> 11
    return (value + (value << 15)) & 0xFFFFFFFF


def address_text(server):
    return server if isinstance(server, str) else "%s:%d" % server


class MemcachedStore(ReconnectingStore):
    durable = False         # memcached evicts items under pressure and forgets all on restart
    driver_error = (MemcacheError, OSError)

    def __init__(self, servers, prefix):
        self.where = ",".join(address_text(server) for server in servers)
        super().__init__(f"memcached {self.where}")
        self.servers = servers
        self.prefix = prefix
        # A namespace that never starts with the prefix, so C's replay skips it.
        extra = b"gearmand.py-extra:" + prefix + b":"
        self.extra = extra if not extra.startswith(prefix) else b"#" + extra
        self.clients = [Client(server, serde=FlagsSerde(), connect_timeout=SOCKET_TIMEOUT,
                               timeout=SOCKET_TIMEOUT, no_delay=True, default_noreply=False)
                        for server in servers]
        self.connection = self.clients    # each connects on demand

    @classmethod
    def open(cls, options):
        servers = parse_servers(options.libmemcached_servers or "")
        if not servers:
            raise StoreError("libmemcached queue: missing --libmemcached-servers "
                             "(for example --libmemcached-servers=127.0.0.1:11211)")
        prefix = (options.libmemcached_prefix or "").encode("utf-8", "surrogateescape")
        if not prefix or len(prefix.split()) > 1 or prefix != prefix.strip() or len(prefix) > 180:
            raise StoreError("libmemcached queue: --libmemcached-prefix must be 1 to 180 bytes "
                             "without spaces")
        store = cls(servers, prefix)
        for server, client in zip(servers, store.clients):
            try:
                client.version()
            except (MemcacheError, OSError) as error:
                store.close()
                raise StoreError(f"libmemcached queue: cannot use memcached at "
                                 f"{address_text(server)}: {describe(error)}") from error
        return store

    def client_for(self, key):
        clients = self.clients
        if len(clients) == 1:
            return clients[0]
        return clients[one_at_a_time(key) % len(clients)]

    def key(self, function, unique):
        return (self.prefix + function + b"-" + unique)[:KEY_MAX]

    def extra_key(self, key):
        return self.extra + hashlib.sha1(key).hexdigest().encode()

    # -- writing

    def connect(self):
        return self.clients               # each makes a new connection on demand

    def disconnect(self):
        for client in self.clients:
            client.close()
        self.connection = None

    def lost(self, error):
        return (isinstance(error, (MemcacheUnexpectedCloseError, OSError))
                or not isinstance(error, (MemcacheClientError, MemcacheServerError)))

    def rollback(self):
        # A key refused (spaces, control bytes) or an item too large may leave a
        # reply unread: start the next batch on fresh connections.
        for client in self.clients:
            client.close()

    def describe(self, error):
        return describe(error)

    def ping(self):
        for client in self.clients:
            client.version()

    def write_batch(self, adds, dones):
        """Delete the finished jobs' items, then set the new ones: two round trips
        to each server concerned."""
        deletes = collections.defaultdict(list)
        for unique, function, _ in dones:
            key = self.key(function, unique)
            deletes[self.client_for(key)].append(key)
            extra_key = self.extra_key(key)
            deletes[self.client_for(extra_key)].append(extra_key)
        for client, keys in deletes.items():
            client.delete_many(keys)
        sets = collections.defaultdict(dict)
        for unique, function, priority, data, when, _ in adds:
            key = self.key(function, unique)
            sets[self.client_for(key)][key] = (data, priority)
            cut = len(self.prefix) + len(function) + 1 + len(unique) > KEY_MAX
            if when or b"-" in function or cut:
                extra_key = self.extra_key(key)
                sets[self.client_for(extra_key)][extra_key] = \
                    (b"%s\0%s\0%d" % (function, unique, when), 0)
        for client, values in sets.items():
            failed = client.set_many(values)
            if failed:
                raise StoreError(f"memcached {self.where}: not stored: {failed[0]!r}")

    # -- replay

    def replay(self):
        try:
            yield from self.read_all()
        except (MemcacheError, OSError, ValueError) as error:
            raise StoreError(f"memcached {self.where}: {describe(error)}") from error

    def read_all(self):
        listed = {}                       # key -> the client of the server that lists it
        for server, client in zip(self.servers, self.clients):
            listed.update(dict.fromkeys(list_keys(server), client))
        extras = {}                       # job key -> (function, unique, when, companion key)
        companions = [(key, client) for key, client in listed.items()
                      if key.startswith(self.extra)]
        for extra_key, (value, _) in self.get_many(companions):
            parts = value.split(b"\0")
            if len(parts) == 3 and parts[2].isdigit():
                key = self.key(parts[0], parts[1])
                if self.extra_key(key) == extra_key:
                    extras[key] = (parts[0], parts[1], int(parts[2]), extra_key)
        # A companion also finds a job that a capped listing left out.
        keys = [(key, client) for key, client in listed.items() if key.startswith(self.prefix)]
        keys += [(key, self.client_for(key)) for key in extras if key not in listed]
        found = set()
        for key, (data, flags) in self.get_many(keys):
            found.add(key)
            if key in extras:
                function, unique, when, _ = extras[key]
            else:
                function, dash, unique = key[len(self.prefix):].partition(b"-")
                if not dash:
                    continue
                when = 0
            yield (unique, function, flags if flags in (0, 1, 2) else 1, data, when, 0)
        for key, extra in extras.items():
            if key not in found:
                listed.get(extra[3], self.client_for(extra[3])).delete(extra[3])

    def get_many(self, pairs):
        """Yield (key, (value, flags)) for those of the (key, client) pairs whose
        server still has the key."""
        by_client = collections.defaultdict(list)
        for key, client in pairs:
            by_client[client].append(key)
        for client, keys in by_client.items():
            for start in range(0, len(keys), GET_KEYS):
                yield from client.get_many(keys[start:start + GET_KEYS]).items()

    def close(self):
        for client in self.clients:
            client.close()


def list_keys(server):
    """Every key a memcached server holds (one connection of its own, as it may take
    a while)."""
    if isinstance(server, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(server)
    else:
        sock = socket.create_connection(server, SOCKET_TIMEOUT)
    with sock:
        sock.settimeout(10 * SOCKET_TIMEOUT)
        lines = Lines(sock)
        for _ in range(20):
            keys = lines.command(b"lru_crawler metadump all")
            if keys is not None:
                return {urllib.parse.unquote_to_bytes(line.split(b" ", 1)[0][4:])
                        for line in keys if line.startswith(b"key=")}
            if not lines.busy:
                break
            time.sleep(0.05)          # another crawl is running
        # memcached older than 1.4.31, or its LRU crawler is off: C's way.
        slabs = {line.split(b":")[1] for line in lines.command(b"stats items") or ()
                 if line.startswith(b"STAT items:")}
        keys = set()
        for slab in sorted(slabs, key=int):
            for line in lines.command(b"stats cachedump %s 0" % slab) or ():
                if line.startswith(b"ITEM "):
                    keys.add(line[5:].rsplit(b" [", 1)[0])
        return keys


class Lines:
    """Line replies of memcached's text protocol on a plain socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""
        self.busy = False

    def command(self, line):
        """Send `line`; return the reply's lines before END, or None on an error reply."""
        self.sock.sendall(line + b"\r\n")
        lines = []
        while True:
            reply = self.readline()
            if reply == b"END":
                return lines
            if reply.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR", b"BUSY")):
                self.busy = reply.startswith(b"BUSY")
                return None
            lines.append(reply)

    def readline(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("memcached closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")


def describe(error):
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."
