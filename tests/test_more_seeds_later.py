"""One study widened over three invocations in one folder (real local Ray, real SQLite store): a level
and a seed added later train only the new trials, under the one MLflow parent run, and the closing
table and the report pool every trial; the first command run again trains nothing."""
import os

import pytest
from mlflow.tracking import MlflowClient

from nvae_platform.record.tracking import PARENT_TAG
from nvae_platform.study.declaration import Factor, Study
from nvae_platform.study.runner import StudySettings, run_study
from reports.runs import load_studies
from reports.tables import build_table

pytestmark = pytest.mark.slow

STUDY = Study(name="test_widen", factors=(Factor("act", {"ELU": {"activation": "elu"},
                                                         "Swish": {"activation": "swish"}}),),
              fixed={"epochs": 1})


def test_a_level_and_a_seed_added_later_train_only_the_new_trials_under_one_parent(local_ray, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def run(**asked):
        return run_study(STUDY, StudySettings(storage_path=str(tmp_path / "runs"), tracking_uri=uri,
                                              cpus_per_worker=0.5, max_concurrent=4, **asked))

    first = run(levels={"act": ["ELU"]})
    trials = tmp_path / "runs" / first.plan.experiment_dir / "trials"
    kept = sorted(os.listdir(trials / "act=ELU,seed=0"))
    wider = run(seeds=2)  # the level Swish and the seed 1 added
    again = run(levels={"act": ["ELU"]})  # the first command: its Tune experiment, nothing to train

    assert wider.plan.experiment_dir == first.plan.experiment_dir != wider.plan.tune_name != first.plan.tune_name
    assert sorted(r.metrics["trial_key"] for r in wider.results) == [  # Tune's record of the second command
        "act=ELU,seed=1", "act=Swish,seed=0", "act=Swish,seed=1"]
    assert [r.metrics["trial_key"] for r in again.results] == ["act=ELU,seed=0"]
    assert sorted(os.listdir(trials / "act=ELU,seed=0")) == kept  # not retrained
    for outcome in (wider, again):  # the closing table pools every seed, whichever command trained it
        rows = outcome.table.splitlines()[2:]
        assert [row.split(" | ")[0] for row in rows] == ["| ELU", "| Swish"], outcome.table
        assert all(" ± " in row and row.endswith(" | 2 finished |") for row in rows), outcome.table
        assert not outcome.interrupted

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test_widen").experiment_id])
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert sorted(r.data.tags["nvae.trial_key"] for r in children) == [
        "act=ELU,seed=0", "act=ELU,seed=1", "act=Swish,seed=0", "act=Swish,seed=1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    tags = parent.data.tags
    assert (tags["nvae.levels.act"], tags["nvae.seeds"], tags["nvae.trials"]) == ("ELU,Swish", "0,1", "4")
    assert wider.parent_run_id == again.parent_run_id == first.parent_run_id == parent.info.run_id

    (study,) = load_studies("test_widen", uri)
    table = build_table(study, {}).long
    assert list(table["act"]) == ["ELU", "Swish"] and list(table["n"]) == [2, 2]
