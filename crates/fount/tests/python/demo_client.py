"""Asks the model and the adapter `fount demo` serves the held-out date task with the official
`openai` package and the demo tenant's key, then the dates given with --dates (the last days of
months, a leap day), then reads the tenant's metered usage.

    python3 demo_client.py --base-url http://127.0.0.1:PORT --api-key fk-... --test test.jsonl --n 30 \
        --dates 2024-12-31,2033-08-30,2024-02-29

Prints one JSON object: the exact answers of each model, each model's answer to each of --dates,
and the tenant's usage rows.
"""

import argparse
import json
import urllib.request

from openai import OpenAI

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--api-key", required=True)
p.add_argument("--test", required=True)
p.add_argument("--n", type=int, default=30)
p.add_argument("--dates", default="", help="comma-separated YYYY-MM-DD dates to ask both models")
args = p.parse_args()

client = OpenAI(base_url=args.base_url + "/v1", api_key=args.api_key, max_retries=0, timeout=120)
models = [m.id for m in client.models.list().data]
assert models == ["fount-demo", "dates"], models

examples = [json.loads(line) for line in open(args.test) if line.strip()][: args.n]
correct = {"fount-demo": 0, "dates": 0}
tokens = {"fount-demo": 0, "dates": 0}
for ex in examples:
    prompt = [m for m in ex["messages"] if m["role"] != "assistant"]
    expected = ex["messages"][-1]["content"].strip()
    for model in correct:
        r = client.chat.completions.create(model=model, messages=prompt, max_tokens=16, temperature=0)
        correct[model] += int(r.choices[0].message.content.strip() == expected)
        tokens[model] += r.usage.total_tokens

answers = {"fount-demo": {}, "dates": {}}
for date in filter(None, args.dates.split(",")):
    prompt = [{"role": "user", "content": f"Rewrite the date {date} in the format DD/MM/YYYY."}]
    for model in answers:
        r = client.chat.completions.create(model=model, messages=prompt, max_tokens=16, temperature=0)
        answers[model][date] = r.choices[0].message.content.strip()
        tokens[model] += r.usage.total_tokens

req = urllib.request.Request(args.base_url + "/v1/usage", headers={"Authorization": "Bearer " + args.api_key})
with urllib.request.urlopen(req) as resp:
    usage = json.load(resp)
print(json.dumps({"n": len(examples), "correct": correct, "answers": answers, "tokens": tokens, "usage": usage}))
