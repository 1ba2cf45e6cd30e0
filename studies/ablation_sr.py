"""Spectral regularization (NVAE Section 5): lambda in {0, 1e-2, 1e-1}, 0 switching it (and the
BN-scale penalty) off; judged by test bpd and whether training stayed finite.

    python studies/ablation_sr.py                        # smoke: offline, minutes on a laptop
    python studies/ablation_sr.py --scale small --seeds 3
"""
from nvae_platform.findings import DIVERGED, Finding
from nvae_platform.study import Study, field_factor
from nvae_platform.study.cli import run

STUDY = Study(
    name="ablation_sr",
    description="spectral regularization lambda in {0, 1e-2, 1e-1} (0 = off)",
    factors=(field_factor("sr_lambda", "sr_lambda", [0.0, 1e-2, 1e-1]),),
    columns=("test_bpd",),  # the trials column counts finished and diverged runs
    baseline={"sr_lambda": "0.01"},  # the paper's CIFAR-10 setting
    findings=(
        Finding("sr_stabilizes", "SR stabilizes training: without it (lambda 0) more trials diverge than with "
                "lambda > 0", rows={"sr_lambda": "0.0"}, than={"sr_lambda": ("0.01", "0.1")}, metric=DIVERGED,
                direction="higher"),
        Finding("sr_improves_bpd", "SR slightly improves test bpd: lambda > 0 has lower test bpd than lambda 0",
                rows={"sr_lambda": ("0.01", "0.1")}, than={"sr_lambda": "0.0"}),
    ),
)

if __name__ == "__main__":
    run(STUDY)
