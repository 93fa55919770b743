"""Targets for the worker tests' real processes: what a run does is in its message.

* ``quick``: complete at once, ``{"worker": <worker id>}`` as metrics;
* ``interrupt:<reason>``: wait for input; once resumed, complete with the payload;
* ``fail``: raise ``ValueError``;
* ``hang``: wait for the cancel token (at most 30 s); on a cancel, write the time it
  was seen to ``$WORKER_TEST_DIR/<run id>.cancelled``. With ``WORKER_HANG=complete``
  in the environment, ``hang`` completes at once instead (the worker that takes over).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from app.worker import RunContext, WaitForInput


def behave(context: RunContext) -> Any:
    message = context.input_message or "quick"
    if message == "quick":
        return {"worker": context.worker_id, "attempt": context.attempt}
    if message.startswith("interrupt:"):
        if context.resume_payload is None:
            return WaitForInput(message.partition(":")[2])
        return {"resumed": context.resume_payload, "worker": context.worker_id}
    if message == "fail":
        raise ValueError("boom in the target")
    if message == "hang":
        if os.environ.get("WORKER_HANG") == "complete":
            return {"worker": context.worker_id, "attempt": context.attempt}
        if context.cancelled.wait(30):
            seen = time.time()
            folder = os.environ.get("WORKER_TEST_DIR")
            if folder:
                Path(folder, f"{context.run_id}.cancelled").write_text(repr(seen))
            context.check()
        raise TimeoutError("hang: no cancel within 30 s")
    raise ValueError("unknown instruction")
