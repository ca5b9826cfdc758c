#!/usr/bin/env python3
"""PyTorch reference for `bench head`: the output layer alone at WikiText-103's vocabulary,
forward + backward of the summed negative log-likelihood of Zipf-like targets, with a full
softmax (`F.cross_entropy` over `h @ W.T`, as a PyTorch user writes it) or with
`torch.nn.AdaptiveLogSoftmaxWithLoss` (the same cutoffs and div_value), timed as `bench head`
times Mixlab's: median wall time of `--repeats` after one untimed warm-up, and the process's
peak RSS (run one head per process, as `bench head` does).

Prints one JSON line: {"kind": "torch-head", "head": ..., "fwd_bwd_s": ..., "peak_rss_mb": ...}.
Not part of the test suite; see ../shared/PYTORCH-CPU.md for installing a CPU PyTorch.

    python3 scripts/torch_head.py --head full
    python3 scripts/torch_head.py --head adaptive
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def zipf_targets(vocab, rows, generator):
    # Zipf(1) over ranks 0..vocab-1, drawn by inverse transform on the harmonic weights.
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, rows, replacement=True, generator=generator)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", choices=["full", "adaptive"], required=True)
    ap.add_argument("--vocab", type=int, default=267_735)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cutoffs", default="20000,40000,200000")
    ap.add_argument("--div-val", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    targets = zipf_targets(a.vocab, a.rows, g)
    cutoffs = [int(c) for c in a.cutoffs.split(",")]
    if a.head == "adaptive":
        layer = nn.AdaptiveLogSoftmaxWithLoss(a.d_model, a.vocab, cutoffs, div_value=a.div_val,
                                              head_bias=True)
        loss_of = lambda h: layer(h, targets).loss * a.rows  # the mean, back to the sum
    else:
        weight = nn.Parameter(torch.randn(a.vocab, a.d_model) * 0.02)
        loss_of = lambda h: F.cross_entropy(h @ weight.T, targets, reduction="sum")
    times = []
    for r in range(a.repeats + 1):
        h = torch.randn(a.rows, a.d_model, requires_grad=True)
        start = time.perf_counter()
        loss = loss_of(h)
        loss.backward()
        h.grad.sum().item()
        if r > 0:
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "kind": "torch-head", "head": a.head, "vocab": a.vocab, "d_model": a.d_model,
        "rows": a.rows, "cutoffs": cutoffs if a.head == "adaptive" else None,
        "div_val": a.div_val if a.head == "adaptive" else None,
        "fwd_bwd_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": a.threads, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
