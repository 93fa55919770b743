"""Load test of the Run API under real uvicorn, over real HTTP, on 127.0.0.1 only.

    python -m tests.load.burst                       # full: 1,000 + 1,000 requests, both backends
    python -m tests.load.burst --reduced             # CI size: 200 + 200
    python -m tests.load.burst --url sqlite:///x.db  # one given (empty or migrated) database

For each backend it migrates a scratch database (or ``--url``), seeds chat
sessions and runs, starts ``uvicorn --workers 2 --factory app.api.main:create_app``
with the default pool settings, and sends two bursts, each all at once:

1. **pairs**: ``POST /api/runs``, and as soon as its 201 arrives, ``GET`` of that
   run on *another* HTTP connection (which may reach the other worker). Every
   GET must find the run: the commit came before the answer.
2. **mixed**: creates, gets, event pages, resumes and cancels in one burst.

It prints the status counts and p50/p99 latency per kind, and exits 1 if any
request got a 5xx or a transport error, or a pair's GET missed its run.
Every loop is bounded in count and by ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.db import create_db_engine, unit_of_work
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from benchmarks.environment import on_each_backend
from migrations import upgrade
from tests.servers import HOST, free_port, start_uvicorn, stop, wait_until_ready

# HOST (127.0.0.1) is the only address this script ever talks to.


@dataclass
class Seeded:
    sessions: list[str]
    waiting: list[str]
    queued: list[str]
    with_events: list[str]


@dataclass
class Figures:
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    transport_errors: Counter[str] = field(default_factory=Counter)
    pairs_missed: int = 0
    pairs: int = 0
    misses: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, seconds: float) -> None:
        self.statuses[kind][status] += 1
        self.latencies[kind].append(seconds)

    @property
    def server_errors(self) -> int:
        return sum(n for counts in self.statuses.values() for s, n in counts.items() if s >= 500)

    def summary(self) -> dict[str, Any]:
        kinds = {}
        for kind, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            kinds[kind] = {
                "requests": len(ordered),
                "statuses": dict(sorted(self.statuses[kind].items())),
                "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
                "p99_ms": round(1000 * ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)], 1),
            }
        return {
            "kinds": kinds,
            "server_errors": self.server_errors,
            "transport_errors": dict(self.transport_errors),
            "pairs": self.pairs,
            "pairs_missed": self.pairs_missed,
            "misses": self.misses[:10],
        }


def seed(url: str, *, sessions: int, waiting: int, queued: int, with_events: int) -> Seeded:
    engine = create_db_engine(url)
    try:
        upgrade(engine)
        with unit_of_work(engine) as db:
            chats = [ChatSession(title=f"load {n}") for n in range(sessions)]
            db.add_all(chats)
            db.flush()
            chat_ids = [chat.id for chat in chats]
            runs, events = RunRepository(db), EventRepository(db)
            seeded = Seeded(chat_ids, [], [], [])
            # One waiting run per session of its own, so resumes do not collide.
            for n in range(waiting):
                run = runs.create({"session_id": chat_ids[n % sessions], "message": "wait"})
                runs.start(run.id)
                runs.wait_for_input(run.id, "pick one")
                seeded.waiting.append(run.id)
            for n in range(queued):
                run = runs.create({"session_id": chat_ids[n % sessions], "message": "queued"})
                seeded.queued.append(run.id)
            for n in range(with_events):
                run = runs.create({"session_id": chat_ids[n % sessions], "message": "events"})
                for step in range(20):
                    events.append(run.session_id, "progress", {"step": step}, run_id=run.id)
                seeded.with_events.append(run.id)
        return seeded
    finally:
        engine.dispose()


class Server:
    """``uvicorn --workers N`` on 127.0.0.1, serving ``url``; stopped on exit."""

    def __init__(self, url: str, workers: int) -> None:
        self.port = free_port()
        # Keep-alive longer than any idle gap in a burst: a keep-alive connection closed
        # by the server just as the client reuses it would read as a failed request.
        options = ["--no-access-log", "--timeout-keep-alive", "75"]
        self.process = start_uvicorn(url, self.port, workers=workers, options=options)
        self.base_url = f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until_ready(self.process, self.base_url, within=timeout)

    def stop(self) -> None:
        stop(self.process)


def _client(base_url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120.0)


async def _send(
    client: httpx.AsyncClient, figures: Figures, kind: str, method: str, path: str, **kw: Any
) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await client.request(method, path, **kw)
    except httpx.TransportError as exc:
        figures.transport_errors[f"{kind}: {type(exc).__name__}"] += 1
        return None
    figures.record(kind, response.status_code, time.perf_counter() - started)
    return response


async def pairs_burst(base_url: str, seeded: Seeded, count: int, figures: Figures) -> None:
    async with _client(base_url, count) as creator, _client(base_url, count) as reader:

        async def pair(n: int) -> None:
            body = {"session_id": seeded.sessions[n % len(seeded.sessions)], "message": f"m{n}"}
            created = await _send(creator, figures, "pair create", "POST", "/api/runs", json=body)
            if created is None or created.status_code != 201:
                return
            figures.pairs += 1
            run_id = created.json()["run_id"]
            fetched = await _send(reader, figures, "pair get", "GET", f"/api/runs/{run_id}")
            if fetched is None or fetched.status_code != 200:
                figures.pairs_missed += 1
                answer = "no answer" if fetched is None else f"{fetched.status_code} {fetched.text}"
                figures.misses.append(f"{run_id}: {answer[:300]}")

        await asyncio.gather(*(pair(n) for n in range(count)))


async def mixed_burst(base_url: str, seeded: Seeded, count: int, figures: Figures) -> None:
    rng = random.Random(count)
    async with _client(base_url, count) as client:

        async def one(n: int) -> None:
            draw = rng.random()
            if draw < 0.3:
                body = {"session_id": rng.choice(seeded.sessions), "message": f"mixed {n}"}
                await _send(client, figures, "create", "POST", "/api/runs", json=body)
            elif draw < 0.5:
                run_id = rng.choice(seeded.with_events + seeded.queued)
                await _send(client, figures, "get", "GET", f"/api/runs/{run_id}")
            elif draw < 0.7:
                run_id = rng.choice(seeded.with_events)
                params = {"since_seq": rng.randrange(0, 15), "limit": 50}
                path = f"/api/runs/{run_id}/events"
                await _send(client, figures, "events", "GET", path, params=params)
            elif draw < 0.85:
                path = f"/api/runs/{rng.choice(seeded.waiting)}/resume"
                body = {"resume": {"user_feedback": f"answer {n}"}}
                await _send(client, figures, "resume", "POST", path, json=body)
            else:
                path = f"/api/runs/{rng.choice(seeded.queued)}/cancel"
                await _send(client, figures, "cancel", "POST", path)

        await asyncio.gather(*(one(n) for n in range(count)))


def run_load(url: str, *, requests: int, workers: int, deadline: float) -> dict[str, Any]:
    seeded = seed(
        url,
        sessions=max(10, requests // 10),
        waiting=max(10, requests // 10),
        queued=max(10, requests // 10),
        with_events=10,
    )
    server = Server(url, workers)
    try:
        server.wait_ready()
        results: dict[str, Any] = {}
        for name, burst in (("pairs", pairs_burst), ("mixed", mixed_burst)):
            figures = Figures()
            started = time.perf_counter()
            sending = burst(server.base_url, seeded, requests, figures)
            asyncio.run(asyncio.wait_for(sending, deadline))
            summary = figures.summary()
            summary["seconds"] = round(time.perf_counter() - started, 2)
            results[name] = summary
        return results
    finally:
        server.stop()


def _failed(results: dict[str, Any]) -> bool:
    return any(
        burst["server_errors"] or burst["transport_errors"] or burst["pairs_missed"]
        for bursts in results.values()
        for burst in bursts.values()
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.load.burst", description=__doc__)
    parser.add_argument("--reduced", action="store_true", help="200 requests per burst (CI)")
    parser.add_argument("--requests", type=int, help="requests per burst (default 1000)")
    parser.add_argument("--url", help="one database to use instead of scratch ones")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per burst")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    requests = args.requests or (200 if args.reduced else 1000)
    results: dict[str, Any] = {}
    if args.url:
        backend = create_db_engine(args.url).dialect.name
        results[backend] = run_load(
            args.url, requests=requests, workers=args.workers, deadline=args.deadline
        )
    else:
        results = on_each_backend(
            args.backends.split(","),
            "load",
            lambda url: run_load(
                url, requests=requests, workers=args.workers, deadline=args.deadline
            ),
        )
    if args.json:
        print(json.dumps(results))
    else:
        for backend, bursts in results.items():
            for name, burst in bursts.items():
                print(f"{backend} {name}: {requests} concurrent requests in {burst['seconds']} s")
                for kind, figures in burst["kinds"].items():
                    print(
                        f"  {kind:<12} {figures['statuses']}  "
                        f"p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms"
                    )
                print(
                    f"  5xx {burst['server_errors']}  transport errors "
                    f"{burst['transport_errors'] or 0}  pairs missed "
                    f"{burst['pairs_missed']}/{burst['pairs']}"
                )
    return 1 if _failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
