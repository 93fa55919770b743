"""FastAPI glue for the Run API (needs the ``api`` extra): the request's unit of
work and repository dependencies (``deps``), the one error shape (``errors``),
the router of spec section 8 (``routes``) and a ready app (``main``)."""
