"""Redis persistent queue (-q redis), with redis-py.

Records are C gearmand 1.1.20's, so either server replays what the other wrote:
one hash per job at `<prefix>-<function>-<unique>` with the fields `data` and
`priority` (0 high, 1 normal, 2 low). Each write() is one Lua script (EVALSHA;
redis-py loads it first where Redis lacks it), which Redis runs with no other
command in between: it deletes the finished jobs, then stores the new ones. So
it needs Redis 4.0 or later, standalone (not Cluster), with scripting allowed.

The index is one more hash, `gearmand.py-index:<prefix>` (C never reads it: its
name does not start with the prefix), with a field per job of ours: its
submission sequence, and for what C's key cannot say, also the function,
unique and time: `<sequence>\\0<function>\\0<unique>\\0<when>`.

Differences from C, on purpose:
* Replay uses SCAN, never KEYS, and runs the jobs in submission order (the
  index's sequence); C's order is Redis's hash order.
* Binary data is kept whole (C cuts it at the first NUL byte on replay).
* Epoch jobs are accepted and keep their time (C refuses them). C would replay
  one as an ordinary job, running it at once.
* A function name containing `-` replays under its own name (C splits the key
  at the first `-` after the prefix); the index holds the real names.
* The job hash has exactly C's two fields: C 1.1.20 reads only the first two
  fields HGETALL returns and refuses to start on any other field name, and
  Redis returns fields in hash order once a value exceeds 64 bytes.
* When Redis is unreachable, write() fails at once for a growing interval
  (0.1 s doubling to 5 s) and reconnects after it; C never reconnects.
Legacy records of gearmand <= 1.1.15 (a plain string: the data) replay as
normal-priority jobs, as in C.
"""
import struct

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import Backoff, Store, StoreError, atoi
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import Backoff, Store, StoreError, atoi

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


class RedisStore(Store):
    durable = True

    def __init__(self, client, prefix, where):
        self.client = client
        self.prefix = prefix
        self.where = where
        # A name that never starts with the prefix, so C's replay never sees it.
        index = b"gearmand.py-index:" + prefix
        self.index = index if not index.startswith(prefix) else b"#" + index
        self.script = client.register_script(WRITE_SCRIPT)
        self.sequence = 0
        self.backoff = Backoff()          # while Redis is down, write() fails at once

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

    def write(self, adds, dones):
        self.backoff.check()
        if not adds and not dones:
            return
        parts = []
        for unique, function in dones:
            key = self.key(function, unique)
            parts += (BYTE_LENGTH(0, len(key)), key)
        for unique, function, priority, data, when in adds:
            key = self.key(function, unique)
            self.sequence += 1
            if when or b"-" in function:
                entry = b"%d\0%s\0%s\0%d" % (self.sequence, function, unique, when)
            else:
                entry = b"%d" % self.sequence
            parts += (BYTE_LENGTH(1, len(key)), key, LENGTH(len(data)), data,
                      BYTE_LENGTH(priority, len(entry)), entry)
        args = (self.index, b"".join(parts))
        try:
            try:
                self.script(args=args)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                # Maybe only the old connection died (Redis restarted) or its reply was
                # late: try a new one at once. The script is idempotent, so running it
                # twice is harmless.
                self.script(args=args)
        except redis.ResponseError as error:
            if "WRONGTYPE" in str(error):     # a key of another type: only its job fails
                raise StoreError(f"Redis {self.where}: {describe(error)}") from error
            self.unavailable(error)           # OOM, READONLY, MISCONF...: Redis refuses writes
        except (redis.RedisError, OSError) as error:
            self.unavailable(error)
        self.backoff.succeeded()

    def unavailable(self, error):
        raise self.backoff.failed(f"Redis {self.where}: {describe(error)}") from error

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
                    yield (unique, function, priority, data, when)
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
