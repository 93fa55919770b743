"""``python -m app.runs``: see and act on runs from a terminal, and purge old ones.

See ``app.runs.cli`` and ``docs/operations.md``.
"""
