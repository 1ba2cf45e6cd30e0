"""Normalization and activation against hierarchy depth (NVAE Section 5): does BN + Swish beat
WN + ELU as the number of latent groups L grows? WN + ELU diverged at L = 40 in the paper; a
diverged trial is a result and is recorded as one. As in the authors' three models, every cell
(both towers, pre- and post-process) is the regular residual cell, so WN rows hold no batch norm.

    python studies/ablation_norm.py                      # smoke: offline, minutes on a laptop
    python studies/ablation_norm.py --scale small --seeds 3
"""
from nvae_platform.findings import DIVERGED, HIGHEST, Finding
from nvae_platform.study import Factor, Study, field_factor
from nvae_platform.study.cli import run

STUDY = Study(
    name="ablation_norm",
    description="normalization x activation in {WN+ELU, BN+ELU, BN+Swish} x groups L in {10, 20, 40}",
    factors=(
        Factor("norm_act", {"WN+ELU": dict(normalization="weight_norm", activation="elu"),
                            "BN+ELU": dict(normalization="batch_norm", activation="elu"),
                            "BN+Swish": dict(normalization="batch_norm", activation="swish")}),
        field_factor("groups", "num_groups_per_scale", [10, 20, 40], smoke_values=[2, 4, 8]),
    ),
    fixed={"num_latent_scales": 1, "encoder_cell": "regular", "decoder_cell": "regular"},
    across="groups",
    baseline={"norm_act": "BN+Swish"},  # NVAE's choice
    findings=(
        Finding("bn_beats_wn", "BN beats WN as the normalization: BN+ELU and BN+Swish have lower test bpd "
                "than WN+ELU", rows={"norm_act": ("BN+ELU", "BN+Swish")}, than={"norm_act": "WN+ELU"}),
        Finding("bn_gain_grows_with_groups", "BN's gain over WN grows with L: at the most groups, BN+ELU and "
                "BN+Swish have lower test bpd than WN+ELU (3.22 and 3.16 against 3.31 at L = 40; none at L = 10)",
                rows={"norm_act": ("BN+ELU", "BN+Swish")}, than={"norm_act": "WN+ELU"}, at={"groups": HIGHEST},
                source="recalled"),
        Finding("swish_beats_elu", "Swish beats ELU with BN: BN+Swish has lower test bpd than BN+ELU",
                rows={"norm_act": "BN+Swish"}, than={"norm_act": "BN+ELU"}, source="recalled"),
        Finding("wn_unstable_deep", "WN+ELU is unstable with the most groups: more of its trials diverge than "
                "of BN+ELU and BN+Swish", rows={"norm_act": "WN+ELU"}, than={"norm_act": ("BN+ELU", "BN+Swish")},
                metric=DIVERGED, direction="higher", at={"groups": HIGHEST}, source="recalled"),
    ),
)

if __name__ == "__main__":
    run(STUDY)
