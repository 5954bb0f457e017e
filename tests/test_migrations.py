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


def _upgrade_at_once(url: str, processes: int = 4) -> None:
    """``processes`` interpreters upgrade the same empty database at the same moment; all must succeed."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = f"from core.db import upgrade; upgrade(url={url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    failed = [e[-400:] for p, e in zip(procs, errors, strict=True) if p.returncode]
    assert not failed, failed
    eng = sa.create_engine(url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    eng.dispose()


def test_sqlite_concurrent_first_upgrades(tmp_path) -> None:  # noqa: ANN001
    """Embedded mode: `tileseg api` and `tileseg worker` started together both migrate an empty data dir
    (without the migration lock, 10 of 20 such processes failed with "table jobs already exists")."""
    for i in range(3):
        _upgrade_at_once(f"sqlite:///{tmp_path}/race{i}.sqlite")


@pytest.mark.services
def test_postgres_concurrent_upgrades(pg_url: str) -> None:
    """Several `tileseg db upgrade` (or migrate containers) at once: the advisory lock serialises them."""
    _upgrade_at_once(pg_url)
