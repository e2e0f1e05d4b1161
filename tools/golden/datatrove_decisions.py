"""Records datatrove's decisions on a corpus, for fount's agreement tests and benchmarks.

For every document of a JSONL corpus it runs FineWeb's filter chain (Gopher repetition, Gopher
quality, C4 with filter_no_terminal_punct=False, FineWeb quality) and records the first rule that
drops it, and it runs datatrove's three MinHash stages (signatures, buckets, clusters; 5-grams,
14 bands x 8 hashes, xxhash64) and records each document's duplicate cluster.

    pip install "datatrove[processing]==0.10.1" spacy==3.8.*
    fount data synth --out /tmp/synth --docs 3000 --seed 7 --chinese-fraction 0
    python3 tools/golden/datatrove_decisions.py /tmp/synth/corpus crates/fount-data/tests/fixtures/datatrove_decisions.jsonl

Output: one JSON object per document, in corpus order:
    {"id": ..., "text_xxh64": ..., "decision": "keep" | "<stage>:<reason>", "cluster": int | null}
"cluster" numbers documents that datatrove put in the same MinHash cluster (null: no duplicate).
"""

import glob
import json
import os
import struct
import sys
import tempfile

import xxhash
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


def load(corpus):
    files = sorted(glob.glob(os.path.join(corpus, "*.jsonl"))) if os.path.isdir(corpus) else [corpus]
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                docs.append(Document(text=rec["text"], id=rec["id"]))
    return docs


def filter_decision(chain, doc):
    doc = Document(text=doc.text, id=doc.id)
    for stage, f in chain:
        res = f.filter(doc)
        if res is True:
            continue
        reason = res[1] if isinstance(res, tuple) else "dropped"
        return f"{stage}:{reason}"
    return "keep"


def minhash_clusters(docs):
    config = MinhashConfig()
    with tempfile.TemporaryDirectory() as tmp:
        sigs, buckets, clusters = (os.path.join(tmp, x) for x in ("sigs", "buckets", "clusters"))
        MinhashDedupSignature(output_folder=sigs, config=config).run(iter(docs), rank=0, world_size=1)
        for b in range(config.num_buckets):
            MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config).run(
                rank=b, world_size=config.num_buckets
            )
        MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=config, save_cluster_id=True).run()
        out = {}
        path = os.path.join(clusters, "000000.clusters")
        if os.path.exists(path):
            with open(path, "rb") as fh:
                data = fh.read()
            for i in range(0, len(data), 8):
                doc, cluster = struct.unpack("<II", data[i : i + 8])
                out[doc] = cluster
        return out


def main():
    corpus, out_path = sys.argv[1], sys.argv[2]
    docs = load(corpus)
    chain = [
        ("gopher_repetition", GopherRepetitionFilter()),
        ("gopher_quality", GopherQualityFilter()),
        ("c4", C4QualityFilter(filter_no_terminal_punct=False)),
        ("fineweb", FineWebQualityFilter()),
    ]
    clusters = minhash_clusters(docs)
    with open(out_path, "w", encoding="utf-8") as out:
        for i, doc in enumerate(docs):
            rec = {
                "id": doc.id,
                "text_xxh64": xxhash.xxh64_hexdigest(doc.text.encode("utf-8")),
                "decision": filter_decision(chain, doc),
                "cluster": clusters.get(i),
            }
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
