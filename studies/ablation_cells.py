"""Residual cells (NVAE Section 5): regular or depthwise-separable cells in the bottom-up
(encoder) and top-down (decoder) towers, judged by test bpd, training time and peak memory.

    python studies/ablation_cells.py                     # smoke: offline, minutes on a laptop
    python studies/ablation_cells.py --scale small
"""
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
)

if __name__ == "__main__":
    run(STUDY)
