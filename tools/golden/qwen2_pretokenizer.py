"""Records how Hugging Face transformers reads a Qwen2 model's tokenizer.

transformers 5 rebuilds a Qwen2 model's tokenizer (`Qwen2Tokenizer`) with its own normalizer
and pre-tokenizer, whatever `tokenizer.json` says; a tokenizer fount trains for a Qwen2 model
must use the same ones, or the model would see other token ids there. This writes them, and the
ids of a few strings, to crates/fount-tokenizer/tests/fixtures/qwen2_pretokenizer.json.

    fount model init --arch qwen2 --preset tiny --out /tmp/q
    python3 tools/golden/qwen2_pretokenizer.py /tmp/q
"""

import json
import sys

import transformers
from transformers import AutoTokenizer

STRINGS = [
    "Rewrite the date 2018-06-21 in the format DD/MM/YYYY.",
    "It's 12345 o'clock\n\n  indented\tand\r\nCRLF",
    "Café crème, naïve résumé — 北京欢迎你！",
]

model_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(model_dir)
backend = tok.backend_tokenizer
out = {
    "transformers": transformers.__version__,
    "class": type(tok).__name__,
    "normalizer": json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None,
    "pre_tokenizer": json.loads(backend.pre_tokenizer.__getstate__()),
    "pieces": [
        [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s))]
        for s in STRINGS
    ],
    "strings": STRINGS,
}
path = "crates/fount-tokenizer/tests/fixtures/qwen2_pretokenizer.json"
with open(path, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
    f.write("\n")
print("wrote", path)
