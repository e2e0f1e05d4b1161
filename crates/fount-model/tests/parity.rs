use candle_core::{Device, Tensor};
use fount_model::{Batch, GenerateOptions, KvCache, Logits, Model, NoCache, Tokenizer};

use crate::util::{assert_close, fixture, load, REGENERATE};

const MODELS: [&str; 5] = ["llama", "llama_linear", "qwen2", "mistral", "mixtral"];
const TOL: f32 = 1e-4;

struct Golden {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
}

fn golden(name: &str) -> Golden {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("golden.json"))
        .unwrap_or_else(|e| panic!("{name}/golden.json: {e}; run `{REGENERATE}`"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let ids = |key: &str| -> Vec<Vec<u32>> {
        serde_json::from_value(json[key].clone()).unwrap_or_else(|e| panic!("{name} {key}: {e}"))
    };
    let prompts = ids("prompts");
    let tensors = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}/golden.safetensors: {e}"));
    let logits = (0..prompts.len())
        .map(|i| {
            tensors[&format!("prompt{i}")]
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    Golden {
        prompts,
        greedy: ids("greedy"),
        logits,
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap_or_else(|e| panic!("{e}"))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn cache(model: &Model) -> KvCache {
    let c = model.config();
    KvCache::new(
        c.num_hidden_layers,
        c.num_key_value_heads,
        c.head_dim,
        model.dtype(),
        model.device(),
    )
}

fn forward_all(model: &Model, tokens: &[u32]) -> Tensor {
    model
        .forward(&Batch::single(tokens, 0), &mut NoCache, Logits::All)
        .unwrap_or_else(|e| panic!("{e}"))
        .logits
}

#[test]
fn logits_match_transformers_at_every_position() {
    for name in MODELS {
        let model = load(name);
        let g = golden(name);
        for (i, prompt) in g.prompts.iter().enumerate() {
            let logits = forward_all(&model, prompt);
            assert_close(
                &format!("{name} prompt {i} logits"),
                &flat(&logits),
                &g.logits[i],
                TOL,
            );
        }
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("chat/qwen2_jinja/tokenizer.json"))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn greedy_continuation_matches_transformers() {
    let tok = tokenizer();
    for name in MODELS {
        let model = load(name);
        let g = golden(name);
        for (i, prompt) in g.prompts.iter().enumerate() {
            let opts = GenerateOptions {
                max_tokens: g.greedy[i].len(),
                ..Default::default()
            };
            let out = fount_model::generate(&model, &tok, prompt, &opts, |_| {})
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                out.tokens, g.greedy[i],
                "{name} prompt {i}: greedy tokens differ; `{REGENERATE}`"
            );
        }
    }
}

#[test]
fn cached_decoding_equals_a_full_forward() {
    for name in MODELS {
        let model = load(name);
        let g = golden(name);
        let prompt = &g.prompts[0];
        let cont = &g.greedy[0];
        let full: Vec<u32> = prompt.iter().chain(cont).copied().collect();
        let reference = rows(&forward_all(&model, &full));
        let mut kv = cache(&model);
        // Prefill in two chunks, then one token at a time.
        let split = prompt.len() / 2;
        model
            .forward(&Batch::single(&prompt[..split], 0), &mut kv, Logits::Last)
            .unwrap_or_else(|e| panic!("{e}"));
        let out = model
            .forward(
                &Batch::single(&prompt[split..], split),
                &mut kv,
                Logits::Last,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_close(
            &format!("{name} chunked prefill"),
            &flat(&out.logits),
            &reference[prompt.len() - 1],
            TOL,
        );
        for (step, &t) in cont.iter().enumerate() {
            let pos = prompt.len() + step;
            let out = model
                .forward(&Batch::single(&[t], pos), &mut kv, Logits::Last)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_close(
                &format!("{name} cached step {step}"),
                &flat(&out.logits),
                &reference[pos],
                TOL,
            );
        }
        assert_eq!(kv.len(), full.len());
    }
}

#[test]
fn a_packed_batch_equals_each_sequence_alone() {
    for name in MODELS {
        let model = load(name);
        let g = golden(name);
        // Prefill: every prompt in one packed forward.
        let mut batch = Batch::default();
        for p in &g.prompts {
            batch.push(p, 0);
        }
        let packed = rows(
            &model
                .forward(&batch, &mut NoCache, Logits::All)
                .unwrap_or_else(|e| panic!("{e}"))
                .logits,
        );
        let mut row = 0;
        for (i, p) in g.prompts.iter().enumerate() {
            let alone = rows(&forward_all(&model, p));
            for (j, expected) in alone.iter().enumerate() {
                assert_close(
                    &format!("{name} packed prompt {i} position {j}"),
                    &packed[row],
                    expected,
                    TOL,
                );
                row += 1;
            }
        }
        // Decode: all sequences step together, each through its own cache.
        let mut caches: Vec<KvCache> = g.prompts.iter().map(|_| cache(&model)).collect();
        let mut batch = Batch::default();
        for p in &g.prompts {
            batch.push(p, 0);
        }
        model
            .forward(&batch, &mut caches, Logits::Last)
            .unwrap_or_else(|e| panic!("{e}"));
        for step in 0..8 {
            let mut batch = Batch::default();
            for (i, p) in g.prompts.iter().enumerate() {
                batch.push(&[g.greedy[i][step]], p.len() + step);
            }
            let out = rows(
                &model
                    .forward(&batch, &mut caches, Logits::Last)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .logits,
            );
            for (i, p) in g.prompts.iter().enumerate() {
                let full: Vec<u32> = p.iter().chain(&g.greedy[i][..=step]).copied().collect();
                let alone = rows(&forward_all(&model, &full));
                assert_close(
                    &format!("{name} batched decode seq {i} step {step}"),
                    &out[i],
                    &alone[full.len() - 1],
                    TOL,
                );
            }
        }
    }
}

#[test]
fn moe_returns_router_logits_per_layer() {
    let model = load("mixtral");
    let out = model
        .forward(
            &Batch::single(&[1, 2, 3, 4, 5], 0),
            &mut NoCache,
            Logits::Last,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.router_logits.len(), 2);
    assert_eq!(out.router_logits[0].dims(), &[5, 4]);
    let dense = load("llama")
        .forward(&Batch::single(&[1, 2], 0), &mut NoCache, Logits::Last)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(dense.router_logits.is_empty());
}

#[test]
fn a_stop_id_ends_generation_before_it() {
    let tok = tokenizer();
    let model = load("qwen2");
    let g = golden("qwen2");
    let greedy = &g.greedy[0];
    let stop = greedy[greedy.len() / 2];
    let first = greedy.iter().position(|&t| t == stop).unwrap_or_default();
    let opts = GenerateOptions {
        max_tokens: greedy.len(),
        stop_ids: vec![stop],
        ..Default::default()
    };
    let mut text = String::new();
    let out = fount_model::generate(&model, &tok, &g.prompts[0], &opts, |t| text.push_str(t))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.tokens, greedy[..first]);
    assert_eq!(out.finish, fount_model::FinishReason::Stop);
    // Everything before the stop id is delivered, held-back bytes included.
    let expected = tok.decode(&greedy[..first], true).unwrap_or_default();
    assert_eq!(text, expected);
}

/// f16 and bf16 weights (the half-precision kernels, activations rounded to the weights' type
/// before each product, the rest of the model in that type) stay within half precision's error
/// of transformers' f32 logits: the largest difference, relative to the largest logit, is at most
/// 8 × the type's machine epsilon (measured: 4.0e-3 for f16, 3.7e-2 for bf16, 4 and 5 ε).
#[test]
fn half_precision_weights_stay_within_half_precision_of_transformers() {
    for (dtype, bound) in [
        (candle_core::DType::F16, 8.0 * 9.77e-4f32),
        (candle_core::DType::BF16, 8.0 * 7.81e-3),
    ] {
        for name in ["llama", "qwen2", "mistral"] {
            let model = Model::load(&fixture(name), dtype, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{name} {dtype:?}: {e}"));
            let g = golden(name);
            for (i, prompt) in g.prompts.iter().enumerate() {
                let ours = flat(&forward_all(&model, prompt));
                let scale = g.logits[i].iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = ours
                    .iter()
                    .zip(&g.logits[i])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{name} {dtype:?} prompt {i}: max |Δ| {worst:.2e} of {scale:.2e}");
                assert!(
                    worst <= bound * scale,
                    "{name} {dtype:?} prompt {i}: logits differ by {worst} (largest logit {scale})"
                );
            }
        }
    }
}
