"""``python -m app.runs``: every command and its ``--json`` output, on both backends.

In process (``app.runs.cli.main``) for speed; one subprocess case checks that
an error is one line and no traceback, and that a pipe gets no progress bar.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app.db import unit_of_work
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from app.runs.cli import REFUSED, main
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory

ROOT = Path(__file__).resolve().parents[2]


def _seed(engine: Engine) -> tuple[str, str, str]:
    with unit_of_work(engine) as db:
        chat = ChatSession(title="cli")
        db.add(chat)
        db.flush()
        runs = RunRepository(db)
        done = runs.create({"session_id": chat.id, "message": "one"})
        runs.start(done.id)
        EventRepository(db).append(chat.id, "note", {"n": 1}, run_id=done.id)
        runs.fail(done.id, {"code": "boom"})
        queued = runs.create({"session_id": chat.id, "message": "two"})
        return chat.id, done.id, queued.id


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], url: str, code: int = 0) -> object:
    assert main([*argv, "--json", "--url", url]) == code
    out = capsys.readouterr().out
    return json.loads(out)


def test_every_command_with_json(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    chat, failed, queued = _seed(engine)
    listing = _json(capsys, ["list", "--session", chat], database_url)
    assert [run["run_id"] for run in listing["runs"]] == [queued, failed]
    only = _json(capsys, ["list", "--status", "failed"], database_url)
    assert [run["run_id"] for run in only["runs"]] == [failed]
    assert _json(capsys, ["list", "--worker", "nobody"], database_url) == {"runs": []}
    later = _json(capsys, ["list", "--created-after", "2999-01-01"], database_url)
    assert later == {"runs": []}

    shown = _json(capsys, ["show", failed], database_url)
    assert shown["run_id"] == failed and shown["status"] == "failed"
    events = _json(capsys, ["events", failed], database_url)
    assert [e["type"] for e in events["events"]] == [
        "run_created",
        "run_started",
        "note",
        "run_failed",
    ]
    # --follow on a finished run prints the backlog as JSON lines and ends.
    assert main(["events", failed, "--follow", "--json", "--url", database_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [e["seq"] for e in events["events"]]

    retried = _json(capsys, ["retry", failed, "missing"], database_url, REFUSED)
    assert [r["ok"] for r in retried["results"]] == [True, False]
    new_run = retried["results"][0]["new_run_id"]
    assert _json(capsys, ["show", new_run], database_url)["parent_run_id"] == failed

    cancelled = _json(capsys, ["cancel", queued, new_run], database_url)
    assert [r["changed"] for r in cancelled["results"]] == [True, True]

    dry = _json(capsys, ["delete", queued, "--dry-run"], database_url)
    assert dry["results"][0]["deleted"] is False
    assert _json(capsys, ["show", queued], database_url)["status"] == "cancelled"
    deleted = _json(capsys, ["delete", queued], database_url)
    assert deleted["results"][0]["deleted"] is True
    gone = _json(capsys, ["show", queued], database_url, REFUSED)
    assert gone["error"] == "run_not_found"

    dry_purge = _json(capsys, ["purge", "--finished-before", "0s", "--dry-run"], database_url)
    assert dry_purge["runs"] == 2 and dry_purge["dry_run"] is True
    purged = _json(capsys, ["purge", "--finished-before", "0s", "--batch", "1"], database_url)
    assert (purged["runs"], purged["batches"]) == (2, 2)
    assert _json(capsys, ["list"], database_url) == {"runs": []}


def test_purge_is_off_unless_configured(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    _seed(engine)
    monkeypatch.delenv("RUN_RETENTION_DAYS", raising=False)
    assert _json(capsys, ["purge"], database_url)["off"] is True
    monkeypatch.setenv("RUN_RETENTION_DAYS", "0")
    assert _json(capsys, ["purge"], database_url)["runs"] == 1
    monkeypatch.setenv("RUN_RETENTION_DAYS", "soon")
    assert main(["purge", "--url", database_url]) == 2
    assert "RUN_RETENTION_DAYS" in capsys.readouterr().err


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["purge", "--batch", "0"], ["list", "--created-after", "yesterday"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_subprocess_errors_without_traceback(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "app.runs", "show", "x", "--url", missing],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_events_follow_tails_a_live_run_until_it_ends(engine: Engine, database_url: str) -> None:
    with unit_of_work(engine) as db:
        chat = ChatSession(title="follow")
        db.add(chat)
        db.flush()
        runs = RunRepository(db)
        run = runs.create({"session_id": chat.id, "message": "live"})
        runs.start(run.id)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.runs",
            "events",
            run.id,
            "--follow",
            "--json",
            "--timeout",
            "60",
            "--url",
            database_url,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(follower.stdout.readline())  # the backlog: run_created
        assert first["type"] == "run_created"
        assert json.loads(follower.stdout.readline())["type"] == "run_started"
        for k in range(3):
            with unit_of_work(engine) as db:
                EventRepository(db).append(chat.id, "step", {"k": k}, run_id=run.id)
        with unit_of_work(engine) as db:
            RunRepository(db).complete(run.id)
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate(timeout=10)
    assert follower.returncode == 0, err
    types = [json.loads(line)["type"] for line in out.splitlines()]
    assert types == ["step", "step", "step", "run_completed"]


@pytest.mark.slow
def test_progress_bar_only_on_a_terminal(engine: Engine, database_url: str) -> None:
    import os
    import pty

    ids = [_seed(engine)[2] for _ in range(25)]  # 25 runs: a bulk cancel (idempotent)
    command = [sys.executable, "-m", "app.runs", "cancel", *ids, "--url", database_url]
    piped = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert "[" not in piped.stderr  # nothing drawn into a pipe
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "app.runs", "cancel", *ids, "--url", database_url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=60,
        )
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert b"cancel [" in drawn and b"25/25" in drawn


def test_list_by_metadata(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def seeded(db: object) -> list[str]:
        chat = SessionFactory()
        made = [
            SessionRunFactory(session=chat, run_metadata=metadata)
            for metadata in (
                {"team": "a", "priority": 1},
                {"team": "a", "priority": "1"},
                {"team": "b", "priority": 1, "urgent": True},
                {},
            )
        ]
        return [run.id for run in made]

    runs = seed(engine, seeded)

    def listed(*filters: str) -> set[str]:
        argv = ["list"] + [arg for one in filters for arg in ("--metadata", one)]
        document = _json(capsys, argv, database_url)
        return {run["run_id"] for run in document["runs"]}

    assert listed("team=a") == {runs[0], runs[1]}
    assert listed("priority=1") == {runs[1]}  # KEY=VALUE matches the string
    assert listed('{"priority": 1}') == {runs[0], runs[2]}
    assert listed("team=a", '{"priority": 1}') == {runs[0]}
    assert listed('{"urgent": true}') == {runs[2]}
    assert listed("team=c") == set()
    shown = _json(capsys, ["list", "--metadata", "team=b"], database_url)["runs"][0]
    assert shown["metadata"] == {"team": "b", "priority": 1, "urgent": True}
    assert "run_metadata" not in shown
    assert main(["list", "--metadata", "team=b", "--url", database_url]) == 0
    assert runs[2] in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad", ["team", "=a", '{"a": {"b": 1}}', "{not json", '{"a": [1]}', 'quo"te=1']
)
def test_a_bad_metadata_filter_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--metadata", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metadata" in err[0]
