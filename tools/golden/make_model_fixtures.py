#!/usr/bin/env python3
"""Reference outputs of HF transformers for fount-model's parity tests.

Builds tiny seeded random models with `transformers` -- a Llama with llama3 rope scaling, a
Qwen2 with q/k/v biases and tied embeddings (saved sharded), a Mistral stored in bfloat16, and a
Mixtral with 4 experts, top-2 -- and writes, for each, the model directory plus `golden.json`
(prompt ids and the 32-token greedy continuation of each prompt) and `golden.safetensors` (the
logits at every prompt position, float32).

It also renders chat conversations with `apply_chat_template` for three templates (a Qwen2.5
ChatML template with tools, a Llama-3.1 template, a Mistral template that raises on bad roles),
stored the three ways `transformers` reads templates: `chat_template.jinja`, a string in
`tokenizer_config.json`, and a list of named templates.

Run once (needs torch, transformers, tokenizers, safetensors; not part of the test command):

    python3 tools/golden/make_model_fixtures.py crates/fount-model/tests/fixtures
"""

import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)
PROMPTS = [
    [1, 17, 42, 99, 300, 7, 256, 511, 0, 12, 130],
    [1, 5],
    [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260, 261, 262, 263, 264, 265, 266, 267],
    [1, 77, 3, 3, 3, 88, 401],
]
NEW_TOKENS = 32


def randomize(model, seed):
    """Weights larger than the default init so logits are well separated, and norms/biases
    that are not the identity so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def build(name, config, out, seed, save_kwargs=None, save_dtype=None):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    to_save = model if save_dtype is None else model.to(save_dtype)
    to_save.save_pretrained(d, **(save_kwargs or {}))
    # Reload exactly what was written and compute in float32.
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    logits = {}
    continuations = []
    min_margin = float("inf")
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([p])
            logits[f"prompt{i}"] = model(ids).logits[0].float().contiguous()
            # An explicit mask: prompts contain id 0, which generate would otherwise take for padding.
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                return_dict_in_generate=True, min_new_tokens=NEW_TOKENS,
            )
            continuations.append(gen.sequences[0, len(p):].tolist())
            for s in gen.scores:
                top = torch.topk(s[0], 2).values
                min_margin = min(min_margin, float(top[0] - top[1]))
    save_file(logits, os.path.join(d, "golden.safetensors"))
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(
            {
                "prompts": PROMPTS,
                "greedy": continuations,
                "min_greedy_margin": min_margin,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            f,
            indent=1,
        )
    print(f"{name}: min greedy margin {min_margin:.4g}", file=sys.stderr)


def models_fixtures(out):
    build(
        "llama",
        LlamaConfig(
            **COMMON,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        ),
        out,
        seed=1,
    )
    build(
        "llama_linear",
        LlamaConfig(
            **COMMON,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=False,
        ),
        out,
        seed=5,
    )
    build(
        "qwen2",
        Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
        out,
        seed=2,
        save_kwargs={"max_shard_size": "200KB"},
    )
    build(
        "mistral",
        MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False),
        out,
        seed=3,
        save_dtype=torch.bfloat16,
    )
    build(
        "mixtral",
        MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None),
        out,
        seed=4,
    )


QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role in ['user', 'assistant'] %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- else %}
        {{- raise_exception("Unsupported role: " + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "  You answer in French.  "},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "La capitale de la France est Paris."},
        {"role": "user", "content": "Et de l'Allemagne ?\n  "},
    ],
    [
        {"role": "user", "content": "用中文回答：北京是哪个国家的首都？ \"quotes\" and \\backslash"},
        {"role": "assistant", "content": "北京是中国的首都。"},
    ],
    [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
            ],
        },
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is 21 °C and sunny."},
    ],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Odd order."}],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


def base_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Hello world, the capital of France is Paris. 北京是中国的首都。"] * 4, trainer)
    return tok


def chat_fixtures(out):
    root = os.path.join(out, "chat")
    shutil.rmtree(root, ignore_errors=True)
    cases = []
    setups = [
        ("qwen2_jinja", QWEN_TEMPLATE, "<|endoftext|>", "<|im_end|>", "jinja"),
        ("llama3_config_string", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "string"),
        ("mistral_named_list", MISTRAL_TEMPLATE, "<s>", "</s>", "list"),
    ]
    for name, template, bos, eos, storage in setups:
        d = os.path.join(root, name)
        os.makedirs(d)
        tok = PreTrainedTokenizerFast(tokenizer_object=base_tokenizer(), bos_token=bos, eos_token=eos)
        tok.chat_template = template
        tok.save_pretrained(d)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        jinja_path = os.path.join(d, "chat_template.jinja")
        if storage != "jinja":
            with open(cfg_path) as f:
                cfg = json.load(f)
            if os.path.exists(jinja_path):
                os.remove(jinja_path)
            if storage == "string":
                cfg["chat_template"] = template
            else:
                cfg["chat_template"] = [
                    {"name": "default", "template": template},
                    {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                ]
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        tok = transformers.AutoTokenizer.from_pretrained(d)
        for ci, conv in enumerate(CONVERSATIONS):
            for agp in (False, True):
                for tools in ([None, TOOLS] if name == "qwen2_jinja" else [None]):
                    kwargs = {"tools": tools} if tools else {}
                    try:
                        text = tok.apply_chat_template(
                            conv, tokenize=False, add_generation_prompt=agp, chat_template=None if storage != "list" else "default", **kwargs
                        )
                        cases.append({"dir": name, "conversation": ci, "add_generation_prompt": agp, "tools": bool(tools), "text": text})
                    except Exception as e:  # the template raised
                        cases.append({"dir": name, "conversation": ci, "add_generation_prompt": agp, "tools": bool(tools), "error": str(e)})
    with open(os.path.join(root, "cases.json"), "w") as f:
        json.dump({"conversations": CONVERSATIONS, "tools": TOOLS, "cases": cases, "transformers": transformers.__version__}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "crates/fount-model/tests/fixtures"
    os.makedirs(out, exist_ok=True)
    models_fixtures(out)
    chat_fixtures(out)
