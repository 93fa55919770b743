"""SSE followers under load: one uvicorn worker on 127.0.0.1, many followers, a few writers.

    python -m tests.load.followers                        # 200 followers, 4 writers, both backends
    python -m tests.load.followers --reduced              # CI size: 50 followers, 4 writers
    python -m tests.load.followers --url sqlite:///x.db   # one given (empty or migrated) database

For each backend: seeds one running run per writer, starts ``uvicorn --workers 1
--factory app.api.main:create_app``, opens every follower's
``GET /api/runs/{run_id}/events/stream`` (followers spread over the runs), then
starts the writers (threads of one process, started and connected beforehand),
each appending ``--events`` events to its run one commit at a time
(``--interval`` apart) and completing it. Every ``--reconnect-every``-th
follower drops its connection halfway through and comes back with ``Last-Event-ID``.

Checked: every follower receives every event of its run exactly once, in seq
order, and the stream ends after ``run_completed``. Measured: latency from the
writer's commit to the follower's read of the event (one clock: the same
machine), p50 / p99, for all followers and for the reconnecting ones; the
database connections the server holds (PostgreSQL: ``pg_stat_activity`` rows
of the server's ``application_name``, and those inside a transaction; SQLite:
open file descriptors of the server on the database file), sampled while
idle and while writers write. Exits 1 when a check fails. Loops are bounded in
count and by ``--deadline``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.db import create_db_engine, unit_of_work
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from benchmarks.environment import on_each_backend
from migrations import upgrade
from tests.load.burst import Server

APPLICATION_NAME = "stream-bench-server"
FIRST_SEQ = 2  # run_created, run_started were written by the seed


# --------------------------------------------------------------------------
# Writers (one process each, so their commits do not wait on the followers' GIL)


def write(url: str, runs: list[tuple[str, str]], events: int, interval: float) -> None:
    """One thread per run: append ``events`` events one commit at a time, then complete
    the run. Prints ``ready``, starts on a line from stdin, then prints
    {run_id: {seq: commit time}} as JSON."""
    engine = create_db_engine(url, pool_size=len(runs))
    committed: dict[str, dict[int, float]] = {run_id: {} for _session_id, run_id in runs}

    def writer(session_id: str, run_id: str) -> None:
        times = committed[run_id]
        for n in range(events):
            with unit_of_work(engine) as db:
                seq = EventRepository(db).append(session_id, "step", {"n": n}, run_id=run_id).seq
            times[seq] = time.time()
            time.sleep(interval)
        with unit_of_work(engine) as db:
            RunRepository(db).complete(run_id)
        times[seq + 1] = time.time()

    try:
        with engine.connect():  # connected and warm before the start
            pass
        print("ready", flush=True)
        sys.stdin.readline()
        threads = [threading.Thread(target=writer, args=run) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.dispose()
    print(json.dumps(committed), flush=True)


# --------------------------------------------------------------------------
# Followers


@dataclass
class Follower:
    run_id: str
    reconnects: bool
    received: list[int] = field(default_factory=list)
    read_at: dict[int, float] = field(default_factory=dict)
    ended: bool = False
    connections: int = 0
    error: str | None = None
    last_id: str | None = None
    drop_at: int | None = None


async def follow(
    client: httpx.AsyncClient, follower: Follower, connected: asyncio.Event, total: int
) -> None:
    """Read the run's stream; a reconnecting follower leaves halfway and resumes."""
    follower.drop_at = total // 2 if follower.reconnects else None
    while not follower.ended and follower.error is None:
        last_id = follower.last_id
        headers = {"Last-Event-ID": last_id} if last_id else {}
        params = {} if last_id else {"since_seq": FIRST_SEQ}
        path = f"/api/runs/{follower.run_id}/events/stream"
        async with client.stream("GET", path, headers=headers, params=params) as response:
            if response.status_code != 200:
                follower.error = f"status {response.status_code}"
                return
            follower.connections += 1
            connected.set()
            if await read_messages(response, follower):
                return


async def read_messages(response: httpx.Response, follower: Follower) -> bool:
    """Read SSE messages until ``event: end`` (True) or a planned drop (False).

    Parses raw chunks (split on the blank line that ends a message) rather than
    line by line: the harness shares the machine with the server it measures.
    """
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        *messages, buffer = buffer.split(b"\n\n")
        read_at = time.time()
        for message in messages:
            if message.startswith(b"event: end"):
                follower.ended = True
                return True
            ids = [line[4:] for line in message.split(b"\n") if line.startswith(b"id: ")]
            if not ids:
                continue  # a ping
            event_id = ids[0].decode()
            seq = int(event_id)
            follower.read_at.setdefault(seq, read_at)
            follower.received.append(seq)
            follower.last_id = event_id
            if follower.drop_at is not None and len(follower.received) >= follower.drop_at:
                follower.drop_at = None
                return False  # drop the connection mid-stream
    if not follower.ended:
        follower.error = "stream closed before event: end"
    return True


# --------------------------------------------------------------------------
# Connection sampling


class ConnectionSampler(threading.Thread):
    """Samples the server's database connections every 0.1 s until stopped."""

    def __init__(self, url: str, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.server_pid = url, server_pid
        self.phase = "idle"
        self.samples: dict[str, list[tuple[int, int]]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite":
            path = str(Path(parsed.database or "").resolve())
            while not self.stopping.wait(0.1):
                try:
                    fds = [
                        os.readlink(f"/proc/{self.server_pid}/fd/{fd}")
                        for fd in os.listdir(f"/proc/{self.server_pid}/fd")
                    ]
                except OSError:
                    continue
                open_db = sum(1 for target in fds if target == path)
                self.samples.setdefault(self.phase, []).append((open_db, -1))
            return
        engine = create_db_engine(self.url, pool_size=1, max_overflow=0)
        query = text(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') "
            "FROM pg_stat_activity WHERE application_name = :name"
        )
        try:
            with engine.connect() as conn:
                while not self.stopping.wait(0.1):
                    total, busy = conn.execute(query, {"name": APPLICATION_NAME}).one()
                    conn.commit()
                    self.samples.setdefault(self.phase, []).append((total, busy))
        finally:
            engine.dispose()

    def summary(self) -> dict[str, Any]:
        return {
            phase: {"max_open": max(s[0] for s in values), "max_in_use": max(s[1] for s in values)}
            for phase, values in self.samples.items()
            if values
        }


# --------------------------------------------------------------------------
# One measurement


def seed(url: str, writers: int) -> list[tuple[str, str]]:
    engine = create_db_engine(url)
    try:
        upgrade(engine)
        runs_seeded = []
        with unit_of_work(engine) as db:
            runs = RunRepository(db)
            for n in range(writers):
                chat = ChatSession(title=f"stream {n}")
                db.add(chat)
                db.flush()
                run = runs.create({"session_id": chat.id, "message": "stream"})
                runs.start(run.id)
                runs_seeded.append((chat.id, run.id))
        return runs_seeded
    finally:
        engine.dispose()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def _start_writers(
    url: str, seeded: Any, events: int, interval: float
) -> asyncio.subprocess.Process:
    """The writers, in a process of their own (``--writer``), with pipes to talk to it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.load.followers",
        "--writer",
        url,
        json.dumps(seeded),
        str(events),
        str(interval),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


def run_stream(
    url: str,
    *,
    followers: int,
    writers: int,
    events: int,
    interval: float,
    reconnect_every: int,
    deadline: float,
) -> dict[str, Any]:
    seeded = seed(url, writers)
    server_url = make_url(url)
    if server_url.get_backend_name() == "postgresql":
        server_url = server_url.update_query_dict({"application_name": APPLICATION_NAME})
    server = Server(server_url.render_as_string(hide_password=False), workers=1)
    sampler: ConnectionSampler | None = None
    try:
        server.wait_ready()
        sampler = ConnectionSampler(
            server_url.render_as_string(hide_password=False), server.process.pid
        )
        sampler.start()
        crowd = [
            Follower(
                seeded[n % writers][1], reconnects=reconnect_every > 0 and n % reconnect_every == 0
            )
            for n in range(followers)
        ]
        total = events + 1  # the steps and run_completed
        committed: dict[str, dict[int, float]] = {}

        async def main() -> None:
            limits = httpx.Limits(max_connections=followers + 10, max_keepalive_connections=0)
            timeout = httpx.Timeout(deadline, connect=30)
            async with httpx.AsyncClient(
                base_url=server.base_url, limits=limits, timeout=timeout
            ) as client:
                connected = [asyncio.Event() for _ in crowd]
                tasks = [
                    asyncio.create_task(follow(client, f, c, total))
                    for f, c in zip(crowd, connected, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(c.wait() for c in connected)), deadline)
                assert sampler is not None
                writers_process = await _start_writers(url, seeded, events, interval)
                assert writers_process.stdin and writers_process.stdout
                ready = await asyncio.wait_for(writers_process.stdout.readline(), deadline)
                assert ready.strip() == b"ready", ready
                await asyncio.sleep(1.0)  # idle: every follower connected, nothing to send
                sampler.phase = "writing"
                out, _ = await asyncio.wait_for(writers_process.communicate(b"go\n"), deadline)
                committed.update(
                    {
                        run: {int(k): v for k, v in times.items()}
                        for run, times in json.loads(out).items()
                    }
                )
                await asyncio.wait_for(asyncio.gather(*tasks), deadline)

        started = time.perf_counter()
        asyncio.run(main())
        seconds = time.perf_counter() - started
    finally:
        if sampler is not None:
            sampler.stopping.set()
            sampler.join(timeout=5)
        server.stop()

    problems: list[str] = []
    latencies: dict[str, list[float]] = {"all": [], "reconnecting": []}
    for index, follower in enumerate(crowd):
        expected = sorted(committed[follower.run_id])
        if follower.error or not follower.ended or follower.received != expected:
            problems.append(
                f"follower {index}: {follower.error or ''} ended={follower.ended} "
                f"got {follower.received[:5]}... ({len(follower.received)}) "
                f"expected {expected[:5]}... ({len(expected)})"
            )
        for seq, read_at in follower.read_at.items():
            delay = 1000 * (read_at - committed[follower.run_id].get(seq, read_at))
            latencies["all"].append(delay)
            if follower.reconnects:
                latencies["reconnecting"].append(delay)
    return {
        "followers": followers,
        "writers": writers,
        "events_per_run": total,
        "reconnecting_followers": sum(f.reconnects for f in crowd),
        "reconnections": sum(f.connections - 1 for f in crowd),
        "seconds": round(seconds, 2),
        "deliveries": len(latencies["all"]),
        "latency_ms": {
            kind: {"p50": round(percentile(v, 0.5), 1), "p99": round(percentile(v, 0.99), 1)}
            for kind, v in latencies.items()
            if v
        },
        "connections": sampler.summary() if sampler else {},
        "problems": problems[:10],
        "failed_followers": len(problems),
    }


def run_feed_only(
    url: str,
    *,
    followers: int,
    writers: int,
    events: int,
    interval: float,
    deadline: float,
    reconnect_every: int = 0,
) -> dict[str, Any]:
    """The same writers, with the followers in this process on ``EventFeed.follow`` (no HTTP):
    the feed's own commit-to-delivery latency, without SSE framing and HTTP parsing."""
    from app.feed import EventFeed

    seeded = seed(url, writers)
    engine = create_db_engine(url)
    feed = EventFeed(engine)
    received: list[tuple[str, list[int], dict[int, float]]] = [
        (seeded[n % writers][1], [], {}) for n in range(followers)
    ]
    sessions = {run_id: session_id for session_id, run_id in seeded}
    committed: dict[str, dict[int, float]] = {}

    async def follow(run_id: str, seqs: list[int], read_at: dict[int, float]) -> None:
        async for batch in feed.follow(sessions[run_id], since_seq=FIRST_SEQ, run_id=run_id):
            now = time.time()
            for event in batch:
                seqs.append(event.seq)
                read_at[event.seq] = now

    async def main() -> None:
        tasks = [asyncio.create_task(follow(*entry)) for entry in received]
        writers_process = await _start_writers(url, seeded, events, interval)
        assert writers_process.stdout is not None
        await asyncio.wait_for(writers_process.stdout.readline(), deadline)
        await asyncio.sleep(1.0)
        out, _ = await asyncio.wait_for(writers_process.communicate(b"go\n"), deadline)
        committed.update(
            {run: {int(k): v for k, v in times.items()} for run, times in json.loads(out).items()}
        )
        await asyncio.wait_for(asyncio.gather(*tasks), deadline)

    try:
        asyncio.run(main())
    finally:
        feed.close()
        engine.dispose()
    latencies = [
        1000 * (at - committed[run_id][seq])
        for run_id, _seqs, read_at in received
        for seq, at in read_at.items()
    ]
    failed = sum(seqs != sorted(committed[run_id]) for run_id, seqs, _ in received)
    return {
        "followers": followers,
        "deliveries": len(latencies),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p99": round(percentile(latencies, 0.99), 1),
        },
        "failed_followers": failed,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.load.followers", description=__doc__)
    parser.add_argument("--reduced", action="store_true", help="50 followers, 10 events (CI)")
    parser.add_argument("--followers", type=int)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--events", type=int, help="appends per writer (default 50)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between appends")
    parser.add_argument("--reconnect-every", type=int, default=10)
    parser.add_argument("--url", help="one database to use instead of scratch ones")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--feed-only", action="store_true", help="followers on EventFeed in-process, no HTTP"
    )
    parser.add_argument("--writer", nargs=4, metavar=("URL", "RUNS_JSON", "N", "INTERVAL"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.writer:
        url, runs, count, interval = args.writer
        write(url, [tuple(run) for run in json.loads(runs)], int(count), float(interval))
        return 0
    options = {
        "followers": args.followers or (50 if args.reduced else 200),
        "writers": args.writers,
        "events": args.events or (10 if args.reduced else 50),
        "interval": args.interval,
        "reconnect_every": args.reconnect_every,
        "deadline": args.deadline,
    }
    results: dict[str, Any] = {}
    measure = run_feed_only if args.feed_only else run_stream
    if args.url:
        results[make_url(args.url).get_backend_name()] = measure(args.url, **options)
    else:
        results = on_each_backend(
            args.backends.split(","), "stream", lambda url: measure(url, **options)
        )
    if args.json:
        print(json.dumps(results))
    else:
        for backend, figures in results.items():
            print(f"{backend}: {json.dumps(figures, indent=2)}")
    return 1 if any(figures["failed_followers"] for figures in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
