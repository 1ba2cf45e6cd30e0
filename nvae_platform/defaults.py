"""Where commands keep data, checkpoints and records unless told: the working directory on one
machine; on a cluster, what its nodes export (cluster.yaml sets all three). No Ray, no MLflow here."""
import os

STORAGE_ENV = "NVAE_STORAGE_PATH"  # checkpoints and trial state: shared storage (s3://, NFS) on a cluster
DATA_ENV = "NVAE_DATA_DIR"  # datasets: the same path on every node, or an s3:// prefix each node copies
DATA_CACHE_ENV = "NVAE_DATA_CACHE"  # where a node keeps its copies of an s3:// data dir


def default_storage_path():
    """$NVAE_STORAGE_PATH, else ./runs."""
    return os.environ.get(STORAGE_ENV) or "runs"


def default_data_dir():
    """$NVAE_DATA_DIR, else ./data."""
    return os.environ.get(DATA_ENV) or "data"


def data_cache_root():
    """$NVAE_DATA_CACHE, else ~/.cache/nvae/data: the node's local copies of remote data dirs."""
    return os.path.expanduser(os.environ.get(DATA_CACHE_ENV) or "~/.cache/nvae/data")


def default_tracking_uri(folder="."):
    """$MLFLOW_TRACKING_URI if set (as in MLflow itself, and on a cluster), else a SQLite store in
    folder (the working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath(os.path.join(folder, "mlflow.db"))
