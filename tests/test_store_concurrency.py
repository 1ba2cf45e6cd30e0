"""Commands started at the same instant in one folder share its ./mlflow.db: the store is created
and migrated once, under a lock, and every run of every process is recorded."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, PROCESSES = 5, 3
# What a study's driver does with its store: check it, open it, find or create its experiment,
# record a run. Two of the three processes share an experiment (the same study started twice).
COMMAND = """
import sys, time
from nvae_platform.record.store import StoreClient, experiment_id
from nvae_platform.record.tracking import check_tracking_uri
uri, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
check_tracking_uri(uri, name)
client = StoreClient(uri)
run = client.create_run(experiment_id(client, name), run_name=sys.argv[4])
for step in range(5):
    client.log_metric(run.info.run_id, "train_bpd", 1.0 / (step + 1), step=step)
client.set_terminated(run.info.run_id)
"""


def test_processes_starting_at_once_on_a_fresh_store_all_record(tmp_path, commands):
    """The processes are forked from the tests' command server (conftest.commands), which has MLflow
    imported: they are all started well before the instant at which they all begin."""
    folders = [tmp_path / f"round{r}" for r in range(ROUNDS)]
    for folder in folders:
        folder.mkdir()
    script = tmp_path / "record.py"
    script.write_text(COMMAND)
    start = time.time() + 3
    procs = [(folder, commands.start(
        [sys.executable, script, f"sqlite:///{folder}/mlflow.db", f"study_{i % 2}", str(start), f"run{i}"],
        folder, dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, timeout=180))
        for folder in folders for i in range(PROCESSES)]
    late = [p.pid for _, p in procs if p.poll() is not None or time.time() > start]
    assert not late, f"started after the instant they all begin: {late}"
    failures = [(folder.name, p.communicate(timeout=180)[1][-2000:]) for folder, p in procs if p.wait(timeout=180)]
    assert not failures, failures
    for folder in folders:
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert sorted(r.info.run_name for r in runs) == [f"run{i}" for i in range(PROCESSES)], folder.name
        assert all(r.info.status == "FINISHED" for r in runs)
        for run in runs:
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train_bpd")] == list(range(5))
        assert len(client.search_experiments(filter_string="name LIKE 'study_%'")) == 2
