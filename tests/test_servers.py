"""The test servers themselves: fresh databases that exist and go away, an MLflow server that stops and restarts."""

from __future__ import annotations

import psycopg
import pymysql
import pytest
from mlflow.tracking import MlflowClient

from tests.servers import Database, create_postgres_database, drop_postgres_database


def test_a_fresh_postgres_database_is_usable_with_and_without_a_password_and_dropped_after():
    database = create_postgres_database()
    try:
        for url in (database.url, database.url_with_password("anything")):
            plain = url.replace("postgresql+psycopg", "postgresql")
            with psycopg.connect(plain) as connection:
                assert connection.execute("select current_database()").fetchone()[0] == database.name
    finally:
        drop_postgres_database(database)
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as admin:
        names = {row[0] for row in admin.execute("select datname from pg_database")}
    assert database.name not in names


def test_a_fresh_mariadb_database_is_empty_and_usable(mariadb_db: Database):
    assert mariadb_db.url == f"mysql+pymysql://root@127.0.0.1:3306/{mariadb_db.name}"
    db = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=mariadb_db.name)
    with db, db.cursor() as cursor:
        cursor.execute("show tables")
        assert cursor.fetchall() == ()


@pytest.mark.slow
def test_the_mlflow_server_stops_and_comes_back_on_the_same_port_with_its_data(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("fixture-check")
    assert mlflow_server.healthy()

    mlflow_server.stop()
    assert not mlflow_server.healthy()
    mlflow_server.start()
    assert mlflow_server.url.endswith(str(mlflow_server.port))
    assert client.get_experiment_by_name("fixture-check").experiment_id == experiment_id
