"""SentencePiece vocabularies and llama.cpp's tokenization of them, the reference fount's
conversion of `tokenizer.ggml.model = llama` GGUF vocabularies is checked against
(sentencepiece and llama-cpp-python, installed by scripts/test).

    python3 tools/gguf/sentencepiece_reference.py train CORPUS.txt VOCAB_SIZE OUT.json
        trains a SentencePiece BPE model as Llama 2's was trained (byte fallback, digits split,
        an unknown piece, <s> and </s>) and writes its pieces as [[piece, score, type], ...],
        type being SentencePiece's (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), the
        numbering GGUF's tokenizer.ggml.token_type uses.

    python3 tools/gguf/sentencepiece_reference.py tokenize MODEL.gguf TEXTS.json OUT.json
        llama.cpp's tokens of each text (BOS added as the file says, special tokens parsed) and
        its text of those tokens (the first token's space prefix removed, special tokens left
        out): {"ids": [[...], ...], "text": ["...", ...]}.
"""

import json
import sys


def train(corpus, vocab_size, out):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_writer=model,
        model_type="bpe",
        vocab_size=int(vocab_size),
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.995,
        user_defined_symbols=["<tool>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = []
    for i in range(sp.get_piece_size()):
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_byte(i):
            kind = 6
        elif sp.is_unused(i):
            kind = 5
        elif sp.id_to_piece(i) == "<tool>":
            kind = 4
        pieces.append([sp.id_to_piece(i), sp.get_score(i), kind])
    json.dump(pieces, open(out, "w"), ensure_ascii=False)


def tokenize(model, texts, out):
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    ids, text = [], []
    for t in json.load(open(texts)):
        got = llm.tokenize(t.encode(), add_bos=True, special=True)
        ids.append(got)
        # llama.cpp's own detokenizer (llama-cpp-python's cuts pieces at 32 bytes)
        arr = (llama_cpp.llama_token * max(1, len(got)))(*got)
        buf = ctypes.create_string_buffer(16 * len(t.encode()) + 64)
        n = llama_cpp.llama_detokenize(vocab, arr, len(got), buf, len(buf), True, False)
        assert n >= 0, n
        text.append(buf.raw[:n].decode("utf-8", errors="replace"))
    json.dump({"ids": ids, "text": text}, open(out, "w"), ensure_ascii=False)


if __name__ == "__main__":
    {"train": train, "tokenize": tokenize}[sys.argv[1]](*sys.argv[2:])
