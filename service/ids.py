"""Job ids: ULIDs, so ids sort by creation time and are safe in URLs and Redis keys."""

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_ID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


_last = 0
_last_lock = threading.Lock()


def new_id() -> str:
    """A new 26-character ULID: 48 bits of milliseconds, then 80 random bits.

    The ids one process makes only grow: within a millisecond the next is the last plus
    one, so that they list in the order the jobs were made.
    """
    global _last
    fresh = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    with _last_lock:
        value = _last = max(fresh, _last + 1)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_valid(job_id: str) -> bool:
    """Whether ``job_id`` has the shape of an id this service hands out."""
    return bool(_ID_RE.fullmatch(job_id))
