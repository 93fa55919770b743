"""FastAPI glue for the Run API: dependencies and error handlers (needs the ``api`` extra)."""
