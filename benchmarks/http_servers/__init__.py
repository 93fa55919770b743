"""The servers ``python -m benchmarks.http`` compares with the project's ``create_app``.

Each module has a ``create_app()`` factory for ``uvicorn --factory`` that serves
``DATABASE_URL`` (an already migrated and seeded database):

* ``raw``: one FastAPI endpoint per route sending the project's own SQL
  (``docs/sql/<dialect>.sql``) with ``sqlite3`` / ``psycopg`` directly;
* ``template``: a FastAPI-template-style service (SQLModel table model,
  ``Session`` from a ``yield`` dependency, ``session.get``, response model),
  ``GET /api/runs/{run_id}`` only.
"""
