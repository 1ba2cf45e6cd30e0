"""A trained model loaded back from its run or its checkpoint, and studies/evaluate.py, the paper's
evaluation of it.

The run-id tests read the shared finished smoke study through a copy of its MLflow store (database
and artifacts), so that what they log stays out of the store the other tests read. The CIFAR-10
test trains a tiny model for one epoch on random images in CIFAR-10's format.
"""
import json
import os
import pickle
import shutil
import sqlite3

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from nvae_core import NVAE
from nvae_platform.evaluate.trained_model import load_trained
from nvae_platform.record.store import sqlite_path
from nvae_platform.record.tracking import CHECKPOINT_TAG, PARENT_TAG, STATUS_TAG
from nvae_platform.train.measures import evaluation_images, nelbo_bpd
from nvae_platform.train.run import run_training
from nvae_platform.train.scales import run_config, run_options
from studies.evaluate import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate_cli(commands, *args):
    """studies/evaluate.py with args, forked from the tests' command server (conftest.commands)."""
    return commands.run(os.path.join(ROOT, "studies", "evaluate.py"), args, cwd=ROOT, env=dict(os.environ),
                        timeout=600)


@pytest.fixture(scope="module")
def store(finished_study, tmp_path_factory):
    """A copy of the finished study's store: its URI, a client, and its runs by kind (finished trials,
    the diverged ones, the parent)."""
    _, uri = finished_study
    source, target = os.path.dirname(sqlite_path(uri)), str(tmp_path_factory.mktemp("store-copy"))
    original, copy = sqlite3.connect(sqlite_path(uri)), sqlite3.connect(f"{target}/mlflow.db")
    original.backup(copy)
    copy.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (source, target))
    copy.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (source, target))
    copy.commit()
    original.close()
    copy.close()
    shutil.copytree(f"{source}/mlartifacts", f"{target}/mlartifacts")
    uri = f"sqlite:///{target}/mlflow.db"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test_study").experiment_id])
    kinds = {"parent": [r for r in runs if PARENT_TAG not in r.data.tags]}
    for status in ("finished", "diverged"):
        kinds[status] = [r for r in runs if r.data.tags.get(STATUS_TAG) == status]
    assert [len(kinds[k]) for k in ("parent", "finished", "diverged")] == [1, 2, 2]
    return uri, client, kinds


def _last(client, run_id, metric):
    return max(client.get_metric_history(run_id, metric), key=lambda m: m.step).value


@pytest.mark.slow
def test_a_run_id_a_checkpoint_and_a_run_folder_load_the_model_that_gave_the_recorded_val_bpd(store):
    """The loaded model's single-sample NELBO on the run's test images, with the workers' seed,
    is the last epoch's recorded val_bpd."""
    uri, client, runs = store
    for run in runs["finished"]:
        folder = run.data.tags[CHECKPOINT_TAG]
        by_run, by_folder = load_trained(run.info.run_id, uri), load_trained(folder)
        assert (by_run.run_id, by_run.checkpoint, by_run.epoch) == (run.info.run_id, folder, 1)
        assert (by_folder.run_id, by_folder.checkpoint, by_folder.options) == (None, folder, {})
        assert load_trained(os.path.dirname(folder)).checkpoint == folder  # the run folder: its latest
        options = by_run.options
        assert options["run.max_test_images"] == 256 and by_run.config == by_folder.config
        for trained in (by_run, by_folder):
            cfg = trained.config
            assert not trained.model.training
            loader = DataLoader(evaluation_images(cfg, options["run.data_dir"], options["run.max_test_images"]),
                                batch_size=options["run.eval_batch_size"])
            val_bpd = nelbo_bpd(trained.model, loader, cfg, torch.device("cpu"), seed=cfg.seed + 7)  # as the workers
            assert val_bpd == pytest.approx(_last(client, run.info.run_id, "val_bpd"), abs=1e-6)


def test_what_cannot_be_loaded_is_one_error_naming_the_problem_and_the_fix(store, tmp_path):
    uri, _, runs = store
    cases = {
        "0" * 32: "is not in the MLflow store",
        runs["parent"][0].info.run_id: "records no trained model (no nvae.checkpoint tag)",
        runs["diverged"][0].info.run_id: "status diverged) records no trained model",
        str(tmp_path / "nowhere"): "does not exist; pass a trial's MLflow run id, a checkpoint folder",
        str(tmp_path): "holds neither state.pt nor checkpoint_* folders",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError) as error:
            load_trained(source, uri)
        assert message in str(error.value), (source, str(error.value))
    with pytest.raises(ValueError, match="there is no MLflow store .* pass the --tracking-uri"):
        load_trained("0" * 32, f"sqlite:///{tmp_path}/absent.db")
    old = tmp_path / "old-run" / "checkpoint_2020-01-01_00-00-00.000000"
    old.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 0}, old / "state.pt")
    with pytest.raises(ValueError, match="holds no model config .* pass the MLflow run id that recorded it"):
        load_trained(str(old.parent))


@pytest.mark.slow
def test_evaluate_a_trial_by_run_id_logs_the_figures_and_grids_to_its_run(store, commands):
    """With the run's K and test images, the sharded IW figure is the run's up to sampling noise and
    the active-unit counts are the run's exactly."""
    uri, client, runs = store
    run = runs["finished"][0]
    result = _evaluate_cli(commands, run.info.run_id, "--tracking-uri", uri, "--iw-samples", "10", "--max-test-images", "256",
                           "--temperatures", "1.0", "0.7", "--readjust-batches", "2", "--num-cpus", "2",
                           "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IW NLL 20/20 shards, sample grids 2/2" in result.stdout
    assert "Ray's own messages go to" in result.stdout and "Started a local Ray" not in result.stdout + result.stderr
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["test_images"] == 256
    assert logged["test_bpd_iw10"] == pytest.approx(logged["test_bpd"], abs=0.03)
    assert logged["test_active_units"] == logged["active_units"] > 0
    assert logged["test_active_units_kl"] == logged["active_units_kl"]
    groups = [logged[f"test_kl_group_{i}"] for i in range(4)]
    assert all(g >= 0 for g in groups) and logged["test_kl"] == pytest.approx(sum(groups))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples_T1.0.png", "samples_T0.7.png", "evaluation_iw10.json"} <= artifacts
    assert client.get_metric_history(run.info.run_id, "test_bpd_iw10")[0].step == 1  # the checkpoint's epoch


def _cifar_folder(root, images=16):
    """A folder in CIFAR-10's python layout with random images: 5 train batches and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (images, 3072), dtype=np.uint8), "labels": [0] * images}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["x"] * 10}, f)
    return root


@pytest.mark.slow
def test_evaluate_a_cifar10_checkpoint_writes_its_figures_and_grids_to_a_folder(local_ray, tmp_path, capsys):
    data = _cifar_folder(tmp_path / "data")
    trained = run_training(run_config("cifar10", "smoke", epochs=1),
                           run_options("cifar10", "smoke", data_dir=str(data), storage_path=str(tmp_path / "runs"),
                                       name="cifar", iw_samples=2, sample_count=2))
    assert trained.status == "finished", trained.status
    out = tmp_path / "evaluation"
    assert main([trained.checkpoint_path, "--data-dir", str(data), "--out", str(out), "--iw-samples", "3",
                 "--temperatures", "0.8", "--readjust-batches", "1", "--grid", "2"]) == 0
    written = json.loads((out / "evaluation_iw3.json").read_text())
    assert written["source"] == {"checkpoint": trained.checkpoint_path, "run_id": None, "epoch": 0,
                                 "dataset": "cifar10", "split": "test"}
    assert written["metrics"]["test_images"] == 16 and written["metrics"]["test_bpd_iw3"] > 0
    assert (out / "samples_T0.8.png").stat().st_size > 0
    assert f"to {out}" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_input_is_one_error_before_ray_starts(store, tmp_path, capsys, commands):
    """A run id not in the store, a missing checkpoint, a dataset not on disk: exit 2, one line."""
    uri, _, _ = store
    cfg = run_config("cifar10", "smoke")
    checkpoint = tmp_path / "cifar-run" / "checkpoint_2020-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    torch.save({"model": NVAE(cfg).state_dict(), "epoch": 0, "config": cfg.to_dict()}, checkpoint / "state.pt")
    ray.shutdown()
    for args, message in ((["0" * 32, "--tracking-uri", uri], "is not in the MLflow store"),
                          ([str(tmp_path / "nowhere")], "does not exist"),
                          ([str(checkpoint), "--workers", "0"], "--workers: 0 is not allowed")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
        assert not ray.is_initialized()
    missing = _evaluate_cli(commands, str(checkpoint.parent), "--data-dir", str(tmp_path / "no-data"))
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "dataset 'cifar10' not found" in missing.stderr and str(tmp_path / "no-data") in missing.stderr
    assert "Started a local Ray instance" not in missing.stderr
