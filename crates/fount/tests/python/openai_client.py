"""The official `openai` package against a running `fount serve` (started by tests/serve.rs).

Every check raises AssertionError with what differed; the last one sends SIGTERM to the server
while a stream is running and checks that the stream finishes and new requests get 503.

    python3 openai_client.py --base-url http://127.0.0.1:PORT/v1 --model tiny --adapter support --pid PID
"""

import argparse
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
from openai import OpenAI

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--model", required=True)
p.add_argument("--adapter", required=True)
p.add_argument("--pid", type=int, required=True)
p.add_argument("--api-key", required=True)
args = p.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
M = args.model
HELLO = [{"role": "user", "content": "Say hello."}]


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}")


# models
models = client.models.list()
ids = [m.id for m in models.data]
check("models are listed", ids == [M, args.adapter], ids)
adapter = client.models.retrieve(args.adapter)
check("an adapter names its parent", adapter.model_extra.get("parent") == M, adapter)
check("a model is retrieved", client.models.retrieve(M).id == M)

# chat, not streamed
r = client.chat.completions.create(model=M, messages=HELLO, max_tokens=5, temperature=0)
c = r.choices[0]
check("chat answers", r.object == "chat.completion" and c.message.role == "assistant", r)
check("max_tokens ends with length", c.finish_reason == "length", c.finish_reason)
u = r.usage
check("usage adds up", u.completion_tokens == 5 and u.total_tokens == u.prompt_tokens + 5, u)
check("cached tokens are reported", u.prompt_tokens_details.cached_tokens >= 0, u)
greedy = c.message.content

# chat, streamed with usage
chunks = list(
    client.chat.completions.create(
        model=M,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
check("the first delta carries the role", chunks[0].choices[0].delta.role == "assistant")
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
check("the stream says what the answer said", text == greedy, (text, greedy))
finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
check("the stream ends with a finish reason", finish == ["length"], finish)
check("include_usage sends usage last", chunks[-1].usage is not None and chunks[-1].choices == [])
check("the prompt is cached the second time", chunks[-1].usage.prompt_tokens_details.cached_tokens > 0)

# n and seed
kw = dict(model=M, messages=HELLO, max_tokens=8, temperature=1.0, seed=1234, n=3)
a = client.chat.completions.create(**kw)
b = client.chat.completions.create(**kw)
check("n = 3 gives three choices", [ch.index for ch in a.choices] == [0, 1, 2])
check(
    "the same seed gives the same choices",
    [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices],
)
other = client.chat.completions.create(**{**kw, "seed": 99})
check(
    "another seed gives other choices",
    [ch.message.content for ch in other.choices] != [ch.message.content for ch in a.choices],
)

# stop (sampled with a seed: the random tiny model's greedy text repeats itself)
SAMPLED = dict(model=M, messages=HELLO, max_tokens=12, temperature=1.0, seed=5)
long = client.chat.completions.create(**SAMPLED)
full = long.choices[0].message.content
cut = 3
while cut < len(full) and full[cut:cut + 2] in full[:cut + 1]:
    cut += 1
stop = full[cut:cut + 2]
if len(stop) == 2:
    s = client.chat.completions.create(**SAMPLED, stop=[stop])
    check("stop ends before the stop string", s.choices[0].message.content == full[:cut], (full, stop))
    check("stop reports stop", s.choices[0].finish_reason == "stop")
else:
    raise AssertionError(f"no stop string to test in {full!r}")

# logprobs
r = client.chat.completions.create(model=M, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
check("a logprob per token", len(lp) == 4, lp)
check("two alternatives each", all(len(t.top_logprobs) == 2 for t in lp))
check("greedy picks the most likely", all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in lp))

# completions
r = client.completions.create(model=M, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
check("completions answer", r.object == "text_completion" and r.choices[0].finish_reason == "length")
check("completion logprobs", len(r.choices[0].logprobs.tokens) == 6 and len(r.choices[0].logprobs.top_logprobs[0]) <= 2)
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=M, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    if ch.choices
)
check("a streamed completion says the same", streamed == r.choices[0].text, (streamed, r.choices[0].text))
r2 = client.completions.create(model=M, prompt=["a", "b"], n=2, max_tokens=2)
check("two prompts with n = 2 give four choices", [c.index for c in r2.choices] == [0, 1, 2, 3])

# an adapter as the model
base = client.completions.create(model=M, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3)
tuned = client.completions.create(model=args.adapter, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3)
check("the adapter answers as itself", tuned.model == args.adapter)
check("the adapter changes the answer", tuned.choices[0].text != base.choices[0].text)


# errors, as the SDK's exception classes
def raises(name, cls, fn, code=None):
    try:
        fn()
    except cls as e:
        got = getattr(e, "code", None)
        check(name, code is None or got == code, f"code {got!r}, expected {code!r}")
        return e
    raise AssertionError(f"{name}: no {cls.__name__}")


raises("a wrong API key is AuthenticationError", openai.AuthenticationError,
       lambda: OpenAI(base_url=args.base_url, api_key="fk-00000000-" + "0" * 64, max_retries=0).models.list(),
       "invalid_api_key")
raises("a bad parameter is BadRequestError", openai.BadRequestError,
       lambda: client.chat.completions.create(model=M, messages=HELLO, temperature=5))
e = raises("an unknown model is NotFoundError", openai.NotFoundError,
           lambda: client.chat.completions.create(model="gpt-nope", messages=HELLO), "model_not_found")
raises("too long is context_length_exceeded", openai.BadRequestError,
       lambda: client.chat.completions.create(model=M, messages=HELLO, max_tokens=10**6), "context_length_exceeded")
raises("a wrong type is BadRequestError", openai.BadRequestError,
       lambda: client.chat.completions.create(model=M, messages=[{"role": "robot", "content": "x"}]))

e = raises("a body over the limit is 413 (APIStatusError)", openai.APIStatusError,
           lambda: client.chat.completions.create(model=M, messages=[{"role": "user", "content": "x" * (5 << 20)}]),
           "request_too_large")
check("413 is its status", e.status_code == 413, e.status_code)

# SIGTERM while a stream runs: the stream finishes, new requests get 503
events = []


failure = []


def long_stream():
    # long enough to still be running while the checks below run
    try:
        for ch in client.completions.create(model=M, prompt="Once", n=4, max_tokens=1500, temperature=1.0,
                                            stream=True):
            events.append(ch)
    except Exception as e:  # reported below
        failure.append(repr(e))


def health_status():
    try:
        return urllib.request.urlopen(args.base_url.removesuffix("/v1") + "/health").status
    except urllib.error.HTTPError as e:
        return e.code


t = threading.Thread(target=long_stream)
t.start()
deadline = time.time() + 60
while len(events) < 3 and t.is_alive() and time.time() < deadline:
    time.sleep(0.005)
check("the long stream started", len(events) >= 3, failure)
os.kill(args.pid, signal.SIGTERM)
deadline = time.time() + 10
while health_status() != 503 and time.time() < deadline:
    time.sleep(0.01)
check("/health turns 503 on SIGTERM", health_status() == 503)
raises("while draining, new requests are 503 (InternalServerError)", openai.InternalServerError,
       lambda: client.completions.create(model=M, prompt="x", max_tokens=2), "shutting_down")
check("the stream was still running", t.is_alive())
t.join(timeout=120)
finished = [ch.choices[0].finish_reason for ch in events if ch.choices and ch.choices[0].finish_reason]
check("the running stream finished", not t.is_alive() and len(finished) == 4, (len(events), finished))
print("all checks passed")
