"""AdaptiveLengthLanguageModel: LanguageModel with the weights of the learned-length losses.

Loss = CE + load_balance_weight * load_balance + length_weight * (inner length / N)
       [or + boundary_prior_weight * binomial prior NLL, when the network has a prior_rate],
see resnet_bk.models.adaptive_length_lm. Every position is scored at full resolution, so the
perplexity is over all evaluated tokens. The achieved compression is logged as
"<stage>/stats/compression_ratio" (tokens / closed segments) and the executed inner length as
"<stage>/stats/inner_length_fraction".
"""

from __future__ import annotations

from lightning_modules.language_model import LanguageModel


class AdaptiveLengthLanguageModel(LanguageModel):
    """LanguageModel for resnet_bk.models.adaptive_length_lm.AdaptiveLengthLM.

    Args (besides LanguageModel's):
        load_balance_weight: weight of the MoE load-balancing loss.
        length_weight: lambda of the seed's length penalty, lambda * (inner length / N).
        boundary_prior_weight: weight of the binomial boundary-rate prior (used instead of the
            length penalty when the network sets prior_rate).
    """

    def __init__(
        self,
        *args,
        load_balance_weight: float = 0.01,
        length_weight: float = 0.01,
        boundary_prior_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.aux_loss_weights["load_balance"] = load_balance_weight
        self.aux_loss_weights["length"] = length_weight
        self.aux_loss_weights["boundary_prior"] = boundary_prior_weight
