"""The schema exists only through Alembic, and the migrations match the models on both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.conftest import reset_all


def _check(url: str) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    from core.db import alembic_config, upgrade

    upgrade(url=url)
    eng = sa.create_engine(url)
    tables = set(sa.inspect(eng).get_table_names())
    assert {"jobs", "items", "class_metrics", "instances", "alembic_version"} <= tables
    try:
        command.check(alembic_config(url))  # autogenerate finds no difference between models and migrations
    except CommandError as exc:  # pragma: no cover - the failure message lists the drift
        pytest.fail(str(exc))
    command.downgrade(alembic_config(url), "base")
    assert set(sa.inspect(eng).get_table_names()) <= {"alembic_version"}
    eng.dispose()


def test_sqlite_migrations(ts_env: dict[str, str]) -> None:
    from core.settings import get_settings

    _check(get_settings().db_url)


@pytest.mark.services
def test_postgres_migrations(ts_env: dict[str, str], pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILESEG_DATABASE_URL", pg_url)
    reset_all()
    _check(pg_url)
