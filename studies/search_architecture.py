"""Automated search over the NVAE design, which the paper names as future work: Optuna samples
cell types per tower, squeeze-and-excitation, width, number of latent groups and flows, and the
study prints the Pareto front of test bpd against parameter count.

    python studies/search_architecture.py                # smoke: 4 trials, offline
    python studies/search_architecture.py --scale small --samples 40

A trial stopped early has no test bpd, so this two-objective search trains every trial to the end;
a single-objective Search(early_stopping=True) prunes with ASHA on the per-epoch val_bpd.
"""
from nvae_platform.study import Factor, Search, Study, field_factor
from nvae_platform.study.cli import run


def channels(widths):
    return {str(w): {"num_channels_enc": w, "num_channels_dec": w} for w in widths}


STUDY = Study(
    name="search_architecture",
    description="Optuna search over cells, SE, width, groups and flows: Pareto front of test bpd vs parameters",
    factors=(
        field_factor("bottom_up", "encoder_cell", ["regular", "separable"]),
        field_factor("top_down", "decoder_cell", ["regular", "separable"]),
        field_factor("se", "use_se", [True, False]),
        Factor("channels", channels([32, 64, 128]), smoke_levels=channels([8, 16, 24])),
        field_factor("groups", "num_groups_per_scale", [10, 20, 30], smoke_values=[2, 4]),
        field_factor("flows", "num_flows", [0, 1, 2]),
    ),
    fixed={"num_latent_scales": 1},
    columns=("test_bpd", "num_params", "step_seconds"),
    search=Search(objectives={"test_bpd": "min", "num_params": "min"}, num_samples=40, smoke_samples=4),
)

if __name__ == "__main__":
    run(STUDY)
