"""Passwords never enter a config: a URL with one is refused at the edge, before anything is written."""

from __future__ import annotations

import pytest

from cli.main import main


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("optuna_storage", "postgresql+psycopg2://soups:{}@127.0.0.1:5432/optuna"),
        ("mlflow_uri", "https://someone:{}@mlflow.example.org"),
    ],
)
def test_a_password_in_a_tracking_url_is_refused_naming_the_fix_without_repeating_it(field, url, tmp_path, capsys):
    planted = "planted-password-4f1c"
    root = tmp_path / "data"
    code = main(["sweep", "--set", f"tracking.root={root}", "--set", f"tracking.{field}={url.format(planted)}"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and error.startswith("soups sweep: error: invalid config")  # one line per problem
    assert f"tracking.{field} has a password in it" in error and "PGPASSWORD" in error
    assert planted not in error
    assert not root.exists()
