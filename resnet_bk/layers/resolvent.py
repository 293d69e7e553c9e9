"""The resolvent mixing of a ResNet-BK layer: its options and the reference computation.

With C channels (chains) per layer, like the heads of attention:

    v    (B, N, C)     one real potential per position and channel
    b    (B, N-1, C)   real couplings, b_i joins positions i and i+1 (None: all 1, the Laplacian)
    H_c  = tridiag(b_c, -2 + v_c, b_c)                 real symmetric, one chain per channel
    g_c  = diagonal of (H_c - z_c I)^-1                causal g_i (positions 0..i) or bidirectional
    out  (B, N, 2C)    [Re g_0, Im g_0, Re g_1, Im g_1, ...] at each position, real

Because sub = sup = b, every k_i = b_i^2 >= 0 and Im z_c > 0 give |g| <= 1 / Im z_c (docs/design.md,
section 2): nothing is clamped. The causal g_i depends on v and b up to position i only (b_{i-1}
joins i-1 and i), so couplings computed from the tokens <= i+1 keep g_i causal.

`resolvent_features` computes the features one of two ways. Where the BK-core resolves to its
Triton kernels (CUDA, Triton installed, input not float64; `bk_core.resolve_method`), the fused
path `resnet_bk.kernels.fused_resolvent.resolvent_features_fused` reads (B, N, C) and writes
(B, N, 2C) directly, with no complex tensors or layout copies. Otherwise the reference path runs:
all B*C chains in ONE call of the BK-core, complex numbers only inside it. The reference is the
specification; tests compare the fused path against it, values and gradients.
`ResolventConfig` holds the options every ResNet-BK model takes (the same names everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch

from resnet_bk.bk_core import green_diagonal, laplacian_couplings, resolve_method
from resnet_bk.config_of import config_of
from resnet_bk.kernels.fused_resolvent import resolvent_features_fused

Couplings = Literal["laplacian", "input"]
Gate = Literal["none", "sigmoid", "silu"]


@dataclass(frozen=True)
class ResolventConfig:
    """Options of the resolvent mixing in every ResNet-BK layer. The defaults are the seeds' layer:
    C = 1, the Laplacian, z = i fixed, no gate.

    Attributes:
        channels: C, the number of independent chains per layer (v_proj D -> C, features 2C -> D).
        z_real: Re z, the real part of every channel's spectral shift z = z_real + i z_imag.
        z_imag: Im z of every channel (> 0); with z_imag_max, Im z of channel c is log-spaced from
            z_imag (c = 0) to z_imag_max (c = C-1).
        z_imag_max: None (every channel at z_imag) or the upper end of the spread (> 0).
        learn_z: False: z fixed. True: z_c = lambda_c + i softplus(r_c) per channel, learned,
            started at the values above; Im z_c > 0 by construction.
        couplings: "laplacian": b_i = 1 (the seeds' H0). "input": b_i = 2 sigmoid(w_c . h_{i+1} +
            a_c) per channel, from the (causal) state of the later position of the pair; 1 at
            w = a = 0.
        gate: "none", or "sigmoid" / "silu": the 2C features times act(W h) before the projection
            back to D (output gating of gated linear RNNs).
        bk_scale: weight of the projected features in the layer's output.
    """

    channels: int = 1
    z_real: float = 0.0
    z_imag: float = 1.0
    z_imag_max: Optional[float] = None
    learn_z: bool = False
    couplings: Couplings = "laplacian"
    gate: Gate = "none"
    bk_scale: float = 1.0

    def __post_init__(self):
        if self.channels < 1:
            raise ValueError(f"ResolventConfig: channels must be >= 1, got {self.channels}.")
        for name in ("z_imag", "z_imag_max"):
            value = getattr(self, name)
            if value is None and name == "z_imag_max":
                continue
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"ResolventConfig: Im z must be > 0 and finite, got {name} = {value}; the resolvent (H - zI)^-1 "
                    "needs a shift off the real axis (e.g. z_real=0.0, z_imag=1.0)."
                )
        if not math.isfinite(self.z_real):
            raise ValueError(f"ResolventConfig: z_real must be finite, got {self.z_real}.")
        if self.couplings not in ("laplacian", "input"):
            raise ValueError(f"ResolventConfig: couplings must be 'laplacian' or 'input', got {self.couplings!r}.")
        if self.gate not in ("none", "sigmoid", "silu"):
            raise ValueError(f"ResolventConfig: gate must be 'none', 'sigmoid' or 'silu', got {self.gate!r}.")

    @classmethod
    def of(cls, value: Union["ResolventConfig", Mapping[str, Any], None]) -> "ResolventConfig":
        """The config itself, the defaults for None, or one built from a mapping (a YAML block read
        without the CLI, e.g. {"channels": 16})."""
        return config_of(cls, value)

    @property
    def z_is_constant(self) -> bool:
        """True when one fixed Python complex z serves every channel (the seeds' layer)."""
        return not self.learn_z and (self.z_imag_max is None or self.channels == 1)

    def initial_z(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re z, Im z), each (C,) float32: the fixed values, or the learned ones at the start."""
        c = self.channels
        re = torch.full((c,), float(self.z_real))
        if self.z_imag_max is None or c == 1:
            im = torch.full((c,), float(self.z_imag))
        else:
            im = torch.logspace(math.log10(self.z_imag), math.log10(self.z_imag_max), c)
        return re, im


def resolvent_features(
    v: torch.Tensor,
    z: Union[complex, torch.Tensor],
    couplings: Optional[torch.Tensor] = None,
    causal: bool = True,
) -> torch.Tensor:
    """The real features of C resolvent chains: the fused kernels where the BK-core resolves to
    "triton", else the reference path (one BK-core call for all chains).

    Args:
        v: (B, N, C) real potentials (any float dtype; the core runs in >= float32).
        z: the shift, a Python complex for every channel or a complex (C,) tensor (one per channel;
            gradients flow to it). Im z > 0 (not checked here: no host sync).
        couplings: None (b = 1) or (B, N-1, C) real b_i between positions i and i+1.
        causal: g_i (positions 0..i only) or the bidirectional G_ii (sees the future).
    Returns:
        (B, N, 2C) real: [Re g_c, Im g_c] for c = 0..C-1 at each position; float32 (float64 for
        float64 input).
    """
    if resolve_method("auto", v) == "triton":
        z = z if isinstance(z, torch.Tensor) else complex(z)
        return resolvent_features_fused(v, couplings, z.real, z.imag, causal)
    return resolvent_features_reference(v, z, couplings, causal)


def resolvent_features_reference(
    v: torch.Tensor,
    z: Union[complex, torch.Tensor],
    couplings: Optional[torch.Tensor] = None,
    causal: bool = True,
) -> torch.Tensor:
    """`resolvent_features` through `green_diagonal`: (B, N, C) permuted to B*C rows, complex g,
    back to (B, N, 2C) real. Arguments and result as `resolvent_features`."""
    b, n, c = v.shape
    dtype = torch.promote_types(v.dtype, torch.float32)
    rows = v.permute(0, 2, 1).reshape(b * c, n)  # row b*C + c is channel c of sequence b
    h0, sub, sup = laplacian_couplings(b * c, n, dtype, v.device)
    if couplings is not None:
        sub = sup = couplings.permute(0, 2, 1).reshape(b * c, n - 1).to(dtype)
    if isinstance(z, torch.Tensor):
        z = z.repeat(b)[:, None]  # (B*C, 1): channel c's z on the rows b*C + c
    # Shapes, dtypes and Im z are right by construction; skip the validation's host sync.
    g = green_diagonal(h0 + rows, sub, sup, z, causal, validate=False)  # (B*C, N) complex
    return torch.view_as_real(g.view(b, c, n).permute(0, 2, 1)).reshape(b, n, 2 * c)
