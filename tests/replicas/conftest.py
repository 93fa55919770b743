"""The read replica of the replica tests: a streaming standby of the test PostgreSQL.

``scripts/ensure-replica`` makes it (``pg_basebackup -R`` from the primary, port 5433,
``REPLICA_DIR``); the ``replica`` fixture runs it with ``--no-primary-changes`` when
no standby answers on ``TEST_REPLICA_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5433/test``). When there is no replica
and none can be made, the tests are skipped with the reason, except under
``CI=true``, where they fail (CI runs ``scripts/ensure-replica`` first).

The standby is shared by the test processes (pytest-xdist): tests that stop it or
pause its replay hold ``exclusive_replica``, the others ``shared_replica`` (a file
lock), so no test sees another's outage.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from conftest import in_ci
from tests.concurrency import ROOT

DEFAULT_REPLICA_URL = "postgresql+psycopg://postgres@127.0.0.1:5433/test"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
LOCK_FILE = Path(os.environ.get("REPLICA_DIR", "/tmp/runlayer-replica") + ".lock")


def _replica_problem(url: str) -> str | None:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            if not conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one():
                return f"{make_url(url).render_as_string(hide_password=True)} is not a standby"
    except Exception as exc:  # unreachable: said in the skip
        return f"no replica at {make_url(url).render_as_string(hide_password=True)} ({exc})"
    finally:
        engine.dispose()
    return None


@dataclass(frozen=True)
class Replica:
    """The standby: its server URL, data directory and how to stop and start it."""

    url: str
    data: Path

    def url_for(self, primary_url: str) -> str:
        """``primary_url`` (a test database of the primary) on the replica."""
        server = make_url(self.url)
        url = make_url(primary_url).set(host=server.host, port=server.port)
        return url.render_as_string(hide_password=False)

    def pg_ctl(self, *args: str) -> None:
        command = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def kill(self) -> None:
        """Stop the server at once, as a crash would (``pg_ctl stop -m immediate``)."""
        self.pg_ctl("stop", "-m", "immediate", "-w")

    def restart(self) -> None:
        """Start the stopped server again (crash recovery, then streaming), as is."""
        log = self.data.parent / "replica.log"
        self.pg_ctl("start", "-W", "-l", str(log))  # recovery may take long on busy cores
        deadline = time.monotonic() + 240
        while _replica_problem(self.url) is not None:
            assert time.monotonic() < deadline, "the replica did not come back in 240 s"
            time.sleep(0.1)

    def start(self) -> None:
        """Make sure the replica runs (``scripts/ensure-replica``; may clone it again)."""
        ensure = subprocess.run(
            [str(ROOT / "scripts" / "ensure-replica"), "--no-primary-changes"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ensure.returncode == 0, ensure.stderr

    def sql(self, statement: str, database_url: str | None = None) -> object:
        url = self.url if database_url is None else self.url_for(database_url)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(text(statement)).scalar()
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def replica() -> Replica:
    url = os.environ.get("TEST_REPLICA_URL", DEFAULT_REPLICA_URL)
    problem = _replica_problem(url)
    if problem is not None:
        ensure = subprocess.run(
            [str(ROOT / "scripts" / "ensure-replica"), "--no-primary-changes"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        problem = _replica_problem(url)
        if problem is not None:
            why = f"{problem}; scripts/ensure-replica said: {ensure.stderr.strip()}"
            if in_ci():
                pytest.fail(f"read replica unavailable under CI: {why}")
            pytest.skip(f"read replica unavailable (run scripts/ensure-replica): {why}")
    data = Path(os.environ.get("REPLICA_DIR", "/tmp/runlayer-replica")) / "data"
    return Replica(url, data)


@contextmanager
def _locked(mode: int) -> Iterator[None]:
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def shared_replica(replica: Replica) -> Iterator[Replica]:
    """The replica, running, while no test stops it or pauses its replay."""
    with _locked(fcntl.LOCK_SH):
        yield replica


@pytest.fixture
def exclusive_replica(replica: Replica) -> Iterator[Replica]:
    """The replica for this test alone: it may stop it or pause its replay, and
    leaves it running and replaying."""
    with _locked(fcntl.LOCK_EX):
        try:
            yield replica
        finally:
            if _replica_problem(replica.url) is not None:
                replica.start()
            replica.sql("SELECT pg_wal_replay_resume()")


def wait_replayed(replica: Replica, primary: Engine, timeout: float = 60.0) -> None:
    """Until the replica has replayed what the primary has written now."""
    with primary.connect() as conn:
        target = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
    deadline = time.monotonic() + timeout
    while True:
        done = replica.sql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
        if done:
            return
        assert time.monotonic() < deadline, f"replica did not replay to {target} in {timeout} s"
        time.sleep(0.05)
