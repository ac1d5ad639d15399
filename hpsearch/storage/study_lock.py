"""The study lock: one mutex over every process, on every node, that shares a study's storage.

Whatever decides the study's trial set holds it: a worker claiming a trial (count, then ask),
a run queueing its planned trials, a parent failing stale trials and queueing their retries.
So nodes that share only the storage still finish exactly ``n_trials`` and fail a stale trial
once. It lives where the storage lives, not in a results folder:

- PostgreSQL: a transaction-level advisory lock keyed by the study id, on its own connection
  of the storage's pool; the server releases it when the holder's connection ends.
- MySQL: ``GET_LOCK`` on its own connection (released when the connection ends).
- SQLite, a journal file: ``flock`` on a file beside the database or journal (a shared file
  system that supports ``flock``, such as NFSv4, shares it too).
- Redis: a Redis lock with an expiry, so a holder that died frees it after ``REDIS_EXPIRY``.
- Any other database: a ``flock`` in this machine's temporary folder (exact on one machine).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from hpsearch.files import file_lock
from hpsearch.optuna_private import rdb_storage, storage_of, study_id
from hpsearch.storage.backends import is_journal_file, journal_path

if TYPE_CHECKING:
    import sqlalchemy

StudyLock = Callable[[], AbstractContextManager[None]]
"""Makes a fresh hold of the lock: ``with lock(): ...``."""

# "hpse": the first key of PostgreSQL's two-key advisory locks, so ours collide with no one's.
PG_NAMESPACE = 0x68707365
# A holder idles in its lock transaction while it counts and asks (milliseconds). A frozen
# or lost node loses the lock after this long instead of blocking every node.
HOLD_LIMIT_S = 120
REDIS_EXPIRY = HOLD_LIMIT_S


def study_lock(study: optuna.Study, url: str) -> StudyLock:
    """The lock of ``study``, whose storage is at ``url`` (see the module docstring)."""
    if url.startswith(("redis://", "rediss://")):
        import redis  # the Redis journal's own dependency

        client = redis.Redis.from_url(url)
        lock = client.lock(f"hpsearch:study-lock:{study.study_name}", timeout=REDIS_EXPIRY)
        return lambda: lock
    if is_journal_file(url):
        return functools.partial(file_lock, Path(f"{journal_path(url)}.study-lock"))
    rdb = rdb_storage(storage_of(study))
    if rdb is not None:
        engine = rdb.engine
        if engine.dialect.name == "postgresql":
            return functools.partial(_postgres_lock, engine, study_id(study))
        if engine.dialect.name == "mysql":
            return functools.partial(_mysql_lock, engine, f"hpsearch-study-{study_id(study)}")
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            return functools.partial(file_lock, Path(f"{engine.url.database}.study-lock"))
    digest = hashlib.sha256(f"{url}\0{study.study_name}".encode()).hexdigest()[:16]
    machine_wide = Path(tempfile.gettempdir()) / f"hpsearch-{os.getuid()}-{digest}.study-lock"
    return functools.partial(file_lock, machine_wide)


@contextlib.contextmanager
def _postgres_lock(engine: sqlalchemy.Engine, key: int) -> Iterator[None]:
    import sqlalchemy  # only RDB studies pay for importing it

    with engine.connect() as conn, conn.begin():
        conn.execute(sqlalchemy.text(
            f"SET LOCAL idle_in_transaction_session_timeout = '{HOLD_LIMIT_S}s'"))
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                     {"ns": PG_NAMESPACE, "key": key})
        yield  # the commit (or the rollback of an error) releases it


@contextlib.contextmanager
def _mysql_lock(engine: sqlalchemy.Engine, name: str) -> Iterator[None]:
    import sqlalchemy  # only RDB studies pay for importing it

    with engine.connect() as conn:
        query = sqlalchemy.text("SELECT GET_LOCK(:name, 60)")
        while (got := conn.execute(query, {"name": name}).scalar()) == 0:
            pass  # timed out waiting: wait again
        if got != 1:
            raise optuna.exceptions.StorageInternalError(f"MySQL GET_LOCK({name!r}) failed")
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
