"""The BK-core shown with numbers (notebooks/04_bk_core.ipynb): |G| along a sequence, why a
language model needs the causal form, and time against N next to causal attention.

    profile(256)                     # potential v, |g_i| causal, |G_ii| bidirectional, the bound 1/Im z
    leak(256, t=128)                 # how much each position's output moves when v_t changes
    timings([256, 1024, 4096])       # ms of the BK-core and of causal SDPA attention at the same B, N

H = H0 + diag(v) with H0 the discrete Laplacian, z = i (resnet_bk.bk_core). The GPU benchmark with
CUDA-event timing, bandwidth floor and FlashAttention is benchmarks/bk_core.py; timings() here is a
simpler wall-clock check that also runs on a CPU.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_bk.bk_core import green_diagonal, laplacian_couplings, resolvent_bound  # noqa: E402


def _potential(n: int, batch: int = 1, scale: float = 1.0, seed: int = 0, device=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(batch, n, generator=g)).to(device)


def profile(n: int, scale: float = 1.0, z: complex = 1j, seed: int = 0) -> dict:
    """One random potential v of length n: |g_i| (causal) and |G_ii| (bidirectional), float64."""
    v = _potential(n, scale=scale, seed=seed).double()
    h0, sub, sup = laplacian_couplings(1, n, torch.float64)
    g = green_diagonal(h0 + v, sub, sup, z, causal=True)[0]
    gb = green_diagonal(h0 + v, sub, sup, z, causal=False)[0]
    return {"v": v[0], "causal": g.abs(), "bidirectional": gb.abs(), "bound": resolvent_bound(z)}


def leak(n: int, t: int, eps: float = 1.0, z: complex = 1j, seed: int = 0) -> dict:
    """|change| of every position's output when v_t alone changes by eps: the causal g_i must not
    move for i < t (a next-token model built on it sees no future); the bidirectional G_ii does."""
    v = _potential(n, seed=seed).double()
    h0, sub, sup = laplacian_couplings(1, n, torch.float64)
    w = v.clone()
    w[0, t] += eps
    out = {}
    for name, causal in (("causal", True), ("bidirectional", False)):
        a = green_diagonal(h0 + v, sub, sup, z, causal=causal)[0]
        b = green_diagonal(h0 + w, sub, sup, z, causal=causal)[0]
        out[name] = (a - b).abs()
    out["t"] = t
    return out


def _time(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def timings(
    ns, batch: int = 8, heads: int = 4, head_dim: int = 64, reps: int = 5, backward: bool = True, device=None
) -> list[dict]:
    """Median ms of one BK-core call (causal, float32, method auto; forward + backward when
    `backward`) and of causal scaled_dot_product_attention on (B, heads, N, head_dim) (bf16 on CUDA,
    float32 on CPU) at the same B and N."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for n in ns:
        v = _potential(n, batch, 0.5, device=device).requires_grad_(backward)
        h0, sub, sup = laplacian_couplings(batch, n, device=device)
        q, k, vv = (
            torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype).requires_grad_(backward)
            for _ in range(3)
        )

        def bk():
            g = green_diagonal(h0 + v, sub, sup, 1j, causal=True, validate=False)
            if backward:
                torch.autograd.grad(g.abs().sum(), v)

        def attention():
            o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
            if backward:
                torch.autograd.grad(o.float().sum(), (q, k, vv))

        rows.append({"n": n, "bk_core_ms": _time(bk, device, reps), "attention_ms": _time(attention, device, reps)})
    return rows


def plot_profile(p: dict, ax=None):
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.plot(p["causal"], label="|g_i| causal (positions 0..i)")
    ax.plot(p["bidirectional"], label="|G_ii| bidirectional (all positions)", alpha=0.8)
    ax.axhline(p["bound"], color="k", ls="--", lw=1, label="bound 1 / Im z")
    ax.set_xlabel("position i")
    ax.set_ylabel("|G|")
    ax.legend(fontsize=8)
    return ax


def plot_leak(d: dict, ax=None):
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    floor = 1e-18  # exact zeros drawn on the log axis
    ax.semilogy(d["causal"].clamp_min(floor), label="causal g_i")
    ax.semilogy(d["bidirectional"].clamp_min(floor), label="bidirectional G_ii", alpha=0.8)
    ax.axvline(d["t"], color="k", ls=":", lw=1, label=f"changed v_t, t = {d['t']}")
    ax.set_xlabel("position i")
    ax.set_ylabel("|change of output|")
    ax.legend(fontsize=8)
    return ax


def plot_timings(rows: list[dict], ax=None):
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ns = [r["n"] for r in rows]
    ax.loglog(ns, [r["bk_core_ms"] for r in rows], "o-", label="BK-core (causal)")
    ax.loglog(ns, [r["attention_ms"] for r in rows], "s-", label="causal attention (SDPA)")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("ms per call")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax
