"""RunWriter on a real SQLite store: a failed run that trains again is reopened, and ends as it ends
the second time."""
from mlflow.tracking import MlflowClient

from nvae_platform.record.run_writer import NODES_TAG, STATUS_TAG, RunWriter


def test_a_failed_run_reopened_runs_again_without_its_failure_and_finishes(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("e"))
    writer = RunWriter(client, run.info.run_id, str(tmp_path / "no-checkpoints"))
    writer.finish({"status": "failed: the run's storage cannot be reached"}, "failed", "Traceback: ...")
    found = RunWriter.found(client, client.get_run(run.info.run_id), writer.run_folder)
    assert found.closed and found.failed

    found.reopen()
    again = client.get_run(run.info.run_id)
    assert again.info.status == "RUNNING" and again.data.tags[STATUS_TAG] == "running"
    assert "nvae.error" not in again.data.tags and "nvae.status_detail" not in again.data.tags
    assert not found.closed and not found.failed

    found.finish({"status": "finished", "epoch": 2}, "finished")
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags[STATUS_TAG] == "finished" and not found.failed


class _ReadingClient(MlflowClient):
    """A real client that, as each metric write goes out, reads what the store holds of the run's tags."""

    def __init__(self, uri):
        super().__init__(uri)
        self.tags_at_metrics = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:
            self.tags_at_metrics.append(dict(self.get_run(run_id).data.tags))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


def test_an_epochs_tags_are_in_the_store_before_its_metrics(tmp_path):
    """A reader that sees an epoch's metrics sees the nodes it ran on (the store commits a batch's metrics
    and tags separately; the namespaced cluster's test read a trial between the two)."""
    client = _ReadingClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("e"))
    writer = RunWriter(client, run.info.run_id, str(tmp_path / "no-checkpoints"))
    writer.log_epoch({"epoch": 0, "train_bpd": 1.5, "nodes": "b,a", "device": "cpu"})
    writer.log_epoch({"epoch": 1, "train_bpd": 1.4, "nodes": "c"})
    assert [t.get(NODES_TAG) for t in client.tags_at_metrics] == ["a,b", "a,b,c"]
    assert client.tags_at_metrics[0]["nvae.device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_bpd")] == [0, 1]
