"""Shared fixtures: tiny configurations that build and run in milliseconds on a CPU, a finished smoke
study, and the services a cluster's head runs (PostgreSQL, the MLflow tracking server)."""
import os
import random
import time
from types import SimpleNamespace

import pytest
import torch

from nvae_core import NVAEConfig


def tiny_config(**overrides):
    """A 3-channel 8x8 NVAE with two latent scales and every count at its smallest useful value."""
    base = dict(dataset="image-folder", image_channels=3, image_size=8, num_x_bits=8,
                likelihood="logistic_mixture", num_mixtures=3, num_channels_enc=8, num_channels_dec=8,
                num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
                num_postprocess_cells=1, num_latent_scales=2, num_groups_per_scale=2,
                num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                epochs=1, batch_size=4)
    base.update(overrides)
    return NVAEConfig(**base)


def fault_rng():
    """(seed, random source) for the moment a fault test strikes; NVAE_FAULT_SEED=<seed> replays a
    draw that a failing test reports."""
    seed = int(os.environ.get("NVAE_FAULT_SEED", time.time_ns() % 2**32))
    return seed, random.Random(seed)


def tiny_batch(cfg, batch=4, seed=0):
    """Images on the config's data grid (binary for Bernoulli)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g)
    levels = 2 ** cfg.num_x_bits - 1
    return torch.round(x * levels) / levels


# Fixtures that start Ray, a server or a cluster: a test using one (directly or through another
# fixture) is in the slow tier whether or not it is marked; `-m "not slow"` is the fast tier.
SLOW_FIXTURES = {"local_ray", "finished_study", "postgres", "tracking_server", "s3_store", "local_hosts"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_MODULE_SECONDS = {}  # test module: seconds of its tests' setup, call and teardown


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Seconds per test module, slowest first (modules over 1 s): where the suite's time goes."""
    slow = sorted(((s, m) for m, s in _MODULE_SECONDS.items() if s >= 1), reverse=True)
    if slow:
        terminalreporter.write_sep("=", f"seconds per module ({sum(_MODULE_SECONDS.values()):.0f} s in all)")
        for seconds, module in slow:
            terminalreporter.write_line(f"{seconds:8.1f}  {module}")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on this machine's 2 cores for one test module (imported here, so unit tests stay Ray-free)."""
    import ray

    from nvae_platform.ray_cluster import init_ray, shutdown_ray

    ray.shutdown()
    init_ray(num_cpus=2, log_to_driver=False)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    """A finished smoke study in a fresh SQLite store, shared by the study, report and UI tests:
    two activations x a sane and an absurd learning rate (which diverges), all four trials at once
    (half a CPU per worker), two epochs each. Returns (StudyOutcome, tracking URI)."""
    import ray

    from nvae_platform.findings import DIVERGED, Finding
    from nvae_platform.ray_cluster import init_ray, shutdown_ray
    from nvae_platform.study import Factor, Study
    from nvae_platform.study.runner import StudySettings, run_study

    study = Study(
        name="test_study", description="two activations x a sane and an absurd learning rate",
        factors=(Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}}),
                 Factor("lr", {"1e-2": {"learning_rate": 1e-2},
                               "1e9": {"learning_rate": 1e9, "warmup_epochs": 0.0}})),
        fixed={"epochs": 2}, baseline={"act": "Swish", "lr": "1e-2"},
        findings=(Finding("absurd_lr_diverges", "an absurd learning rate diverges", rows={"lr": "1e9"},
                          than={"lr": "1e-2"}, metric=DIVERGED, direction="higher"),))
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder}/mlflow.db"
    ray.shutdown()
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        outcome = run_study(study, StudySettings(storage_path=str(folder / "runs"), tracking_uri=uri,
                                                 cpus_per_worker=0.5, max_concurrent=4))
    finally:
        shutdown_ray()
    return outcome, uri


PRELOADED_SCRIPTS = ("ablation_sr.py", "ablation_norm.py", "train.py", "evaluate.py")  # the entry points tests run as commands


@pytest.fixture(scope="session")
def commands():
    """The entry points as commands forked from one process that imported them (tests/forked_commands.py):
    commands.run(script, args, cwd, env) is a CompletedProcess, without the 6 s of imports and teardown."""
    from forked_commands import ForkedCommands

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with ForkedCommands(os.path.join(root, "studies", name) for name in PRELOADED_SCRIPTS) as server:
        yield server


def free_port():
    """A TCP port on loopback that nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url, process, log_path, seconds=90):
    """Wait until url answers (any HTTP status); fail with the server's log if process exits first."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                with open(log_path) as f:
                    pytest.fail(f"{url} did not come up:\n{f.read()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL (Debian's) on a loopback port, with the databases cluster/create_databases.sql
    creates on a cluster's head: .address (host:port), .password of the role `mlflow`, and
    .create_databases() to run that SQL again."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if not versions or not shutil.which("psql"):
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    bin_dir = os.path.dirname(versions[-1])
    # PostgreSQL refuses to run as root: as root, run it as the postgres user in a folder it owns.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = tempfile.mkdtemp(prefix="nvae-pg-")
    os.chmod(folder, 0o755)
    data = os.path.join(folder, "data")
    if as_owner:
        shutil.chown(folder, "postgres", "postgres")
    port, password = free_port(), "test-db-password"
    subprocess.run(as_owner + [f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
                               "--auth-host=scram-sha-256"], check=True, capture_output=True)
    subprocess.run(as_owner + [f"{bin_dir}/pg_ctl", "-D", data, "-l", f"{folder}/log", "-w", "start", "-o",
                               f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"], check=True, capture_output=True)

    def create_databases():
        """cluster/create_databases.sql as the head runs it: psql as the superuser."""
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "cluster/create_databases.sql")) as sql:
            return subprocess.run(as_owner + ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"password={password}",
                                              "-h", folder, "-p", str(port), "-U", "postgres"],
                                  stdin=sql, capture_output=True, text=True)

    try:
        created = create_databases()
        assert created.returncode == 0, created.stderr
        yield SimpleNamespace(address=f"127.0.0.1:{port}", password=password, create_databases=create_databases)
    finally:
        subprocess.run(as_owner + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    """The cluster's MLflow tracking server (python -m nvae_platform.record.tracking_server) on PostgreSQL,
    with basic auth, on a loopback port. Returns (url, admin username, admin password, artifacts folder)."""
    import os
    import subprocess
    import sys

    address, db_password = postgres.address, postgres.password
    folder = tmp_path_factory.mktemp("tracking-server")
    port, admin_password = free_port(), "test-admin-password"
    env = dict(os.environ, PGPASSWORD=db_password, MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key")
    log = folder / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "nvae_platform.record.tracking_server", "--backend-store-uri",
         f"postgresql://mlflow@{address}/mlflow", "--auth-database-uri", f"postgresql://mlflow@{address}/mlflow_auth",
         "--artifacts-destination", str(folder / "artifacts"), "--port", str(port), "--config-dir", str(folder)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", server, log)
    yield url, "admin", admin_password, folder / "artifacts"
    server.terminate()
    server.wait(timeout=30)



@pytest.fixture
def s3_store(monkeypatch):
    """moto's S3 server on a loopback port of its own, with the bucket `nvae` and fake keys in the
    environment (processes the test starts inherit them): .port, .endpoint (for AWS_ENDPOINT_URL) and
    .filesystem (pyarrow's, on it)."""
    import subprocess
    import sys

    import pyarrow.fs

    pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                         allow_bucket_creation=True)
    try:
        for attempt in range(100):  # until the server answers
            try:
                filesystem.create_dir("nvae")
                break
            except OSError:
                if attempt == 99:
                    raise
                time.sleep(0.1)
        yield SimpleNamespace(port=port, endpoint=f"http://127.0.0.1:{port}", filesystem=filesystem)
    finally:
        server.kill()
        server.wait()
