"""Services some tests need (PostgreSQL, Redis, a Dask cluster, an S3 server): skip with the
reason where one is absent, unless ``HPSEARCH_REQUIRE_SERVICES=1`` (``.ci/run`` sets it), which
turns that skip into a failure so CI always runs them."""

from __future__ import annotations

import os

import pytest

POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


def require(available: bool, reason: str) -> None:
    """Skip (or, where services are required, fail) unless ``available``."""
    if available:
        return
    if os.environ.get("HPSEARCH_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (HPSEARCH_REQUIRE_SERVICES=1: this test must run)")
    pytest.skip(reason)


def reachable(url: str) -> bool:
    """Whether the database or Redis server at ``url`` answers."""
    try:
        if url.startswith("redis"):
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        else:
            import sqlalchemy

            engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 2})
            with engine.connect():
                pass
            engine.dispose()
        return True
    except Exception:  # any failure to connect means: not here
        return False


def require_service(url: str) -> str:
    """``url``, or skip/fail when its server does not answer."""
    require(reachable(url), f"{url.split(':', 1)[0]} is not reachable at {url}")
    return url


def require_postgres(url: str = POSTGRES) -> str:
    """The PostgreSQL URL, or skip/fail when it is not reachable."""
    return require_service(url)
