"""What a running study shows: trials done (finished, diverged, failed), running (each one's epoch
and last validation bits/dim) and pending, the best validation bits/dim so far, an ETA, and the
GPU-hours (CPU-hours) its trials have taken and will take in all.

On a terminal the view is a block redrawn in place, at most once a second, with each ended trial
printed once above it. Anywhere else (CI, `ray job logs`, a file) it prints one line per change: a
trial starts, completes an epoch, ends; never the same line twice. No Ray here: progress_callback.py
feeds it from Tune.
"""
import math
import shutil
import sys
import time
from dataclasses import dataclass

from nvae_platform.train.failures import reason

ENDED = ("finished", "diverged", "failed", "stopped early")  # stopped early: by ASHA, in a search
MAX_RUNNING_SHOWN = 20  # lines of running trials in the terminal block


def duration(seconds):
    """'45s', '3m10s', '2h05m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ending(result, status):
    """How a trial ended, from its last result and status (one of ENDED), in words:
    'finished  test_bpd 0.6425', 'diverged at step 53', 'failed: RuntimeError: ...'."""
    said = str(result.get("status") or status)
    test_bpd = result.get("test_bpd")
    if status == "finished" and isinstance(test_bpd, float) and math.isfinite(test_bpd):
        return f"finished  test_bpd {test_bpd:.4f}"
    if status == "diverged":
        return said
    if status == "failed":
        return f"failed: {reason(said.removeprefix('failed: '))[:300]}"
    return status


@dataclass
class Running:
    since: float  # when its last epoch ended (or it started)
    done: int = None  # epochs completed; None until its first report (a resumed trial starts mid-way)
    val_bpd: float = None


class ProgressView:
    """The live state of a study of `total` trials of `epochs` epochs, `concurrency` at once (None:
    as many as run), written to `stream` (default stdout; `tty` default: whether it is a terminal).
    reserved: (unit, amount) each trial holds, e.g. ("GPU", 8.0), to show the hours spent and
    projected; estimates: {trial key: estimated wall seconds} (study/cost.py), else the hours left
    are projected from the trials ended so far."""

    def __init__(self, total, epochs, concurrency=None, stream=None, tty=None, clock=time.monotonic, interval=1.0,
                 reserved=None, estimates=None):
        self.total, self.epochs, self.concurrency = total, epochs, concurrency
        self.reserved, self.estimates = reserved, estimates or {}
        self.started_at = {}  # trial key -> when it started, while it runs
        self.took = {}  # trial key -> wall seconds of the trials that ended in this invocation
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock, self.interval = clock, interval
        self.running = {}  # trial key -> Running, in start order
        self.outcomes = {}  # trial key -> one of ENDED
        self.epoch_seconds = []  # wall time of every epoch seen
        self.best = None  # (val_bpd, trial key)
        self._said = set()  # event lines already printed
        self._above = []  # terminal: lines to print above the block at its next draw
        self._block = []  # terminal: the block as last drawn
        self._live = False  # terminal: the block is drawn from the first refresh or trial event on
        self._drawn_at = -math.inf

    # Events
    def note(self, text):
        """A line printed once, as it is (e.g. where Ray's messages go)."""
        self._say(text, text, permanent=True)

    def restored(self, outcomes):
        """The trials that ended before this invocation of the study ({key: status}): counted."""
        self.outcomes.update(outcomes)
        if outcomes:
            self._event(f"resumed: {len(outcomes)} trial(s) ended before", permanent=True)

    def started(self, key):
        self.running[key] = Running(since=self.clock())
        self.started_at[key] = self.running[key].since
        self._event(f"started {key}")

    def epoch(self, key, epoch, val_bpd):
        """Trial key completed epoch (0-based) with this validation bits/dim; a repeat is ignored."""
        run = self.running.setdefault(key, Running(since=self.clock()))
        done = epoch + 1
        if run.done is not None and done <= run.done:
            return
        now = self.clock()
        self.epoch_seconds.append((now - run.since) / (done - run.done if run.done is not None else 1))
        run.since, run.done, run.val_bpd = now, done, val_bpd
        if math.isfinite(val_bpd) and (self.best is None or val_bpd < self.best[0]):
            self.best = (val_bpd, key)
        self._event(f"{key}: epoch {done}/{self.epochs}  val_bpd {val_bpd:.4f}")

    def ended(self, key, status, text=None):
        """Trial key ended with status (one of ENDED); text says how (default: the status)."""
        self.running.pop(key, None)
        self.outcomes[key] = status
        if key in self.started_at:
            self.took[key] = self.clock() - self.started_at.pop(key)
        self._event(f"{key}: {text or status}", permanent=True)

    def retrying(self, key, why):
        """Trial key failed (why) and Tune starts it again."""
        self.running.pop(key, None)
        self._event(f"{key}: restarting after {why}", permanent=True)

    def refresh(self):
        """Terminal: redraw if something changed and a second has passed. Call it often."""
        self._live = True
        if self.tty:
            self._draw(force=False)

    def close(self):
        """Terminal: draw the final state."""
        if self.tty:
            self._draw(force=True)

    # What is shown
    def summary(self):
        """The state in parts: counts of trials done, running and pending; best so far and ETA."""
        counts = {status: 0 for status in ENDED}
        for status in self.outcomes.values():
            counts[status] = counts.get(status, 0) + 1
        pending = self.pending()
        early = f", {counts['stopped early']} stopped early" if counts["stopped early"] else ""
        done = (f"{len(self.outcomes)}/{self.total} done: {counts['finished']} finished, "
                f"{counts['diverged']} diverged, {counts['failed']} failed{early}")
        parts = [done, f"{len(self.running)} running, {pending} pending"]
        if self.best is not None:
            parts.append(f"best val_bpd {self.best[0]:.4f} ({self.best[1]})")
        if self.running or pending:
            parts.append(f"ETA {self.eta()}")
        if self.reserved:
            spent, projected = self.hours()
            unit = f"{self.reserved[0]}-h"
            parts.append(f"{spent:.2g}/{projected:.2g} {unit}" if projected is not None else f"{spent:.2g} {unit} spent")
        return parts

    def hours(self):
        """(spent, projected) hours of this invocation's trials (wall hours x what each reserves);
        projected is None until an estimate or an ended trial says how long a trial takes."""
        now = self.clock()
        elapsed = {key: now - since for key, since in self.started_at.items()}
        spent = sum(self.took.values()) + sum(elapsed.values())
        known = list(self.estimates.values()) or list(self.took.values())
        to_hours = self.reserved[1] / 3600
        if not known:
            return spent * to_hours, None
        typical = sum(known) / len(known)
        unseen = [s for key, s in self.estimates.items() if key not in self.started_at and key not in self.outcomes]
        pending = sum(unseen) if len(unseen) == self.pending() else self.pending() * typical
        left = sum(max(self.estimates.get(key, typical) - e, 0.0) for key, e in elapsed.items()) + pending
        return spent * to_hours, (spent + left) * to_hours

    def pending(self):
        """Trials neither ended nor running."""
        return max(self.total - len(self.outcomes) - len(self.running), 0)

    def eta(self):
        """Mean epoch time x epochs left / trials at once; 'unknown' before the first epoch."""
        if not self.epoch_seconds:
            return "unknown"
        pending = self.pending()
        left = sum(max(self.epochs - (r.done or 0), 0) for r in self.running.values()) + pending * self.epochs
        lanes = min(self.concurrency or max(len(self.running), 1), len(self.running) + pending)
        return duration(sum(self.epoch_seconds) / len(self.epoch_seconds) * left / max(lanes, 1))

    def lines(self):
        """The terminal block: the summary (counts; best and ETA), then each running trial."""
        parts = self.summary()
        lines = [f"[study] {' | '.join(parts[:2])}"]
        if parts[2:]:
            lines.append(f"        {' | '.join(parts[2:])}")
        shown = list(self.running.items())[:MAX_RUNNING_SHOWN]
        for key, run in shown:
            state = "starting" if run.done is None else f"epoch {run.done}/{self.epochs}"
            bpd = f"  val_bpd {run.val_bpd:.4f}" if run.val_bpd is not None else ""
            lines.append(f"  {key}  {state}{bpd}")
        if len(self.running) > len(shown):
            lines.append(f"  ... and {len(self.running) - len(shown)} more running")
        return lines

    # Output
    def _event(self, text, permanent=False):
        """A change: plain, one line with the state after it; on a terminal, the block shows the state."""
        self._live = True
        line = f"[study] {text}" if self.tty else f"[study] {text}  ({' | '.join(self.summary())})"
        self._say(text, line, permanent)

    def _say(self, event, line, permanent):
        """Print line for event once: plain, at once; on a terminal, above the block (permanent) or
        by updating the block."""
        if not self.tty:
            if event not in self._said:
                self._said.add(event)
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        if permanent and event not in self._said:
            self._said.add(event)
            self._above.append(line)
        self._draw(force=permanent)

    def _draw(self, force):
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
        block = [line[:width] for line in self.lines()] if self._live else []
        now = self.clock()
        due = force or not self._block or now - self._drawn_at >= self.interval
        if not self._above and (block == self._block or not due):
            return
        erase = f"\x1b[{len(self._block)}A\r\x1b[J" if self._block else ""  # up to the block's top, clear below
        self.stream.write(erase + "".join(line + "\n" for line in self._above + block))
        self.stream.flush()
        self._above, self._block, self._drawn_at = [], block, now
