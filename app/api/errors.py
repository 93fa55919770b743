"""Domain errors as Run API responses: ``{"error": {"code", "message"}}`` with their status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import DataLayerError


async def _data_layer_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataLayerError)
    return JSONResponse(status_code=exc.status_code, content={"error": exc.to_dict()})


def install_error_handlers(app: FastAPI) -> None:
    """Answer every ``DataLayerError`` with its ``status_code`` and code.

    One handler for the base class covers the whole hierarchy of
    ``app.errors``; other exceptions keep FastAPI's behaviour (500).
    """
    app.add_exception_handler(DataLayerError, _data_layer_error)


__all__ = ["install_error_handlers"]
