"""Where commands keep data and checkpoints unless told: folders in the working directory on one
machine; on a cluster, what its nodes export (cluster.yaml sets both, beside MLFLOW_TRACKING_URI)."""
import os

STORAGE_ENV = "NVAE_STORAGE_PATH"  # checkpoints and trial state: shared storage (s3://, NFS) on a cluster
DATA_ENV = "NVAE_DATA_DIR"  # datasets: the same path on every node


def default_storage_path():
    """$NVAE_STORAGE_PATH, else ./runs."""
    return os.environ.get(STORAGE_ENV) or "runs"


def default_data_dir():
    """$NVAE_DATA_DIR, else ./data."""
    return os.environ.get(DATA_ENV) or "data"
