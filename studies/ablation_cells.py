"""Residual cells (NVAE Section 5): regular or depthwise-separable cells in the bottom-up
(encoder) and top-down (decoder) towers, judged by test bpd, training time and peak memory.

    python studies/ablation_cells.py                     # smoke: offline, minutes on a laptop
    python studies/ablation_cells.py --scale small
"""
from nvae_platform.findings import Finding
from nvae_platform.study import Study, field_factor
from nvae_platform.study.cli import run

STUDY = Study(
    name="ablation_cells",
    description="bottom-up cell x top-down cell in {regular, separable}",
    factors=(
        field_factor("bottom_up", "encoder_cell", ["regular", "separable"]),
        field_factor("top_down", "decoder_cell", ["regular", "separable"]),
    ),
    columns=("test_bpd", "training_hours", "peak_memory_gb"),
    baseline={"bottom_up": "regular", "top_down": "separable"},  # NVAE's choice
    findings=(  # "different effects at different locations" (3.07 against 3.11 top-down; 3.12 against 3.11 bottom-up)
        Finding("separable_helps_top_down", "the separable (depthwise) cell in the top-down (generative) tower "
                "lowers test bpd", rows={"top_down": "separable"}, than={"top_down": "regular"}),
        Finding("separable_not_bottom_up", "the separable cell in the bottom-up tower does not lower test bpd "
                "(by more than 0.01 bpd)", rows={"bottom_up": "separable"}, than={"bottom_up": "regular"},
                direction="not lower", margin=0.01),
    ),
)

if __name__ == "__main__":
    run(STUDY)
