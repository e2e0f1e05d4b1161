"""PyTorch's side of `fount bench train`: full training or LoRA fine-tuning steps (forward,
backward, clipping at 1.0, AdamW) of an HF model directory on random tokens, with HF
transformers and PEFT (LoRA on every linear projection, alpha = 2r). Prints one JSON line:
tokens/s over the timed steps (after one warm-up step) and the process's peak memory.

    python3 tools/bench/torch_train.py --model DIR --mode full|lora --batch 4 --seq-len 256 \\
        --steps 5 --lora-r 16 --threads 2 [--recompute]

`--recompute` turns on gradient checkpointing (`gradient_checkpointing_enable`), the
counterpart of fount's `recompute`.
"""

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--mode", choices=["full", "lora"], required=True)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq-len", type=int, default=256)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--lora-r", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--recompute", action="store_true", help="gradient checkpointing of every layer")
args = p.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
model.train()
if args.recompute:
    # non-reentrant checkpointing: with the base frozen (LoRA), the reentrant variant would
    # see no input that needs a gradient
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if args.mode == "lora":
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model,
        LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"),
    )
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1 if args.mode == "full" else 0.0)
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (args.batch, args.seq_len + 1))


def step():
    logits = model(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


step()
t = time.perf_counter()
for _ in range(args.steps):
    step()
secs = time.perf_counter() - t
print(
    json.dumps(
        {
            "engine": f"PyTorch {torch.__version__.split('+')[0]} (transformers {transformers.__version__})",
            "tokens_per_s": args.batch * args.seq_len * args.steps / secs,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
)
