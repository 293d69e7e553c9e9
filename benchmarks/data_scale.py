"""Tokenisation and loading throughput of WikiTextDataModule on a generated 100M-token corpus (CPU).

The corpus: wiki.{train,valid,test}.tokens in WikiText's layout, words drawn from a Zipf(1.1)
distribution over a 50,000-word vocabulary, 19 words per line (+ <eos> = 20 tokens per line), so
the training split is `--tokens` tokens (default 100M, ~560 MB of text). Measured, each phase in a
fresh process (so that each peak RSS is its own):

  cold:  WikiTextDataModule(source=dir) on an empty cache (sha256 of the files, HF `datasets` Arrow
         cache of the text, word counting) + prepare_data() (chunked tokenisation of every split
         into memory-mapped token files), wall-clock and peak RSS;
  warm:  a second WikiTextDataModule on the same cache + setup("fit"): what every later run pays;
  load:  the training DataLoader (batch 32 x seq_len 256, shuffled windows, num_workers 0 and 2),
         batches and tokens per second, and the RSS of the process while it iterates.

    python benchmarks/data_scale.py [--tokens 100000000] [--work /tmp/data_scale]
Writes benchmarks/results/data_scale.json; docs/data_scale.md reads it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, SEQ_LEN = 32, 256


def status_mb(field: str = "VmRSS") -> float:
    """/proc/self/status's VmRSS (resident memory) or RssAnon (anonymous, heap: RSS without the pages of
    memory-mapped files, which are page cache the kernel can drop at any time) in MiB."""
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:")), float("nan"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(folder: Path, n_tokens: int, vocab: int = 50_000, words_per_line: int = 19, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    cdf = np.cumsum(p / p.sum())
    for split, n in (("train", n_tokens), ("valid", 200_000), ("test", 200_000)):
        with open(folder / f"wiki.{split}.tokens", "w", encoding="utf-8") as f:
            lines_left = n // (words_per_line + 1)
            while lines_left:
                k = min(lines_left, 200_000)
                ids = np.searchsorted(cdf, rng.random((k, words_per_line)))
                f.write("".join(" " + " ".join(row) + " \n" for row in words[np.minimum(ids, vocab - 1)].tolist()))
                lines_left -= k


def cold(data: Path, cache: Path) -> dict:
    """Build the data module on an empty cache and tokenise every split."""
    from datamodules import WikiTextDataModule

    shutil.rmtree(cache, ignore_errors=True)
    rss0 = status_mb()
    t = time.perf_counter()
    dm = WikiTextDataModule(source=str(data), seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=str(cache))
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    dm.prepare_data()
    t_tok = time.perf_counter() - t
    n_train = len(dm.tokens("train"))
    return {"cold": {
        "init_s (hash + HF Arrow text cache + word counts)": t_init,
        "tokenise_s (all splits -> memmap files)": t_tok,
        "train_tokens": n_train, "vocab_size": dm.vocab_size,
        "tokens_per_s_tokenise": sum(len(dm.tokens(s)) for s in ("train", "valid", "test")) / t_tok,
        "tokens_per_s_end_to_end": n_train / (t_init + t_tok),
        "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0, "anon_rss_after_mb": status_mb("RssAnon"),
        "token_file_mb": sum(p.stat().st_size for p in (cache / "streams").iterdir()) / 2**20,
        "token_dtype": str(dm.tokens("train").dtype),
    }}  # fmt: skip


def warm_and_load(data: Path, cache: Path, batches: int) -> dict:
    """Open the filled cache, then iterate the training loader with 0 and 2 workers."""
    import torch

    from datamodules import WikiTextDataModule

    rss1, anon1 = status_mb(), status_mb("RssAnon")
    t = time.perf_counter()
    dm = WikiTextDataModule(source=str(data), seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=str(cache))
    dm.setup("fit")
    result = {"warm": {"init_and_setup_s": time.perf_counter() - t, "rss_increase_mb": status_mb() - rss1,
                       "anon_rss_before_mb": anon1, "anon_rss_after_setup_mb": status_mb("RssAnon"),
                       "train_windows": len(dm.train_dataset)}, "load": {}}  # fmt: skip
    for workers in (0, 2):
        dm.num_workers = workers
        loader = dm.train_dataloader()
        n = min(batches, len(loader) - 2)  # full batches only
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        for _ in range(n):
            batch = next(it)
        dt = time.perf_counter() - t
        assert batch["input_ids"].shape == (BATCH, SEQ_LEN) and batch["input_ids"].dtype == torch.int64
        result["load"][f"num_workers={workers}"] = {
            "batches_per_s": n / dt, "tokens_per_s": n * BATCH * SEQ_LEN / dt, "rss_mb": status_mb(),
            "anon_rss_mb": status_mb("RssAnon"),
        }  # fmt: skip
        del it
    result["warm"]["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--work", default="/tmp/data_scale")
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    args = ap.parse_args()
    data, cache = Path(args.work) / "corpus", Path(args.work) / "cache"
    result = {"tokens_requested": args.tokens, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count()}  # fmt: skip
    t = time.perf_counter()
    if not (data / "wiki.train.tokens").exists():
        generate(data, args.tokens)
    result["generate_s"] = time.perf_counter() - t
    result["text_bytes"] = sum(f.stat().st_size for f in data.iterdir())
    for phase, phase_args in ((cold, (data, cache)), (warm_and_load, (data, cache, args.batches))):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # its own peak RSS
            result.update(pool.submit(phase, *phase_args).result())
        print(json.dumps(result, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
