"""The official `openai` package against fount's Files API: upload, auto-paging list, retrieve,
content, wait_for_processing, delete; another tenant's 404s and a refused purpose.

usage: files_client.py BASE_URL KEY_OF_TENANT_A KEY_OF_TENANT_B FILE.jsonl
"""

import os
import sys

from openai import BadRequestError, NotFoundError, OpenAI, PermissionDeniedError

base, key_a, key_b, key_inference, path = sys.argv[1:6]
a = OpenAI(base_url=base, api_key=key_a, max_retries=0)
b = OpenAI(base_url=base, api_key=key_b, max_retries=0)
data = open(path, "rb").read()

ids = []
for _ in range(3):
    with open(path, "rb") as f:
        up = a.files.create(file=f, purpose="fine-tune")
    assert up.id.startswith("file-"), up
    assert (up.object, up.purpose, up.status, up.bytes) == ("file", "fine-tune", "processed", len(data)), up
    assert up.filename == os.path.basename(path), up
    ids.append(up.id)

# the SDK pages with `after` until has_more is false: one file a page reaches all three
paged = [f.id for f in a.files.list(limit=1)]
assert sorted(paged) == sorted(ids) and len(paged) == 3, paged
assert [f.id for f in a.files.list(purpose="fine-tune", order="asc")] == ids
assert a.files.retrieve(ids[0]).filename == os.path.basename(path)
assert a.files.content(ids[0]).read() == data
assert a.files.wait_for_processing(ids[1]).status == "processed"

# another tenant: 404 for each, an empty list
for call in (
    lambda: b.files.retrieve(ids[0]),
    lambda: b.files.content(ids[0]).read(),
    lambda: b.files.delete(ids[0]),
):
    try:
        call()
        raise SystemExit("another tenant reached a file")
    except NotFoundError:
        pass
assert list(b.files.list()) == []

# a key without the files scope
try:
    OpenAI(base_url=base, api_key=key_inference, max_retries=0).files.list()
    raise SystemExit("a key without the files scope listed files")
except PermissionDeniedError:
    pass

# purposes other than fine-tune are refused, naming the parameter
try:
    with open(path, "rb") as f:
        a.files.create(file=f, purpose="batch")
    raise SystemExit("purpose batch accepted")
except BadRequestError as e:
    assert e.param == "purpose", e

gone = a.files.delete(ids[0])
assert gone.deleted and gone.id == ids[0], gone
assert sorted(f.id for f in a.files.list()) == sorted(ids[1:])
print("files: all checks passed")
