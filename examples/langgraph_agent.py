"""An example LangGraph agent run by the worker: a tool step, then an interrupt.

    DATABASE_URL=... python -m app.worker examples.langgraph_agent:target

agent (a fake chat model asks for the ``get_weather`` tool) -> tools -> agent (the
model drafts an answer) -> review (``interrupt``: a person approves the draft) ->
end. No network: the chat model is LangChain's ``GenericFakeChatModel``, scripted.
The checkpoints go to ``LANGGRAPH_CHECKPOINTS`` (a SQLite path or a PostgreSQL
URL), else to the run database itself (its tables ``checkpoints``, ``writes``...
sit beside the layer's). Needs the ``langgraph`` extra.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt
from sqlalchemy.engine import make_url

from app.db import pooler_mode
from app.integrations.langgraph import graph_target
from app.worker import RunContext


@tool
def get_weather(city: str) -> str:
    """Today's weather in ``city``."""
    return f"sunny, 21 C in {city}"


def agent(state: MessagesState) -> dict[str, Any]:
    tool_results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    if not tool_results:
        scripted = AIMessage(
            content="",
            tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call-1"}],
        )
    else:
        scripted = AIMessage(content=f"Draft: the weather is {tool_results[-1].content}.")
    model = GenericFakeChatModel(messages=iter([scripted]))
    return {"messages": [model.invoke(state["messages"])]}


def route(state: MessagesState) -> str:
    return "tools" if state["messages"][-1].tool_calls else "review"


def review(state: MessagesState) -> dict[str, Any]:
    draft = state["messages"][-1].content
    answer = interrupt({"question": "send this answer?", "draft": draft})
    verdict = "sent" if answer.get("approved") else "discarded"
    return {"messages": [AIMessage(content=f"{verdict}: {draft}")]}


def build(checkpointer: Any) -> Any:
    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([get_weather]))
    graph.add_node("review", review)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", "review"])
    graph.add_edge("tools", "agent")
    graph.add_edge("review", END)
    return graph.compile(checkpointer=checkpointer)


def checkpointer(location: str) -> Any:
    """A LangGraph checkpointer for a SQLite path / URL or a PostgreSQL URL, set up."""
    if location.startswith("postgresql"):
        from langgraph.checkpoint.postgres import PostgresSaver

        if pooler_mode() == "transaction" and os.environ.get("DATABASE_DIRECT_URL"):
            # Its connection keeps prepared statements: past the pooler (docs/deployment.md).
            location = os.environ["DATABASE_DIRECT_URL"]
        from psycopg import Connection
        from psycopg.rows import dict_row

        url = make_url(location).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        conn = Connection.connect(
            conninfo, autocommit=True, prepare_threshold=0, row_factory=dict_row
        )
        saver: Any = PostgresSaver(conn)
    else:
        from langgraph.checkpoint.sqlite import SqliteSaver

        path = make_url(location).database if "://" in location else location
        saver = SqliteSaver(sqlite3.connect(path or ":memory:", check_same_thread=False))
    saver.setup()
    return saver


def make_target(location: str) -> Any:
    return graph_target(build(checkpointer(location)))


_target: Any = None


def target(context: RunContext) -> Any:
    """The worker's callable: the graph, built on first use in this process."""
    global _target
    if _target is None:
        location = (
            os.environ.get("LANGGRAPH_CHECKPOINTS") or os.environ.get("DATABASE_URL") or "runs.db"
        )
        _target = make_target(location)
    return _target(context)
