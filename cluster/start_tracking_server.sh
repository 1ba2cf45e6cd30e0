#!/usr/bin/env bash
# (Re)start the MLflow tracking server on the head, on 127.0.0.1:PORT (default 5000), after
# cluster/setup_head.sh. NVAE_TRACKING_HOST=0.0.0.0 serves it to the network instead (a private one
# only: basic auth over plain HTTP), as cluster/local_hosts.py does for its laptop host. Runs in PostgreSQL (password from PGPASSWORD, never on a command line),
# artifacts under $NVAE_STORAGE_PATH/mlartifacts; log in ~/.nvae/mlflow-server.log.
set -euo pipefail
PORT=${1:-5000}
. ~/.nvae/cluster.env
RUNNING="mlflow server --app-name basic-auth .*--port $PORT "
pkill -f "$RUNNING" || true
for _ in $(seq 30); do pgrep -f "$RUNNING" >/dev/null || break; sleep 1; done   # the old one must let go of the port
DB=postgresql://$PGUSER@$PGHOST:$PGPORT
setsid nohup python -m nvae_platform.record.tracking_server --backend-store-uri "$DB/mlflow" \
    --auth-database-uri "$DB/mlflow_auth" --artifacts-destination "$NVAE_STORAGE_PATH/mlartifacts" \
    --host "${NVAE_TRACKING_HOST:-127.0.0.1}" --port "$PORT" >> ~/.nvae/mlflow-server.log 2>&1 < /dev/null &
for _ in $(seq 60); do
    python -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null \
        && { echo "MLflow server up on 127.0.0.1:$PORT"; exit 0; }
    sleep 1
done
tail -n 30 ~/.nvae/mlflow-server.log
echo "the MLflow server did not start; its log is ~/.nvae/mlflow-server.log" >&2
exit 1
