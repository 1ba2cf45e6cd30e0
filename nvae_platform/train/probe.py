"""A short timed run of one configuration on one worker: how long its steps, its per-epoch
validation and checkpoint, and its final evaluation take on this device, with the first steps
(warm-up, and compiling where the model is compiled) counted apart. A study's --probe estimates its
cost from these seconds before anything trains."""
import os
import tempfile
import time

import torch

from nvae_core.datasets import Batches
from nvae_platform.train.measures import final_figures, nelbo_bpd
from nvae_platform.train.worker_loop import _checkpoint_state, _save_samples, restore, set_up
from nvae_platform.train.worker_session import TrialSession

WARMUP_STEPS = 2  # the first steps: allocation, and compiling where the model is compiled
TIMED_STEPS = 8


def _clock(device):
    """A timer that waits for the device's queued work before reading the time."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _timed(now, call):
    start = now()
    call()
    return now() - start


def probe_speed(cfg, options, steps=TIMED_STEPS, warmup=WARMUP_STEPS):
    """Seconds of cfg trained as one worker of options in this process, on its device: set_up_s (data
    and model), warmup_s (the first `warmup` steps), step_s (mean of the next `steps`),
    steps_per_epoch (of one worker), validation_s and checkpoint_s (each epoch), final_s (the last
    epoch's evaluation and sample grid), and the device's name. The evaluations are timed on the
    first test batch and scaled to the test loader's batches."""
    threads = torch.get_num_threads()
    try:
        start = time.perf_counter()
        w = set_up(cfg, options, TrialSession(options, None))  # sets the worker's threads
        restore(w)  # data-dependent init and compiling, as a new trial does
        now = _clock(w.device)
        set_up_s = now() - start
        prepare = Batches(cfg, w.device, seed=cfg.seed, train=True)
        batches = [prepare(x) for _, x in zip(range(min(len(w.loader), steps + warmup)), w.loader)]

        def train(count):
            for i in range(count):
                stats = w.step(batches[i % len(batches)], measure_grad_norm=True)
                [float(stats[k]) for k in ("loss", "nelbo", "recon", "kl", "grad_norm")]  # the loop's reads

        warmup_s = _timed(now, lambda: train(warmup))
        step_s = _timed(now, lambda: train(steps)) / steps
        first = [next(iter(w.test_loader))]
        scale = len(w.test_loader)
        validation_s = scale * _timed(now, lambda: nelbo_bpd(w.model, first, cfg, w.device, seed=cfg.seed))
        final_s = scale * _timed(now, lambda: final_figures(w.core, first, cfg, w.device, options, seed=cfg.seed))
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_s = _timed(now, lambda: torch.save(_checkpoint_state(w.core, w.step, 0, cfg),
                                                          os.path.join(folder, "state.pt")))
            final_s += _timed(now, lambda: _save_samples(w.core, cfg, os.path.join(folder, "samples.png"), options))
        device = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu"
        return dict(set_up_s=set_up_s, warmup_s=warmup_s, step_s=step_s, steps_per_epoch=len(w.loader),
                    validation_s=validation_s, checkpoint_s=checkpoint_s, final_s=final_s, device=device)
    finally:
        torch.set_num_threads(threads)
