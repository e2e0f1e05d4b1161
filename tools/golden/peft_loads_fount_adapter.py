#!/usr/bin/env python3
"""PEFT reading an adapter that fount wrote: the other direction of the PEFT check.

`crates/fount-train/tests/fixtures/fount_adapter/` holds an adapter written by fount-train's
`LoraParams::save_peft` (regenerate it with
`FOUNT_BLESS=1 cargo test -p fount-train --test main peft`). This script loads it with
`peft.PeftModel.from_pretrained` onto the tiny Llama fixture and records the logits at every
position of each prompt of `llama/golden.json` into `peft_logits.safetensors` beside it; the Rust
test checks that fount's logits with the same adapter match them.

    python3 tools/golden/peft_loads_fount_adapter.py crates/fount-model/tests/fixtures crates/fount-train/tests/fixtures/fount_adapter
"""

import json
import os
import sys

import peft
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    fixtures, adapter = sys.argv[1], sys.argv[2]
    base = os.path.join(fixtures, "llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    prompts = json.load(open(os.path.join(base, "golden.json")))["prompts"]
    logits = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            logits[f"prompt{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
    save_file(logits, os.path.join(adapter, "peft_logits.safetensors"),
              metadata={"peft": peft.__version__, "torch": torch.__version__})
    print("wrote", os.path.join(adapter, "peft_logits.safetensors"))


if __name__ == "__main__":
    main()
