#!/usr/bin/env bash
# Copy the MLflow databases (pg_dump) to $NVAE_STORAGE_PATH/mlflow-backup/, beside the checkpoints,
# so that the results outlive the head node. setup_head.sh runs this hourly; run it before `ray down`:
#   ray exec cluster.yaml 'bash ~/nvae/cluster/backup_tracking.sh'
# A new head restores them with pg_restore (README, "Scale out").
set -euo pipefail
. ~/.nvae/cluster.env
[ -f ~/venv/bin/activate ] && . ~/venv/bin/activate   # cron starts with a bare PATH
for db in mlflow mlflow_auth; do
    pg_dump --format=custom --dbname="$db" --file="$HOME/.nvae/$db.dump"
done
python - <<'PY'
import os

import pyarrow.fs as fs

target = os.environ["NVAE_STORAGE_PATH"].rstrip("/") + "/mlflow-backup"
filesystem, path = fs.FileSystem.from_uri(target if "://" in target else os.path.abspath(target))
filesystem.create_dir(path, recursive=True)
for name in ("mlflow.dump", "mlflow_auth.dump"):
    fs.copy_files(os.path.expanduser(f"~/.nvae/{name}"), f"{path}/{name}", destination_filesystem=filesystem)
print(f"MLflow databases copied to {target}/")
PY
