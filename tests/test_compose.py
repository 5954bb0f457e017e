"""docker-compose.yml is valid and every command in it exists in the CLI."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import REPO


def _services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_file_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (CI installs Debian's package)")
    proc = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compose_commands_exist() -> None:
    from core.cli import main

    services = _services()
    assert {"redis", "postgres", "migrate", "api", "worker", "beat", "minio"} <= set(services)
    runner = CliRunner()
    for name, svc in services.items():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "tileseg":
            continue
        words = [w for w in cmd[1:] if not w.startswith("-")]
        # Resolve the subcommand path and ask it for --help: unknown commands fail here.
        path: list[str] = []
        for w in words:
            probe = runner.invoke(main, [*path, w, "--help"])
            if probe.exit_code != 0:
                break
            path.append(w)
        assert path, f"{name}: `{' '.join(cmd)}` is not a tileseg command"
        assert runner.invoke(main, [*path, "--help"]).exit_code == 0


def test_dockerfile_copies_every_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    for pkg in ("core", "worker", "api", "pipelines", "adapters", "migrations"):
        assert f"COPY {pkg} {pkg}" in text
