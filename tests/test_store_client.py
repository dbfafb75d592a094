"""The store's Redis client: commands packed in C, byte for byte what redis-py sends."""

from __future__ import annotations

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from service.store import connect

COMMANDS: list[tuple[object, ...]] = [
    ("EVALSHA", "f" * 40, 2, "cf:job:1", "cf:stream:io", "xadd", 1.5, -3, "é", b"\x00\xff"),
    ("HSET", "k", "field", 10**20),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", "corefleet"),
]


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/0", "rediss://127.0.0.1:6390/0", "unix:///tmp/redis.sock"]
)
def test_commands_are_packed_in_c_and_the_same(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of connection a URL names packs with hiredis's C packer, and sends the
    same bytes redis-py's own packer would."""
    packed_in_c: list[tuple[object, ...]] = []
    c_packer = hiredis.pack_command

    def spy(args: tuple[object, ...]) -> bytes:
        packed_in_c.append(args)
        return c_packer(args)

    monkeypatch.setattr(hiredis, "pack_command", spy)
    client = connect(url)
    pool = client.connection_pool
    ours = pool.make_connection()
    stock = next(base for base in type(ours).__mro__[1:] if base.__module__.startswith("redis"))
    assert issubclass(stock, aioredis.connection.AbstractConnection)
    theirs = stock(**pool.connection_kwargs)
    for command in COMMANDS:
        packed = ours.pack_command(*command)
        assert len(packed) == 1  # one buffer, from hiredis
        assert packed[0] == b"".join(theirs.pack_command(*command))
    assert len(packed_in_c) == len(COMMANDS)
    assert b"".join(ours.pack_commands(COMMANDS)) == b"".join(theirs.pack_commands(COMMANDS))
    assert len(packed_in_c) == 2 * len(COMMANDS)


def test_a_value_redis_cannot_hold_is_refused_as_redis_py_does() -> None:
    connection = connect("redis://127.0.0.1:6390/0").connection_pool.make_connection()
    for bad in (None, True, {"a": 1}):
        with pytest.raises(DataError):
            connection.pack_command("SET", "k", bad)
