"""What a run that diverges says about its checkpoints: trained in this process, no Ray."""
from nvae_platform.train.run import prepare_run
from nvae_platform.train.scales import run_config, run_options
from nvae_platform.train.worker_loop import train_in_trial


def test_a_run_diverging_before_its_first_checkpoint_does_not_say_one_was_kept(tmp_path, capfd):
    options = prepare_run(run_config("digits", "smoke", epochs=2), run_options(
        "digits", "smoke", storage_path=str(tmp_path), name="nan", debug_nan_at_step=2))
    outcome = train_in_trial(run_config("digits", "smoke", epochs=2), options, lambda metrics: None)
    assert outcome["status"] == "diverged at step 2"
    said = capfd.readouterr().out
    assert "before its first checkpoint: none kept" in said and "last good checkpoint kept" not in said
