#!/usr/bin/env python3
"""Reference outputs of PEFT LoRA adapters on the tiny Llama fixture, for fount-model's tests.

Writes two adapters on `crates/fount-model/tests/fixtures/llama` (made by make_model_fixtures.py):

- `lora_a/`: rank 4, alpha 8, on all seven projections (q, k, v, o, gate, up, down);
- `lora_b/`: rank 2, alpha 4, rsLoRA scaling, on q_proj and v_proj only;

each with PEFT's `adapter_config.json` and `adapter_model.safetensors`, `lora_B` initialised to
random values (PEFT's default is zeros, which would test nothing), and `golden.safetensors`: the
logits of the base model with the adapter at every position of each prompt in
`llama/golden.json`.

    python3 tools/golden/make_lora_fixtures.py crates/fount-model/tests/fixtures
"""

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ADAPTERS = {
    "lora_a": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        seed=101,
    ),
    "lora_b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True, seed=202),
}


def main(out):
    base_dir = os.path.join(out, "llama")
    with open(os.path.join(base_dir, "golden.json")) as f:
        prompts = json.load(f)["prompts"]
    for name, spec in ADAPTERS.items():
        spec = dict(spec)
        seed = spec.pop("seed")
        model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager")
        cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **spec)
        peft_model = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        peft_model.eval()
        d = os.path.join(out, name)
        peft_model.save_pretrained(d)
        logits = {}
        with torch.no_grad():
            for i, ids in enumerate(prompts):
                logits[f"prompt{i}"] = peft_model(torch.tensor([ids])).logits[0].float().contiguous()
        save_file(logits, os.path.join(d, "golden.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
