"""A host application: its own routes, the Run API mounted, and the browser client.

    DATABASE_URL=sqlite:///runs.db uvicorn examples.browser.app:app
    then open http://127.0.0.1:8000/stream.html?run=<run id>

``stream.html`` follows one run with the browser's ``EventSource``; served by the
app that serves the API, it reads the stream same-origin. The database must be
migrated (``python -m migrations upgrade``). ``tests/feed/test_sse_browser.py``
runs this app under uvicorn and the page in a headless Chromium.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from app.api.routes import router as runs_router

PAGE = Path(__file__).with_name("stream.html")

app = FastAPI(title="A host application")
app.include_router(runs_router)  # /api/runs/...: answers its own errors, installs nothing


@app.get("/stream.html", include_in_schema=False)
async def stream_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


@app.get("/hello")
async def hello() -> dict[str, str]:
    """One of the host's own routes."""
    return {"hello": "world"}
