"""Schemathesis hooks for fuzzing `fount serve`: most generated generation requests name the
served model (`tiny`), so the fuzzer reaches the engine instead of stopping at 404."""

import random

import schemathesis

_rng = random.Random(1)


@schemathesis.hook
def map_body(ctx, body):
    # only a string: a negative case whose model is of the wrong type must stay invalid
    if isinstance(body, dict) and isinstance(body.get("model"), str) and _rng.random() < 0.8:
        body["model"] = "tiny"
    return body
