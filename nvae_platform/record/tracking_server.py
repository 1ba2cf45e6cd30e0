"""The MLflow tracking server a cluster's head runs (cluster.yaml starts it): runs in a database
(PostgreSQL), artifacts proxied to an artifact store (s3://), and MLflow's basic-auth app, bound to
loopback: study drivers run on the head, and people reach it through an SSH port-forward.

    MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... python -m nvae_platform.record.tracking_server \\
        --backend-store-uri postgresql://mlflow:PW@127.0.0.1:5432/mlflow \\
        --auth-database-uri postgresql://mlflow:PW@127.0.0.1:5432/mlflow_auth \\
        --artifacts-destination s3://BUCKET/nvae/mlartifacts --port 5000

The admin user is created with MLFLOW_AUTH_ADMIN_PASSWORD on the first start; study drivers log in
with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Requests without credentials get 401.
"""
import argparse
import os
import sys

SECRETS = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def auth_config(auth_database_uri, admin_username="admin", default_permission="READ"):
    """The basic-auth app's configuration (INI): users and permissions live in their own database,
    since the tracking store's migrations and the auth app's would share one version table."""
    return (f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = {auth_database_uri}\n"
            f"admin_username = {admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def check_database(uri, flag):
    """Raise ValueError naming flag unless the database at uri accepts a connection."""
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(uri).connect():
            pass
    except Exception as error:  # noqa: BLE001  the driver's errors (refused, bad password, no database) all end here
        first = str(error).strip().splitlines()[0][:300]
        raise ValueError(f"{flag} {sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)}: "
                         f"cannot connect ({first}); start the database or fix the URI") from None


def server_command(args):
    """The `mlflow server` command line for the parsed arguments."""
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", args.backend_store_uri, "--artifacts-destination", args.artifacts_destination,
            "--serve-artifacts", "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m nvae_platform.record.tracking_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", required=True, help="runs, e.g. postgresql://user:pw@host/mlflow")
    parser.add_argument("--auth-database-uri", required=True, help="users and permissions: another database")
    parser.add_argument("--artifacts-destination", required=True, help="artifact store: s3://bucket/path or a folder")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--admin-username", default="admin")
    parser.add_argument("--default-permission", default="READ", choices=("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"),
                        help="what a user created later may do with experiments not theirs (default: READ)")
    parser.add_argument("--config-dir", default="~/.nvae", help="where the auth app's configuration is written")
    return parser


def main(argv=None):
    """Check the secrets and both databases, write the auth configuration, then become `mlflow server`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name in SECRETS if not os.environ.get(name)]
    if missing:
        parser.error(f"set {' and '.join(missing)} in the environment (cluster/setup_head.sh keeps them in "
                     "~/.nvae/secrets.env)")
    try:
        check_database(args.backend_store_uri, "--backend-store-uri")
        check_database(args.auth_database_uri, "--auth-database-uri")
    except ValueError as error:
        parser.error(str(error))
    folder = os.path.expanduser(args.config_dir)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, "basic_auth.ini")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(auth_config(args.auth_database_uri, args.admin_username, args.default_permission))
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=path)
    # MLflow's job runner (for its GenAI jobs, which no study uses) adds 7 huey consumers: idle, they
    # took 36% of a core and 2.2 GB here, on a head that hosts every trial's driver. Off unless asked for.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = server_command(args)
    print(f"[tracking] mlflow server on http://{args.host}:{args.port} (basic auth, runs in "
          f"{args.backend_store_uri.split('@')[-1]}, artifacts in {args.artifacts_destination})", flush=True)
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
