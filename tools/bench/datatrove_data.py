"""Times datatrove (one process, one core) on the first documents of a JSONL corpus, for
`fount bench data`. Prints one JSON object.

    pip install "datatrove[processing]==0.10.1" spacy==3.8.* tokenizers
    python3 tools/bench/datatrove_data.py CORPUS_DIR --docs 2000 --tokenizer RUN_DIR/tokenizer.json

Measured, each on the same documents:
  filters   GopherRepetition, GopherQuality, C4QualityFilter(filter_no_terminal_punct=False),
            FineWebQualityFilter, chained as FineWeb chains them
  minhash   MinhashDedupSignature (signatures written and sorted, 14 x 8, 5-grams)
  pipeline  filters, PIIFormatter, the three MinHash stages and tokenization of the survivors
            with the given tokenizer.json (datatrove's language filter needs a fastText model
            download and is left out)
"""

import argparse
import glob
import json
import os
import tempfile
import time

from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.formatters import PIIFormatter


def load(corpus, n):
    docs = []
    for f in sorted(glob.glob(os.path.join(corpus, "*.jsonl"))):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                docs.append(Document(text=rec["text"], id=rec["id"]))
                if len(docs) >= n:
                    return docs
    return docs


def chain():
    return [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]


def run_filters(docs):
    filters = chain()
    kept = []
    for d in docs:
        doc = Document(text=d.text, id=d.id)
        if all(f.filter(doc) is True for f in filters):
            kept.append(doc)
    return kept


def run_minhash(docs, tmp, all_stages):
    config = MinhashConfig()
    sigs = os.path.join(tmp, "sigs")
    MinhashDedupSignature(output_folder=sigs, config=config).run(iter(docs), rank=0, world_size=1)
    if all_stages:
        buckets, clusters = os.path.join(tmp, "buckets"), os.path.join(tmp, "clusters")
        for b in range(config.num_buckets):
            MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config).run(
                rank=b, world_size=config.num_buckets
            )
        MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=config).run()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    docs = load(args.corpus, args.docs)
    nbytes = sum(len(d.text.encode("utf-8")) for d in docs)
    run_filters(docs[:20])  # load spaCy outside the timing
    out = {"docs": len(docs), "bytes": nbytes}

    t = time.perf_counter()
    run_filters(docs)
    out["filters_s"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_minhash(docs, tmp, all_stages=False)
        out["minhash_s"] = time.perf_counter() - t

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    pii = PIIFormatter()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        kept = run_filters(docs)
        for d in kept:
            d.text = pii.format(d.text)
        run_minhash(kept, tmp, all_stages=True)
        for d in kept:
            tok.encode(d.text)
        out["pipeline_s"] = time.perf_counter() - t
    print(json.dumps(out))


if __name__ == "__main__":
    main()
