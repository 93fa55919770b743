"""A compiled LangGraph graph as a ``RunWorker`` target (docs/worker.md, extra ``langgraph``).

    from app.integrations.langgraph import graph_target
    target = graph_target(builder.compile(checkpointer=saver))
    # python -m app.worker mymodule:target --concurrency 4

For each run the worker claims:

* ``config = {"configurable": {"thread_id": run.checkpoint_thread}}`` (plus
  ``checkpoint_ns`` when the run has one). ``checkpoint_thread`` is
  ``"{session}:{run}"``: **one LangGraph thread per run** (the spec's default).
  The chat's memory across runs is the session's event log, which
  ``make_input`` may turn into the first input; a host that wants LangGraph's own
  memory across runs passes ``thread_id=`` (e.g. the session id), and then the
  session's runs share one thread (they never run at once: one running run per
  session).
* The input: ``Command(resume=run.resume_payload)`` when the thread has a pending
  interrupt and the run was resumed; ``None`` (continue from the checkpoint) when
  the thread stopped mid-way (a retried run whose worker died); else
  ``make_input(context)`` (default: the run's message as a user message).
* ``graph.stream(..., stream_mode="updates")``: each step's updates are appended as
  ``graph_update`` events (``{"node": ..., "update": ...}``) with the run's
  ``run_id``, one ``append_many`` per step; the cancel token is checked between steps.
* An ``interrupt(value)`` ends the run's execution as ``wait_for_input`` with
  ``value`` as ``waiting_reason`` (a string as it is, anything else as JSON); the
  checkpointer holds the graph's state until ``resume``. Otherwise the run
  completes with ``{"graph_steps": n}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from langchain_core.messages import BaseMessage
from langgraph.types import Command

from app.worker import RunContext, WaitForInput

EVENT_TYPE = "graph_update"


def default_input(context: RunContext) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": context.input_message or ""}]}


def config_for(context: RunContext, thread_id: str | None = None) -> dict[str, Any]:
    configurable: dict[str, Any] = {"thread_id": thread_id or context.checkpoint_thread}
    if context.checkpoint_ns:
        configurable["checkpoint_ns"] = context.checkpoint_ns
    return {"configurable": configurable}


def graph_target(
    graph: Any,
    *,
    make_input: Callable[[RunContext], Any] = default_input,
    thread_id: Callable[[RunContext], str] | None = None,
) -> Callable[[RunContext], Any]:
    """A ``RunWorker`` target running ``graph`` (compiled with a checkpointer)."""

    def target(context: RunContext) -> Any:
        config = config_for(context, thread_id(context) if thread_id else None)
        state = graph.get_state(config)
        if state.interrupts and context.resume_payload is not None:
            graph_input: Any = Command(resume=context.resume_payload)
        elif state.next:
            graph_input = None
        else:
            graph_input = make_input(context)
        steps = 0
        for chunk in graph.stream(graph_input, config, stream_mode="updates"):
            context.check()
            events = [
                {"type": EVENT_TYPE, "payload": {"node": node, "update": _jsonable(update)}}
                for node, update in chunk.items()
                if node != "__interrupt__"
            ]
            context.emit(events)
            steps += 1
        state = graph.get_state(config)
        if state.interrupts:
            value = state.interrupts[0].value
            return WaitForInput(value if isinstance(value, str) else json.dumps(_jsonable(value)))
        return {"graph_steps": steps}

    return target


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, BaseMessage):
        message: dict[str, Any] = {"type": value.type, "content": value.content}
        for name in ("tool_calls", "tool_call_id", "name"):
            if getattr(value, name, None):
                message[name] = getattr(value, name)
        return message
    return repr(value)
