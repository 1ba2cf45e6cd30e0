"""The MLflow record after a crash (real local Ray, real SQLite store, real study scripts): every
epoch a checkpoint holds is recorded exactly once, and a child run a failed write left half-made is
completed on the next run."""
import os
import re
import signal
import sqlite3
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from nvae_platform.record.outcomes import OUTCOME_FILE
from nvae_platform.record.tracking import PARENT_TAG
from nvae_platform.study.runner import StudySettings, plan_study
from nvae_platform.train.fault_injection import KILL_DRIVER_ENV
from studies.ablation_norm import STUDY as NORM

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

EPOCHS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_EPOCH = ("train_bpd", "val_bpd", "lr", "epoch_seconds", "train_kl_group_0")
# What Ray prints on its own: its start-up line, its processes' forwarded output, Tune's table; and
# any line of its loggers ("2026-01-01 10:00:00,000<TAB>INFO worker.py:2038 -- ...").
RAY_NOISE = ("Started a local Ray instance", "pid=", "(raylet)", "Reporting training result", "[nvae] epoch",
             "Configuration for experiment", "View detailed results",
             "Creating initial MLflow database tables", "View run", "View experiment")  # MLflow's own
RAY_LOG_LINE = re.compile(r"\t(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+\.py:\d+ -- ")


def _study_command(*flags):
    return [sys.executable, os.path.join(ROOT, "studies", "ablation_norm.py"), "--levels", "groups=2",
            "--set", f"epochs={EPOCHS}", "--num-cpus", "2", *flags]


def _run(command, folder, commands, env=None):
    """Run a study script, forked from the tests' command server (conftest.commands), in its own process
    group; whatever it leaves running is killed after."""
    process = commands.start(command, folder, {**os.environ, **(env or {})}, timeout=600)
    try:
        out, err = process.communicate(timeout=630)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, out, err


def _children(folder, experiment="ablation_norm"):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs, {r.data.tags["nvae.trial_key"]: r for r in runs if PARENT_TAG in r.data.tags}


def _assert_every_epoch_once(client, children):
    for key, run in children.items():
        for name in PER_EPOCH:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert steps == list(range(EPOCHS)), (key, name, steps)


def _assert_readable(out, err):
    """No line twice and none of Ray's own messages: those are in the log file the output names."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert not [noise for noise in RAY_NOISE if noise in out + err], out[-3000:] + err[-3000:]
    assert not RAY_LOG_LINE.search(out + err), out[-3000:] + err[-3000:]
    with open(re.search(r"Ray's own messages .* go to (\S+)", out).group(1)) as f:
        log = f.read()
    assert "Started a local Ray instance" in log and "[nvae] epoch 1/" in log  # the trials' own lines
    if "resumed:" not in out:  # a new store: MLflow's line about its schema is in the log, not the console
        assert "Creating initial MLflow database tables" in log


def test_driver_killed_between_a_checkpoint_and_its_record_loses_no_epoch(tmp_path, commands):
    """SIGKILL of the driver when trial 2's epoch 0 reaches it (its checkpoint committed, MLflow not
    yet written); the rerun back-fills that epoch from the checkpoint and retrains no finished trial."""
    plan = plan_study(NORM, StudySettings(levels={"groups": ["2"]}, overrides={"epochs": EPOCHS}))
    second_trial = plan.trials[1].key
    command = _study_command("--max-concurrent", "1")
    code, out, err = _run(command, tmp_path, commands, {KILL_DRIVER_ENV: f"{second_trial}@0"})
    assert code == -signal.SIGKILL and "1/3 done" in out, out[-3000:] + err[-3000:]
    _assert_readable(out, err)
    trials = next((tmp_path / "runs").glob("ablation_norm-smoke-*")) / "trials"
    finished = [p.name for p in trials.iterdir() if (p / OUTCOME_FILE).exists()]
    assert finished == [plan.trials[0].key]
    assert any(p.name.startswith("checkpoint_") for p in (trials / second_trial).iterdir())
    client, _, children = _children(tmp_path)
    assert client.get_metric_history(children[second_trial].info.run_id, "train_bpd") == []  # the lost epoch
    checkpoints_before = sorted(os.listdir(trials / finished[0]))

    code, out, err = _run(command, tmp_path, commands)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "resuming" in out and f"started {finished[0]}" not in out
    assert "[study] resumed: 1 trial(s) ended before  (1/3 done: 1 finished" in out
    _assert_readable(out, err)
    assert sorted(os.listdir(trials / finished[0])) == checkpoints_before  # not retrained
    client, runs, children = _children(tmp_path)
    assert len(runs) == 4 and len(children) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    _assert_every_epoch_once(client, children)
    for run in children.values():
        assert os.path.exists(os.path.join(run.data.tags["nvae.checkpoint"], "state.pt"))


def test_a_store_that_stops_taking_writes_is_said_in_one_line_and_the_rerun_completes_the_record(tmp_path, commands):
    """The store refuses the second child's params (as a full disk does): the study trains on, says
    so once, and at its end says in one line that its record is incomplete; once the store takes
    writes again, the same command completes every child run and retrains nothing."""
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # create the store's schema
    with sqlite3.connect(store) as db:  # parent and first child get their params, the second child not
        db.execute("CREATE TRIGGER full_disk BEFORE INSERT ON params WHEN (SELECT count(*) FROM runs) >= 3 "
                   "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    command = _study_command("--levels", "norm_act=BN+ELU,BN+Swish", "--max-concurrent", "2")
    code, out, err = _run(command, tmp_path, commands)
    assert code == 1, out[-3000:] + err[-3000:]
    behind = [line for line in out.splitlines() if "stopped taking writes" in line]
    assert len(behind) == 1 and "database or disk is full" in behind[0] and "the study goes on" in behind[0]
    unrecorded = [line for line in err.splitlines() if line.startswith("[study] the trials ended, but")]
    assert len(unrecorded) == 1 and "database or disk is full" in unrecorded[0]
    assert "run the same command again" in unrecorded[0]
    trials = next((tmp_path / "runs").glob("ablation_norm-smoke-*")) / "trials"
    trained = sorted(str(p.relative_to(trials)) for p in trials.rglob("checkpoint_*"))
    assert len({p.split("/")[0] for p in trained}) == 2  # both trials trained to their end
    _, _, children = _children(tmp_path)
    assert sorted(len(r.data.params) > 0 for r in children.values()) == [False, True]  # one half-made child

    with sqlite3.connect(store) as db:
        db.execute("DROP TRIGGER full_disk")
    code, out, err = _run(command, tmp_path, commands)
    assert code == 0, out[-3000:] + err[-3000:]
    assert sorted(str(p.relative_to(trials)) for p in trials.rglob("checkpoint_*")) == trained
    client, runs, children = _children(tmp_path)
    assert len(runs) == 3 and len(children) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert run.data.params, run.info.run_name
    for run in children.values():
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "samples.png"}
        assert run.data.params["normalization"] == "batch_norm"
    _assert_every_epoch_once(client, children)


def test_two_studies_started_at_once_in_one_folder_both_record_every_epoch_once(tmp_path, commands):
    """Two study scripts, each with its own local Ray, start together on a fresh ./mlflow.db."""
    one_trial = {"ablation_norm.py": ["--levels", "groups=2", "--levels", "norm_act=BN+Swish"],
                 "ablation_sr.py": ["--levels", "sr_lambda=0.01"]}
    argvs = [[sys.executable, os.path.join(ROOT, "studies", script), *levels, "--set", f"epochs={EPOCHS}",
              "--num-cpus", "1"] for script, levels in one_trial.items()]
    processes = [commands.start(c, tmp_path, dict(os.environ), stderr=subprocess.STDOUT) for c in argvs]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [out[-3000:] for out in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("ablation_norm", "ablation_sr"):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        children = {r.data.tags["nvae.trial_key"]: r for r in runs if PARENT_TAG in r.data.tags}
        assert len(runs) == 2 and len(children) == 1 and {r.info.status for r in runs} == {"FINISHED"}, name
        _assert_every_epoch_once(client, children)


def test_a_finished_study_run_again_under_another_experiment_is_recorded_there_whole_and_not_retrained(tmp_path, commands):
    """The study's folder is keyed by what it trains, not by --experiment: the second command finds
    every trial ended, trains nothing, and records the whole study in the experiment it names."""
    command = _study_command("--levels", "norm_act=BN+ELU", "--max-concurrent", "1")
    code, out, err = _run(command, tmp_path, commands)
    assert code == 0, out[-3000:] + err[-3000:]
    trials = next((tmp_path / "runs").glob("ablation_norm-smoke-*")) / "trials"
    trained = sorted(str(p.relative_to(trials)) for p in trials.rglob("checkpoint_*"))

    code, out, err = _run([*command, "--experiment", "norm-again"], tmp_path, commands)
    assert code == 0 and "interrupted" not in out, out[-3000:] + err[-3000:]
    assert sorted(str(p.relative_to(trials)) for p in trials.rglob("checkpoint_*")) == trained
    for experiment in ("ablation_norm", "norm-again"):
        client, runs, children = _children(tmp_path, experiment)
        assert len(runs) == 2 and len(children) == 1 and {r.info.status for r in runs} == {"FINISHED"}, experiment
        _assert_every_epoch_once(client, children)
        (child,) = children.values()
        assert child.data.params["normalization"] == "batch_norm" and "test_bpd" in child.data.metrics
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"config.json", "samples.png"}
