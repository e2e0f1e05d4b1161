#!/usr/bin/env python3
"""Reference values of PyTorch and HF transformers for fount-train's gradient tests.

On the tiny Llama and Mixtral fixtures of fount-model (crates/fount-model/tests/fixtures), for one
fixed batch of two 12-token sequences:

- the mean next-token cross-entropy (what `model(input_ids, labels=input_ids).loss` returns),
- the gradients of a set of parameters after `loss.backward()`,
- the same parameters after one `torch.optim.AdamW` step (lr 1e-3, betas (0.9, 0.95), eps 1e-8,
  weight decay 0.1 on every matrix, none on norms and biases), after clipping the gradients to a
  global norm of 0.5 with `torch.nn.utils.clip_grad_norm_` (which the step must follow);
- for the Mixtral: the router logits of each layer and HF's `load_balancing_loss_func` on them
  (4 experts, top-2), and the loss with the auxiliary loss added at the config's coefficient.

Writes `<out>/<model>.safetensors` (float32: `grad.<name>`, `after.<name>`, `router.<layer>`)
and `<out>/<model>.json` (the batch, the losses, the gradient norm before clipping).

Run once (needs torch, transformers, safetensors; not part of the test command):

    python3 tools/golden/make_train_fixtures.py crates/fount-model/tests/fixtures crates/fount-train/tests/fixtures
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

BATCH = [
    [1, 17, 42, 99, 300, 7, 256, 511, 0, 12, 130, 64],
    [1, 250, 251, 252, 3, 3, 3, 88, 401, 77, 5, 9],
]
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 0.5
PARAMS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
# transformers keeps Mixtral's experts fused; the checkpoint (and fount) names them one by one
MOE_PARAMS = {
    "model.layers.0.block_sparse_moe.gate.weight": ("model.layers.0.mlp.gate.weight", None),
    "model.layers.1.block_sparse_moe.experts.0.w1.weight": ("model.layers.1.mlp.experts.gate_up_proj", "gate"),
    "model.layers.1.block_sparse_moe.experts.0.w3.weight": ("model.layers.1.mlp.experts.gate_up_proj", "up"),
    "model.layers.1.block_sparse_moe.experts.0.w2.weight": ("model.layers.1.mlp.experts.down_proj", "down"),
}


def part(t, kind, inter):
    if kind is None:
        return t
    if kind == "gate":
        return t[0, :inter]
    if kind == "up":
        return t[0, inter:]
    return t[0]


def no_decay(name):
    return name.endswith("norm.weight") or name.endswith(".bias")


def run(src, out, name, moe):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(src, name), dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    ids = torch.tensor(BATCH)
    res = model(input_ids=ids, labels=ids, output_router_logits=moe)
    lm_loss = res.loss
    info = {"batch": BATCH, "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD, "clip": CLIP}
    tensors = {}
    loss = lm_loss
    if moe:
        cfg = model.config
        # HF adds the auxiliary loss to `loss` when labels are given and router logits asked for;
        # recompute it from the router logits to record both parts
        aux = load_balancing_loss_func(
            res.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok, None
        )
        info["aux_loss"] = aux.item()
        info["router_aux_loss_coef"] = cfg.router_aux_loss_coef
        # HF's res.loss already includes coef * aux
        info["lm_loss"] = (lm_loss - cfg.router_aux_loss_coef * aux).item()
        for i, r in enumerate(res.router_logits):
            tensors[f"router.{i}"] = r.detach().float().contiguous()
    else:
        info["lm_loss"] = lm_loss.item()
    info["loss"] = loss.item()
    loss.backward()
    named = dict(model.named_parameters())
    inter = model.config.intermediate_size
    # fount's name -> (transformers' parameter, the part of it)
    wanted = {p: (p, None) for p in PARAMS if p in named}
    if moe:
        wanted.update(MOE_PARAMS)
        from safetensors import safe_open

        with safe_open(os.path.join(src, name, "model.safetensors"), "pt") as f:
            for fname, (tname, kind) in MOE_PARAMS.items():
                assert torch.equal(f.get_tensor(fname), part(named[tname].detach(), kind, inter)), fname
    for p, (tname, kind) in wanted.items():
        tensors[f"grad.{p}"] = part(named[tname].grad.detach(), kind, inter).clone().contiguous()
    info["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
    groups = [
        {"params": [p for n, p in named.items() if not no_decay(n)], "weight_decay": WD},
        {"params": [p for n, p in named.items() if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    opt.step()
    for p, (tname, kind) in wanted.items():
        tensors[f"after.{p}"] = part(named[tname].detach(), kind, inter).clone().contiguous()
    info["params"] = list(wanted)
    save_file(tensors, os.path.join(out, f"{name}.safetensors"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(name, info["loss"], info["grad_norm"])


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    run(src, out, "llama", False)
    run(src, out, "mixtral", True)


if __name__ == "__main__":
    main()
