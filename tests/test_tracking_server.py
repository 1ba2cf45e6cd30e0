"""The tracking server as a cluster's head runs it (python -m nvae_platform.record.tracking_server):
PostgreSQL behind it, MLflow's basic-auth app in front. Without valid credentials nothing is served,
and a study pointed at it without them stops before it starts anything."""
import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(url, credentials=None):
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(credentials).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_requests_without_valid_credentials_are_refused(tracking_server):
    url, user, password, _ = tracking_server
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/api/2.0/mlflow-artifacts/artifacts", "/"):
        assert _status(url + path) == 401, path
        assert _status(url + path, (user, "not-the-password")) == 401, path
        assert _status(url + path, ("nobody", password)) == 401, path
    assert _status(url + "/api/2.0/mlflow/experiments/search?max_results=1", (user, password)) == 200


def _study(commands, tmp_path, url, **credentials):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=url, **credentials)
    return commands.run(os.path.join(REPO, "studies/ablation_sr.py"), ["--experiment", "refused-study",
                        "--storage-path", str(tmp_path / "runs")], cwd=REPO, env=env)


def test_the_server_runs_no_job_consumers(tracking_server):
    """MLflow's job runner (7 huey consumers, idle at 36% of a core) is off: no study uses it."""
    import psutil

    port = int(tracking_server[0].rsplit(":", 1)[1])
    (listener,) = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    server = psutil.Process(listener)
    while server.parent() is not None and "mlflow" in " ".join(server.parent().cmdline()):
        server = server.parent()  # from a worker up to `mlflow server`
    commands = [" ".join(p.cmdline()) for p in [server, *server.children(recursive=True)]]
    assert not [c for c in commands if "huey" in c], commands


@pytest.mark.slow
def test_a_study_without_credentials_stops_before_it_starts_naming_the_fix(tracking_server, tmp_path, commands):
    url, user, password, _ = tracking_server
    anonymous = _study(commands, tmp_path, url)
    assert anonymous.returncode == 2
    assert "refused the request" in anonymous.stderr
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in anonymous.stderr
    wrong = _study(commands, tmp_path, url, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD="wrong")
    assert wrong.returncode == 2 and "check MLFLOW_TRACKING_PASSWORD" in wrong.stderr
    assert "Started a local Ray" not in anonymous.stderr + wrong.stderr
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        assert MlflowClient(url).get_experiment_by_name("refused-study") is None  # nothing was recorded
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


def _server(*args, **env):
    return subprocess.run([sys.executable, "-m", "nvae_platform.record.tracking_server", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_the_server_command_checks_its_secrets_and_databases_first(postgres, tmp_path):
    address = postgres.address
    uris = ["--backend-store-uri", f"postgresql://mlflow@{address}/mlflow", "--auth-database-uri",
            f"postgresql://mlflow@{address}/mlflow_auth", "--artifacts-destination", str(tmp_path)]
    no_secrets = _server(*uris, MLFLOW_AUTH_ADMIN_PASSWORD="", MLFLOW_FLASK_SERVER_SECRET_KEY="")
    assert no_secrets.returncode == 2
    assert "set MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY" in no_secrets.stderr
    bad_password = _server(*uris, "--config-dir", str(tmp_path), PGPASSWORD="wrong",
                           MLFLOW_AUTH_ADMIN_PASSWORD="x" * 12, MLFLOW_FLASK_SERVER_SECRET_KEY="k")
    assert bad_password.returncode == 2
    assert "--backend-store-uri postgresql://mlflow@" in bad_password.stderr and "cannot connect" in bad_password.stderr
    assert "password authentication failed" in bad_password.stderr


def test_creating_the_databases_again_changes_nothing(postgres, tracking_server):
    """`ray up` re-runs the head's setup on a head whose server has already created its tables."""
    import psycopg

    host, port = postgres.address.split(":")

    def tables():
        with psycopg.connect(host=host, port=port, user="mlflow", password=postgres.password,
                             dbname="mlflow") as connection:
            return connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]

    before = tables()
    rerun = postgres.create_databases()
    assert rerun.returncode == 0, rerun.stderr
    assert before > 10 and tables() == before


def _head_environment(postgres, folder, storage, extra=""):
    """The environment of a head's shell: HOME holding the ~/.nvae/cluster.env setup_head.sh writes
    (here: the test's PostgreSQL), and this Python first on PATH, as ~/venv is there."""
    home = folder / "home"
    (home / ".nvae").mkdir(parents=True)
    host, port = postgres.address.split(":")
    (home / ".nvae/cluster.env").write_text(f"export PGHOST={host} PGPORT={port} PGUSER=mlflow "
                                            f"PGPASSWORD={postgres.password}\nexport NVAE_STORAGE_PATH={storage}\n"
                                            + extra)
    return {**os.environ, "HOME": str(home), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def test_the_backup_copies_both_databases_to_the_storage_for_pg_restore(postgres, tracking_server, tmp_path):
    """cluster/backup_tracking.sh, as cron runs it on the head: the dumps land beside the checkpoints."""
    storage = tmp_path / "storage"
    env = _head_environment(postgres, tmp_path, storage)
    backup = subprocess.run(["bash", "cluster/backup_tracking.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert backup.returncode == 0, backup.stderr
    assert f"MLflow databases copied to {storage}/mlflow-backup/" in backup.stdout
    for name, table in (("mlflow", "runs"), ("mlflow_auth", "users")):
        listing = subprocess.run(["pg_restore", "--list", str(storage / "mlflow-backup" / f"{name}.dump")],
                                 capture_output=True, text=True)
        assert listing.returncode == 0 and f"TABLE public {table} " in listing.stdout, listing.stderr


@pytest.mark.slow
def test_the_heads_start_script_serves_with_authentication_and_restarts_in_place(postgres, tmp_path):
    """cluster/start_tracking_server.sh as `ray up` runs it (twice: a re-run replaces the server)."""
    env = _head_environment(postgres, tmp_path, tmp_path / "storage",
                            "export MLFLOW_AUTH_ADMIN_PASSWORD=test-admin-password MLFLOW_FLASK_SERVER_SECRET_KEY=k\n")
    server_port = free_port()
    url = f"http://127.0.0.1:{server_port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        for _ in range(2):
            start = subprocess.run(["bash", "cluster/start_tracking_server.sh", str(server_port)], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=120)
            assert start.returncode == 0, start.stdout + start.stderr
            assert f"MLflow server up on 127.0.0.1:{server_port}" in start.stdout
            assert _status(url) == 401 and _status(url, ("admin", "test-admin-password")) == 200
    finally:
        subprocess.run(["pkill", "-f", f"mlflow server --app-name basic-auth .*--port {server_port} "])
    servers = subprocess.run(["pgrep", "-f", f"--port {server_port} "], capture_output=True, text=True)
    assert servers.stdout == ""
