"""Load for the crash test: keeps `--concurrency` requests running against `fount serve` and
appends the id of every response that completed to `--out`, one per line, flushed as it
arrives. The test kills the server with SIGKILL while this runs; errors after that are expected (behind a
load balancer, with --max-retries, the requests go on on the other replicas).

    python3 crash_load.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY --out ids.txt
"""

import argparse
import asyncio
import os

from openai import AsyncOpenAI

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--api-key", required=True)
p.add_argument("--out", required=True)
p.add_argument("--concurrency", type=int, default=8)
# behind a load balancer a request a dead replica dropped is retried (on another replica)
p.add_argument("--max-retries", type=int, default=0)
# requests per worker (0: until an error)
p.add_argument("--count", type=int, default=0)
args = p.parse_args()

client = AsyncOpenAI(
    base_url=args.base_url, api_key=args.api_key, max_retries=args.max_retries, timeout=30
)
out = open(args.out, "a", buffering=1)


async def worker(w):
    i = 0
    while args.count == 0 or i < args.count:
        i += 1
        try:
            if i % 2:
                r = await client.completions.create(model="tiny", prompt=f"w{w} r{i}", max_tokens=8)
                rid = r.id
            else:
                rid = None
                async for ch in await client.completions.create(
                    model="tiny", prompt=f"w{w} r{i}", max_tokens=8, stream=True
                ):
                    rid = ch.id
                # the stream ended with [DONE]: it completed
        except Exception:
            if args.count:
                # a request a dying replica dropped mid-stream: the next one goes elsewhere
                continue
            return
        out.write(rid + "\n")
        os.fsync(out.fileno())


async def main():
    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))


asyncio.run(main())
