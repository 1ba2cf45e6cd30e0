"""One configuration trained: its Ray Train run (or a one-worker trial's own process), the worker loop,
its checkpoints and metrics on storage, resume, failures, and the figures a run measures."""
