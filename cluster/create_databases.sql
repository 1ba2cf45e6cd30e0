-- The MLflow tracking server's databases on the head's PostgreSQL: runs in `mlflow`, users and
-- permissions of the basic-auth app in `mlflow_auth`, both owned by the login role `mlflow`.
-- Run with psql -v password=... ; idempotent (cluster/setup_head.sh runs it on every `ray up`).
SELECT format('CREATE ROLE mlflow LOGIN PASSWORD %L', :'password')
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') \gexec
SELECT format('ALTER ROLE mlflow PASSWORD %L', :'password') \gexec
SELECT 'CREATE DATABASE mlflow OWNER mlflow'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') \gexec
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth') \gexec
