"""A study on a multi-node Ray cluster simulated on this machine, run the way cluster.yaml runs one:
a head with no CPUs that hosts the trial processes, two 1-CPU worker nodes, a shared folder as the
storage, the tracking server on PostgreSQL with basic auth, and the environment cluster/setup_head.sh
exports. The study is submitted with `ray job submit` and no flags; mid-run, the node under one
trial is removed and a fresh one joins, as when a cloud node is lost and the autoscaler replaces it."""
import os
import re
import subprocess
import sys
import time

import pytest
import ray
from conftest import free_port
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from nvae_platform.defaults import STORAGE_ENV
from nvae_platform.study.runner import TRIAL_DRIVER_RESOURCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 6


@pytest.fixture(scope="module")
def cluster(tracking_server, tmp_path_factory):
    """(Cluster, worker nodes, dashboard URL, tracking URL); every Ray process inherits the head's environment."""
    url, user, password, _ = tracking_server
    storage = tmp_path_factory.mktemp("shared-storage")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {STORAGE_ENV: str(storage), "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user,
                            "MLFLOW_TRACKING_PASSWORD": password,
                            # Ray turns token auth on in a process that finds ~/.ray/auth_token (a local
                            # ray.init writes one) unless RAY_AUTH_MODE says otherwise, and a driver whose
                            # mode differs from the nodes' cannot create actors: pin this process's mode.
                            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}.items():
            env.setenv(name, value)
        ray.shutdown()
        port = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "resources": {TRIAL_DRIVER_RESOURCE: 1000}, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": port})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        try:
            yield cluster, workers, f"http://127.0.0.1:{port}", url
        finally:
            cluster.shutdown()


# The `ray` command of the Python running the tests: no activated environment needed.
RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")


def _running_trial_with_a_checkpoint(client, experiment_name, worker_ids):
    """(run, node id, epochs done) of a trial past its first checkpoint, with epochs to go, on a worker node."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
        nodes = [n for n in run.data.tags.get("nvae.nodes", "").split(",") if n in worker_ids]
        epochs = len(client.get_metric_history(run.info.run_id, "train_bpd"))
        if len(nodes) == 1 and 1 <= epochs <= EPOCHS - 3:
            return run, nodes[0], epochs
    return None


def test_a_study_submitted_as_a_ray_job_spreads_over_nodes_and_survives_losing_one(cluster):
    """Three trials on three nodes; one loses its node after a checkpoint and resumes on the new
    node from that checkpoint; MLflow on the server ends with every run, epoch and sample grid once."""
    cluster_, workers, dashboard, url = cluster
    started = time.time()
    job_id = f"ablation-sr-{int(started)}"
    command = [RAY_CLI, "job", "submit", "--address", dashboard, "--submission-id", job_id, "--no-wait", "--",
               sys.executable, os.path.join(REPO, "studies/ablation_sr.py"), "--set", f"epochs={EPOCHS}"]
    deadline = time.time() + 480  # the head's job agent registers a while after the dashboard answers (minutes under load)
    while True:
        submit = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if "No available agent to submit job" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr
    jobs, client = JobSubmissionClient(dashboard), MlflowClient(url)

    head_id = cluster_.head_node.node_id
    by_id = {node.node_id: node for node in workers}
    lost = None
    deadline = time.time() + 480
    while jobs.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, jobs.get_job_logs(job_id)[-5000:]
        if lost is None and (found := _running_trial_with_a_checkpoint(client, "ablation_sr", by_id)):
            lost = found
            cluster_.remove_node(by_id[found[1]], allow_graceful=False)
            cluster_.add_node(num_cpus=1)  # the autoscaler's replacement
        time.sleep(0.5)
    logs = jobs.get_job_logs(job_id)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-5000:]
    assert lost is not None, "no trial was caught mid-run"
    assert "| 0.01 |" in logs and "failed" not in logs.split("bits/dim of the finished trials")[-1]

    experiment = client.get_experiment_by_name("ablation_sr")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    nodes = set()
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["nvae.status"] == "finished"
        assert 0 < run.data.metrics["test_bpd"] < 1.5
        history = client.get_metric_history(run.info.run_id, "train_bpd")
        assert sorted(m.step for m in history) == list(range(EPOCHS))  # every epoch once, none lost or doubled
        assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        nodes.update(run.data.tags["nvae.nodes"].split(","))
    assert head_id not in nodes and len(nodes) >= 2  # training ran on the worker nodes, more than one

    controllers = list_actors(address=dashboard, filters=[("class_name", "=", "TrainController")], limit=1000)
    assert len(controllers) >= 3 and {a.node_id for a in controllers} == {head_id}  # all bookkeeping on the head

    moved = client.get_run(lost[0].info.run_id)
    assert lost[1] in moved.data.tags["nvae.nodes"].split(",") and len(moved.data.tags["nvae.nodes"].split(",")) == 2
    resumed_at = max(m.value for m in client.get_metric_history(moved.info.run_id, "start_epoch"))
    assert resumed_at >= 1  # the new worker group started from a checkpoint, not from scratch
    print(f"\n{moved.info.run_name}: node lost after {lost[2]} epoch(s), resumed at epoch {resumed_at:g} on "
          f"another node; {len(nodes)} worker nodes used; job {time.time() - started:.0f} s")


def test_a_study_run_on_the_head_joins_its_cluster_as_under_ray_submit(cluster):
    """`ray submit` runs the script on the head in a login shell: no RAY_ADDRESS, no flags. It joins
    the cluster started there and records to the cluster's server, its trials on the worker nodes."""
    cluster_, _, _, url = cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "studies/ablation_sr.py", "--levels", "sr_lambda=0.1", "--set", "epochs=1",
                          "--experiment", "via-ray-submit"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(re.search(r"Ray's own messages .* go to (\S+)", run.stdout).group(1)) as f:
        ray_log = f.read()  # Ray's start-up messages go there, not to the console
    assert "Connected to Ray cluster" in ray_log and "Started a local Ray instance" not in ray_log + run.stderr
    assert "View run" not in run.stdout + run.stderr and "View experiment" not in run.stdout  # MLflow's run links
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("via-ray-submit")
    (trial,) = client.search_runs([experiment.experiment_id], "tags.`nvae.status` = 'finished'")
    assert cluster_.head_node.node_id not in trial.data.tags["nvae.nodes"]
