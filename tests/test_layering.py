"""What each layer may import: nvae_core never Ray or MLflow; declaring a study and building a
report never Ray; a study's trial process (its plan and trial function) never MLflow, Optuna or
scikit-learn, each a second or so of every trial process's start (checked in a fresh interpreter)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("modules, absent", [
    ("nvae_core, nvae_core.datasets, nvae_core.evaluation", ("ray", "mlflow")),
    (("nvae_platform.study, nvae_platform.scales, nvae_platform.run_options, nvae_platform.defaults, "
      "nvae_platform.progress_view"), ("ray",)),
    ("reports, reports.__main__, reports.build", ("ray",)),
    ("nvae_platform.study_plan, nvae_platform.study_trial, nvae_platform.worker_loop", ("mlflow", "optuna", "sklearn")),
])
def test_layer_imports_stay_out(modules, absent):
    code = f"import sys; import {modules}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {modules} loaded {out.stdout.strip()}"
