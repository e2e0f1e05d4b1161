"""OpenAI's Fine-tuning API on `fount serve`, driven by the official `openai` client, unmodified.

Usage: finetuning_client.py BASE_URL KEY_A KEY_B FOUNT DATA_DIR BASE_MODEL TRAIN_JSONL WORK_DIR

Tenant A uploads a file, creates a job, follows its events until it succeeds, lists its
checkpoints, calls the `ft:` model and a checkpoint model the moment the job succeeds, reads the
results file and sees the trained tokens in its usage; a job is cancelled while it runs, one is
paused and resumed, and one is preempted by a job of higher priority (submitted with `fount jobs
submit`): both end with the adapter of an uninterrupted run. Every validation failure fails the job
in `validating_files` with OpenAI's code, and nothing runs. Tenant B gets 404 for all of A's.
"""

import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

BASE, KEY_A, KEY_B, FOUNT, DATA_DIR, BASE_MODEL, TRAIN, WORK = sys.argv[1:9]
WORK = Path(WORK)
WORK.mkdir(parents=True, exist_ok=True)
a = openai.OpenAI(base_url=BASE, api_key=KEY_A, max_retries=0)
b = openai.OpenAI(base_url=BASE, api_key=KEY_B, max_retries=0)
FINAL = {"succeeded", "failed", "cancelled"}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def wait(job_id, statuses, timeout=240.0, every=0.05):
    start = time.time()
    while True:
        job = a.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        check(time.time() - start < timeout, f"{job_id} stuck in {job.status}")
        time.sleep(every)


def events(job_id):
    # a small page: the SDK follows `after` through every page
    return list(a.fine_tuning.jobs.list_events(job_id, limit=7))


def wait_event(job_id, text, timeout=120.0):
    start = time.time()
    while True:
        for e in events(job_id):
            if text in e.message:
                return e
        check(time.time() - start < timeout, f"{job_id}: no event with {text!r}: {[e.message for e in events(job_id)]}")
        time.sleep(0.05)


def adapter(job_id):
    return (Path(DATA_DIR) / "fine_tuning" / job_id / "adapter" / "adapter_model.safetensors").read_bytes()


def chat(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Rewrite the date 1999-01-02."}], max_tokens=4
    )
    check(r.choices and r.model == model, f"{model}: {r}")
    return r


def not_found(call, what):
    try:
        call()
    except openai.NotFoundError:
        return
    raise AssertionError(f"{what}: no 404")


train = a.files.create(file=open(TRAIN, "rb"), purpose="fine-tune")
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 1}}}

# --- the whole flow, with the `ft:` model answering the moment the job succeeds ---
job = a.fine_tuning.jobs.create(
    model="tiny",
    training_file=train.id,
    suffix="dates",
    seed=7,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
    metadata={"team": "support"},
)
check(job.status == "validating_files" and job.id.startswith("ftjob-"), job)
check(job.hyperparameters.n_epochs == 3, job)
done = wait(job.id, FINAL, every=0.02)
t0 = time.time()
check(done.status == "succeeded", done)
name = done.fine_tuned_model
check(name.startswith("ft:tiny:acme:dates:") and len(name.split(":")[-1]) == 8, name)
chat(a, name)
first_answer = time.time() - t0
check(first_answer < 1.0, f"first answer {first_answer:.3f} s after succeeded")
check(done.trained_tokens and done.trained_tokens > 0, done)
check(done.finished_at and done.finished_at >= done.created_at, done)
check(done.metadata == {"team": "support"}, done.metadata)
h = done.method.supervised.hyperparameters
check((h.n_epochs, h.batch_size, h.learning_rate_multiplier) == (3, 4, 1.0), h)
msgs = [e.message for e in events(job.id)]
check(msgs[0] == "The job has successfully completed", msgs)
check(msgs[-1] == f"Created fine-tuning job: {job.id}", msgs)
order = [
    f"Created fine-tuning job: {job.id}",
    f"Validating training file: {train.id}",
    "Files validated, moving job to queued state",
    "Fine-tuning job started",
    "Checkpoint created at step",
    f"New fine-tuned model created: {name}",
    "The job has successfully completed",
]
at = [next(i for i, m in enumerate(reversed(msgs)) if m.startswith(o)) for o in order]
check(at == sorted(at), f"events out of order: {msgs}")
metrics = [e for e in events(job.id) if e.type == "metrics"]
check(metrics and all(e.data["step"] >= 1 and "train_loss" in e.data for e in metrics), metrics[:2])
steps = max(e.data["step"] for e in metrics)
ckpts = list(a.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
check(len(ckpts) == 3, ckpts)
check([c.step_number for c in ckpts] == sorted([c.step_number for c in ckpts], reverse=True), ckpts)
check(ckpts[0].step_number == steps, (ckpts[0], steps))
for c in ckpts:
    check(c.fine_tuned_model_checkpoint == f"{name}:ckpt-step-{c.step_number}", c)
    check(c.id.startswith("ftckpt_") and c.metrics.train_loss is not None, c)
chat(a, ckpts[-1].fine_tuned_model_checkpoint)
check(name in [m.id for m in a.models.list()], "the model is not listed")
csv = base64.b64decode(a.files.content(done.result_files[0]).read()).decode()
lines = csv.strip().split("\n")
check(lines[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy", lines[0])
check(len(lines) == steps + 1, f"{len(lines)} lines for {steps} steps")
check(a.files.retrieve(done.result_files[0]).purpose == "fine-tune-results", "results purpose")
req = urllib.request.Request(BASE + "/usage", headers={"Authorization": f"Bearer {KEY_A}"})
usage = json.load(urllib.request.urlopen(req))["data"]
trained = sum(r["trained_tokens"] for r in usage if r["kind"] == "training")
check(trained == done.trained_tokens, (trained, done.trained_tokens, usage))
page = a.fine_tuning.jobs.list(limit=1)
check(page.data[0].id == job.id, page)
print(f"flow: ok ({first_answer * 1000:.0f} ms from succeeded to the first answer)")

# --- another tenant sees none of it ---
not_found(lambda: b.fine_tuning.jobs.retrieve(job.id), "retrieve")
not_found(lambda: b.fine_tuning.jobs.list_events(job.id), "events")
not_found(lambda: b.fine_tuning.jobs.checkpoints.list(job.id), "checkpoints")
not_found(lambda: b.fine_tuning.jobs.cancel(job.id), "cancel")
not_found(lambda: b.fine_tuning.jobs.pause(job.id), "pause")
not_found(lambda: chat(b, name), "the ft: model")
not_found(lambda: chat(b, ckpts[0].fine_tuned_model_checkpoint), "a checkpoint model")
not_found(lambda: b.files.retrieve(train.id), "the training file")
not_found(lambda: b.files.content(done.result_files[0]), "the results file")
check(job.id not in [j.id for j in b.fine_tuning.jobs.list()], "listed to another tenant")
check(name not in [m.id for m in b.models.list()], "model listed to another tenant")
try:
    b.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    raise AssertionError("another tenant's file accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "training_file", e.body)
print("isolation: ok")

# --- validation: each failure with OpenAI's code, before anything runs ---
good = [l for l in Path(TRAIN).read_text().splitlines() if l.strip()][:10]
long_text = " ".join(["word"] * 3000)
cases = {
    "few": (good[:3], "invalid_n_examples", "Training file has 3 example(s), but must have at least 10 examples"),
    "notjson": (good + ["{not json"], "invalid_file_format", "Example 11 cannot be parsed"),
    "notobject": (good + ["[1, 2]"], "invalid_file_format", "Example 11 is not a JSON object"),
    "nomessages": (good + ['{"prompt": "x"}'], "invalid_training_file", "Example 11 is missing key 'messages'"),
    "noassistant": (good + ['{"messages": [{"role": "user", "content": "hi"}]}'], "invalid_training_file", "Example 11 is missing an assistant message"),
    "norole": (good + ['{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}'], "invalid_training_file", "Example 11, message 1 Discriminator 'role' is missing in value"),
    "badrole": (good + ['{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}'], "invalid_training_file", "unrecognized role"),
    "badweight": (good + ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]}'], "invalid_training_file", "invalid weight"),
    "extraweight": (good + ['{"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "x"}]}'], "invalid_file_format", 'Example 11 contains an extra "weight".'),
    "nocontent": (good + ['{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'], "invalid_training_file", "message 1 is missing content"),
}
failed = []
for label, (lines_, code, text) in cases.items():
    p = WORK / f"{label}.jsonl"
    p.write_text("\n".join(lines_) + "\n")
    f = a.files.create(file=open(p, "rb"), purpose="fine-tune")
    j = a.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    failed.append((j.id, label, code, text))
p = WORK / "binary.jsonl"
p.write_bytes(("\n".join(good) + "\n").encode() + b"\xff\xfe not text\n")
f = a.files.create(file=open(p, "rb"), purpose="fine-tune")
j = a.fine_tuning.jobs.create(model="tiny", training_file=f.id)
failed.append((j.id, "binary", "invalid_file_format", "Example 11 cannot be read as UTF-8 text"))
for jid, label, code, text in failed:
    j = wait(jid, FINAL)
    check(j.status == "failed", (label, j))
    check(j.error.code == code and text in j.error.message and j.error.param == "training_file", (label, j.error))
    check(j.trained_tokens is None and j.fine_tuned_model is None, (label, j))
    msgs = [e.message for e in events(jid)]
    check(not any(m.startswith("Fine-tuning job started") for m in msgs), (label, msgs))
    check(list(a.fine_tuning.jobs.checkpoints.list(jid)) == [], label)
try:
    a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found", e.body)
for bad in [
    {"hyperparameters": {"n_epochs": 0}},
    {"hyperparameters": {"batch_size": "big"}},
    {"method": {"type": "dpo"}},
    {"seed": -1},
    {"suffix": "x" * 65},
    {"training_file": "file-nope"},
]:
    args = {"model": "tiny", "training_file": train.id, **bad}
    try:
        a.fine_tuning.jobs.create(**args)
        raise AssertionError(f"{bad} accepted")
    except openai.BadRequestError:
        pass
# an example over the context is counted, reported and truncated, as OpenAI does
p = WORK / "long.jsonl"
p.write_text("\n".join(good + [json.dumps({"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]})]) + "\n")
f = a.files.create(file=open(p, "rb"), purpose="fine-tune")
j = a.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 1})
j = wait(j.id, FINAL)
check(j.status == "succeeded", j)
check(any("1 example(s) are longer than the context" in e.message and e.level == "warn" for e in events(j.id)), "no truncation event")
print(f"validation: ok ({len(failed)} refusals)")

# --- cancel a running job ---
j = a.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=LONG)
wait(j.id, {"running"})
wait_event(j.id, "Step ")
c = a.fine_tuning.jobs.cancel(j.id)
check(c.status == "cancelled", c)
time.sleep(1.0)
c = a.fine_tuning.jobs.retrieve(j.id)
check(c.status == "cancelled" and c.fine_tuned_model is None, c)
try:
    a.fine_tuning.jobs.cancel(j.id)
    raise AssertionError("cancelled twice")
except openai.BadRequestError:
    pass
print("cancel: ok")

# --- the adapter of an uninterrupted run ---
ref = a.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=LONG, seed=11)
ref = wait(ref.id, FINAL)
check(ref.status == "succeeded", ref)
reference = adapter(ref.id)

# --- pause and resume: held at a checkpoint, then the same adapter ---
j = a.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=LONG, seed=11)
wait(j.id, {"running"})
wait_event(j.id, "Checkpoint created at step")
p = a.fine_tuning.jobs.pause(j.id)
check(p.status == "paused", p)
wait_event(j.id, "Job paused: paused by its owner")
time.sleep(0.5)
check(a.fine_tuning.jobs.retrieve(j.id).status == "paused", "not held")
r = a.fine_tuning.jobs.resume(j.id)
check(r.status == "queued", r)
j = wait(j.id, FINAL)
check(j.status == "succeeded", j)
wait_event(j.id, "Fine-tuning job resumed from its checkpoint at step")
check(adapter(j.id) == reference, "a paused and resumed job ends with another adapter")
print("pause and resume: ok")

# --- preempted by a job of higher priority: the same adapter ---
j = a.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=LONG, seed=11)
wait(j.id, {"running"})
wait_event(j.id, "Checkpoint created at step")
cfg = WORK / "urgent.toml"
cfg.write_text("epochs = 1\n")
urgent = subprocess.run(
    [FOUNT, "jobs", "--data-dir", DATA_DIR, "submit", "--tenant", "acme", "--priority", "high", "--",
     "finetune", "--base", BASE_MODEL, "--data", TRAIN, "--out", str(WORK / "urgent"), "--config", str(cfg)],
    capture_output=True, text=True, check=True,
).stdout.strip()
wait_event(j.id, "Job preempted")
j = wait(j.id, FINAL)
check(j.status == "succeeded", j)
msgs = [e.message for e in events(j.id)]
# what it waited behind: the urgent job, named
check(any(m.startswith(("Job preempted", "Waiting for a slot")) and f"{urgent} (" in m for m in msgs), msgs)
check(any(m.startswith("Fine-tuning job resumed") for m in msgs), msgs)
check(adapter(j.id) == reference, "a preempted job ends with another adapter")
print(f"preemption: ok (by {urgent})")

# --- every response, success or error, as the committed OpenAPI document describes it ---
import re
import urllib.error

import jsonschema_rs

ROOT = BASE[: -len("/v1")]
doc = json.load(urllib.request.urlopen(ROOT + "/openapi.json"))


def raw(method, path, key=KEY_A, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(ROOT + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def conforms(method, path, key=KEY_A, body=None):
    status, value = raw(method, path, key, body)
    template = next(t for t in doc["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path.split("?")[0]))
    op = doc["paths"][template][method.lower()]
    check(str(status) in op["responses"], f"{method} {path}: undocumented status {status}")
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    v = jsonschema_rs.validator_for({**schema, "components": doc["components"]})
    errors = [str(e) for e in v.iter_errors(value)]
    check(not errors, f"{method} {path} ({status}): {errors}")
    return status


checked = [
    conforms("GET", f"/v1/fine_tuning/jobs/{job.id}"),
    conforms("GET", "/v1/fine_tuning/jobs?limit=2"),
    conforms("GET", f"/v1/fine_tuning/jobs/{job.id}/events?limit=3"),
    conforms("GET", f"/v1/fine_tuning/jobs/{job.id}/checkpoints"),
    conforms("GET", f"/v1/fine_tuning/jobs/{failed[0][0]}"),
    conforms("POST", f"/v1/fine_tuning/jobs/{job.id}/pause"),
    conforms("POST", f"/v1/fine_tuning/jobs/{job.id}/cancel"),
    conforms("GET", f"/v1/fine_tuning/jobs/{job.id}", key=KEY_B),
    conforms("GET", "/v1/fine_tuning/jobs/ftjob-nope/events"),
    conforms("GET", "/v1/fine_tuning/jobs?limit=0"),
    conforms("POST", "/v1/fine_tuning/jobs", body={"model": "nope", "training_file": train.id}),
    conforms("POST", "/v1/fine_tuning/jobs", body={"model": "tiny", "training_file": train.id, "seed": "x"}),
    conforms("GET", f"/v1/files/{done.result_files[0]}"),
    conforms("GET", "/v1/usage"),
]
j = a.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=LONG)
checked += [
    conforms("POST", f"/v1/fine_tuning/jobs/{j.id}/resume"),
    conforms("POST", f"/v1/fine_tuning/jobs/{j.id}/cancel"),
]
check(sorted(set(checked)) == [200, 400, 404], checked)
print(f"openapi: ok ({len(checked)} responses conform)")

print("fine-tuning: all checks passed")
