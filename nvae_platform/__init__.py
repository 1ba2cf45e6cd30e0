"""The platform around nvae_core: rooms by what each file serves, arrows only pointing down.

study/ (a study: declaration, plan, Tune run, CLI, progress view) -> evaluate/ (a trained run's
evaluation) -> record/ (the MLflow record) -> train/ (one configuration's Ray Train run) -> the shared
files here (preflight checks, defaults, the Ray a command runs on, Ray's output, Ray's internals).
"""
