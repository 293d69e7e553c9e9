"""MultiScaleLanguageModel: trains resnet_bk.models.multiscale_lm.MultiScaleLM (simple or hierarchical).

The multi-scale network adds no loss term of its own; this module logs, besides LanguageModel's
metrics, the work per resolution the network reports (<stage>/stats/ffn_rows/res<r> and
<stage>/stats/mix_tokens/res<r>, per input position, r = 1, 2, 4 for full, half and quarter
resolution) and val/flops_per_token (FlopCounterMode, executed FLOPs).
"""

from __future__ import annotations

from lightning_modules.flops import FlopCountingLanguageModel


class MultiScaleLanguageModel(FlopCountingLanguageModel):
    """LanguageModel for MultiScaleLM; its args are LanguageModel's and count_flops."""
