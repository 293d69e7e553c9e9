"""Sampling text from any resnet_bk language model (forward(input_ids) -> LMOutput).

Every model here is causal, so generating is: run the model on the context, take the last
position's logits, draw one token, append, repeat. The context is cropped to the model's
max_seq_len (its position embeddings); no key/value cache, so each new token costs one forward
pass over at most max_seq_len tokens, which is O(N) for ResNet-BK.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend input_ids ((N,) or (B, N), N >= 1) by max_new_tokens sampled tokens.

    temperature 0 is greedy (argmax); top_k keeps the k most probable tokens before drawing.
    The model is put in eval mode and left there. Returns (B, N + max_new_tokens) (or 1-D for 1-D input).
    """
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}.")
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if ids.shape[1] < 1:
        raise ValueError("sample: input_ids needs at least one token.")
    model.eval()
    context = getattr(model, "max_seq_len", None)
    for _ in range(max_new_tokens):
        logits = model(ids if context is None else ids[:, -context:]).logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1)
            nxt = torch.multinomial(
                probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                1,
                generator=generator,
            ).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0] if squeeze else ids
