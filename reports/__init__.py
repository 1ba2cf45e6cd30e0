"""Tables and plots of NVAE ablation studies, read from MLflow."""
