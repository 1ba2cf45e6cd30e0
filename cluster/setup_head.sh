#!/usr/bin/env bash
# Head-node services of cluster.yaml and cluster-local.yaml, run by `ray up` (idempotent):
# PostgreSQL with the MLflow databases, generated secrets, ~/.nvae/cluster.env (the environment
# every command on the head reads: storage, tracking server, credentials), and an hourly backup.
#   bash cluster/setup_head.sh STORAGE   (s3://bucket/prefix, or a folder every node mounts)
set -euo pipefail
STORAGE=${1:?usage: setup_head.sh STORAGE (s3://bucket/prefix, or a folder every node mounts)}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p ~/.nvae && chmod 700 ~/.nvae

SUDO=sudo; AS_POSTGRES="sudo -u postgres"
[ "$(id -u)" -eq 0 ] && { SUDO=""; AS_POSTGRES="runuser -u postgres --"; }
if ! command -v psql >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
# Listens on loopback only (Debian's default). A host without systemd (a container) starts it with
# Debian's init script.
if [ -d /run/systemd/system ]; then $SUDO systemctl enable --now postgresql; else $SUDO service postgresql start; fi

if [ ! -f ~/.nvae/secrets.env ]; then
    (umask 077; cat > ~/.nvae/secrets.env <<SECRETS
export PGPASSWORD=$(openssl rand -hex 16)
export MLFLOW_AUTH_ADMIN_PASSWORD=$(openssl rand -hex 16)
export MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32)
SECRETS
    )
fi
. ~/.nvae/secrets.env
$AS_POSTGRES psql -q -v ON_ERROR_STOP=1 -v password="$PGPASSWORD" < "$HERE/create_databases.sql"

(umask 077; cat > ~/.nvae/cluster.env <<ENV
. ~/.nvae/secrets.env
export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=mlflow
export NVAE_STORAGE_PATH=$STORAGE
export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD=\$MLFLOW_AUTH_ADMIN_PASSWORD
# ray job stop gives a study's driver this long after its SIGTERM to mark its runs KILLED and print
# its table, before Ray's SIGKILL (Ray's default is 3 s); ray start passes it to the job supervisor.
export RAY_JOB_STOP_WAIT_TIME_S=30
ENV
)
grep -q '.nvae/cluster.env' ~/.bashrc || echo '[ -f ~/.nvae/cluster.env ] && . ~/.nvae/cluster.env' >> ~/.bashrc
# Hourly copy of the MLflow database to the storage, so that results outlive the head.
if command -v crontab >/dev/null; then
    (crontab -l 2>/dev/null | grep -v backup_tracking.sh || true
     echo "17 * * * * bash $HERE/backup_tracking.sh >> $HOME/.nvae/backup.log 2>&1") | crontab -
else
    echo "no cron on this host: run cluster/backup_tracking.sh yourself to copy the MLflow databases to $STORAGE" >&2
fi
