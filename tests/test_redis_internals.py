"""The redis-py internals `shared.redis_conn.FollowingConnection` builds on are still there, in the form it
was written against. A redis-py release that changes one fails here, naming it, rather than in a farm
whose clients then stick to a dead primary after a failover. pyproject.toml pins redis-py to the major
release these tests pass on.

Nothing public makes a retried command ask the sentinels again: redis-py's command retry reconnects the
connection object the command was sent on (`send_packed_command` -> `connect_check_health`), and only
`SentinelManagedConnection.connect()` asks the sentinels."""
from __future__ import annotations

import inspect

import redis
import redis.connection
import redis.sentinel

from shared.redis_conn import FollowingConnection


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def test_the_sentinel_connection_resolves_in_connect_to_and_connects_through_connect_check_health():
    managed = redis.sentinel.SentinelManagedConnection
    assert parameters(managed.connect_to) == ["address"]
    assert parameters(redis.connection.Connection.connect_check_health) == ["check_health", "retry_socket_connect"]
    connect_to = inspect.getsource(managed.connect_to)
    assert "self.host, self.port = address" in connect_to and "self.connect_check_health(" in connect_to
    assert "self.connection_pool.get_master_address()" in inspect.getsource(managed._connect_retry)
    pool = redis.sentinel.SentinelConnectionPool
    assert parameters(pool.get_master_address) == [] and "self.is_master = " in inspect.getsource(pool.__init__)


def test_a_retried_command_reconnects_its_connection_through_connect_check_health():
    send = inspect.getsource(redis.connection.Connection.send_packed_command)
    assert "self.connect_check_health(" in send
    assert "self._sock" in inspect.getsource(redis.connection.Connection.connect_check_health)


def test_master_for_hands_the_connection_class_to_its_pool_and_following_connection_overrides_what_it_should():
    manager = redis.sentinel.Sentinel([("127.0.0.1", 1)])   # no connection is made here
    client = manager.master_for("zfarm", connection_class=FollowingConnection)
    assert client.connection_pool.connection_class is FollowingConnection
    assert FollowingConnection.connect_check_health is not redis.connection.Connection.connect_check_health
    assert FollowingConnection.connect_to is not redis.sentinel.SentinelManagedConnection.connect_to
    assert redis.VERSION[0] == 8
