"""Ten times more concurrent requests than the queue holds, through the official `openai`
package: some get 429 (RateLimitError) with Retry-After, every admitted one completes.

    python3 overload.py --base-url http://127.0.0.1:PORT/v1 --model tiny --requests 40
"""

import argparse
import asyncio
import json

import openai
from openai import AsyncOpenAI

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--model", required=True)
p.add_argument("--requests", type=int, required=True)
p.add_argument("--api-key", required=True)
args = p.parse_args()

client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)


async def one(i):
    try:
        r = await client.completions.create(model=args.model, prompt=f"request {i}", max_tokens=32, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length"), r
        return "ok"
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after") == "1", e.response.headers
        assert e.code == "queue_full", e.code
        return "429"


async def main():
    results = await asyncio.gather(*(one(i) for i in range(args.requests)))
    counts = {k: results.count(k) for k in ("ok", "429")}
    assert counts["ok"] + counts["429"] == args.requests, counts
    assert counts["429"] > 0, f"no request was refused: {counts}"
    assert counts["ok"] > 0, f"no request was answered: {counts}"
    print(json.dumps(counts))


asyncio.run(main())
