"""``python -m benchmarks.async_paths``: async access, the thread design against native async.

    python -m benchmarks.async_paths                      # both backends, both parts
    python -m benchmarks.async_paths --backend sqlite --part calls --calls 500
    python -m benchmarks.async_paths --part http --duration 5 --rounds 1
    python -m benchmarks.async_paths --part burst          # 1,000 requests at once, 0 5xx

Reading one run (``get``) from ``async def`` code, five ways:

* ``blocking``: ``RunReads.get`` called in the event loop (what an ``async def``
  route calling the sync layer does; it blocks the loop: a reference only);
* ``to_thread``: ``anyio.to_thread.run_sync(RunReads.get, ...)`` (the Run API's
  ``run_in_slot`` without its slot);
* ``aio_reads``: ``await AsyncRunReads.of(engine).get(...)`` (``app.aio``: a slot,
  then a pinned worker thread);
* ``aio_uow``: ``async with async_unit_of_work(engine, readonly=True) as db:
  await db.runs.get(...)`` (the ORM path: begin, get and commit on the unit's thread);
* ``native``: a minimal native-async prototype: the same SQL and the same row
  builder as ``RunReads`` (its plan, ``app.repositories.reads``), sent with
  psycopg's ``AsyncConnection`` from a ``psycopg_pool.AsyncConnectionPool``
  (autocommit, as ``RunReads`` reads) or with ``aiosqlite`` (a pool of connections,
  each one thread of aiosqlite's). Only the I/O differs from ``aio_reads``.

Part ``calls`` (in this process, one event loop): per-call time of each way,
sequential (median of rounds of ``--calls`` calls), and the calls per second of
64 tasks calling at once for ``--seconds``, with the event loop's worst lag.

Part ``http``: ``uvicorn --workers 2 --factory benchmarks.async_paths:create_app``
serving one seeded database (``benchmarks.http``'s seed: 200 runs), measured
with wrk ``-t2 -c64`` as ``benchmarks.http`` measures (its servers, scripts and
medians), endpoint by endpoint, rounds interleaved:
``GET /api/runs/{id}`` (the Run API's own route, ``run_in_slot``),
``/async/reads/{id}``, ``/async/uow/{id}``, ``/async/native/{id}``,
``/async/blocking/{id}``, and the writes ``POST /api/runs`` against
``POST /async/uow/runs`` (create through ``async_unit_of_work``).

Part ``burst``: ``tests/load/burst.py``'s two bursts of ``--requests`` requests at
once (creates then reads on other connections, then a mix of all five endpoints),
against ``examples.async_route:create_run_api`` (the Run API's endpoints as
``async def`` routes on ``app.api.async_deps``) under ``uvicorn --workers 2``;
it exits 1 on any 5xx.

Everything runs on scratch databases (``benchmarks.environment``); all traffic
goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Response
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.aio import AsyncRunReads, async_unit_of_work, request_slots
from app.api.async_deps import AsyncDbDep, AsyncRunReaderDep, AsyncRunReadsDep
from app.api.errors import install_error_handlers
from app.api.routes import router
from app.db import create_db_engine, get_engine
from app.repositories import RunReads
from app.schemas import RunCreate, RunResponse
from benchmarks import http
from benchmarks.environment import (
    machine_facts,
    postgresql_reachable,
    postgresql_server_url,
    psycopg_conninfo,
    scratch_databases,
)
from migrations import upgrade

WAYS = ("blocking", "to_thread", "aio_reads", "aio_uow", "native")
TASKS = 64


# --------------------------------------------------------------------------
# The native-async prototype of RunReads.get


class NativeReads:
    """``RunReads.get`` on a native async driver: the same SQL and row builder."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.size = request_slots(engine)
        self._query: Any = None
        self._pg: Any = None
        self._sqlite: asyncio.Queue[Any] | None = None
        self._sqlite_all: list[Any] = []

    async def open(self, some_run_id: str) -> None:
        reads = RunReads.of(self.engine)
        reads.get(some_run_id)  # the statement's plan exists after one execution
        # Benchmark only: the read path's own statement plan and row builder.
        query = reads._by_id  # noqa: SLF001
        plan = query._plan or query._planned()  # noqa: SLF001
        if plan is None:
            raise RuntimeError("no plan for RunReads.get: is something observing statements?")
        self._query = query
        if self.engine.dialect.name == "postgresql":
            from psycopg_pool import AsyncConnectionPool

            async def configure(conn: Any) -> None:
                await conn.set_autocommit(True)
                await conn.execute("SET TIME ZONE 'UTC'")

            self._pg = AsyncConnectionPool(
                psycopg_conninfo(self.engine.url),
                min_size=self.size,
                max_size=self.size,
                configure=configure,
                open=False,
            )
            await self._pg.open(wait=True)
        else:
            import aiosqlite

            self._sqlite = asyncio.Queue()
            for _ in range(self.size):
                conn = await aiosqlite.connect(self.engine.url.database, isolation_level=None)
                await conn.execute("PRAGMA busy_timeout = 5000")
                self._sqlite_all.append(conn)
                self._sqlite.put_nowait(conn)

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
        for conn in self._sqlite_all:
            await conn.close()

    async def get(self, run_id: str) -> RunResponse:
        query = self._query
        plan = query._plan  # noqa: SLF001
        arguments = plan.arguments({"run_id": run_id})
        if self._pg is not None:
            async with self._pg.connection() as conn:
                cursor = await conn.execute(plan.sql, arguments)
                rows = await cursor.fetchall()
        else:
            assert self._sqlite is not None
            conn = await self._sqlite.get()
            try:
                async with conn.execute(plan.sql, arguments) as cursor:
                    rows = list(await cursor.fetchall())
            finally:
                self._sqlite.put_nowait(conn)
        found = query._build(rows)  # noqa: SLF001
        if not found:
            raise LookupError(run_id)
        return found[0]


def ways(engine: Engine, native: NativeReads) -> dict[str, Callable[[str], Awaitable[Any]]]:
    reads, async_reads = RunReads.of(engine), AsyncRunReads.of(engine)

    async def blocking(run_id: str) -> Any:
        return reads.get(run_id)

    async def to_thread(run_id: str) -> Any:
        return await anyio.to_thread.run_sync(reads.get, run_id)

    async def aio_reads(run_id: str) -> Any:
        return await async_reads.get(run_id)

    async def aio_uow(run_id: str) -> Any:
        async with async_unit_of_work(engine, readonly=True) as db:
            return RunResponse.model_validate(await db.runs.get(run_id))

    return {
        "blocking": blocking,
        "to_thread": to_thread,
        "aio_reads": aio_reads,
        "aio_uow": aio_uow,
        "native": native.get,
    }


# --------------------------------------------------------------------------
# Part "calls": in one process


async def _lag_watch(stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        worst[0] = max(worst[0], time.perf_counter() - before - 0.005)


async def measure_calls(url: str, run_ids: list[str], calls: int, rounds: int, seconds: float):
    engine = create_db_engine(url)
    native = NativeReads(engine)
    await native.open(run_ids[0])
    try:
        paths = ways(engine, native)
        expected = RunReads.of(engine).get(run_ids[0])
        for name, call in paths.items():  # all answer the same
            if (await call(run_ids[0])) != expected:
                raise AssertionError(f"{name} reads another answer")
        sequential: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(rounds):
            for name in WAYS:  # interleaved
                call = paths[name]
                started = time.perf_counter()
                for n in range(calls):
                    await call(run_ids[n % len(run_ids)])
                sequential[name].append((time.perf_counter() - started) / calls * 1e6)
        concurrent: dict[str, tuple[float, float]] = {}
        for name in WAYS:
            call = paths[name]
            done, stop, worst = 0, asyncio.Event(), [0.0]
            deadline = time.perf_counter() + seconds

            async def task(
                offset: int,
                call: Callable[[str], Awaitable[Any]] = call,
                deadline: float = deadline,
            ) -> None:
                nonlocal done
                n = offset
                while time.perf_counter() < deadline:
                    await call(run_ids[n % len(run_ids)])
                    n += TASKS
                    done += 1

            watcher = asyncio.create_task(_lag_watch(stop, worst))
            started = time.perf_counter()
            await asyncio.gather(*(task(offset) for offset in range(TASKS)))
            elapsed = time.perf_counter() - started
            stop.set()
            await watcher
            concurrent[name] = (done / elapsed, worst[0] * 1000)
        return (
            {name: statistics.median(values) for name, values in sequential.items()},
            concurrent,
        )
    finally:
        await native.close()
        engine.dispose()


# --------------------------------------------------------------------------
# Part "http": the server


def create_app() -> FastAPI:
    """The benchmark's server: the Run API plus the async ways of reading a run."""
    engine = get_engine()
    native = NativeReads(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        some = RunReads.of(engine).list_by_status("queued", limit=1)
        if some:
            await native.open(some[0].run_id)
        yield
        await native.close()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)

    def answer(model: Any, status: int = 200) -> Response:
        body = model.__pydantic_serializer__.to_json(model)
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/async/reads/{run_id}")
    async def by_reads(run_id: str, reads: AsyncRunReadsDep) -> Response:
        return answer(await reads.get(run_id))

    @app.get("/async/uow/{run_id}")
    async def by_uow(run_id: str, runs: AsyncRunReaderDep) -> Response:
        return answer(RunResponse.model_validate(await runs.get(run_id)))

    @app.get("/async/native/{run_id}")
    async def by_native(run_id: str) -> Response:
        return answer(await native.get(run_id))

    @app.get("/async/blocking/{run_id}")
    async def by_blocking(run_id: str) -> Response:
        return answer(RunReads.of(engine).get(run_id))

    @app.post("/async/uow/runs")
    async def create(body: RunCreate, db: AsyncDbDep) -> Response:
        run = await db.runs.create(body)
        return answer(RunResponse.model_validate(run), 201)

    return app


ENDPOINTS = {
    e.name: e
    for e in (
        http.ENDPOINTS["get"],
        http.Endpoint("reads", "GET /async/reads/{id}", "GET", "/async/reads/%s", "runs"),
        http.Endpoint("uow", "GET /async/uow/{id}", "GET", "/async/uow/%s", "runs"),
        http.Endpoint("native", "GET /async/native/{id}", "GET", "/async/native/%s", "runs"),
        http.Endpoint("blocking", "GET /async/blocking/{id}", "GET", "/async/blocking/%s", "runs"),
        http.ENDPOINTS["create"],
        http.Endpoint(
            "uow_create",
            "POST /async/uow/runs",
            "POST",
            "/async/uow/runs",
            "sessions",
            '{"session_id":"%s","message":"http benchmark"}',
        ),
    )
}


def measure_http(
    backend: str, url: str, workload: http.Workload, args: argparse.Namespace, folder: Path
) -> list[http.Measurement]:
    http.SERVERS["async"] = "benchmarks.async_paths:create_app"
    options = http.Options(args.threads, args.connections, args.duration, args.warmup, 30.0)
    database = None if backend == "sqlite" else make_url(url).database
    results: list[http.Measurement] = []
    with http.bounded_processes() as processes:
        for round_number in range(1, args.rounds + 1):
            server = http.Server(processes, "async", url, args.workers)
            try:
                server.wait_ready(f"/async/native/{workload.runs[0]}")
                for name in args.endpoints:
                    endpoint = ENDPOINTS[name]
                    script = folder / f"{backend}-{name}.lua"
                    script.write_text(http.lua_script(endpoint, workload, args.threads))
                    context = {
                        "backend": backend,
                        "url": url,
                        "database": database,
                        "round": round_number,
                    }
                    found = http.measure(processes, server, endpoint, script, options, context)
                    found.endpoint = name
                    results.append(found)
                    print(
                        f"  {backend} round {round_number} {name:<11} {found.rate:8.0f} req/s "
                        f"p99 {found.latency_us['p99'] / 1000:.1f} ms {found.statuses} "
                        f"errors {found.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                server.stop()
    return results


# --------------------------------------------------------------------------
# Part "burst": tests/load/burst.py against the Run API written on app.aio


ASYNC_RUN_API = "examples.async_route:create_run_api"


def burst(requests: int, backends: list[str]) -> int:
    """``python -m tests.load.burst`` (1,000 requests at once per burst, both bursts),
    its server being ``uvicorn --workers 2 --factory examples.async_route:create_run_api``:
    the Run API's endpoints as ``async def`` routes on ``app.api.async_deps``.
    Exits as it does: 1 on any 5xx, transport error or missed pair."""
    from tests.load import burst as load

    class AsyncRunApiServer(load.Server):
        def __init__(self, url: str, workers: int) -> None:  # the same, another factory
            self.port = load.free_port()
            command = [sys.executable, "-m", "uvicorn", "--factory", ASYNC_RUN_API]
            command += ["--host", load.HOST, "--port", str(self.port), "--workers", str(workers)]
            command += ["--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "75"]
            env = {**os.environ, "DATABASE_URL": url}
            self.process = subprocess.Popen(command, env=env, cwd=http.ROOT)
            self.base_url = f"http://{load.HOST}:{self.port}"

    load.Server = AsyncRunApiServer  # type: ignore[misc]
    return load.main(["--requests", str(requests), "--backends", ",".join(backends)])


# --------------------------------------------------------------------------
# Report


def report(
    facts: dict[str, str],
    args: argparse.Namespace,
    calls: dict[str, Any],
    measured: dict[str, list[http.Measurement]],
) -> str:
    lines = [
        f"## async_paths, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
        "",
        f"Command: `python -m benchmarks.async_paths {' '.join(args.argv)}`".rstrip(),
        "",
    ]
    for backend, (sequential, concurrent) in calls.items():
        lines += [
            f"### {backend}: one `get` from async code, in one process",
            "",
            f"Sequential: median of {args.call_rounds} interleaved rounds of {args.calls} calls. "
            f"Concurrent: {TASKS} tasks calling for {args.seconds:g} s, and the event loop's "
            "worst lag meanwhile.",
            "",
            "| way | µs per call (sequential) | calls/s (64 tasks) | worst loop lag ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in WAYS:
            rate, lag = concurrent[name]
            lines.append(f"| {name} | {sequential[name]:,.0f} | {rate:,.0f} | {lag:.1f} |")
        lines.append("")
    for backend, results in measured.items():
        lines += [
            f"### {backend}: HTTP, wrk -t{args.threads} -c{args.connections} "
            f"-d{args.duration:g}s, uvicorn --workers {args.workers}",
            "",
            f"Medians of {args.rounds} round(s); req/s counts 2xx answers only.",
            "",
            "| endpoint | req/s | p50 ms | p99 ms | non-2xx | socket errors | worker CPU µs/req |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        cells = http.summarize(results)
        for name in args.endpoints:
            cell = cells.get((name, "async"))
            if cell is None:
                continue
            lines.append(
                f"| `{ENDPOINTS[name].label}` | {cell.rate:,.0f} | {cell.p50_ms:.1f} | "
                f"{cell.p99_ms:.1f} | {cell.non_2xx} | {cell.errors} | "
                f"{_us(cell.worker_us)} |"
            )
        loads = [m.load[0] for m in results]
        lines += ["", f"1-minute load during the run {min(loads):.2f}-{max(loads):.2f}.", ""]
    return "\n".join(lines)


def _us(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # NaN: nothing measured


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_paths")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--part", choices=("calls", "http", "both", "burst"), default="both")
    parser.add_argument("--requests", type=int, default=1000, help="burst: requests at once")
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per round")
    parser.add_argument("--call-rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="concurrent calls, per way")
    parser.add_argument("--duration", type=float, default=10.0, help="wrk seconds")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="HTTP rounds (medians)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help=",".join(ENDPOINTS))
    parser.add_argument("--output", type=Path, help="also append the markdown report here")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    unknown = set(args.endpoints) - set(ENDPOINTS)
    if unknown:
        parser.error(f"unknown endpoints: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    server_url = postgresql_server_url()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and postgresql_reachable(server_url) is not None:
        print(f"PostgreSQL unreachable at {server_url}", file=sys.stderr)
        return 2
    if args.part == "burst":
        return burst(args.requests, backends)
    calls: dict[str, Any] = {}
    measured: dict[str, list[http.Measurement]] = {}
    with (
        scratch_databases(server_url) as databases,
        tempfile.TemporaryDirectory(prefix="async_paths_") as folder,
    ):
        for backend in backends:
            url = databases.url(backend, "async")
            engine = create_db_engine(url, poolclass=NullPool)
            try:
                upgrade(engine)
                workload = http.seed(engine, pool=0)
            finally:
                engine.dispose()
            if args.part in ("calls", "both"):
                print(f"{backend}: calls", file=sys.stderr, flush=True)
                calls[backend] = asyncio.run(
                    measure_calls(url, workload.runs, args.calls, args.call_rounds, args.seconds)
                )
            if args.part in ("http", "both"):
                measured[backend] = measure_http(backend, url, workload, args, Path(folder))
        text = report(machine_facts(server_url), args, calls, measured)
    print(text)
    if args.output is not None:
        with args.output.open("a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
