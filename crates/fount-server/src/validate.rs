//! Request bodies become validated engine requests here, before the engine sees them: ranges
//! checked, the model or adapter resolved, the chat template applied, the prompt tokenised and
//! measured against the context.

use fount_engine::Request;
use fount_model::{Message, SamplingParams};

use crate::error::{ApiError, ApiResult};
use crate::protocol::{
    ChatCompletionRequest, ChatMessage, CommonParams, CompletionRequest, MessageContent, Prompt,
    Role, Stop,
};
use crate::state::AppState;
use crate::tenancy::Caller;

/// Most stop strings, as OpenAI allows.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most choices per prompt: the engine's limit ([`fount_engine::MAX_N`]).
pub const MAX_N: u32 = fount_engine::MAX_N as u32;
/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 64;

/// A request ready for the engine: one engine request per prompt.
#[derive(Debug)]
pub struct Valid {
    /// The `model` to echo in responses.
    pub model: String,
    /// One per prompt, each with `n` choices.
    pub requests: Vec<Request>,
    /// `best_of`: keep the best `n` choices of each prompt, and whether the client asked for
    /// log-probabilities (else they were asked only to rank the choices).
    pub keep: Option<(usize, bool)>,
    /// Stream server-sent events.
    pub stream: bool,
    /// Add a usage chunk to the stream.
    pub include_usage: bool,
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> ApiResult<f32> {
    match v {
        None => Ok(default),
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, not {x}"),
        )),
    }
}

/// The engine's name of a tenant's private adapter.
pub fn private_name(tenant_id: &str, name: &str) -> String {
    format!("{tenant_id}/{name}")
}

/// Resolves `model` to the base model (`None`) or a registered adapter: the caller's own
/// private adapter of that name first, then a public one. Another tenant's adapter is not
/// found.
pub fn resolve_model(
    state: &AppState,
    model: &str,
    caller: Option<&Caller>,
) -> ApiResult<Option<String>> {
    if model == state.cfg.model_name {
        return Ok(None);
    }
    if let Some(c) = caller {
        let own = private_name(&c.tenant.id, model);
        if state.engine.adapters().current(&own).is_some() {
            return Ok(Some(own));
        }
    }
    if !model.contains('/') && state.engine.adapters().current(model).is_some() {
        return Ok(Some(model.to_string()));
    }
    Err(ApiError::NotFound {
        message: format!(
            "the model {model:?} does not exist; GET /v1/models lists the base model {:?} and its adapters",
            state.cfg.model_name
        ),
        param: Some("model".into()),
        code: "model_not_found",
    })
}

fn template(
    state: &AppState,
    model: &str,
    caller: Option<&Caller>,
    c: &CommonParams,
    logprobs: Option<usize>,
) -> ApiResult<Request> {
    let adapter = resolve_model(state, model, caller)?;
    let temperature = range("temperature", c.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", c.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be above 0"));
    }
    let presence_penalty = range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?;
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_N}, not {n}"),
        ));
    }
    let stop: Vec<String> = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings, not {}", stop.len()),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop strings must be 1 to {MAX_STOP_BYTES} bytes long, not {}",
                s.len()
            ),
        ));
    }
    let vocab = state.config.vocab_size;
    let mut logit_bias = Vec::new();
    for (k, v) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("{k:?} is not a token id below the vocabulary size {vocab}"),
                )
            })?;
        if !(-100.0..=100.0).contains(v) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("biases must be between -100 and 100, not {v} (token {k})"),
            ));
        }
        logit_bias.push((id, *v));
    }
    let seed = c.seed.map_or_else(rand::random::<u64>, |s| s as u64);
    Ok(Request {
        prompt: Vec::new(),
        sampling: SamplingParams {
            temperature,
            top_p,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed,
            ..Default::default()
        },
        max_tokens: 0,
        stop,
        stop_token_ids: Vec::new(),
        n: n as usize,
        logprobs,
        adapter,
        cache_salt: String::new(),
        meter: None,
    })
}

/// Fits `max_tokens` (or, when absent, the rest of the context) to a prompt.
fn fit(
    state: &AppState,
    prompt_len: usize,
    asked: Option<u32>,
    param: &'static str,
) -> ApiResult<usize> {
    let context = state.context();
    if asked == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let want = asked.map_or(context.saturating_sub(prompt_len), |m| m as usize);
    if prompt_len == 0 {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    if prompt_len + want.max(1) > context {
        return Err(ApiError::ContextLength {
            message: format!(
                "this model's maximum context length is {context} tokens; the request needs {} ({prompt_len} in the {param}, {} to generate)",
                prompt_len + want.max(1),
                want.max(1)
            ),
            param,
        });
    }
    Ok(want)
}

fn message_text(m: &ChatMessage, i: usize) -> ApiResult<String> {
    match &m.content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}].text"),
                            "a text part needs text",
                        ))
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}].type"),
                            format!("content parts of type {kind:?} are not supported; only text"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Validates a chat request.
pub fn chat(
    state: &AppState,
    body: &ChatCompletionRequest,
    caller: Option<&Caller>,
) -> ApiResult<Valid> {
    if body.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    if body.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(
            "tools",
            "tool calling is not supported yet",
        ));
    }
    let logprobs = match (body.logprobs.unwrap_or(false), body.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ))
        }
        (false, _) => None,
        (true, k) => {
            let k = k.unwrap_or(0);
            if k > 20 {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, not {k}"),
                ));
            }
            Some(k as usize)
        }
    };
    let mut req = template(state, &body.model, caller, &body.common(), logprobs)?;
    let Some(tpl) = &state.template else {
        return Err(ApiError::invalid(
            "model",
            "this model has no chat template; use /v1/completions",
        ));
    };
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role {
            Role::Developer | Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut msg = Message::new(role, &message_text(m, i)?);
        if let Some(name) = &m.name {
            msg.extra.insert("name".into(), name.clone().into());
        }
        messages.push(msg);
    }
    let text = tpl.render(&messages, true).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the chat template refused the messages: {e}"),
        )
    })?;
    // the template writes its own special tokens
    req.prompt = state
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let asked = body.max_completion_tokens.or(body.max_tokens);
    let param = if body.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    if asked == Some(0) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    req.max_tokens = fit(state, req.prompt.len(), asked, "messages")?;
    Ok(Valid {
        model: body.model.clone(),
        requests: vec![req],
        keep: None,
        stream: body.stream.unwrap_or(false),
        include_usage: include_usage(body.stream, body.stream_options.as_ref())?,
    })
}

fn include_usage(
    stream: Option<bool>,
    options: Option<&crate::protocol::StreamOptions>,
) -> ApiResult<bool> {
    let asked = options.and_then(|o| o.include_usage).unwrap_or(false);
    if options.is_some() && !stream.unwrap_or(false) {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(asked)
}

/// Validates a completions request.
pub fn completion(
    state: &AppState,
    body: &CompletionRequest,
    caller: Option<&Caller>,
) -> ApiResult<Valid> {
    if body.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if body.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let n = body.n.unwrap_or(1);
    let best_of = body.best_of.unwrap_or(n);
    if best_of < n || best_of > MAX_N {
        return Err(ApiError::invalid(
            "best_of",
            format!("best_of must be between n ({n}) and {MAX_N}, not {best_of}"),
        ));
    }
    if best_of > n && body.stream.unwrap_or(false) {
        return Err(ApiError::invalid(
            "best_of",
            "best_of above n cannot be streamed (the best are known only at the end)",
        ));
    }
    let logprobs = match body.logprobs {
        None => None,
        Some(k) if k <= 5 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and 5, not {k}"),
            ))
        }
    };
    let mut req = template(state, &body.model, caller, &body.common(), logprobs)?;
    if best_of > n {
        // the choices are ranked by their tokens' log-probabilities
        req.n = best_of as usize;
        req.logprobs = Some(logprobs.unwrap_or(0));
    }
    let encode = |t: &str| {
        state
            .tokenizer
            .encode(t, true)
            .map_err(|e| ApiError::Internal(e.to_string()))
    };
    let prompts: Vec<Vec<u32>> = match &body.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<ApiResult<_>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(l) => l.clone(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("give 1 to {MAX_PROMPTS} prompts, not {}", prompts.len()),
        ));
    }
    let vocab = state.config.vocab_size;
    let mut requests = Vec::with_capacity(prompts.len());
    for p in prompts {
        if let Some(t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let mut r = req.clone();
        r.max_tokens = fit(
            state,
            p.len(),
            Some(body.max_tokens.unwrap_or(16)),
            "prompt",
        )?;
        r.prompt = p;
        requests.push(r);
    }
    Ok(Valid {
        model: body.model.clone(),
        requests,
        keep: (best_of > n).then_some((n as usize, logprobs.is_some())),
        stream: body.stream.unwrap_or(false),
        include_usage: include_usage(body.stream, body.stream_options.as_ref())?,
    })
}
