//! `fount generate`: stream a completion of one prompt to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use fount_model::{
    ChatTemplate, GenerateOptions, Message, Model, ModelFiles, SamplingParams, Tokenizer,
};

/// Arguments of `fount generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
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
    let files = ModelFiles::open(&a.model)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_path())?;
    let text = if a.chat {
        let template = ChatTemplate::from_dir(&a.model)?.with_context(|| {
            format!(
                "--chat needs a chat template, and {} has none (tokenizer_config.json chat_template or chat_template.jinja)",
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
    let model = Model::load(&a.model, super::parse_dtype(&a.dtype)?, &Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let adapter = match &a.adapter {
        None => None,
        Some(dir) => Some(std::sync::Arc::new(
            fount_model::LoraAdapter::load(dir, model.config(), model.dtype(), model.device())
                .with_context(|| format!("loading the adapter {}", dir.display()))?,
        )),
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        stop_ids: files.generation_config()?.eos_token_ids,
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
