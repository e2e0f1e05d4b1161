"""llama.cpp's outputs on a GGUF file, as the reference fount's GGUF tests and benchmarks check
against (llama-cpp-python, built from source by scripts/test).

    python3 tools/gguf/llama_cpp_reference.py MODEL.gguf REQUEST.json OUT

REQUEST.json: {"sequences": [[token ids], ...], "greedy": [[prompt ids], ...], "greedy_tokens": N}
OUT.f32: for each sequence, its logits at every position as little-endian float32 (len × vocab,
row after row). OUT.json: {"vocab": V, "greedy": [[ids], ...]}, the greedy continuation of each
prompt. Everything runs on 2 threads, one sequence at a time from an empty f32 cache.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

model, request, out = sys.argv[1:4]
req = json.load(open(request))
longest = max([len(s) for s in req["sequences"]] + [len(p) + req["greedy_tokens"] for p in req["greedy"]])
llm = Llama(
    model_path=model,
    n_ctx=max(64, longest + 8),
    n_batch=max(64, longest + 8),
    n_threads=2,
    logits_all=True,
    # an f32 cache (llama.cpp's default is f16), so the comparison is of the weights' kernels
    type_k=0,
    type_v=0,
    verbose=False,
)
vocab = llm.n_vocab()
with open(out + ".f32", "wb") as f:
    for seq in req["sequences"]:
        llm.reset()
        llm.eval(seq)
        scores = np.asarray(llm.scores[: len(seq)], dtype="<f4")
        f.write(scores.tobytes())
    greedy = []
    for prompt in req["greedy"]:
        llm.reset()
        llm.eval(prompt)
        got = []
        for _ in range(req["greedy_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            llm.eval([nxt])
        greedy.append(got)
json.dump({"vocab": vocab, "greedy": greedy}, open(out + ".json", "w"))
