"""--until-decided: rounds that add one seed to the rows an open finding needs, under one parent run,
until every finding is decided or --max-seeds; refused, before anything starts, where nothing could
decide (no findings, a search, --max-seeds below the first round's seeds)."""
import pytest
from mlflow.tracking import MlflowClient

from nvae_platform.findings import DIVERGED, Finding
from nvae_platform.record.tracking import LOOKS_TAG
from nvae_platform.study import Factor, Study
from nvae_platform.study.cli import main
from studies.search_architecture import STUDY as SEARCH

# An absurd learning rate diverges at once: its count of diverged trials against the sane row's is the
# finding. With --max-seeds 3 each verdict is judged at 2.5% / 3, which 3 seeds a row cannot reach
# (Fisher's one-sided p of 3/3 against 0/3 diverged is 1/20), so the run ends open at 3 seeds.
STUDY = Study(name="test_until_decided", factors=(Factor("lr", {"1e-2": {"learning_rate": 1e-2},
                                                               "1e9": {"learning_rate": 1e9, "warmup_epochs": 0.0}}),),
              fixed={"epochs": 1},
              findings=(Finding("absurd_lr_diverges", "an absurd learning rate diverges", rows={"lr": "1e9"},
                                than={"lr": "1e-2"}, metric=DIVERGED, direction="higher"),))
NO_FINDINGS = Study(name="test_no_findings", factors=STUDY.factors, fixed={"epochs": 1})


@pytest.mark.parametrize("study, argv, message", [
    (NO_FINDINGS, [], "declares no findings"),
    (SEARCH, [], "a search samples its levels"),
    (STUDY, ["--seeds", "4", "--max-seeds", "3"], "--max-seeds 3: below the 4 seeds per row of the first round"),
])
def test_a_run_that_nothing_could_decide_is_refused_before_it_starts(study, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(study, ["--until-decided", "--storage-path", str(tmp_path / "runs"),
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_rounds_add_a_seed_to_the_open_rows_under_one_parent_until_max_seeds(local_ray, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(STUDY, ["--until-decided", "--max-seeds", "3", "--storage-path", str(tmp_path / "runs"),
                        "--tracking-uri", uri, "--cpus-per-worker", "0.5", "--max-concurrent", "4"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "[study] --until-decided, round 2" in out and "round 3" not in out
    assert "[study] --until-decided: open at 3 seeds: absurd_lr_diverges after 2 round(s)" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test_until_decided").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(r.data.tags["nvae.trial_key"] for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert children == [f"lr={lr},seed={s}" for lr in ("1e-2", "1e9") for s in range(3)]  # each trial once
    assert parent.data.tags[LOOKS_TAG] == "3" and parent.data.tags["nvae.finding.absurd_lr_diverges"] == "open"
