"""ACTMultiScaleLanguageModel: trains resnet_bk.models.act_multiscale_lm.ACTMultiScaleLM.

The ACT loss (act_lambda * ponder) of ACTLanguageModel, and the logs of both parents: ponder,
layers executed (multi-scale blocks per position), halting fractions, work per resolution
(stats/ffn_rows/res<r>, stats/mix_tokens/res<r>) and val/flops_per_token.
"""

from __future__ import annotations

from lightning_modules.act import ACTLanguageModel


class ACTMultiScaleLanguageModel(ACTLanguageModel):
    """LanguageModel for ACTMultiScaleLM; its args are ACTLanguageModel's (act_lambda, count_flops, ...)."""
