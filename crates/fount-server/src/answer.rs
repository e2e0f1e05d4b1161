//! Running validated requests on the engine and shaping what comes back: one JSON answer, or
//! server-sent events chunked exactly as OpenAI chunks them.
//!
//! A client that disconnects drops the response body, which drops the engine streams, which
//! cancels the requests and frees their KV blocks.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;

use fount_engine::{Event, Stream as EngineStream, TokenLogprob};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};

use crate::error::{ApiError, ApiResult};
use crate::protocol::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    ChatTokenLogprob, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs, Delta,
    FinishReason, Role, TopLogprob, Usage,
};
use crate::safety::check::Controls;
use crate::state::{now, AppState, InFlight};
use crate::tenancy::Metering;
use crate::validate::Valid;

/// Identifies the server build in `system_fingerprint`.
pub const FINGERPRINT: &str = concat!("fount-", env!("CARGO_PKG_VERSION"));

/// The engine events of every prompt of a request, as `(prompt index, event)`.
type Merged = SelectAll<BoxStream<'static, (usize, Event)>>;

/// Submits every prompt; if one is refused, the ones already submitted are cancelled.
fn submit(state: &AppState, requests: Vec<fount_engine::Request>) -> ApiResult<Merged> {
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        streams.push(state.engine.submit(r)?);
    }
    let boxed = streams.into_iter().enumerate().map(|(i, s)| {
        stream::unfold(s, |mut s: EngineStream| async move {
            let e = s.next().await?;
            Some((e, s))
        })
        .map(move |e| (i, e))
        .boxed()
    });
    Ok(stream::select_all(boxed))
}

/// A response id, `chatcmpl-…` or `cmpl-…`; also the usage record's key.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn finish(r: fount_engine::FinishReason) -> FinishReason {
    match r {
        fount_engine::FinishReason::Stop => FinishReason::Stop,
        fount_engine::FinishReason::Length => FinishReason::Length,
    }
}

fn token_text(state: &AppState, id: u32) -> (String, Vec<u8>) {
    let bytes = state.tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprob(state: &AppState, token: u32, lp: &TokenLogprob) -> ChatTokenLogprob {
    let (text, bytes) = token_text(state, token);
    ChatTokenLogprob {
        token: text,
        logprob: lp.logprob,
        bytes,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let (token, bytes) = token_text(state, id);
                TopLogprob {
                    token,
                    logprob,
                    bytes,
                }
            })
            .collect(),
    }
}

/// What one choice has produced so far.
#[derive(Debug, Default)]
struct Acc {
    text: String,
    logprobs: Vec<ChatTokenLogprob>,
    completion_logprobs: CompletionLogprobs,
    finish: Option<FinishReason>,
}

/// Token counts over all prompts and choices.
#[derive(Debug, Default)]
struct Counts {
    usage: Usage,
}

impl Counts {
    fn add(&mut self, choice: usize, u: &fount_engine::Usage) {
        if choice == 0 {
            self.usage.prompt_tokens += u.prompt_tokens;
            self.usage.prompt_tokens_details.cached_tokens += u.cached_tokens;
        }
        self.usage.completion_tokens += u.completion_tokens;
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
    }
}

fn add_completion_logprob(state: &AppState, acc: &mut Acc, token: u32, lp: &TokenLogprob) {
    let (text, _) = token_text(state, token);
    let l = &mut acc.completion_logprobs;
    l.text_offset.push(acc.text.len());
    l.tokens.push(text);
    l.token_logprobs.push(lp.logprob);
    l.top_logprobs.push(
        lp.top
            .iter()
            .map(|&(id, logprob)| (token_text(state, id).0, logprob))
            .collect(),
    );
}

/// Reads every event of a non-streamed request, each choice's text through its output
/// policy; a suspension ends it with an error.
async fn collect(
    state: &AppState,
    mut merged: Merged,
    setup: &Setup,
    controls: &mut Controls,
) -> ApiResult<(Vec<Acc>, Usage)> {
    let (n, prompts) = (setup.n, setup.prompts);
    let mut accs: Vec<Acc> = (0..n * prompts).map(|_| Acc::default()).collect();
    let mut counts = Counts::default();
    loop {
        let next = tokio::select! {
            e = merged.next() => Ok(e),
            e = controls.suspended() => Err(e),
        };
        let Some((p, e)) = next? else { break };
        match e {
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                let i = p * n + choice;
                if controls.is_done(i) {
                    continue;
                }
                let (text, blocked) = controls.token(i, text);
                let acc = &mut accs[i];
                if let Some(lp) = &logprob {
                    acc.logprobs.push(chat_logprob(state, token, lp));
                    add_completion_logprob(state, acc, token, lp);
                }
                acc.text.push_str(&text);
                if blocked {
                    acc.finish = Some(FinishReason::ContentFilter);
                    counts.add(choice, &blocked_usage(setup, controls, p, i));
                }
            }
            Event::Finished {
                choice,
                reason,
                text,
                usage,
            } => {
                let i = p * n + choice;
                if controls.is_done(i) {
                    continue;
                }
                let (text, blocked) = controls.finish(i, text).await;
                let acc = &mut accs[i];
                acc.text.push_str(&text);
                acc.finish = Some(match blocked {
                    true => FinishReason::ContentFilter,
                    false => finish(reason),
                });
                counts.add(choice, &usage);
            }
            Event::Error(e) => return Err(ApiError::Internal(e)),
        }
        if controls.all_done() {
            // choices the policy ended are cancelled with the rest (dropping the streams)
            break;
        }
    }
    Ok((accs, counts.usage))
}

/// The usage of a choice the policy ended, as far as it went (its engine request is cancelled
/// before it reports its own).
fn blocked_usage(
    setup: &Setup,
    controls: &Controls,
    prompt: usize,
    i: usize,
) -> fount_engine::Usage {
    fount_engine::Usage {
        prompt_tokens: setup.prompt_lens.get(prompt).copied().unwrap_or(0),
        completion_tokens: controls.seen[i],
        cached_tokens: 0,
    }
}

/// What a response's shape needs to know of its request.
struct Setup {
    head: Head,
    /// Choices per prompt (as generated; `best_of` keeps fewer).
    n: usize,
    prompts: usize,
    logprobs: bool,
    include_usage: bool,
    /// Prompt tokens of each prompt.
    prompt_lens: Vec<usize>,
}

fn setup(id: String, valid: &Valid) -> Setup {
    Setup {
        prompt_lens: valid.requests.iter().map(|r| r.prompt.len()).collect(),
        head: Head::new(id, valid),
        n: valid.requests.first().map_or(1, |r| r.n),
        prompts: valid.requests.len(),
        logprobs: valid.requests.first().is_some_and(|r| r.logprobs.is_some()),
        include_usage: valid.include_usage,
    }
}

/// Answers a validated chat request.
pub async fn chat(
    state: Arc<AppState>,
    valid: Valid,
    id: String,
    metering: Option<Metering>,
    mut controls: Controls,
) -> ApiResult<Response> {
    let guard = state.in_flight();
    let setup = setup(id, &valid);
    let stream = valid.stream;
    let merged = match submit(&state, valid.requests) {
        Ok(m) => m,
        Err(e) => return Metering::fail(metering, e).await,
    };
    if stream {
        return Ok(chat_stream(state, setup, merged, guard, metering, controls));
    }
    let (accs, usage) = match collect(&state, merged, &setup, &mut controls).await {
        Ok(x) => x,
        Err(e) => return Metering::fail(metering, e).await,
    };
    if let Some(m) = metering {
        m.finish(200).await;
    }
    let choices = accs
        .into_iter()
        .enumerate()
        .map(|(index, a)| ChatChoice {
            index,
            message: AssistantMessage {
                role: Role::Assistant,
                content: a.text,
            },
            logprobs: setup.logprobs.then_some(ChatLogprobs {
                content: a.logprobs,
            }),
            finish_reason: a.finish.unwrap_or(FinishReason::Stop),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id: setup.head.id,
        object: "chat.completion",
        created: setup.head.created,
        model: setup.head.model,
        choices,
        usage,
        system_fingerprint: FINGERPRINT.into(),
    })
    .into_response())
}

/// Of each prompt's `generated` choices, the `keep` with the highest total log-probability (ties
/// in generation order), prompt by prompt.
fn best_of(accs: Vec<Acc>, generated: usize, keep: usize) -> Vec<Acc> {
    let mut out = Vec::with_capacity(accs.len() / generated.max(1) * keep);
    let mut it = accs.into_iter().peekable();
    while it.peek().is_some() {
        let mut group: Vec<Acc> = it.by_ref().take(generated).collect();
        let score = |a: &Acc| -> f32 { a.completion_logprobs.token_logprobs.iter().sum() };
        group.sort_by(|a, b| score(b).total_cmp(&score(a)));
        out.extend(group.into_iter().take(keep));
    }
    out
}

/// Answers a validated completions request.
pub async fn completion(
    state: Arc<AppState>,
    valid: Valid,
    id: String,
    metering: Option<Metering>,
    mut controls: Controls,
) -> ApiResult<Response> {
    let guard = state.in_flight();
    let setup = setup(id, &valid);
    let (stream, keep) = (valid.stream, valid.keep);
    let merged = match submit(&state, valid.requests) {
        Ok(m) => m,
        Err(e) => return Metering::fail(metering, e).await,
    };
    if stream {
        return Ok(completion_stream(
            state, setup, merged, guard, metering, controls,
        ));
    }
    let (n, prompts) = (setup.n, setup.prompts);
    let (mut accs, usage) = match collect(&state, merged, &setup, &mut controls).await {
        Ok(x) => x,
        Err(e) => return Metering::fail(metering, e).await,
    };
    if let Some(m) = metering {
        m.finish(200).await;
    }
    let (kept, logprobs) = match keep {
        Some((kept, asked)) => {
            accs = best_of(accs, n, kept);
            (kept, asked)
        }
        None => (n, setup.logprobs),
    };
    debug_assert_eq!(accs.len(), kept * prompts);
    let choices = accs
        .into_iter()
        .enumerate()
        .map(|(index, a)| CompletionChoice {
            index,
            text: a.text,
            logprobs: logprobs.then_some(a.completion_logprobs),
            finish_reason: Some(a.finish.unwrap_or(FinishReason::Stop)),
        })
        .collect();
    Ok(Json(Completion {
        id: setup.head.id,
        object: "text_completion",
        created: setup.head.created,
        model: setup.head.model,
        choices,
        usage: Some(Some(usage)),
        system_fingerprint: FINGERPRINT.into(),
    })
    .into_response())
}

fn sse(payloads: impl futures_util::Stream<Item = String> + Send + 'static) -> Response {
    Sse::new(payloads.map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)))).into_response()
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn error_payload(message: String) -> String {
    json(&ApiError::Internal(message).body())
}

/// Turns one response's engine events into server-sent event payloads.
trait Shape: Send + 'static {
    /// A generated token of choice `index` (`None`: nothing to send).
    fn token(
        &mut self,
        state: &AppState,
        index: usize,
        token: u32,
        text: String,
        logprob: Option<&TokenLogprob>,
    ) -> Option<String>;
    /// The end of choice `index`, with the text held back until now.
    fn finished(&mut self, index: usize, reason: FinishReason, text: String) -> Vec<String>;
    /// The last chunk, with the usage of the whole response.
    fn usage(&self, usage: Usage) -> String;
}

/// Where a streamed response stands.
struct StreamState<S> {
    state: Arc<AppState>,
    merged: Merged,
    shape: S,
    /// Choices per prompt.
    n: usize,
    include_usage: bool,
    counts: Counts,
    done: bool,
    /// Held until the stream ends or the client goes away.
    _in_flight: InFlight,
    /// Taken when the stream ends; still here when the client went away.
    metering: Option<Metering>,
    controls: Controls,
    prompt_lens: Vec<usize>,
}

impl<S> StreamState<S> {
    fn new(
        state: Arc<AppState>,
        merged: Merged,
        shape: S,
        setup: &Setup,
        guard: InFlight,
        metering: Option<Metering>,
        controls: Controls,
    ) -> StreamState<S> {
        StreamState {
            controls,
            prompt_lens: setup.prompt_lens.clone(),
            state,
            merged,
            shape,
            n: setup.n,
            include_usage: setup.include_usage,
            counts: Counts::default(),
            done: false,
            _in_flight: guard,
            metering,
        }
    }
}

impl<S> Drop for StreamState<S> {
    fn drop(&mut self) {
        if let Some(m) = self.metering.take() {
            // the client went away: recorded as 499 with the tokens generated until the
            // engine saw the stream dropped
            m.abandoned();
        }
    }
}

/// The payloads of a streamed response: `first`, then one or more per engine event, then the
/// usage chunk (when asked for) and `[DONE]`.
fn drive<S: Shape>(first: Vec<String>, s: StreamState<S>) -> Response {
    let body = stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        let next = tokio::select! {
            e = s.merged.next() => Ok(e),
            e = s.controls.suspended() => Err(e),
        };
        let next = match next {
            Ok(next) => next,
            Err(suspended) => {
                // the engine's requests are cancelled now, not when the client lets go
                s.merged = stream::select_all(Vec::new());
                s.done = true;
                if let Some(m) = s.metering.take() {
                    m.finish(suspended.status().as_u16()).await;
                }
                return Some((vec![json(&suspended.body()), "[DONE]".into()], s));
            }
        };
        let Some((p, e)) = next else {
            s.done = true;
            if let Some(m) = s.metering.take() {
                m.finish(200).await;
            }
            let mut out = Vec::new();
            if s.include_usage {
                out.push(s.shape.usage(s.counts.usage.clone()));
            }
            out.push("[DONE]".to_string());
            return Some((out, s));
        };
        let out = match e {
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                let index = p * s.n + choice;
                if s.controls.is_done(index) {
                    return Some((Vec::new(), s));
                }
                let (text, blocked) = s.controls.token(index, text);
                let mut out: Vec<String> = s
                    .shape
                    .token(&s.state, index, token, text, logprob.as_ref())
                    .into_iter()
                    .collect();
                if blocked {
                    let usage = fount_engine::Usage {
                        prompt_tokens: s.prompt_lens.get(p).copied().unwrap_or(0),
                        completion_tokens: s.controls.seen[index],
                        cached_tokens: 0,
                    };
                    s.counts.add(choice, &usage);
                    out.extend(
                        s.shape
                            .finished(index, FinishReason::ContentFilter, String::new()),
                    );
                }
                out
            }
            Event::Finished {
                choice,
                reason,
                text,
                usage,
            } => {
                let index = p * s.n + choice;
                if s.controls.is_done(index) {
                    return Some((Vec::new(), s));
                }
                let (text, blocked) = s.controls.finish(index, text).await;
                s.counts.add(choice, &usage);
                let reason = if blocked {
                    FinishReason::ContentFilter
                } else {
                    finish(reason)
                };
                s.shape.finished(index, reason, text)
            }
            Event::Error(e) => {
                s.done = true;
                if let Some(m) = s.metering.take() {
                    m.finish(500).await;
                }
                vec![error_payload(e), "[DONE]".into()]
            }
        };
        if s.controls.all_done() && !s.done {
            // every choice has ended (some by the policy): cancel what the engine still runs
            s.merged = stream::select_all(Vec::new());
        }
        Some((out, s))
    });
    sse(stream::iter(first).chain(body.flat_map(stream::iter)))
}

/// What every chunk of a response repeats.
#[derive(Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    /// `Some(None)` (`"usage": null` on every chunk) when the client asked for usage.
    usage: Option<Option<Usage>>,
}

impl Head {
    fn new(id: String, valid: &Valid) -> Head {
        Head {
            id,
            created: now(),
            model: valid.model.clone(),
            usage: valid.include_usage.then_some(None),
        }
    }
}

/// Chat chunks.
struct ChatShape {
    head: Head,
    logprobs: bool,
}

impl ChatShape {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Option<Usage>>) -> String {
        json(&ChatCompletionChunk {
            id: self.head.id.clone(),
            object: "chat.completion.chunk",
            created: self.head.created,
            model: self.head.model.clone(),
            system_fingerprint: FINGERPRINT.into(),
            choices,
            usage,
        })
    }

    fn delta(index: usize, role: Option<Role>, content: Option<String>) -> ChunkChoice {
        ChunkChoice {
            index,
            delta: Delta { role, content },
            logprobs: None,
            finish_reason: None,
        }
    }
}

impl Shape for ChatShape {
    fn token(
        &mut self,
        state: &AppState,
        index: usize,
        token: u32,
        text: String,
        logprob: Option<&TokenLogprob>,
    ) -> Option<String> {
        if text.is_empty() && !self.logprobs {
            return None;
        }
        let mut c = ChatShape::delta(index, None, Some(text));
        if let (true, Some(lp)) = (self.logprobs, logprob) {
            c.logprobs = Some(ChatLogprobs {
                content: vec![chat_logprob(state, token, lp)],
            });
        }
        Some(self.chunk(vec![c], self.head.usage.clone()))
    }

    fn finished(&mut self, index: usize, reason: FinishReason, text: String) -> Vec<String> {
        let mut out = Vec::new();
        if !text.is_empty() {
            let c = ChatShape::delta(index, None, Some(text));
            out.push(self.chunk(vec![c], self.head.usage.clone()));
        }
        let mut last = ChatShape::delta(index, None, None);
        last.finish_reason = Some(reason);
        out.push(self.chunk(vec![last], self.head.usage.clone()));
        out
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(Some(usage)))
    }
}

fn chat_stream(
    state: Arc<AppState>,
    setup: Setup,
    merged: Merged,
    guard: InFlight,
    metering: Option<Metering>,
    controls: Controls,
) -> Response {
    let shape = ChatShape {
        head: setup.head.clone(),
        logprobs: setup.logprobs,
    };
    // the role first, for every choice
    let first = (0..setup.n)
        .map(|i| {
            let role = ChatShape::delta(i, Some(Role::Assistant), Some(String::new()));
            shape.chunk(vec![role], shape.head.usage.clone())
        })
        .collect();
    drive(
        first,
        StreamState::new(state, merged, shape, &setup, guard, metering, controls),
    )
}

/// Completion chunks.
struct CompletionShape {
    head: Head,
    logprobs: bool,
    /// Bytes streamed so far per choice, for `text_offset`.
    offsets: Vec<usize>,
}

impl CompletionShape {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> String {
        json(&Completion {
            id: self.head.id.clone(),
            object: "text_completion",
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage,
            system_fingerprint: FINGERPRINT.into(),
        })
    }
}

impl Shape for CompletionShape {
    fn token(
        &mut self,
        state: &AppState,
        index: usize,
        token: u32,
        text: String,
        logprob: Option<&TokenLogprob>,
    ) -> Option<String> {
        if text.is_empty() && !self.logprobs {
            return None;
        }
        let mut lps = None;
        if let (true, Some(lp)) = (self.logprobs, logprob) {
            let mut acc = Acc::default();
            add_completion_logprob(state, &mut acc, token, lp);
            acc.completion_logprobs.text_offset = vec![self.offsets[index]];
            lps = Some(acc.completion_logprobs);
        }
        self.offsets[index] += text.len();
        let c = CompletionChoice {
            index,
            text,
            logprobs: lps,
            finish_reason: None,
        };
        Some(self.chunk(vec![c], self.head.usage.clone()))
    }

    fn finished(&mut self, index: usize, reason: FinishReason, text: String) -> Vec<String> {
        let c = CompletionChoice {
            index,
            text,
            logprobs: None,
            finish_reason: Some(reason),
        };
        vec![self.chunk(vec![c], self.head.usage.clone())]
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(Some(usage)))
    }
}

fn completion_stream(
    state: Arc<AppState>,
    setup: Setup,
    merged: Merged,
    guard: InFlight,
    metering: Option<Metering>,
    controls: Controls,
) -> Response {
    let shape = CompletionShape {
        head: setup.head.clone(),
        logprobs: setup.logprobs,
        offsets: vec![0; setup.n * setup.prompts],
    };
    drive(
        Vec::new(),
        StreamState::new(state, merged, shape, &setup, guard, metering, controls),
    )
}
