#!/usr/bin/env python3
"""PyTorch reference for Mixlab's training-throughput benchmark: the same models, sizes and
optimizer, written the way a PyTorch user would (SDPA for attention, torch.fft for FNet, a dense
boolean mask for sparse patterns — what xformers#1086 complains about), timed the way
`bench train` times Mixlab: median wall time of `--steps` full training steps (forward, backward,
global-norm clipping, AdamW) after `--warmup` untimed ones, on random tokens.

Prints one JSON line: {"kind": "torch", "mixer": ..., "tokens_per_s": ..., "step_s_median": ...,
"params": ..., "threads": ...}. Not part of the test suite; see scripts/compare_torch.sh and
../shared/PYTORCH-CPU.md for installing a CPU PyTorch.

Model (as crates/models): token embedding + learned positions; pre-norm blocks
x + mixer(LN(x)), x + W2 GELU(W1 LN(x)) (no MLP when d_ff = 0); final LN; head tied to the
embedding; init N(0, 0.02²), residual projections 0.02/sqrt(2 L).
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Dense(nn.Module):
    def __init__(self, d, heads, causal, mask=None):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads, self.causal = heads, causal
        self.register_buffer("mask", mask, persistent=False)  # [n, n] True = may attend

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:n, :n])
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Fourier(nn.Module):
    def forward(self, x):
        return torch.fft.fft(torch.fft.fft(x.float(), dim=-1), dim=-2).real.to(x.dtype)


class Persistent(nn.Module):
    """All-attention: one softmax over [context ; N persistent key/value vectors] per head."""

    def __init__(self, d, heads, n_persistent, causal):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads, self.causal = heads, causal
        dh = d // heads
        self.keys = nn.Parameter(torch.randn(heads, n_persistent, dh) / math.sqrt(dh))
        self.values = nn.Parameter(torch.randn(heads, n_persistent, dh) / math.sqrt(n_persistent))

    def forward(self, x):
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, h, dh).transpose(1, 2) for t in (q, k, v))
        n_mem = self.keys.shape[1]
        keys = (self.keys * math.sqrt(dh)).unsqueeze(0).expand(b, h, n_mem, dh)
        values = (self.values * math.sqrt(n_mem)).unsqueeze(0).expand(b, h, n_mem, dh)
        mask = None
        if self.causal:
            ctx = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = torch.cat([ctx, torch.ones(n, n_mem, dtype=torch.bool, device=x.device)], dim=1)
        y = F.scaled_dot_product_attention(
            q, torch.cat([k, keys], dim=2), torch.cat([v, values], dim=2), attn_mask=mask
        )
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


def block_mask(pattern, n, block, causal, params):
    """Token-level mask of a Mixlab block pattern (window / strided / bigbird without random)."""
    nb = (n + block - 1) // block
    allowed = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(nb):
            dist = abs(i - j)
            if pattern == "window":
                w = params["width"]
                lo, hi = (i - w + 1, i) if causal else (i - (w - 1) // 2, i + w // 2)
                allowed[i, j] = lo <= j <= hi
            elif pattern == "strided":
                s = params["stride"]
                allowed[i, j] = dist < s or dist % s == 0
            else:
                raise SystemExit(f"unknown pattern {pattern}")
    mask = allowed.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    return mask


class Block(nn.Module):
    def __init__(self, d, d_ff, mixer):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d), mixer
        self.mlp = None
        if d_ff > 0:
            self.norm2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class Lm(nn.Module):
    def __init__(self, vocab, d, layers, d_ff, seq, make_mixer):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, d_ff, make_mixer()) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "keys" not in name and "values" not in name:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(n, device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.tok.weight.t()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixer", default="dense",
                    help="dense | fourier | persistent | sparse-window | sparse-strided")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-persistent", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--width", type=int, default=3)
    ap.add_argument("--stride", type=int, default=6)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (eager; timing synchronises)")
    ap.add_argument("--dtype", default="f32", help="f32 | bf16 (autocast on cuda)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    causal = bool(a.causal)
    d_ff = a.d_ff

    if a.mixer == "dense":
        make = lambda: Dense(a.d_model, a.heads, causal)
    elif a.mixer == "fourier":
        make = Fourier
    elif a.mixer == "persistent":
        d_ff = 0
        make = lambda: Persistent(a.d_model, a.heads, a.n_persistent, causal)
    elif a.mixer.startswith("sparse-"):
        pattern = a.mixer.split("-", 1)[1]
        mask = block_mask(pattern, a.seq, a.block, causal, {"width": a.width, "stride": a.stride})
        make = lambda: Dense(a.d_model, a.heads, causal, mask)
    else:
        raise SystemExit(f"unknown mixer {a.mixer}")

    dev = torch.device(a.device)
    model = Lm(a.vocab, a.d_model, a.layers, d_ff, a.seq, make).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n and "pos" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    times = []
    for i in range(a.warmup + a.steps):
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev)
        sync()
        start = time.perf_counter()
        with amp:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    print(json.dumps({
        "kind": "torch", "mixer": a.mixer, "seq": a.seq, "batch": a.batch,
        "tokens_per_s": a.batch * a.seq / step, "step_s_median": step,
        "params": sum(p.numel() for p in model.parameters()), "threads": a.threads,
        "torch": torch.__version__, "device": a.device, "dtype": a.dtype,
        "peak_device_memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                                  if dev.type == "cuda" else None),
    }))


if __name__ == "__main__":
    main()
