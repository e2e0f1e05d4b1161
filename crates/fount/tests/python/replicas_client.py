"""Fine-tuning through a load balancer in front of several `fount serve` replicas, with the
official `openai` client: the training file is uploaded through the balancer (to whichever
replica), the job is created and followed there, and the `ft:` model (kept in the artifacts
store by the replica that saw the job succeed) then answers on every replica, asked directly.

Usage: replicas_client.py LB_URL KEY TRAIN_JSONL REPLICA_URL...
"""

import sys
import time

import openai

LB, KEY, TRAIN = sys.argv[1:4]
REPLICAS = sys.argv[4:]
lb = openai.OpenAI(base_url=LB, api_key=KEY, max_retries=0)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


train = lb.files.create(file=open(TRAIN, "rb"), purpose="fine-tune")
# every replica reads the file, whichever took the upload
for url in REPLICAS:
    c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    check(c.files.content(train.id).content == open(TRAIN, "rb").read(), f"{url}: file content")
job = lb.fine_tuning.jobs.create(
    model="tiny",
    training_file=train.id,
    suffix="replicas",
    seed=3,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
)
start = time.time()
while True:
    job = lb.fine_tuning.jobs.retrieve(job.id)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    check(time.time() - start < 300, f"{job.id} stuck in {job.status}")
    time.sleep(0.2)
check(job.status == "succeeded", job)
name = job.fine_tuned_model
t0 = time.time()
answered = {}
for url in REPLICAS:
    c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    while True:
        try:
            r = c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            check(r.model == name, r)
            break
        except openai.NotFoundError:
            check(time.time() - t0 < 5, f"{url} does not serve {name}")
            time.sleep(0.05)
    answered[url] = round(time.time() - t0, 3)
print("model", name)
print("answered", answered)
print("replicas: all checks passed")
