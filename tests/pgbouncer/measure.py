"""Operations per second straight to PostgreSQL and through a private PgBouncer.

    python -m tests.pgbouncer.measure                 # 3 interleaved rounds of 5 s each
    python -m tests.pgbouncer.measure --seconds 10 --rounds 5 --threads 8

Makes a scratch database on ``--server`` (default 127.0.0.1:5432, dropped at the
end), migrates and seeds it (one chat session, 200 runs), starts PgBouncer in
transaction mode with ``scripts/ensure-pgbouncer`` in a temporary folder, and
measures, in rounds that alternate the two URLs, ``--threads`` threads doing for
``--seconds`` each:

* ``get``: ``RunReads.get`` (the ``GET /api/runs/{id}`` read: one statement);
* ``create``: ``RunRepository.create`` in a unit of work (the ``POST /api/runs`` write).

The engines are the ones the API makes: direct, and with ``DATABASE_POOLER=transaction``
(no prepared statements, ``SET LOCAL`` of the time zone first in each transaction).
Prints the median ops/s per operation and URL, and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.db import create_db_engine, unit_of_work
from app.models import ChatSession, new_id
from app.repositories import RunRepository
from app.repositories.reads import RunReads
from migrations import upgrade

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-pgbouncer"


def ops_per_second(work: Callable[[int], object], threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        n = 0
        while time.monotonic() < stop:
            work(n)
            n += 1
        counts[index] = n

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - started)


def operations(engine: Engine, session_id: str, run_ids: list[str]) -> dict[str, Callable]:
    reads = RunReads.of(engine)

    def get(n: int) -> object:
        return reads.get(run_ids[n % len(run_ids)])

    def create(n: int) -> object:
        with unit_of_work(engine) as db:
            return RunRepository(db).create({"session_id": session_id, "message": f"m{n}"})

    return {"get": get, "create": create}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:5432")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    host, port = args.server.rsplit(":", 1)
    server = make_url(f"postgresql+psycopg://postgres@{host}:{port}/postgres")
    name = f"runlayer_pgbouncer_measure_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(server, isolation_level="AUTOCOMMIT", pooled=False)
    folder = Path(tempfile.mkdtemp(prefix="runlayer-pgbouncer-"))
    engines: dict[str, Engine] = {}
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        direct_url = server.set(database=name)
        engines["direct"] = create_db_engine(direct_url, pooled=False)
        upgrade(engines["direct"])
        started = subprocess.run(
            [str(SCRIPT), "--dir", str(folder), "--server", args.server],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        pooled_url = make_url(started.stdout.strip().splitlines()[-1]).set(
            drivername="postgresql+psycopg", database=name
        )
        engines["pgbouncer"] = create_db_engine(pooled_url, pooled=True, direct_url=direct_url)
        with unit_of_work(engines["direct"]) as db:
            chat = ChatSession(id=new_id(), title="measure")
            db.add(chat)
            db.flush()
            repository = RunRepository(db)
            run_ids = [
                repository.create({"session_id": chat.id, "message": "x"}).id for _ in range(200)
            ]
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for label, engine in engines.items():
                for operation, work in operations(engine, chat.id, run_ids).items():
                    ops = ops_per_second(work, args.threads, args.seconds)
                    results.setdefault((operation, label), []).append(ops)
        print(f"{args.threads} threads, {args.rounds} rounds of {args.seconds:g} s, medians:")
        for operation in ("get", "create"):
            direct = statistics.median(results[operation, "direct"])
            pooled = statistics.median(results[operation, "pgbouncer"])
            print(
                f"  {operation:6} direct {direct:7.0f}/s   PgBouncer {pooled:7.0f}/s   "
                f"ratio {pooled / direct:.2f}"
            )
    finally:
        for engine in engines.values():
            engine.dispose()
        subprocess.run([str(SCRIPT), "--dir", str(folder), "--stop"], check=False, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
