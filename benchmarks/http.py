"""``python -m benchmarks.http``: the Run API over HTTP against the same SQL sent raw.

    python -m benchmarks.http                                   # both backends, 3 rounds of 10 s
    python -m benchmarks.http --backend sqlite --duration 5 --rounds 1
    python -m benchmarks.http --connections 1000 --endpoints get,create

Servers (``uvicorn --workers 2`` each, on 127.0.0.1, one port each):

* ``project``: ``app.api.main:create_app``;
* ``raw``: ``benchmarks.http_servers.raw``, the project's statements
  (``docs/sql/<dialect>.sql``) sent with ``sqlite3`` / ``psycopg``, one
  connection per thread, sync endpoints, the same JSON;
* ``template``: ``benchmarks.http_servers.template``, the FastAPI template's
  way (SQLModel table model, ``Session`` from a ``yield`` dependency,
  ``session.get``, response model); ``GET /api/runs/{id}`` only.

All serve one freshly migrated database per backend (a SQLite file; a scratch
PostgreSQL database, created and dropped here), seeded with 200 runs (one per
session) and 20 runs holding 100 events each, plus a pool of waiting runs for
the writes (``--pool``, one per session of its own).

Workload, one endpoint at a time, with wrk (``scripts/ensure-wrk`` installs it),
``-t2 -c64`` by default; each request picks its target by a counter in the
wrk script (thread ``t`` of ``T`` sends ``t``, ``t+T``, ``t+2T``, ...):

* ``get``: ``GET /api/runs/{id}`` over the 200 runs;
* ``events``: ``GET /api/runs/{id}/events?limit=100`` over the 20 runs (full pages);
* ``create``: ``POST /api/runs`` round-robin over the 200 sessions (enqueue);
* ``resume``: ``POST /api/runs/{id}/resume``, each request a distinct waiting run
  of the pool; once the pool is used up a resume is a 409 (counted, not success);
* ``cancel``: ``POST /api/runs/{id}/cancel``, each request a distinct waiting run
  of the pool (202); once the pool is used up the repeated cancel of a
  cancelled run answers 200 (idempotent, listed apart under "repeats").

The pool is set back to ``waiting_input`` before every warm-up and measurement
(the server idle; on PostgreSQL followed by ``VACUUM``), so every server and
round starts from the same state.

Rounds interleave the servers (project, raw, template, project, raw, ...): each
server is started for its turn, warmed up on each endpoint (``--warmup`` s), then
measured, then stopped. Figures are medians over the rounds: requests per second
counting **2xx answers only**, p50 / p99 latency (wrk's, all answers), and
the non-2xx answers and socket errors summed. During each measurement the CPU
of the uvicorn workers, the database server's backends (PostgreSQL) and wrk is
read from ``/proc/<pid>/stat``, with the whole machine's from ``/proc/stat``;
also the worker CPU per answer (steadier than req/s on a shared machine), the
connections each worker holds (uvicorn's workers race to accept, so a run may
put all of them on one worker) and, on PostgreSQL, the connections opened
during the measurement (``pg_stat_database.sessions``): a backend that serves
one short-lived connection exits before its CPU is read, so the database CPU
counts only the connections that stay open.

Every process started here is stopped at the end, also on Ctrl-C or an error;
all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.db import create_db_engine, unit_of_work
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from benchmarks.environment import (
    machine_facts,
    postgresql_reachable,
    postgresql_server_url,
    raw_postgresql,
    raw_sqlite,
    scratch_databases,
)
from migrations import upgrade

HOST = "127.0.0.1"  # the only address this benchmark talks to
ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "project": "app.api.main:create_app",
    "raw": "benchmarks.http_servers.raw:create_app",
    "template": "benchmarks.http_servers.template:create_app",
}
BACKENDS = ("sqlite", "postgresql")
POOL_MESSAGE = "http benchmark pool"
POOL_REASON = "pick one"
POOL_RUN_ID = "1{:031d}"  # 32 characters, like a uuid4 hex
POOL_SESSION_ID = "2{:031d}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# The database: seed, pool, reset


@dataclass
class Workload:
    """What the requests aim at: ids in the seeded database."""

    runs: list[str]
    event_runs: list[str]
    sessions: list[str]
    pool: int

    def pool_run(self, n: int) -> str:
        return POOL_RUN_ID.format(n)


def seed(
    engine: Engine, *, runs: int = 200, event_runs: int = 20, events: int = 100, pool: int = 20_000
) -> Workload:
    """Seed a migrated database through the repositories (the pool is copied in SQL)."""
    with unit_of_work(engine) as db:
        repository, event_log = RunRepository(db), EventRepository(db)
        chats = [ChatSession(title=f"http {n}") for n in range(runs + event_runs)]
        db.add_all(chats)
        db.flush()
        workload = Workload([], [], [chat.id for chat in chats[:runs]], pool)
        for chat in chats[:runs]:
            workload.runs.append(repository.create({"session_id": chat.id, "message": "get"}).id)
        for chat in chats[runs:]:
            run = repository.create({"session_id": chat.id, "message": "events"})
            steps = [
                {"type": "progress", "payload": {"step": n}, "run_id": run.id}
                for n in range(events - 1)  # plus run_created
            ]
            event_log.append_many(chat.id, steps)
            workload.event_runs.append(run.id)
    add_pool(engine, pool)
    return workload


def add_pool(engine: Engine, size: int) -> None:
    """``size`` waiting runs, each in a session of its own, with ids ``POOL_RUN_ID``.

    One is made by the repositories; the others are copies of its rows with
    their own ids (``session_id`` and ``checkpoint_thread`` follow).
    """
    with unit_of_work(engine) as db:
        chat = ChatSession(title=POOL_MESSAGE)
        db.add(chat)
        db.flush()
        repository = RunRepository(db)
        model = repository.create({"session_id": chat.id, "message": POOL_MESSAGE})
        repository.start(model.id)
        repository.wait_for_input(model.id, POOL_REASON)
        model_session, model_run = chat.id, model.id
    if size < 1:
        return
    with engine.begin() as conn:
        columns = {
            table: [column["name"] for column in inspect(conn).get_columns(table)]
            for table in ("sessions", "session_runs")
        }
        run_id, session_id = "CAST(:new_id AS VARCHAR)", "CAST(:new_session AS VARCHAR)"
        new = {
            "id": run_id,
            "session_id": session_id,
            "checkpoint_thread": f"{session_id} || ':' || {run_id}",
        }
        for table, model_id, values in (
            ("sessions", model_session, {"id": session_id}),
            ("session_runs", model_run, new),
        ):
            names = columns[table]
            picked = ", ".join(values.get(name, name) for name in names)
            statement = text(  # table and column names from the schema, values bound
                f"INSERT INTO {table} ({', '.join(names)}) SELECT {picked} "  # noqa: S608
                f"FROM {table} WHERE id = :model_id"
            )
            conn.execute(
                statement,
                [
                    {
                        "model_id": model_id,
                        "new_id": POOL_RUN_ID.format(n),
                        "new_session": POOL_SESSION_ID.format(n),
                    }
                    for n in range(size)
                ],
            )


def reset_pool(url: str) -> int:
    """Every pool run back to ``waiting_input``; returns how many were changed."""
    sql = (
        "UPDATE session_runs SET status = 'waiting_input', finished_at = NULL, "
        "waiting_reason = ?, resume_payload = NULL, worker_id = NULL, lease_expires_at = NULL "
        "WHERE input_message = ? AND status <> 'waiting_input'"
    )
    values = (POOL_REASON, POOL_MESSAGE)
    if make_url(url).get_backend_name() == "sqlite":
        conn = raw_sqlite(url)
        try:
            changed = conn.execute(sql, values).rowcount
        finally:
            conn.close()
        return changed
    with raw_postgresql(url, autocommit=True) as pg:
        changed = pg.execute(sql.replace("?", "%s"), values).rowcount
        if changed:
            pg.execute("VACUUM session_runs")
    return changed


# --------------------------------------------------------------------------
# Endpoints and their wrk scripts


@dataclass(frozen=True)
class Endpoint:
    name: str
    label: str
    method: str
    path: str  # Lua string.format pattern of the target id
    targets: str  # "runs", "event_runs", "sessions" or "pool"
    body: str | None = None  # Lua string.format pattern of the target id

    @property
    def writes_pool(self) -> bool:
        return self.targets == "pool"


ENDPOINTS = {
    e.name: e
    for e in (
        Endpoint("get", "GET /api/runs/{id}", "GET", "/api/runs/%s", "runs"),
        Endpoint(
            "events",
            "GET /api/runs/{id}/events?limit=100",
            "GET",
            "/api/runs/%s/events?limit=100",
            "event_runs",
        ),
        Endpoint(
            "create",
            "POST /api/runs",
            "POST",
            "/api/runs",
            "sessions",
            '{"session_id":"%s","message":"http benchmark"}',
        ),
        Endpoint(
            "resume",
            "POST /api/runs/{id}/resume",
            "POST",
            "/api/runs/%s/resume",
            "pool",
            '{"resume":{"user_feedback":"ocean blues"}}',
        ),
        Endpoint("cancel", "POST /api/runs/{id}/cancel", "POST", "/api/runs/%s/cancel", "pool"),
    )
}
TEMPLATE_ENDPOINTS = ("get",)
RESULT_PREFIX = "HTTP_BENCH_RESULT "

_LUA = """
local threads_started = {}
local thread_count = THREADS
local targets = {TARGETS}
local function target(i)
  if POOL > 0 then return string.format("1%031d", i % POOL) end
  return targets[i % #targets + 1]
end

function setup(thread)
  thread:set("tid", #threads_started)
  table.insert(threads_started, thread)
end

function init(args)
  counter = 0
  statuses = {}
end

function request()
  local id = target(counter * thread_count + tid)
  counter = counter + 1
  local path = string.format(PATH, id)
  if BODY == nil then
    return wrk.format(METHOD, path)
  end
  return wrk.format(METHOD, path, {["Content-Type"] = "application/json"}, string.format(BODY, id))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads_started) do
    for code, n in pairs(thread:get("statuses")) do total[code] = (total[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(total) do table.insert(parts, string.format('"%d":%d', code, n)) end
  local e = summary.errors
  io.write(string.format(
    'PREFIX{"requests":%d,"duration_us":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d}}\\n',
    summary.requests, summary.duration, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(value: str | None) -> str:
    return "nil" if value is None else json.dumps(value)  # a JSON string is a valid Lua string


def lua_script(endpoint: Endpoint, workload: Workload, threads: int) -> str:
    ids: list[str] = [] if endpoint.writes_pool else getattr(workload, endpoint.targets)
    replacements = {
        "THREADS": str(threads),
        "TARGETS": ", ".join(json.dumps(i) for i in ids),
        "POOL": str(workload.pool if endpoint.writes_pool else 0),
        "PATH": _lua_string(endpoint.path),
        "BODY": _lua_string(endpoint.body),
        "METHOD": _lua_string(endpoint.method),
        "PREFIX": RESULT_PREFIX,
    }
    pattern = re.compile("|".join(rf"\b{key}\b" for key in replacements))
    return pattern.sub(lambda m: replacements[m.group(0)], _LUA)


# --------------------------------------------------------------------------
# Processes: every one started here is stopped at the end


class Processes:
    """The subprocesses of this run, each in a process group of its own."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(command, start_new_session=True, text=True, **kwargs)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[str], timeout: float = 15.0) -> None:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Workers left behind by a master that died first share its group.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        for process in list(self.started):
            self.stop(process)


@contextmanager
def bounded_processes() -> Iterator[Processes]:
    """Processes stopped at the end, also on Ctrl-C and on SIGTERM (both handled here,
    since a shell that starts this in the background leaves SIGINT ignored)."""
    processes = Processes()

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield processes
    finally:
        processes.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class Server:
    """``uvicorn --workers N --factory <target>`` on 127.0.0.1, serving ``url``."""

    def __init__(self, processes: Processes, name: str, url: str, workers: int) -> None:
        self.name, self.workers, self.processes = name, workers, processes
        self.port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", SERVERS[name]]
        command += ["--host", HOST, "--port", str(self.port), "--workers", str(workers)]
        command += ["--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "75"]
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": path}
        self.process = processes.start(command, env=env, cwd=ROOT)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, probe_path: str, timeout: float = 60.0) -> None:
        """Until the probe answers 200 and every worker process is up."""
        deadline = time.monotonic() + timeout
        answered = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}")
            with suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                try:
                    conn.request("GET", probe_path)
                    answered += conn.getresponse().status == 200
                finally:
                    conn.close()
            if answered >= 4 and len(self.worker_pids()) >= self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not ready within {timeout:g} s")

    def worker_pids(self) -> list[int]:
        """The worker processes (uvicorn's children but multiprocessing's resource tracker)."""
        children = (pid for pid, info in _processes().items() if info[0] == self.process.pid)
        return sorted(pid for pid in children if "spawn_main" in _cmdline(pid))

    def settle(self, quiet: float = 0.3, timeout: float = 15.0) -> None:
        """Until the workers used no CPU for ``quiet`` seconds: the requests wrk left in
        flight when it stopped have been answered (they would change the pool after a reset)."""
        deadline = time.monotonic() + timeout
        workers = self.worker_pids()
        last = None
        while time.monotonic() < deadline:
            ticks = _processes()
            now = sum(ticks.get(pid, (0, 0))[1] for pid in workers)
            if now == last:
                return
            last = now
            time.sleep(quiet)

    def stop(self) -> None:
        self.processes.stop(self.process)


# --------------------------------------------------------------------------
# CPU use from /proc


def _processes() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, user + system clock ticks)}`` of every process."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with suppress(OSError, IndexError, ValueError):
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def connections_per_process(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections to ``port`` each of ``pids`` holds.

    uvicorn's workers share one listening socket and each accepts what it can,
    so wrk's connections may all land on one worker while the other idles.
    """
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":
                    established.add(fields[9])
    counts = []
    for pid in pids:
        inodes = set()
        with suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        counts.append(len(inodes & established))
    return counts


@dataclass
class CpuSample:
    at: float
    ticks: dict[int, int]
    machine: tuple[int, int]


def cpu_sample() -> CpuSample:
    return CpuSample(
        time.monotonic(), {p: t for p, (_, t) in _processes().items()}, _machine_ticks()
    )


def cpu_use(
    before: CpuSample,
    after: CpuSample,
    workers: list[int],
    database: str | None,
    wrk_seconds: float,
) -> dict[str, float]:
    """Per process group, percent of one core over the interval (100 = one core busy)."""
    seconds = after.at - before.at

    def percent(pids: list[int]) -> float:
        ticks = sum(after.ticks.get(p, 0) - before.ticks.get(p, 0) for p in pids)
        return round(100 * ticks / CLOCK_TICKS / seconds, 1)

    use = {f"worker {n + 1}": percent([pid]) for n, pid in enumerate(workers)}
    if database is not None:
        ours, others = [], []
        for pid in after.ticks:
            command = _cmdline(pid)
            if not command.startswith("postgres"):
                continue
            (ours if f" {database} " in command or "walwriter" in command else others).append(pid)
        use["database"] = percent(ours)
        use["other postgres"] = percent(others)
    use["wrk"] = round(100 * wrk_seconds / seconds, 1)
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    use["machine"] = round(100 * (os.cpu_count() or 1) * busy / max(total, 1), 1)
    return use


# --------------------------------------------------------------------------
# One measurement


@dataclass
class Measurement:
    backend: str
    server: str
    endpoint: str
    round: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_us: dict[str, int]
    cpu: dict[str, float]
    load: tuple[float, float, float]
    connections: list[int] = field(default_factory=list)  # per worker, read once mid-run
    opened: int | None = None  # PostgreSQL connections opened during the measurement

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def rate(self) -> float:
        """2xx answers per second; other answers do not count."""
        return self.ok / self.seconds

    def count(self, low: int, high: int) -> int:
        return sum(n for code, n in self.statuses.items() if low <= code < high)

    def cpu_per_request(self, *prefixes: str) -> float:
        """CPU microseconds per answer of the processes named ``prefixes`` (``worker``,
        ``database``): steadier than req/s on a machine shared with other work."""
        answers = sum(self.statuses.values())
        if not answers or not any(k.startswith(prefixes) for k in self.cpu):
            return float("nan")
        percent = sum(v for k, v in self.cpu.items() if k.startswith(prefixes))
        return percent / 100 * self.seconds / answers * 1e6


@dataclass
class Options:
    threads: int
    connections: int
    duration: float
    warmup: float
    timeout: float


class _SessionCounter:
    """Connections opened to a PostgreSQL database (``pg_stat_database.sessions``)
    between its creation and ``close()``; its own connection is opened first."""

    def __init__(self, url: str) -> None:
        self.conn = raw_postgresql(url, autocommit=True)
        self.start = self._sessions()

    def _sessions(self) -> int:
        row = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> int:
        try:
            return self._sessions() - self.start
        finally:
            self.conn.close()


def run_wrk(
    processes: Processes,
    base_url: str,
    script: Path,
    options: Options,
    duration: float,
    during: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """wrk's result (the script's JSON line) and the CPU seconds wrk used;
    ``during`` is called once, a moment after wrk has connected."""
    command = ["wrk", f"-t{options.threads}", f"-c{options.connections}"]
    command += [f"-d{max(duration, 1):g}s", "--timeout", f"{options.timeout:g}s"]
    command += ["-s", str(script), base_url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = processes.start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if during is not None:
            time.sleep(min(1.0, duration / 2))
            during()
        out, err = process.communicate(timeout=duration + options.timeout + 30)
    finally:
        processes.stop(process)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]), cpu
    raise RuntimeError(f"wrk gave no result (exit {process.returncode}): {err.strip()[:500]}")


def measure(
    processes: Processes,
    server: Server,
    endpoint: Endpoint,
    script: Path,
    options: Options,
    context: dict[str, Any],
) -> Measurement:
    url, database = context["url"], context["database"]
    if options.warmup > 0:
        run_wrk(processes, server.base_url, script, options, options.warmup)
        server.settle()
    if endpoint.writes_pool:
        reset_pool(url)
    workers = server.worker_pids()
    spread: list[int] = []
    sessions = _SessionCounter(url) if database is not None else None
    before = cpu_sample()
    result, wrk_cpu = run_wrk(
        processes,
        server.base_url,
        script,
        options,
        options.duration,
        during=lambda: spread.extend(connections_per_process(workers, server.port)),
    )
    after = cpu_sample()
    opened = sessions.close() if sessions is not None else None
    server.settle()
    return Measurement(
        backend=context["backend"],
        server=server.name,
        endpoint=endpoint.name,
        round=context["round"],
        seconds=result["duration_us"] / 1e6,
        statuses={int(code): n for code, n in result["statuses"].items()},
        errors=result["errors"],
        latency_us=result["latency_us"],
        cpu=cpu_use(before, after, workers, database, wrk_cpu),
        load=os.getloadavg(),
        connections=spread,
        opened=opened,
    )


# --------------------------------------------------------------------------
# A backend: database, servers, rounds


def servers_for(endpoint: str, servers: Sequence[str]) -> list[str]:
    return [s for s in servers if s != "template" or endpoint in TEMPLATE_ENDPOINTS]


def measure_backend(
    backend: str,
    url: str,
    args: argparse.Namespace,
    processes: Processes,
    folder: Path,
) -> list[Measurement]:
    engine = create_db_engine(url, poolclass=NullPool)
    try:
        upgrade(engine)
        workload = seed(engine, pool=args.pool)
    finally:
        engine.dispose()
    options = Options(args.threads, args.connections, args.duration, args.warmup, args.timeout)
    scripts = {}
    for name in args.endpoints:
        scripts[name] = folder / f"{backend}-{name}.lua"
        scripts[name].write_text(lua_script(ENDPOINTS[name], workload, args.threads))
    database = None if backend == "sqlite" else make_url(url).database
    probe = f"/api/runs/{workload.runs[0]}"
    results: list[Measurement] = []
    for round_number in range(1, args.rounds + 1):
        for name in args.servers:
            endpoints = [e for e in args.endpoints if name in servers_for(e, args.servers)]
            if not endpoints:
                continue
            server = Server(processes, name, url, args.workers)
            try:
                server.wait_ready(probe)
                for endpoint in endpoints:
                    context = {
                        "backend": backend,
                        "url": url,
                        "database": database,
                        "round": round_number,
                    }
                    found = measure(
                        processes, server, ENDPOINTS[endpoint], scripts[endpoint], options, context
                    )
                    results.append(found)
                    print(_progress(found), file=sys.stderr, flush=True)
            finally:
                server.stop()
    return results


def _progress(m: Measurement) -> str:
    non_2xx = m.count(0, 200) + m.count(300, 1000)
    return (
        f"  {m.backend} round {m.round} {m.server:<8} {m.endpoint:<7} {m.rate:8.0f} req/s  "
        f"p99 {m.latency_us['p99'] / 1000:7.1f} ms  non-2xx {non_2xx} {m.statuses}  "
        f"cpu {m.cpu}  connections {m.connections}  opened {m.opened}  load {m.load[0]:.2f}"
    )


# --------------------------------------------------------------------------
# Report


@dataclass
class Cell:
    rate: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    repeats: int
    errors: int
    cpu: dict[str, float]
    worker_us: float = float("nan")  # worker CPU per answer
    database_us: float = float("nan")  # PostgreSQL backends' CPU per answer
    load: list[float] = field(default_factory=list)
    spread: list[str] = field(default_factory=list)  # connections per worker, each round
    opened: list[int | None] = field(default_factory=list)  # PostgreSQL connections, each round
    stalled: int = 0  # rounds without a single answer


def _median_of_measured(values: Iterable[float]) -> float:
    """The median of the values that are not NaN (a round without answers has no CPU per
    answer), NaN if none is."""
    measured = [v for v in values if v == v]
    return statistics.median(measured) if measured else float("nan")


def summarize(measurements: list[Measurement]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    keys = sorted({(m.endpoint, m.server) for m in measurements})
    for key in keys:
        group = [m for m in measurements if (m.endpoint, m.server) == key]
        cpu_keys = sorted({k for m in group for k in m.cpu})
        cells[key] = Cell(
            rate=statistics.median(m.rate for m in group),
            p50_ms=statistics.median(m.latency_us["p50"] for m in group) / 1000,
            p99_ms=statistics.median(m.latency_us["p99"] for m in group) / 1000,
            non_2xx=sum(m.count(0, 200) + m.count(300, 1000) for m in group),
            repeats=sum(m.statuses.get(200, 0) for m in group) if key[0] == "cancel" else 0,
            errors=sum(sum(m.errors.values()) for m in group),
            cpu={k: statistics.median(m.cpu.get(k, 0.0) for m in group) for k in cpu_keys},
            worker_us=_median_of_measured(m.cpu_per_request("worker") for m in group),
            database_us=_median_of_measured(m.cpu_per_request("database") for m in group),
            load=[m.load[0] for m in group],
            spread=["/".join(map(str, m.connections)) for m in group],
            opened=[m.opened for m in group],
            stalled=sum(1 for m in group if not m.statuses),
        )
    return cells


def _pool_users(measurements: list[Measurement]) -> list[Measurement]:
    return [m for m in measurements if ENDPOINTS[m.endpoint].writes_pool]


def _us(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # NaN: nothing measured


def _ratio(a: Cell | None, b: Cell | None) -> str:
    if a is None or b is None or b.rate == 0:
        return "-"
    return f"{a.rate / b.rate:.2f}"


def backend_section(backend: str, measurements: list[Measurement], args: argparse.Namespace) -> str:
    cells = summarize(measurements)
    loads = [m.load[0] for m in measurements]
    lines = [
        f"### {backend}",
        "",
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
        f"uvicorn --workers {args.workers}, {args.rounds} interleaved round(s), medians; "
        f"1-minute load during the run {min(loads):.2f}-{max(loads):.2f}.",
        "",
        "| endpoint | server | req/s (2xx) | p50 ms | p99 ms | non-2xx | socket errors "
        "| project ÷ this (req/s) | worker CPU µs/req | database CPU µs/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for endpoint in args.endpoints:
        for server in servers_for(endpoint, args.servers):
            cell = cells.get((endpoint, server))
            if cell is None:
                continue
            ratio = "" if server == "project" else _ratio(cells.get((endpoint, "project")), cell)
            non_2xx = f"{cell.non_2xx}" + (f" (+{cell.repeats} repeats)" if cell.repeats else "")
            if cell.stalled:
                non_2xx += f" ({cell.stalled} round(s) without any answer)"
            lines.append(
                f"| `{ENDPOINTS[endpoint].label}` | {server} | {cell.rate:,.0f} | "
                f"{cell.p50_ms:.1f} | {cell.p99_ms:.1f} | {non_2xx} | {cell.errors} | {ratio} | "
                f"{_us(cell.worker_us)} | {_us(cell.database_us)} |"
            )
    if any(
        m.ok < sum(m.statuses.values()) or m.statuses.get(200) for m in _pool_users(measurements)
    ):
        lines += [
            "",
            f"The pool of {args.pool:,} waiting runs was used up in some measurements: past it "
            "a resume answers 409 (non-2xx) and a cancel 200 (a repeat); raise --pool.",
        ]
    lines += [
        "",
        "CPU during the measurement, % of one core (medians; "
        f"the machine has {os.cpu_count()} cores = {100 * (os.cpu_count() or 1)} %):",
        "",
    ]
    cpu_keys = sorted({k for cell in cells.values() for k in cell.cpu}, key=_cpu_order)
    opened = any(m.opened is not None for m in measurements)
    extra = " PostgreSQL connections opened |" if opened else ""
    lines.append(
        "| endpoint | server | " + " | ".join(cpu_keys) + " | connections per worker |" + extra
    )
    lines.append(
        "| --- | --- | " + " | ".join("---:" for _ in cpu_keys) + " | --- |" + " --- |" * opened
    )
    for endpoint in args.endpoints:
        for server in servers_for(endpoint, args.servers):
            cell = cells.get((endpoint, server))
            if cell is not None:
                values = " | ".join(f"{cell.cpu.get(k, 0):.0f}" for k in cpu_keys)
                row = f"| {endpoint} | {server} | {values} | {', '.join(cell.spread)} |"
                if opened:
                    row += f" {', '.join(str(n) for n in cell.opened)} |"
                lines.append(row)
    return "\n".join(lines) + "\n"


def _cpu_order(key: str) -> tuple[int, str]:
    order = ["worker", "database", "wrk", "other", "machine"]
    return next((n for n, prefix in enumerate(order) if key.startswith(prefix)), 9), key


HEADER_FACTS = ("date", "cpu", "machine")


def header_section(facts: dict[str, str], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [
        f"## HTTP: the Run API against the raw driver ({facts['date']})",
        "",
        f"`python -m benchmarks.http {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"- machine: {facts['cpu']}, {facts['machine']}; load average at the start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "- " + ", ".join(f"{k} {v}" for k, v in facts.items() if k not in HEADER_FACTS),
        "- req/s counts 2xx answers only; p50/p99 are wrk's, over all answers; CPU µs per "
        "answer from /proc (steadier than req/s when other work shares the machine).",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Command line


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn --workers")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help=",".join(ENDPOINTS))
    parser.add_argument("--servers", default=",".join(SERVERS), help=",".join(SERVERS))
    parser.add_argument(
        "--add-server",
        action="append",
        default=[],
        metavar="NAME=MODULE:FACTORY",
        help="one more server measured on every endpoint, e.g. a variant of create_app "
        "(importable from PYTHONPATH); repeatable",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each measurement")
    parser.add_argument("--pool", type=int, default=20_000, help="waiting runs for resume/cancel")
    parser.add_argument("--timeout", type=float, default=30.0, help="wrk --timeout, seconds")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every measurement as JSON here")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.endpoints, args.servers = _csv(args.endpoints), _csv(args.servers)
    for extra in args.add_server:
        name, _, target = extra.partition("=")
        if not name or ":" not in target or name in SERVERS:
            parser.error(f"--add-server expects a new NAME=module:factory, got {extra!r}")
        SERVERS[name] = target
        args.servers.append(name)
    unknown = (set(args.endpoints) - set(ENDPOINTS)) | (set(args.servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown endpoint or server: {sorted(unknown)}")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    args.backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    return args


def ensure_wrk() -> None:
    if shutil.which("wrk") is None:
        subprocess.run([str(ROOT / "scripts" / "ensure-wrk")], check=True)


def ensure_open_files(connections: int) -> None:
    """wrk and the servers each hold one descriptor per connection; raise the soft limit."""
    needed = connections * 2 + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(
                f"ulimit -n is at most {hard}; {connections} connections need {needed}"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ensure_wrk()
    ensure_open_files(args.connections)
    server_url = postgresql_server_url()
    backends = list(args.backends)
    if "postgresql" in backends and (reason := postgresql_reachable(server_url)):
        print(f"postgresql skipped: {reason}", file=sys.stderr)
        backends.remove("postgresql")
    facts = machine_facts(server_url if "postgresql" in backends else None)
    sections = [header_section(facts, args)]
    print(sections[0], flush=True)
    measurements: list[Measurement] = []
    folder = Path(tempfile.mkdtemp(prefix="bench_http_"))
    try:
        with scratch_databases(server_url) as databases, bounded_processes() as processes:
            for backend in backends:
                url = databases.url(backend, "http")
                found = measure_backend(backend, url, args, processes, folder)
                measurements += found
                sections.append(backend_section(backend, found, args))
                print(sections[-1], flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = "\n".join(sections)
    if args.output:
        args.output.write_text(report)
    if args.json:
        args.json.write_text(json.dumps([m.__dict__ for m in measurements], default=str, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        sys.exit(130)


__all__ = ["Workload", "add_pool", "lua_script", "main", "reset_pool", "seed"]
