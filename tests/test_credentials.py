"""Passwords leave the command line for the environment, and come back only where a connection opens."""

from __future__ import annotations

import pytest

from sweeper.tracking.credentials import move_passwords_to_env, password_env_name, with_credentials

PG_VAR = "LORA_SWEEPER_DB_PASSWORD__POSTGRESQL__POSTGRES__127_0_0_1__5432"


@pytest.mark.parametrize(
    ("arg", "stripped", "env"),
    [
        (
            "hydra.sweeper.storage=postgresql+psycopg://postgres:S3cret@127.0.0.1:5432/db",
            "hydra.sweeper.storage=postgresql+psycopg://postgres@127.0.0.1:5432/db",
            {PG_VAR: "S3cret"},
        ),
        (  # quoted for Hydra, a ":" in the password, a query string
            "hydra.sweeper.storage='postgresql://postgres:a:b@127.0.0.1:5432/db?sslmode=disable'",
            "hydra.sweeper.storage='postgresql://postgres@127.0.0.1:5432/db?sslmode=disable'",
            {PG_VAR: "a:b"},
        ),
        (  # percent-encoded stays encoded for SQLAlchemy
            "x=mysql+pymysql://root:p%40ss@db.example:3306/optuna",
            "x=mysql+pymysql://root@db.example:3306/optuna",
            {"LORA_SWEEPER_DB_PASSWORD__MYSQL__ROOT__DB_EXAMPLE__3306": "p%40ss"},
        ),
        (  # an MLflow server: MLflow's own variables, decoded, and no user left in the URL
            "tracking.uri=https://alice:p%40ss@mlflow.example/ml",
            "tracking.uri=https://mlflow.example/ml",
            {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss"},
        ),
        ("tracking.uri=http://127.0.0.1:5000", "tracking.uri=http://127.0.0.1:5000", {}),
        ("hydra.sweeper.storage=postgresql://postgres@h/db", "hydra.sweeper.storage=postgresql://postgres@h/db", {}),
        ("train.max_steps=10", "train.max_steps=10", {}),
    ],
)
def test_a_password_moves_from_the_argument_to_the_environment(arg, stripped, env):
    environ: dict[str, str] = {}
    assert move_passwords_to_env(["-m", arg], environ) == ["-m", stripped]
    assert environ == env


def test_the_database_password_comes_back_only_for_its_own_server_and_user():
    environ: dict[str, str] = {}
    [url] = move_passwords_to_env(["postgresql+psycopg://postgres:S3cret@127.0.0.1:5432/db"], environ)
    assert with_credentials(url, environ) == "postgresql+psycopg://postgres:S3cret@127.0.0.1:5432/db"
    # another database on the same server and user, another driver: the same password
    assert with_credentials("postgresql://postgres@127.0.0.1:5432/other", environ).endswith(
        ":S3cret@127.0.0.1:5432/other"
    )
    for unchanged in (
        "postgresql://other@127.0.0.1:5432/db",  # another user
        "postgresql://postgres@127.0.0.1:5433/db",  # another port
        "postgresql://postgres:given@127.0.0.1:5432/db",  # a password of its own
        "sqlite:////tmp/optuna.db",
        "http://127.0.0.1:5000",
    ):
        assert with_credentials(unchanged, environ) == unchanged
    assert password_env_name("postgresql+psycopg", "postgres", "127.0.0.1:5432") == PG_VAR
