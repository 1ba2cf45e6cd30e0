"""The MLflow record: the one writer a study or run has (on its driver), its idempotent per-run record,
the store's safe opening, a trial's outcome ledger on storage, and the cluster's tracking server."""
