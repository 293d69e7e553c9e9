"""ACTLanguageModel: trains a network with adaptive computation time (resnet_bk.models.act_lm).

Loss = CE + load_balance_weight * load_balance + act_lambda * ponder, where ponder is the mean over
positions of Graves' N + R returned by the network. Logged besides LanguageModel's metrics (every
stage, under <stage>/): aux/ponder, stats/layers_executed (mean layers a position takes),
stats/layers_run (layers the batch entered), stats/halt_frac/<l> (fraction of positions halting at
layer l), stats/ffn_rows_frac; and val/flops_per_token (FlopCounterMode, executed FLOPs).
"""

from __future__ import annotations

from lightning_modules.flops import FlopCountingLanguageModel


class ACTLanguageModel(FlopCountingLanguageModel):
    """LanguageModel for ACT networks (ACTResNetBKLM, ACTMultiScaleLM).

    Args (besides LanguageModel's and count_flops):
        act_lambda: weight of the ponder cost (Graves' tau; 0.01 in Universal Transformers).
    """

    def __init__(self, *args, act_lambda: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        if act_lambda < 0:
            raise ValueError(f"ACTLanguageModel: act_lambda must be >= 0, got {act_lambda}.")
        self.act_lambda = act_lambda
        self.aux_loss_weights["ponder"] = act_lambda
