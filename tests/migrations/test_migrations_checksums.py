"""Checksums: the SQL a migration runs and nothing else, pinned per migration and dialect.

A failure of ``test_every_checksum_is_pinned`` means a released migration's
SQL changed: every database that applied it would refuse to upgrade. Restore
the SQL and put the change in a new migration (``docs/migrations.md``).
Update the table only when adding a migration.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from migrations import MIGRATIONS, Migration, status, upgrade
from migrations.runner import _RENDERED_CHECKSUMS
from migrations.steps import Check, Probe, step

PINNED = {
    (1, "sqlite"): "f4f11568ab7ac9104fe4798bc283b5d9c5c115c635d729e10a75aa4701938776",
    (1, "postgresql"): "33b7965dca0310a2a0479b607f8c508bfd750955066164e91bf5f09ea1149a7c",
    (2, "sqlite"): "5058a308dcee9575233be5f85f2bf937b6a7b0b0c78df0e1063b9c4c5565cc18",
    (2, "postgresql"): "f54c5c385e1778b36e42a9ff1831ddf7c84dde4aacce38167f1aea24b45ca79b",
    (3, "sqlite"): "47ee1fd45bc2190dd20418b83d668052893a65cf1a9f85a6917c8bc9667f87b1",
    (3, "postgresql"): "f28ffff9c6e0933892ab3c1a077c11e89c747de2316980e26cb9ad7d307e8258",
    (4, "sqlite"): "303ca225a83d54b0fbf48a56a3fe653cba4c9a55ddbd97001ef0e19a50a540cd",
    (4, "postgresql"): "f9490b53db7ec55d2f395ed375c8042b58631f0118d8df7c19ff0d08ae06e348",
    (5, "sqlite"): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    (5, "postgresql"): "9184280768ef05ffe4a6fd20487205cae907972e63ce913c0715f0f91cc7e67b",
    (6, "sqlite"): "b69b0045afb212cabfd3a42e5dc08677b57083d77d37afc9399ae032acf83c75",
    (6, "postgresql"): "06720f418e0acb92f29e5e544c8ea992a33e2d741f4b81b16e22a4e7afba8983",
    (7, "sqlite"): "a5b279622573a82de5e414b10f5f3053786774ee5230cbbc38ccee9c6c248608",
    (7, "postgresql"): "4eec57866c86661977dd736e070ace836b15d4a8c78982f6336931b7c247559d",
    (8, "sqlite"): "0964e357aa9dc50bd4cb4bfccb5f4ff2dbf82fc88e8e9f899ba8e4ce3fab50b0",
    (8, "postgresql"): "ccb3b218af9ad7eda77fdd6e9a4a59024a82996e08475ed9d7d6ea1404163f5b",
    (9, "sqlite"): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    (9, "postgresql"): "ca0ceeafb19bad9e8a7b24d53c232b6ef6ed109a5e52cc94d64a5ba6b59b0874",
    (10, "sqlite"): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    (10, "postgresql"): "50a415ead0b91de508a52b14d010fec107e2a03ed83893a667e48d53d942ea0a",
    (11, "sqlite"): "2d821de75ae884e835c985815a844aaec6cba268e1a8caaa11a49611821f22a2",
    (11, "postgresql"): "e9014816dfc5096ba4dae8b722a2176edf3d2c9cdfcf7576d4bc38a6bbb62c69",
    (12, "sqlite"): "ab008971e2ab610e11749cbdf7b8c7c10dab0cf71034a59c41dd9f86add0230f",
    (12, "postgresql"): "298c7428883a7e1ffcd551843213126dc5ebd4411212d3adfaa910d4765b3230",
    (13, "sqlite"): "d0c5e6e2bcb2a2d98900135c1d4e1f8df05096c6b39b39cb6d48563d94ea1ba3",
    (13, "postgresql"): "d0c5e6e2bcb2a2d98900135c1d4e1f8df05096c6b39b39cb6d48563d94ea1ba3",
    (14, "sqlite"): "4d8a50307027f6b9e5c99d981c44631c208792a28bbb7a8c74e2312809a0afca",
    (14, "postgresql"): "3b743cba57ebe878e3293c034f5b254051c99b367e1dec2cec45e24f02754c5a",
    (15, "sqlite"): "b12d9438828f9eea2d7fc0f932a5d508f6933e94eb0b231ca55e9d22f4071f4f",
    (15, "postgresql"): "a9b39a180eb1424f53482833d4196e4298f6cef379df91e91639f0d7c3b1ed13",
    (16, "sqlite"): "568ea86927e6bf8748298cc15dcc3504f97f7d7ff46d48fa9b14fd3418266a5d",
    (16, "postgresql"): "4e13fc1040df2ecd8ffd3ec05171ce72fff2e8d949f47430906e2ffc1ffd86a1",
    (17, "sqlite"): "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    (17, "postgresql"): "a0f7afff268485cd1eaefc5b072f4c83a712939a06ea666554503444d9a90cba",
}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_every_checksum_is_pinned(dialect: str) -> None:
    got = {(m.version, dialect): m.checksum(dialect) for m in MIGRATIONS}
    want = {key: value for key, value in PINNED.items() if key[1] == dialect}
    assert got == want


def _with_prose(check: str, report: str) -> Migration:
    return Migration(
        version=1,
        name="prose",
        summary=f"summary {check}",
        declare=lambda dialect: (
            step("CREATE TABLE t (id INTEGER)", only_if=Check(check, lambda conn: True)),
            Probe("SELECT id FROM t", lambda rows: report),
        ),
    )


def test_prose_around_the_sql_changes_no_checksum() -> None:
    first = _with_prose("t does not exist", "rows found")
    reworded = _with_prose("there is no table t yet", "these rows were found")
    assert first.render_sql("sqlite") != reworded.render_sql("sqlite")
    assert first.checksum("sqlite") == reworded.checksum("sqlite")
    other_sql = Migration(
        1, "prose", "summary", lambda dialect: (step("CREATE TABLE t (id BIGINT)"),)
    )
    assert other_sql.checksum("sqlite") != first.checksum("sqlite")


def test_checksums_in_the_old_rendered_format_are_accepted_and_rewritten(
    empty_engine: Engine,
) -> None:
    """A database upgraded by the previous release recorded rendered-text checksums."""
    dialect = empty_engine.dialect.name
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        for (version, key_dialect), (rendered, _sql) in _RENDERED_CHECKSUMS.items():
            if key_dialect == dialect:
                conn.execute(
                    text("UPDATE schema_migrations SET checksum = :c WHERE version = :v"),
                    {"c": rendered, "v": version},
                )

    assert all(state.state == "applied" for state in status(empty_engine))
    assert upgrade(empty_engine) == []
    with empty_engine.connect() as conn:
        recorded = dict(conn.execute(text("SELECT version, checksum FROM schema_migrations")).all())
    assert recorded == {m.version: m.checksum(dialect) for m in MIGRATIONS}


def test_an_old_format_checksum_with_different_sql_is_still_a_change(empty_engine: Engine) -> None:
    dialect = empty_engine.dialect.name
    upgrade(empty_engine)
    rendered_of_0002 = _RENDERED_CHECKSUMS[(2, dialect)][0]
    with empty_engine.begin() as conn:  # 0003's row claims the text 0002 had: not 0003's SQL
        conn.execute(
            text("UPDATE schema_migrations SET checksum = :c WHERE version = 3"),
            {"c": rendered_of_0002},
        )
    assert [s.version for s in status(empty_engine) if s.state == "changed"] == [3]
