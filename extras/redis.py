"""Redis persistent queue (-q redis), with redis-py.

C gearmand 1.1.20's keys and hashes; the differences from C and outages:
docs/backends.md#redis.

Each write() is one Lua script (EVALSHA; redis-py loads it first where Redis
lacks it), which Redis runs with no other command in between: it deletes the
finished jobs, then stores the new ones. The index hash `gearmand.py-index:<prefix>`
has a field per job of ours: its submission sequence, and for what C's key
cannot say, also the function, unique and time:
`<sequence>\\0<function>\\0<unique>\\0<when>`.
"""
import struct

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import ReconnectingStore, StoreError, atoi
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import ReconnectingStore, StoreError, atoi

SOCKET_TIMEOUT = 2.0         # seconds a connect, or one reply, may take
SCAN_COUNT = 1000            # keys per SCAN / HSCAN step, and per replay round trip

# One write() as one EVALSHA: ARGV[1] is the index's
# key, ARGV[2] the records, deletes first, each a type byte and then fields with
# 4-byte big-endian lengths: 0 = delete (key), 1 = store (key, data, priority
# byte, index entry). One argument, not thousands, keeps redis-py's packing cheap.
WRITE_SCRIPT = """
local index, blob = ARGV[1], ARGV[2]
local pos, gone, entries = 1, {}, {}
local function flush()
  if #gone > 0 then
    redis.call('DEL', unpack(gone))
    redis.call('HDEL', index, unpack(gone))
    gone = {}
  end
  if #entries > 0 then
    redis.call('HSET', index, unpack(entries))
    entries = {}
  end
end
while pos <= #blob do
  local key, data, priority, entry
  if blob:byte(pos) == 0 then
    key, pos = struct.unpack('>I4c0', blob, pos + 1)
    gone[#gone + 1] = key
  else
    if #gone > 0 then flush() end
    key, data, priority, entry, pos = struct.unpack('>I4c0I4c0BI4c0', blob, pos + 1)
    redis.call('HSET', key, 'data', data, 'priority', priority)
    entries[#entries + 1] = key
    entries[#entries + 1] = entry
  end
  if #gone >= 1000 or #entries >= 1000 then flush() end
end
flush()
return 1
"""
BYTE_LENGTH = struct.Struct(">BI").pack     # a type or priority byte, then a length
LENGTH = struct.Struct(">I").pack


def glob_escape(text):
    """`text` as a SCAN MATCH pattern that matches only itself."""
    for char in b"\\*?[]":
        text = text.replace(bytes([char]), b"\\" + bytes([char]))
    return text


class RedisStore(ReconnectingStore):
    driver_error = (redis.RedisError, OSError)

    def __init__(self, client, prefix, where):
        super().__init__(f"Redis {where}")
        self.client = client
        self.connection = client          # its pool connects on demand
        self.prefix = prefix
        self.where = where
        # A name that never starts with the prefix, so C's replay never sees it.
        index = b"gearmand.py-index:" + prefix
        self.index = index if not index.startswith(prefix) else b"#" + index
        self.script = client.register_script(WRITE_SCRIPT)
        self.sequence = 0

    @classmethod
    def open(cls, options):
        prefix = (options.redis_prefix or "").encode("utf-8", "surrogateescape")
        if not prefix:
            raise StoreError("redis queue: --redis-prefix must not be empty")
        host = options.redis_server or "127.0.0.1"
        port = atoi(str(options.redis_port).encode())
        where = f"{host}:{port}"
        client = redis.Redis(host=host, port=port, password=options.redis_password or None,
                             socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                             retry=Retry(NoBackoff(), 0))
        try:
            client.ping()
        except redis.RedisError as error:
            client.close()
            raise StoreError(f"redis queue: cannot use Redis at {where}: "
                             f"{describe(error)}") from error
        return cls(client, prefix, where)

    def key(self, function, unique):
        return b"%s-%s-%s" % (self.prefix, function, unique)

    # -- writing

    def connect(self):
        return self.client                # a new connection comes from its pool on demand

    def disconnect(self):
        self.client.connection_pool.disconnect()
        self.connection = None

    def lost(self, error):
        return isinstance(error, (redis.ConnectionError, redis.TimeoutError, OSError))

    def blocked(self, error):
        # OOM, READONLY, MISCONF...: Redis refuses every write; WRONGTYPE is one key's.
        return isinstance(error, redis.ResponseError) and "WRONGTYPE" not in str(error)

    def describe(self, error):
        return describe(error)

    def ping(self):
        self.client.ping()

    def write_batch(self, adds, dones):
        """Run the script once. After a lost reply it runs again on a new connection:
        it is idempotent, so running it twice is harmless."""
        if not adds and not dones:
            return
        parts = []
        for unique, function, _ in dones:
            key = self.key(function, unique)
            parts += (BYTE_LENGTH(0, len(key)), key)
        for unique, function, priority, data, when, _ in adds:
            key = self.key(function, unique)
            self.sequence += 1
            if when or b"-" in function:
                entry = b"%d\0%s\0%s\0%d" % (self.sequence, function, unique, when)
            else:
                entry = b"%d" % self.sequence
            parts += (BYTE_LENGTH(1, len(key)), key, LENGTH(len(data)), data,
                      BYTE_LENGTH(priority, len(entry)), entry)
        self.script(args=(self.index, b"".join(parts)))

    # -- replay

    def replay(self):
        try:
            yield from self.read_all()
        except redis.RedisError as error:
            raise StoreError(f"Redis {self.where}: {describe(error)}") from error

    def read_all(self):
        index = dict(self.client.hscan_iter(self.index, count=SCAN_COUNT))
        keys = set(self.client.scan_iter(match=glob_escape(self.prefix) + b"*", count=SCAN_COUNT))
        sequences = {}
        for key, value in index.items():
            try:
                sequences[key] = int(value.split(b"\0", 1)[0])
            except ValueError:
                sequences[key] = 0
        self.sequence = max(sequences.values(), default=0)
        # Ours in submission order, then those C wrote.
        ordered = sorted(keys, key=lambda key: (key not in sequences, sequences.get(key, 0), key))
        for start in range(0, len(ordered), SCAN_COUNT):
            chunk = ordered[start:start + SCAN_COUNT]
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hgetall(key)
            values = pipe.execute(raise_on_error=False)
            legacy = [key for key, value in zip(chunk, values)
                      if isinstance(value, redis.ResponseError)]
            if legacy:
                pipe = self.client.pipeline(transaction=False)
                for key in legacy:
                    pipe.get(key)
                strings = dict(zip(legacy, pipe.execute(raise_on_error=False)))
            for key, value in zip(chunk, values):
                if isinstance(value, redis.ResponseError):
                    value = strings[key]
                    if not isinstance(value, bytes):
                        continue          # neither a hash nor a string: not a job
                    data, priority = value, 1
                elif value:
                    data = value.get(b"data", b"")
                    priority = atoi(value.get(b"priority", b"1"))
                else:
                    continue              # gone since SCAN listed it
                record = self.parse(key, index.get(key))
                if record is not None:
                    unique, function, when = record
                    yield (unique, function, priority, data, when, 0)
        stale = [key for key in index if key not in keys]
        for start in range(0, len(stale), SCAN_COUNT):
            self.client.hdel(self.index, *stale[start:start + SCAN_COUNT])

    def parse(self, key, entry):
        """(unique, function, when) of a job's key, from the index where it has them."""
        if entry and entry.count(b"\0") == 3:
            _, function, unique, when = entry.split(b"\0")
            if self.key(function, unique) == key:
                return unique, function, int(when) if when.isdigit() else 0
        rest = key[len(self.prefix):]
        if not rest.startswith(b"-"):
            return None                   # another application's key
        function, dash, unique = rest[1:].partition(b"-")
        return (unique, function, 0) if dash else None

    def close(self):
        self.client.close()


def describe(error):
    """One line about a redis-py error."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."
