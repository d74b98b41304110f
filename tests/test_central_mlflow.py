"""The central MLflow as production runs it (cluster/compose.yaml): PostgreSQL store, basic-auth
login, artifacts proxied to S3, all real processes. The sweep, final, pull-best and predict
against it, with MLFLOW_TRACKING_USERNAME/PASSWORD and no credential in anything the run wrote,
are the end-to-end test in tests/test_workflow.py (one run of the production path, not two).
"""

from __future__ import annotations

import pytest
import requests

from tests.conftest import CentralMlflow
from tests.postgres_helpers import SOURCES, postgres_bin_dir, start_postgres, stop_postgres

pytestmark = pytest.mark.services


def test_the_server_refuses_requests_without_a_valid_login(central_mlflow: CentralMlflow) -> None:
    url = f"{central_mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=30).status_code == 401
    wrong = (central_mlflow.username, central_mlflow.password + "x")
    assert requests.get(url, auth=wrong, timeout=30).status_code == 401
    login = (central_mlflow.username, central_mlflow.password)
    assert requests.get(url, auth=login, timeout=30).status_code == 200
    # The health check stays open: load balancers and compose's healthcheck have no login.
    assert requests.get(f"{central_mlflow.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("source", SOURCES)
def test_postgres_starts_from_each_binary_source(source: str) -> None:
    """The system's PostgreSQL and pgserver's (the dev extra's, for machines without one) both
    start, take the password login and hold a table."""
    from chestxpert.cluster.processes import free_port

    if postgres_bin_dir(source) is None:
        pytest.skip(f"no {source} PostgreSQL here")
    server = start_postgres(free_port(), "pg-password-with/@:", source)
    try:
        assert server.source == source
        connection = server.connect()
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE probe (value text); INSERT INTO probe VALUES ('kept')")
        connection.commit()
        connection.close()
        assert b"kept" in server.dump()
    finally:
        stop_postgres(server)
    assert not server.root.exists()
