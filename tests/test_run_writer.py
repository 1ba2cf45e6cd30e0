"""RunWriter on a real SQLite store: a failed run that trains again is reopened, and ends as it ends
the second time."""
from mlflow.tracking import MlflowClient

from nvae_platform.record.run_writer import STATUS_TAG, RunWriter


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
