"""The command line as people type it: options in either place, pipes, YAML out, and databases that fail to open."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_core.config import validate_config
from storage import Store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, **popen: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DISTILLERY_DB_URL", None)
    return subprocess.run([sys.executable, "-m", "kd_core", *args], capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=120, **popen)


@pytest.fixture
def db_with_runs(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    config = validate_config({"name": "listed", "teacher": {"arch": "cnn_small"}, "student": {"arch": "cnn_tiny"},
                              "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9}]})
    for i in range(60):
        store.create_run(f"run {i}", config.model_dump(mode="json"), status="completed")
    store.dispose()
    return url


def test_db_option_before_or_after_the_command(db_with_runs: str) -> None:
    before, after = cli("--db", db_with_runs, "runs"), cli("runs", "--db", db_with_runs)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout and "run 59" in after.stdout


def test_a_closed_pipe_ends_quietly(db_with_runs: str) -> None:
    """`python -m kd_core runs | head -3`: no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(f"{sys.executable} -m kd_core runs --db '{db_with_runs}' | head -3", shell=True, capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert len(out.stdout.splitlines()) == 3
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_show_config_prints_yaml_that_runs_again(db_with_runs: str) -> None:
    shown = cli("show", "1", "--config", "--db", db_with_runs)
    assert shown.returncode == 0, shown.stderr
    config = validate_config(yaml.safe_load(shown.stdout))
    assert config.recipe[1].params == {"temperature": 4.0}  # defaults written out: the stored config is complete
    full = cli("show", "1", "--db", db_with_runs)
    assert "config:" in full.stdout and "temperature: 4.0" in full.stdout


@pytest.mark.parametrize("case", ["missing database", "wrong password", "server down", "read-only file"])
def test_a_database_that_cannot_be_opened_gives_one_line_with_the_fix(case: str, tmp_path: Path) -> None:
    from tests.conftest import STORAGE_PG_DEFAULT_URL, _storage_pg_base_url

    pg = _storage_pg_base_url() or STORAGE_PG_DEFAULT_URL
    if case == "read-only file":
        path = tmp_path / "ro.db"
        Store(f"sqlite:///{path}").dispose()
        path.chmod(stat.S_IRUSR)
        # root writes read-only files anyway; SQLite's read-only open mode gives the same refusal to anyone
        url = f"sqlite:///file:{path}?mode=ro&uri=true" if os.geteuid() == 0 else f"sqlite:///{path}"
        hint = "read-only"
    else:
        from sqlalchemy.engine import make_url

        base = make_url(pg)
        url, hint = {
            "missing database": (base.set(database="no_such_distillery_db"), "does not exist"),
            "wrong password": (base.set(password="not-the-password"), "wrong user or password"),
            "server down": (base.set(host="127.0.0.1", port=9), "no server answers there"),
        }[case]
        url = url.render_as_string(hide_password=False)
    out = cli("runs", "--db", url)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the database") and hint in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "not-the-password" not in out.stderr and "distillery:distillery@" not in out.stderr
