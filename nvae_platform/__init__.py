"""Ray Train / Ray Tune / MLflow layer over nvae_core."""
