"""Exercises every path a key travels through `fount serve` and prints each secret it used, one
per line, for the test to look for in the server's logs: a key created over the admin API,
used, refused after revocation; a wrong key; a malformed header.

    python3 key_logs.py --base-url http://127.0.0.1:PORT --admin-key KEY
"""

import argparse
import json
import urllib.error
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--admin-key", required=True)
args = p.parse_args()


def call(method, path, key, body=None, header=None):
    req = urllib.request.Request(
        args.base_url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": header if header is not None else f"Bearer {key}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


status, _ = call("POST", "/admin/v1/tenants", args.admin_key, {"name": "logged"})
assert status == 200, status
status, created = call("POST", "/admin/v1/keys", args.admin_key, {"tenant": "logged"})
assert status == 200, (status, created)
secret = created["key"]
ask = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
status, _ = call("POST", "/v1/completions", secret, ask)
assert status == 200, status
status, _ = call("POST", "/v1/completions", secret, {**ask, "stream": True, "temperature": -1})
assert status == 400, status
wrong = "fk-" + "0" * 64
status, _ = call("GET", "/v1/models", wrong)
assert status == 401, status
malformed = "Basic " + secret
status, _ = call("GET", "/v1/models", None, header=malformed)
assert status == 401, status
status, _ = call("DELETE", f"/admin/v1/keys/{created['info']['prefix']}", args.admin_key)
assert status == 200, status
status, _ = call("GET", "/v1/models", secret)
assert status == 401, status
status, _ = call("GET", "/admin/v1/keys", secret)
assert status == 401, status
print(secret)
print(wrong)
