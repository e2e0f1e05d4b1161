#!/usr/bin/env python3
"""Prefill and decode speed of HF transformers (PyTorch, CPU) on a model directory.

Called by `fount bench generate --reference torch` so that both engines are measured in the
same run, on the same weights, with the same thread count. Prints one JSON object.

    python3 tools/bench/hf_generate.py --model DIR --prompt-tokens 512 --decode-tokens 128 --threads 2
"""

import argparse
import json
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 32000), (1, a.prompt_tokens), generator=g)
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(a.decode_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "engine": f"transformers {transformers.__version__} / torch {torch.__version__}",
                "threads": a.threads,
                "prefill_tokens": a.prompt_tokens,
                "prefill_s": prefill,
                "prefill_tok_s": a.prompt_tokens / prefill,
                "decode_tokens": a.decode_tokens,
                "decode_s": decode,
                "decode_tok_s": a.decode_tokens / decode,
            }
        )
    )


if __name__ == "__main__":
    main()
