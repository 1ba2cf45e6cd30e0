"""A damaged or missing newest checkpoint is never the end of a run (real Ray, real files): it is set
aside, named, and the run resumes from the newest checkpoint that loads."""
import shutil
from pathlib import Path

import pytest
import torch

from nvae_platform.ray_internals import TRAIN_SNAPSHOT_FILE
from nvae_platform.train.checkpoints import epoch_checkpoints, staging_folder
from nvae_platform.train.resume import damage
from nvae_platform.train.run import prepare_run, run_training
from nvae_platform.train.scales import run_config, run_options


def test_a_truncated_state_is_damage_and_a_whole_one_is_not(tmp_path):
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "state.pt")
    assert damage(str(tmp_path)) is None
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    assert damage(str(tmp_path)) is not None
    (tmp_path / "state.pt").unlink()
    assert damage(str(tmp_path)) == "no state.pt"


def test_a_checkpoint_is_staged_in_its_run_folder_and_what_a_killed_process_left_there_is_cleared(tmp_path):
    options = run_options("digits", "smoke", workers=1, storage_path=str(tmp_path), name="run")
    with staging_folder(options.run_folder) as folder:  # not the machine's temp folder
        assert Path(folder).parent == tmp_path / "run"
        (Path(folder) / "state.pt").write_bytes(b"state")
        shutil.copytree(folder, f"{folder}-left")  # as a process killed while it staged leaves it
    prepare_run(run_config("digits", "smoke"), options)  # the next attempt
    assert not list((tmp_path / "run").iterdir())


def _two_epochs(folder):
    options = run_options("digits", "smoke", workers=1, storage_path=str(folder), name="run")
    assert run_training(run_config("digits", "smoke", epochs=2), options).status == "finished"
    assert (folder / "run" / TRAIN_SNAPSHOT_FILE).exists()
    return options, Path(epoch_checkpoints(str(folder / "run"))[-1].path)


def _three_epochs_resume_from_the_first(options, folder):
    longer = run_training(run_config("digits", "smoke", epochs=3), options)
    assert longer.status == "finished"
    assert [m["epoch"] for m in longer.history] == [0, 1, 2]
    assert [m["start_epoch"] for m in longer.history[1:]] == [1, 1]  # epoch 1 trained again, from epoch 0's state
    return longer


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(local_ray, tmp_path):
    options, newest = _two_epochs(tmp_path)
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    longer = _three_epochs_resume_from_the_first(options, tmp_path)
    aside = newest.parent / f"damaged_{newest.name}"
    assert (aside / "state.pt").exists() and not newest.exists()  # set aside, not deleted
    assert longer.metrics["set_aside_checkpoints"] == aside.name


@pytest.mark.slow
def test_a_deleted_newest_checkpoint_folder_does_not_stop_the_run(local_ray, tmp_path):
    """Ray's own record still names the deleted folder; it is dropped and the run resumes."""
    options, newest = _two_epochs(tmp_path)
    shutil.rmtree(newest)
    _three_epochs_resume_from_the_first(options, tmp_path)
