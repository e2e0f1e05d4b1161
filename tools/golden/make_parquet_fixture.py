"""Writes crates/fount-data/tests/fixtures/docs.parquet: three documents with a text column, an
id column and a metadata column, as HF datasets store web text (snappy-compressed).

    pip install pyarrow
    python3 tools/golden/make_parquet_fixture.py crates/fount-data/tests/fixtures/docs.parquet
"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq

table = pa.table(
    {
        "id": ["pq-1", "pq-2", "pq-3"],
        "content": [
            "The first parquet document talks about rivers.",
            "第二个文档是中文的。",
            "The third one has a url field too.",
        ],
        "url": ["https://a.example.com/1", None, "https://c.example.com/3"],
        "score": [0.5, 0.25, 1.0],
    }
)
pq.write_table(table, sys.argv[1], compression="snappy", row_group_size=2)
