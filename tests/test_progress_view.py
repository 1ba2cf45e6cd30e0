"""The study's progress view on synthetic events (no Ray): its plain lines, the terminal block, the
counts, the ETA and a resumed study's count."""
import io

from nvae_platform.study.progress_view import ProgressView, duration, ending
from nvae_platform.train.failures import reason


class Clock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _view(total=4, epochs=2, concurrency=2, tty=False):
    clock, out = Clock(), io.StringIO()
    return ProgressView(total, epochs, concurrency, stream=out, tty=tty, clock=clock), clock, out


def test_plain_mode_prints_one_line_per_change_and_never_one_twice():
    view, clock, out = _view()
    view.note("[study] Ray's own messages go to /x/ray.log")
    view.started("a")
    view.started("b")
    clock.now = 10
    view.epoch("a", 0, 0.70)
    view.epoch("a", 0, 0.70)  # the outcome report repeats the last epoch
    view.refresh()
    clock.now = 20
    view.epoch("a", 1, 0.65)
    view.ended("a", "finished", ending({"status": "finished", "test_bpd": 0.6425}, "finished"))
    view.ended("a", "finished", ending({"status": "finished", "test_bpd": 0.6425}, "finished"))
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(set(lines)) == 6, lines
    assert lines[0] == "[study] Ray's own messages go to /x/ray.log"
    assert lines[1] == "[study] started a  (0/4 done: 0 finished, 0 diverged, 0 failed | 1 running, 3 pending | ETA unknown)"
    assert lines[3].startswith("[study] a: epoch 1/2  val_bpd 0.7000  (0/4 done")
    assert "best val_bpd 0.7000 (a)" in lines[3]
    assert lines[5].startswith("[study] a: finished  test_bpd 0.6425  (1/4 done: 1 finished, 0 diverged, 0 failed")
    assert "\x1b" not in out.getvalue()  # no cursor movement where no terminal reads it


def test_eta_is_the_mean_epoch_time_times_the_epochs_left_over_the_trials_at_once():
    view, clock, _ = _view(total=4, epochs=2, concurrency=2)
    assert view.eta() == "unknown"
    view.started("a")
    view.started("b")
    clock.now = 10
    view.epoch("a", 0, 0.7)  # 10 s per epoch; left: a 1, b 2, two pending trials 4 = 7 epochs on 2 lanes
    assert view.eta() == "35s"
    clock.now = 30
    view.epoch("b", 0, 0.7)  # b's epoch took 30 s: mean 20 s x 6 epochs left / 2
    assert view.eta() == "1m00s"
    assert "ETA 1m00s" in " | ".join(view.summary())
    assert duration(45) == "45s" and duration(190) == "3m10s" and duration(7500) == "2h05m"


def test_diverged_and_failed_trials_are_counted_and_say_why():
    view, _, out = _view(total=3)
    for key in "abc":
        view.started(key)
    view.ended("a", "diverged", ending({"status": "diverged at step 53"}, "diverged"))
    failure = "failed: Training failed.\nTraceback (most recent call last):\n  ...\nRuntimeError: out of memory\n"
    view.ended("b", "failed", ending({"status": failure}, "failed"))
    view.retrying("c", f"failure 1: {reason('Traceback ...' + chr(10) + 'ValueError: boom')}")
    text = out.getvalue()
    assert "[study] a: diverged at step 53  (1/3 done: 0 finished, 1 diverged, 0 failed" in text
    assert "[study] b: failed: RuntimeError: out of memory  (2/3 done: 0 finished, 1 diverged, 1 failed" in text
    assert "[study] c: restarting after failure 1: ValueError: boom  (2/3 done" in text
    assert "0 running, 1 pending" in text.splitlines()[-1]


def test_a_resumed_study_counts_the_trials_that_ended_before():
    view, _, out = _view(total=4)
    view.restored({"a": "finished", "b": "diverged"})
    view.started("c")
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[study] resumed: 2 trial(s) ended before  (2/4 done: 1 finished, 1 diverged, 0 failed | "
                        "0 running, 2 pending | ETA unknown)")
    assert lines[1].startswith("[study] started c  (2/4 done: 1 finished, 1 diverged, 0 failed | 1 running, 1 pending")
    quiet, _, out = _view(total=4)
    quiet.restored({})  # a fresh study: nothing to say
    assert out.getvalue() == ""


def test_a_terminal_redraws_the_block_in_place_at_most_once_a_second():
    view, clock, out = _view(total=2, tty=True)
    view.note("[study] Ray's own messages go to /x/ray.log")
    view.started("a")
    assert out.getvalue().splitlines() == ["[study] Ray's own messages go to /x/ray.log",
                                           "[study] 0/2 done: 0 finished, 0 diverged, 0 failed | 1 running, 1 pending",
                                           "        ETA unknown", "  a  starting"]
    drawn = out.getvalue()
    clock.now = 0.5
    view.epoch("a", 0, 0.7)
    view.refresh()
    assert out.getvalue() == drawn  # changed, but within the second
    clock.now = 1.5
    view.refresh()
    redraw = out.getvalue()[len(drawn):]
    assert redraw.startswith("\x1b[3A\r\x1b[J")  # up to the block's top, clear to the end of the screen
    assert "  a  epoch 1/2  val_bpd 0.7000" in redraw
    clock.now = 5
    view.refresh()
    assert out.getvalue() == drawn + redraw  # nothing changed: nothing drawn
    view.ended("a", "failed", "failed: RuntimeError: boom")  # an end is printed at once, above the block
    ended = out.getvalue()[len(drawn + redraw):]
    assert ended.startswith("\x1b[3A\r\x1b[J[study] a: failed: RuntimeError: boom\n[study] 1/2 done: 0 finished")
    view.close()
    assert out.getvalue().count("a: failed") == 1


def test_the_hours_spent_and_projected_follow_the_estimates_then_the_trials_that_ended():
    clock, out = Clock(), io.StringIO()
    view = ProgressView(3, 2, 2, stream=out, tty=False, clock=clock, reserved=("GPU", 2.0),
                        estimates={"a": 3600.0, "b": 3600.0, "c": 7200.0})
    view.started("a")
    view.started("b")
    clock.now = 1800
    assert view.hours() == (2.0, 8.0)  # 2 x 1800 s x 2 GPUs spent; then 1800 s more of a and of b, and c's 7200 s
    assert "2/8 GPU-h" in view.summary()
    clock.now = 5400  # a and b run past their estimates: the projection grows with them
    view.ended("a", "finished")
    assert view.hours() == (6.0, 10.0)
    unestimated = ProgressView(2, 1, 1, stream=out, tty=False, clock=clock, reserved=("CPU", 1.0))
    unestimated.started("a")
    assert "CPU-h spent" in unestimated.summary()[-1]
    clock.now += 360
    unestimated.ended("a", "finished")
    assert unestimated.hours() == (0.1, 0.2)  # the next trial is projected to take as long as the first
