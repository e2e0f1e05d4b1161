//! `fount generate`: stream a completion of one prompt to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fount_model::{GenerateOptions, Loaded, Message, SamplingParams};

/// Arguments of `fount generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory, or a GGUF file (`.gguf`).
    #[arg(long)]
    pub model: PathBuf,
    /// A `tokenizer.json` (or a directory with one, and its chat template) to use instead of
    /// the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A PEFT LoRA adapter directory to apply to the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as one user message through the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens below this fraction of the most likely one's probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty over prompt and output (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// OpenAI presence penalty (−2…2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty (−2…2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text is generated (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Compute dtype: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs `fount generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let Loaded {
        model,
        tokenizer,
        template,
        generation,
    } = Loaded::open(
        &a.model,
        a.tokenizer.as_deref(),
        super::parse_dtype(&a.dtype)?,
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let text = if a.chat {
        let template = template.with_context(|| {
            format!(
                "--chat needs a chat template, and {} has none (tokenizer_config.json chat_template, chat_template.jinja, or tokenizer.chat_template in a GGUF file)",
                a.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &a.prompt));
        template.render(&messages, true)?
    } else {
        a.prompt.clone()
    };
    // A chat template writes its own BOS; a raw prompt gets the tokenizer's.
    let prompt = tokenizer.encode(&text, !a.chat)?;
    let adapter = match &a.adapter {
        None => None,
        Some(dir) => Some(std::sync::Arc::new(
            fount_model::LoraAdapter::load(dir, model.config(), model.dtype(), model.device())
                .with_context(|| format!("loading the adapter {}", dir.display()))?,
        )),
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        stop_ids: generation.eos_token_ids,
        stop_strings: a.stop.clone(),
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed: a.seed,
            ..Default::default()
        },
        adapter,
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let out = fount_model::generate(&model, &tokenizer, &prompt, &opts, |piece| {
        if write_err.is_none() {
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
            {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    let decoded = out.tokens.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s); finish: {:?}",
        out.prompt_tokens,
        out.prefill.as_secs_f64(),
        out.prompt_tokens as f64 / out.prefill.as_secs_f64().max(1e-9),
        decoded,
        out.decode.as_secs_f64(),
        decoded as f64 / out.decode.as_secs_f64().max(1e-9),
        out.finish,
    );
    Ok(())
}
