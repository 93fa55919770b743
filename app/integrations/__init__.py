"""Adapters between the worker runtime (``app.worker``) and agent frameworks."""
