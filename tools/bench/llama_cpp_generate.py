"""Prefill and batch-1 decode speed of llama.cpp (llama-cpp-python, built from source) on a GGUF
file, for `fount bench generate --quant`: the same random prompt length, the same number of
decoded tokens, the same threads. Prints one JSON line.

    python3 tools/bench/llama_cpp_generate.py --model F.gguf --prompt-tokens 512 \
        --decode-tokens 128 --threads 2
"""

import argparse
import json
import random
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama, __version__

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--prompt-tokens", type=int, default=512)
p.add_argument("--decode-tokens", type=int, default=128)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

n_ctx = a.prompt_tokens + a.decode_tokens + 16
llm = Llama(
    model_path=a.model,
    n_ctx=n_ctx,
    n_batch=a.prompt_tokens,
    n_ubatch=a.prompt_tokens,
    n_threads=a.threads,
    n_threads_batch=a.threads,
    verbose=False,
)
rng = random.Random(0)
vocab = min(llm.n_vocab(), 32000)
prompt = [rng.randrange(vocab) for _ in range(a.prompt_tokens)]

llm.eval(prompt[:8])  # warm-up: threads, page faults of the mapped weights
llm.reset()
t0 = time.perf_counter()
llm.eval(prompt)
prefill = time.perf_counter() - t0
n_vocab = llm.n_vocab()


def last_logits():
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))


nxt = int(np.argmax(last_logits()))
t0 = time.perf_counter()
for _ in range(a.decode_tokens):
    llm.eval([nxt])
    nxt = int(np.argmax(last_logits()))
decode = time.perf_counter() - t0
print(
    json.dumps(
        {
            "engine": f"llama.cpp (llama-cpp-python {__version__})",
            "prefill_tok_s": a.prompt_tokens / prefill,
            "decode_tok_s": a.decode_tokens / decode,
        }
    )
)
