"""Opening Redis: one URL, a single server or a cluster, with errors that say what to fix.

The client and the worker both connect here. A connection's name (CLIENT SETNAME) lets an
operator, or a test, count what one client holds with CLIENT LIST.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from runnerd.errors import ConfigError, StoreError

RedisClient = aioredis.Redis | RedisCluster
SCHEMES = ("redis", "rediss", "unix")
SOCKET_TIMEOUT_S = 10.0  # a hung server fails a command after this, so it can be retried
CONNECT_TIMEOUT_S = 5.0


def check_url(url: str) -> None:
    """A REDIS_URL redis-py would misread (no scheme: it would fail later, less clearly)."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        example = "redis://127.0.0.1:6379/0"
        raise ConfigError(
            f"REDIS_URL {url!r} has no valid scheme (one of {', '.join(s + '://' for s in SCHEMES)}"
            f"), e.g. {example}"
        )


async def open_redis(
    url: str, *, name: str | None = None, max_connections: int | None = None
) -> RedisClient:
    """Connect and ping; a Redis Cluster is recognised and talked to as one. With
    `max_connections`, a single server's pool makes callers wait for a free connection instead
    of failing; a cluster's limit is per node."""
    check_url(url)
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "client_name": name,
    }
    if max_connections is not None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, **options
        )
        plain = aioredis.Redis.from_pool(pool)  # its aclose() closes the pool too
    else:
        plain = aioredis.from_url(url, **options)
    try:
        info = await plain.info("cluster")
    except ResponseError as exc:
        await plain.aclose(close_connection_pool=True)
        if "DB index is out of range" in str(exc):
            raise ConfigError(
                f"REDIS_URL {url!r} names a database this Redis does not have ({exc}); "
                "use /0, or one below the server's `databases` setting"
            ) from None
        raise StoreError(f"Redis at {url} refused the first command: {exc}") from None
    except (OSError, RedisError) as exc:
        await plain.aclose(close_connection_pool=True)
        raise StoreError(
            f"cannot reach Redis at {url}: {exc}. Start one (apt-get install redis-server), "
            "point REDIS_URL at yours, or use `runnerd serve --embedded-redis`."
        ) from None
    if not info.get("cluster_enabled"):
        return plain
    await plain.aclose(close_connection_pool=True)
    cluster_options = {**options, "max_connections": max_connections or 100}
    cluster = RedisCluster.from_url(url, **cluster_options)
    try:
        await cluster.initialize()
    except (OSError, RedisError) as exc:
        await cluster.aclose()
        raise StoreError(f"cannot reach the Redis Cluster at {url}: {exc}") from None
    return cluster
