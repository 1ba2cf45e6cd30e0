"""The tracking server goes away under a running study: the head's server (python -m
nvae_platform.record.tracking_server: PostgreSQL, basic auth) on loopback, SIGKILLed after the first
epoch is recorded. The study trains on and its record catches up once the server is back; a server
still gone when the study ends is said in one line, and the same command, run again, completes the
record without retraining.

MLflow's client retries each request for about 2 minutes, which carries a study through a quick
restart (tests/test_local_cluster.py kills the cluster's server for 30 s). Here the study's client
does not retry (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0), so a server that is gone longer than that is
reached in seconds.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, wait_for_http
from mlflow.tracking import MlflowClient

from nvae_platform.record.tracking import PARENT_TAG

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
PER_EPOCH = ("train_bpd", "val_bpd", "lr")
ADMIN_PASSWORD = "test-admin-password"
FELL_BEHIND = "stopped taking writes"
CAUGHT_UP = "takes writes again"
UNRECORDED = "[study] the trials ended, but the MLflow store"


class Server:
    """The head's tracking server on a fixed loopback port, started and SIGKILLed by the test."""

    def __init__(self, postgres, folder):
        self.postgres, self.folder, self.port = postgres, folder, free_port()
        self.url, self.process = f"http://127.0.0.1:{self.port}", None

    def start(self):
        address = self.postgres.address
        env = dict(os.environ, PGPASSWORD=self.postgres.password, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                   MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key")
        log = self.folder / "server.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nvae_platform.record.tracking_server", "--backend-store-uri",
             f"postgresql://mlflow@{address}/mlflow", "--auth-database-uri", f"postgresql://mlflow@{address}/mlflow_auth",
             "--artifacts-destination", str(self.folder / "artifacts"), "--port", str(self.port), "--workers", "1",
             "--config-dir", str(self.folder)], cwd=REPO, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for_http(f"{self.url}/health", self.process, log)

    def kill(self):
        """Every process of the server at once, as a lost host or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the test's client, and the studies it starts
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    server = Server(postgres, tmp_path)
    server.start()
    yield server
    server.kill()


class Study:
    """ablation_norm (3 trials a seed, one at a time) recording to the server, forked from the tests'
    command server (conftest.commands); its output read as it comes."""

    def __init__(self, server, folder, experiment, commands, seeds=1):
        command, env = self.command(server, folder, experiment, seeds)
        self.process = commands.start(command, folder, env)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
                        for s, into in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def command(server, folder, experiment, seeds=1):
        """(argv, environment) of the study."""
        command = [sys.executable, os.path.join(REPO, "studies", "ablation_norm.py"), "--levels", "groups=2",
                   "--seeds", str(seeds), "--set", f"epochs={EPOCHS}", "--num-cpus", "2", "--max-concurrent", "1",
                   "--experiment", experiment, "--storage-path", str(folder / "runs")]
        return command, dict(os.environ, MLFLOW_TRACKING_URI=server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")

    def wait_for_line(self, text, seconds=300):
        deadline = time.time() + seconds
        while not any(text in line for line in self.out):
            assert time.time() < deadline and self.process.poll() is None, self.output()
            time.sleep(0.5)

    def wait(self, seconds=600):
        try:
            code = self.process.wait(timeout=seconds)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left running
            except ProcessLookupError:
                pass
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def output(self):
        return "".join(self.out)[-3000:] + "".join(self.err)[-3000:]

    def count(self, text, stream=None):
        return sum(text in line for line in (self.out if stream is None else stream))


def _first_epoch_recorded(server, experiment, study, seconds=300):
    client, deadline = MlflowClient(server.url), time.time() + seconds
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if any(client.get_metric_history(r.info.run_id, "train_bpd") for r in runs):
            return
        assert time.time() < deadline and study.process.poll() is None, study.output()
        time.sleep(1)


def _assert_complete(server, experiment, trials=3):
    """1 parent and its children FINISHED, every per-epoch metric at every epoch exactly once."""
    client = MlflowClient(server.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(runs) == trials + 1 and len(children) == trials and {r.info.status for r in runs} == {"FINISHED"}
    for run in children:
        assert run.data.tags["nvae.status"] == "finished"
        for name in PER_EPOCH:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert sorted(steps) == list(range(EPOCHS)), (run.info.run_name, name, steps)


def _checkpoints(folder):
    return sorted(str(p.relative_to(folder)) for p in (folder / "runs").rglob("checkpoint_*"))


def test_the_study_rides_through_a_server_outage_and_its_record_catches_up(server, tmp_path, commands):
    study = Study(server, tmp_path, "outage-back", commands, seeds=2)  # 6 trials: time to restart and catch up
    _first_epoch_recorded(server, "outage-back", study)
    server.kill()
    study.wait_for_line(FELL_BEHIND)
    server.start()
    study.wait_for_line(CAUGHT_UP)  # by a Tune hook: while the study runs
    assert study.wait() == 0, study.output()
    assert study.count(FELL_BEHIND) == 1 and study.count(CAUGHT_UP) == 1, study.output()
    _assert_complete(server, "outage-back", trials=6)


def test_a_server_still_gone_at_the_end_is_said_in_one_line_and_the_rerun_completes_the_record(server, tmp_path,
                                                                                               commands):
    study = Study(server, tmp_path, "outage-end", commands)
    _first_epoch_recorded(server, "outage-end", study)
    server.kill()
    assert study.wait() == 1, study.output()
    assert study.count(FELL_BEHIND) == 1 and study.count(CAUGHT_UP) == 0, study.output()
    assert study.count(UNRECORDED, study.err) == 1 and "run the same command again" in "".join(study.err)
    assert "bits/dim of the finished trials" in "".join(study.out)  # the table, from Tune's results
    trained = _checkpoints(tmp_path)

    server.start()
    client = MlflowClient(server.url)
    runs = client.search_runs([client.get_experiment_by_name("outage-end").experiment_id])
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert parent.info.status == "RUNNING" and [r.info.status for r in children] == ["RUNNING"]  # before the rerun
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "train_bpd")]
    assert steps == list(range(len(steps))) and 0 < len(steps) < EPOCHS, steps  # the epochs before the kill
    command, env = Study.command(server, tmp_path, "outage-end")
    again = commands.run_argv(command, cwd=tmp_path, env=env, timeout=600)  # forked, to its end
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _checkpoints(tmp_path) == trained  # nothing retrained
    _assert_complete(server, "outage-end")
