#!/usr/bin/env python3
"""Check a Mixlab `export --format hf` directory with Hugging Face `transformers` (not part of
the test suite: CI has no PyTorch; install per ../shared/PYTORCH-CPU.md, then
`pip install --no-deps transformers huggingface_hub tokenizers safetensors numpy regex
packaging pyyaml tqdm` and what `import transformers` still asks for).

Given the export and Mixlab's per-token scores of the same model (`eval --scores`), it loads the
model with `AutoModelForCausalLM` / `AutoModelForMaskedLM` and the tokenizer with
`AutoTokenizer` (no code of ours), and prints, window by window and in total, the loss
`transformers` computes on Mixlab's windows (and masks) beside Mixlab's:

    cargo run --release --bin export -- --run runs/dense --format hf --out /tmp/hf-dense
    cargo run --release --bin eval -- --run runs/dense --scores /tmp/dense-scores.jsonl
    python3 scripts/hf_check.py --export /tmp/hf-dense --scores /tmp/dense-scores.jsonl

With `--greedy N --prompt TEXT --mixlab-text FILE` (FILE: the output of
`sample --run R --prompt TEXT --tokens N --temperature 0`) it also continues the prompt greedily
with the exported GPT-2 (the last `n_positions` tokens as context, as `sample` does) and
compares the text. Exits 1 if the losses differ by more than `--rtol` (1e-4) relative, the
tokenizer does not reproduce Mixlab's ids, or the continuations differ.
"""
import argparse
import json
import os
import sys

# Offline, and without the `kernels` package transformers 5 tries to use by default.
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="the export --format hf directory")
    ap.add_argument("--scores", required=True, help="eval --scores JSONL of the same model")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--greedy", type=int, default=0, help="tokens to continue greedily")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--mixlab-text", help="sample --temperature 0's output for --prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    config = AutoConfig.from_pretrained(args.export)
    arch = config.architectures[0]
    causal = arch == "GPT2LMHeadModel"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(args.export, dtype=torch.float32).eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: loaded {arch} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters) from {args.export}")
    tokenizer = AutoTokenizer.from_pretrained(args.export)

    windows = [json.loads(line) for line in open(args.scores)]
    ok = True
    mix_sum = hf_sum = weight_sum = 0.0
    worst = 0.0
    own_loss_pairs = []
    tokenizer_ok = True
    for w in windows:
        ids = torch.tensor([w["input"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        pos = torch.tensor(w["scored"], dtype=torch.long)
        tgt = torch.tensor(w["target"])[pos]
        hf_lp = logp[pos, tgt]
        weight = torch.tensor(w["weight"], dtype=torch.float64)
        mix_lp = torch.tensor(w["logprob"], dtype=torch.float64)
        hf_nll = -(hf_lp * weight).sum().item()
        mix_nll = -(mix_lp * weight).sum().item()
        worst = max(worst, (hf_lp - mix_lp).abs().max().item())
        mix_sum += mix_nll
        hf_sum += hf_nll
        weight_sum += weight.sum().item()
        # transformers' own loss (labels), on the positions it can score the same way.
        labels = torch.full_like(ids, -100)
        if causal:
            # GPT-2 shifts: logits[p] against labels[p + 1] = input[p + 1] = Mixlab's target[p].
            keep = [p for p in w["scored"] if p + 1 < len(w["input"])]
            for p in keep:
                labels[0, p + 1] = w["target"][p]
        else:
            keep = w["scored"]
            for p in keep:
                labels[0, p] = w["target"][p]
        with torch.no_grad():
            own = model(input_ids=ids, labels=labels).loss.item()
        at = {p: i for i, p in enumerate(w["scored"])}
        mix_own = -sum(w["logprob"][at[p]] for p in keep) / max(len(keep), 1)
        own_loss_pairs.append((own, mix_own))
        print(f"window {w['window']:3d}: {len(w['scored']):4d} scored  transformers "
              f"{hf_nll / weight.sum().item():.6f}  mixlab {mix_nll / weight.sum().item():.6f}  "
              f"transformers' loss(labels) {own:.6f} vs mixlab {mix_own:.6f}")
        # The tokenizer: decoding Mixlab's ids and encoding the text gives them back
        # ([MASK] included).
        text = tokenizer.decode(w["input"], skip_special_tokens=False)
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if again != w["input"]:
            print(f"  tokenizer: decode/encode of window {w['window']} does not give Mixlab's ids")
            tokenizer_ok = False
    hf_loss, mix_loss = hf_sum / weight_sum, mix_sum / weight_sum
    rel = abs(hf_loss - mix_loss) / abs(mix_loss)
    own_rel = max(abs(a - b) / abs(b) for a, b in own_loss_pairs)
    print(f"\n{len(windows)} windows, {weight_sum:.0f} scored tokens: loss transformers "
          f"{hf_loss:.7f}, mixlab {mix_loss:.7f}, relative difference {rel:.2e} "
          f"(largest per-token log-prob difference {worst:.2e}; transformers' own labelled "
          f"loss vs mixlab's on the same positions: at most {own_rel:.2e} relative)")
    if not (rel <= args.rtol and own_rel <= args.rtol):
        ok = False
    print("tokenizer (AutoTokenizer): decode(ids) re-encodes to Mixlab's ids in every window: "
          f"{'yes' if tokenizer_ok else 'NO'}")
    ok = ok and tokenizer_ok

    if args.greedy:
        if not causal:
            sys.exit("--greedy is for a GPT2LMHeadModel export")
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        n_pos = config.n_positions
        out = []
        for _ in range(args.greedy):
            context = torch.tensor([ids[-n_pos:]])
            with torch.no_grad():
                nxt = int(model(input_ids=context).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
        text = args.prompt + tokenizer.decode(out)
        print(f"\ngreedy continuation, {args.greedy} tokens (transformers):\n{text}")
        if args.mixlab_text:
            mixlab = open(args.mixlab_text).read()
            same = mixlab.rstrip("\n") == text.rstrip("\n")
            print(f"identical to Mixlab's sample --temperature 0: {'yes' if same else 'NO'}")
            if not same:
                ok = False
                for i, (a, b) in enumerate(zip(mixlab, text)):
                    if a != b:
                        print(f"  first difference at character {i}: {mixlab[i:i+40]!r} vs {text[i:i+40]!r}")
                        break
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
