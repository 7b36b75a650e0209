"""Tokyo Cabinet persistent queue (-q libtokyocabinet), through the system
library libtokyocabinet.so.9 with ctypes (Debian: apt-get install libtokyocabinet9).

C gearmand's record format (key `<function>-<unique>`, value `<function>\\0<unique>\\0`
+ priority digit + decimal epoch time + `\\0` + data), file types, locking and the
differences from C: docs/backends.md#tokyo-cabinet. Each write() deletes, puts,
then calls tcadbsync() once.
"""
import ctypes
import ctypes.util
import errno
import os
import re

if "." in __package__:    # vendored: myproj/extras/ beside myproj/gearmand.py
    from ..gearmand import Store, StoreError
else:                     # gearmand_extras, beside the module gearmand
    from gearmand import Store, StoreError

LIBRARY = "libtokyocabinet.so.9"
ADBOHDB, ADBOBDB = 3, 4      # tcadbomode(): a hash or a B+ tree database
TCENOREC = 22                # tcerrmsg() code: no record found
PRIORITY_DIGITS = (b"0", b"1", b"2")
FALSE_WORDS = ("false", "0", "no", "off")
WHEN = re.compile(rb"-?[0-9]+")

_library = None


def library():
    """libtokyocabinet with the prototypes we call, loaded once."""
    global _library
    if _library is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("tokyocabinet") or LIBRARY, use_errno=True)
        except OSError:
            raise StoreError("queue type libtokyocabinet needs the Tokyo Cabinet library: "
                             "apt-get install libtokyocabinet9") from None
        pointer, size, flag = ctypes.c_void_p, ctypes.c_int, ctypes.c_bool
        prototypes = {
            "tcadbnew": (pointer, []),
            "tcadbdel": (None, [pointer]),
            "tcadbopen": (flag, [pointer, ctypes.c_char_p]),
            "tcadbclose": (flag, [pointer]),
            "tcadbput": (flag, [pointer, ctypes.c_char_p, size, ctypes.c_char_p, size]),
            "tcadbout": (flag, [pointer, ctypes.c_char_p, size]),
            "tcadbget": (pointer, [pointer, ctypes.c_char_p, size, ctypes.POINTER(size)]),
            "tcadbiterinit": (flag, [pointer]),
            "tcadbiternext": (pointer, [pointer, ctypes.POINTER(size)]),
            "tcadbsync": (flag, [pointer]),
            "tcadboptimize": (flag, [pointer, ctypes.c_char_p]),
            "tcadbomode": (size, [pointer]),
            "tcadbreveal": (pointer, [pointer]),
            "tchdbecode": (size, [pointer]),
            "tcbdbecode": (size, [pointer]),
            "tcerrmsg": (ctypes.c_char_p, [size]),
            "tcfree": (None, [pointer]),
        }
        for name, (restype, argtypes) in prototypes.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        _library = lib
    return _library


def record(function, unique, priority, data, when):
    """(key, value) of a job, as C gearmand writes them."""
    return (function + b"-" + unique,
            b"%s\0%s\0%s%d\0%s" % (function, unique, PRIORITY_DIGITS[priority]
                                   if priority in (0, 1, 2) else b"1", when, data))


def parse(value):
    """(unique, function, priority, data, when, 0) of a stored value, or None."""
    parts = value.split(b"\0", 2)
    if len(parts) < 3 or not parts[2]:
        return None
    function, unique, rest = parts
    priority = {b"0": 0, b"2": 2}.get(rest[:1], 1)
    # The time, as C reads it with strtoul(): a leading `-` is taken (C writes a
    # negative time with %lld; strtoul's wrap-around and the cast back give it back).
    number = WHEN.match(rest, 1)
    end = number.end() if number else 1
    when = int(number.group()) if number else 0
    return unique, function, priority, rest[end + 1:], when, 0  # +1 skips the NUL


class TokyoCabinetStore(Store):
    persistent = True
    durable = True

    def __init__(self, lib, db, name):
        self.lib = lib
        self.db = db
        self.name = name

    @classmethod
    def open(cls, options):
        path = options.libtokyocabinet_file
        if not path:
            raise StoreError("libtokyocabinet queue: missing --libtokyocabinet-file=<file> "
                             "(a name ending in .tch or .tcb)")
        if not path.split("#", 1)[0].endswith((".tch", ".tcb")):
            raise StoreError(f"libtokyocabinet queue: {path}: the file name must end in .tch "
                             f"(hash database) or .tcb (B+ tree database)")
        lib = library()
        name = path if "mode=" in path else path + "#mode=wcf"   # f: never wait for a lock
        db = lib.tcadbnew()
        ctypes.set_errno(0)
        if not lib.tcadbopen(db, name.encode("utf-8", "surrogateescape")):
            code = ctypes.get_errno()
            lib.tcadbdel(db)
            reason = ("locked by another process (another gearmand?)" if code == errno.EAGAIN
                      else os.strerror(code) if code else "not a valid Tokyo Cabinet database")
            raise StoreError(f"libtokyocabinet queue: cannot open {path}: {reason}")
        store = cls(lib, db, path)
        optimize = str(options.libtokyocabinet_optimize).lower() not in FALSE_WORDS
        if optimize and not lib.tcadboptimize(db, None):
            message = store.error()
            store.close()
            raise StoreError(f"libtokyocabinet queue: tcadboptimize({path}): {message}")
        return store

    def error_code(self):
        """The database's last error code, or None if tcadb does not tell it."""
        lib = self.lib
        mode = lib.tcadbomode(self.db)
        if mode == ADBOHDB:
            return lib.tchdbecode(lib.tcadbreveal(self.db))
        if mode == ADBOBDB:
            return lib.tcbdbecode(lib.tcadbreveal(self.db))
        return None

    def error(self):
        """The database's last error message, as C reports it."""
        code = self.error_code()
        return "misc error" if code is None else self.lib.tcerrmsg(code).decode("utf-8", "replace")

    def write(self, adds, dones):
        lib, db = self.lib, self.db
        for unique, function, _ in dones:
            key = function + b"-" + unique
            if not lib.tcadbout(db, key, len(key)) and self.error_code() not in (TCENOREC, None):
                raise StoreError(f"Tokyo Cabinet {self.name}: delete: {self.error()}")
        for unique, function, priority, data, when, _ in adds:
            key, value = record(function, unique, priority, data, when)
            if not lib.tcadbput(db, key, len(key), value, len(value)):
                raise StoreError(f"Tokyo Cabinet {self.name}: put: {self.error()}")
        if not lib.tcadbsync(db):
            raise StoreError(f"Tokyo Cabinet {self.name}: sync: {self.error()}")

    def replay(self):
        lib, db = self.lib, self.db
        if not lib.tcadbiterinit(db):
            raise StoreError(f"Tokyo Cabinet {self.name}: {self.error()}")
        size = ctypes.c_int()
        while True:
            pointer = lib.tcadbiternext(db, ctypes.byref(size))
            if not pointer:
                return
            key = ctypes.string_at(pointer, size.value)
            lib.tcfree(pointer)
            pointer = lib.tcadbget(db, key, len(key), ctypes.byref(size))
            if not pointer:
                continue                  # gone meanwhile
            value = ctypes.string_at(pointer, size.value)
            lib.tcfree(pointer)
            job = parse(value)
            if job is not None:
                yield job

    def close(self):
        if self.db:
            self.lib.tcadbclose(self.db)
            self.lib.tcadbdel(self.db)
            self.db = None
