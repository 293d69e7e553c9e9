"""ConditionalMoELanguageModel: LanguageModel with the weights of the conditional MoE's aux losses.

Loss = CE + load_balance_weight * load_balance + compute_weight * compute, where (see
resnet_bk.layers.conditional_moe) load_balance is the Switch loss over all routed rows and compute
is the mean normalised router entropy, the differentiable price of taking more experts. The
network's stats are logged by the base class as "<stage>/stats/experts_per_token" and
"<stage>/stats/expert_load/<e>".
"""

from __future__ import annotations

from lightning_modules.language_model import LanguageModel


class ConditionalMoELanguageModel(LanguageModel):
    """LanguageModel for resnet_bk.models.conditional_moe_lm.ConditionalMoELM.

    Args (besides LanguageModel's):
        load_balance_weight: weight of the Switch load-balancing loss.
        compute_weight: weight of the compute penalty (router entropy / log num_experts); larger
            values make tokens take fewer experts.
    """

    def __init__(self, *args, load_balance_weight: float = 0.01, compute_weight: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_weights["load_balance"] = load_balance_weight
        self.aux_loss_weights["compute"] = compute_weight
