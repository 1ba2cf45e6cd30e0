"""Ray's and MLflow's own console output goes to one log file, so that a study's console shows the study.

That is Ray's start-up and shutdown messages, the INFO and WARNING lines of its Python loggers (Tune,
Train), what its processes print (each trial's Train controller and workers) and the warnings and
errors the cluster publishes (a raylet's, a worker killed for memory); and MLflow's log lines (a new
store's "Creating initial MLflow database tables") and its "View run ... at" links. What a person needs still
reaches the console: a trial's failure through its result (the progress view names its reason), a
crash of the driver as its traceback. Every invocation of the study appends to the log.
"""
import logging
import os
import sys
import threading

from nvae_platform.ray_internals import print_ray_output_with

LOG_FILE = "ray.log"
FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own
_log = {"file": None, "lock": threading.Lock(), "console_prefix": None}  # the one open log of this process


def ray_log_path(study_key, experiment_dir):
    """ray.log in the study's (or train.py run's) folder when it is local, else
    ~/.nvae/logs/<experiment_dir>.ray.log on the machine of its driver (stored at s3://; a Ray job's
    driver runs in no folder of the user's: on a head it starts in /)."""
    if "://" in study_key:
        return os.path.join(os.path.expanduser("~"), ".nvae", "logs", f"{experiment_dir}.{LOG_FILE}")
    return os.path.join(study_key, LOG_FILE)


def _is_console(handler):
    stream = getattr(handler, "stream", None)
    return (getattr(handler, "nvae_ray_log", False) or stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
            or type(stream).__name__ == "MlflowLoggingStream")  # MLflow's handlers write to sys.stderr through it


def send_ray_logs_to(path, console_prefix=None):
    """From now on Ray's and MLflow's Python loggers in this process, and what Ray forwards to it from
    its other processes, write to path (appended), not the console; MLflow prints no run links. Call
    it before ray.init: its start-up messages go there too, and it binds the printer of forwarded output.
    Forwarded lines that start with console_prefix (train.py's workers' "[nvae] " lines) are also
    printed on this process's stdout, as their process printed them."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _log["lock"]:
        if _log["file"] is not None:
            _log["file"].close()
        _log["file"] = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    handler = logging.StreamHandler(_log["file"])
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.nvae_ray_log = True
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # its "View run ... at" lines, on stdout
    names = ["ray", "mlflow", "alembic"] + [name for name in logging.Logger.manager.loggerDict
                                            if name.startswith(("ray.", "mlflow.", "alembic."))]
    for logger in map(logging.getLogger, names):
        console = [h for h in logger.handlers if _is_console(h)]
        for h in console:
            logger.removeHandler(h)
        if console or logger.name in ("ray", "mlflow", "alembic"):  # a logger that had its own console handler does not propagate
            logger.addHandler(handler)
    _log["console_prefix"] = console_prefix
    print_ray_output_with(_write_ray_output)


def _write_ray_output(data, ignore_prefix=False):
    pid = data.get("pid")
    if pid == "autoscaler":  # its status, every few seconds, stays in Ray's own monitor log
        return
    name = data.get("actor_name") or data.get("task_name") or ""
    source = pid if pid == "raylet" else f"{name} pid={pid}".strip()
    with _log["lock"]:
        if _log["file"] is not None and not _log["file"].closed:
            _log["file"].write("".join(f"({source}) {line}\n" for line in data.get("lines", [])))
    prefix = _log["console_prefix"]
    shown = [line for line in data.get("lines", []) if line.startswith(prefix)] if prefix else []
    if shown:
        sys.stdout.write("".join(f"{line}\n" for line in shown))
        sys.stdout.flush()
