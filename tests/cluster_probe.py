"""What the namespaced cluster's tests ask from the laptop host (their own process has no route to the
hosts' bridge), as JSON on stdout: what the MLflow tracking server holds of one experiment, and how a
Ray job ended.

    python tests/cluster_probe.py record EXPERIMENT            # every run: status, tags, metrics, steps
    python tests/cluster_probe.py running EXPERIMENT --epochs N  # wait for a running trial with N epochs
    python tests/cluster_probe.py finished EXPERIMENT          # wait for a finished trial
    python tests/cluster_probe.py job DASHBOARD JOB_ID         # wait for the job to end: status, logs
    python tests/cluster_probe.py nodes DASHBOARD              # the head's node id, each TrainController's node
"""
import argparse
import json
import time

from mlflow.tracking import MlflowClient


def epochs_done(client, run):
    """Epochs a trial's run has recorded."""
    return len(client.get_metric_history(run.info.run_id, "train_bpd"))


def trial_at(client, experiment_name, epochs, status="RUNNING"):
    """{id, name, epochs, tags} of a trial's run in `status` with at least `epochs` epochs recorded, or None."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    for run in client.search_runs([experiment.experiment_id], f"attributes.status = '{status}'"):
        if "mlflow.parentRunId" in run.data.tags and (done := epochs_done(client, run)) >= epochs:
            # read again: the search saw the tags before the epochs were counted, and an epoch's tags
            # (nvae.nodes) are written before its metrics
            tags = client.get_run(run.info.run_id).data.tags
            return {"id": run.info.run_id, "name": run.info.run_name, "epochs": done, "tags": tags}
    return None


def record(client, experiment_name):
    """Every run of the experiment with its status, tags, last metrics, each metric's steps and artifacts."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [{"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status, "tags": run.data.tags,
             "metrics": run.data.metrics,
             "steps": {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                       for key in run.data.metrics},
             "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)]} for run in runs]


def job_end(dashboard, job_id, timeout):
    """{status, logs} of a Ray job once it has ended (or at the timeout)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs, deadline = JobSubmissionClient(dashboard), time.time() + timeout
    while jobs.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            break
        time.sleep(2)
    return {"status": jobs.get_job_status(job_id).value, "logs": jobs.get_job_logs(job_id)}


def train_controllers(dashboard):
    """{head: the head's node id, controllers: the node id of every TrainController actor, alive or ended}."""
    from ray.util.state import list_actors, list_nodes

    head = next(n.node_id for n in list_nodes(address=dashboard, limit=1000) if n.is_head_node)
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "TrainController")], limit=1000)
    return {"head": head, "controllers": [a.node_id for a in actors]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("record", "running", "finished", "job", "nodes"))
    parser.add_argument("names", nargs="+", help="EXPERIMENT, DASHBOARD JOB_ID, or DASHBOARD")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.what == "job":
        print(json.dumps(job_end(*args.names, args.timeout)))
        return
    if args.what == "nodes":
        print(json.dumps(train_controllers(args.names[0])))
        return
    client = MlflowClient()
    if args.what == "record":
        print(json.dumps(record(client, args.names[0])))
        return
    deadline, status = time.time() + args.timeout, args.what.upper()
    while (found := trial_at(client, args.names[0], args.epochs, status)) is None:
        if time.time() > deadline:
            raise SystemExit(f"no {args.what} trial of {args.names[0]} with {args.epochs} epoch(s)")
        time.sleep(1)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
