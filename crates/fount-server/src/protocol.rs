//! The OpenAI wire format: request bodies as clients send them and responses as clients parse
//! them. Unknown request fields are ignored, as OpenAI ignores them; `null` is the same as
//! absent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The base model's name or an adapter's.
    pub model: String,
    /// The conversation so far.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate per choice (deprecated by OpenAI in favour of
    /// `max_completion_tokens`; both are accepted). Default: the rest of the context.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate per choice.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2 (0: greedy). Default 1.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, above 0 and at most 1. Default 1.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Choices to generate, 1 to 16. Default 1.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    /// Up to 4 strings that end generation (not included in the output).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed of the sampler: the same seed, parameters and prompt give the same output.
    #[serde(default)]
    pub seed: Option<i64>,
    /// −2 to 2: penalise tokens that have appeared at all.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// −2 to 2: penalise tokens by how often they have appeared.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias from −100 to 100 added to its logit.
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Return the log-probability of each generated token.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: how many most likely alternatives to return per token, 0 to 20.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An end-user identifier (recorded, not interpreted).
    #[serde(default)]
    pub user: Option<String>,
    /// Tool definitions: not supported yet; a request with tools is refused (an empty list is
    /// the same as none).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// The output format: only plain text.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormat {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: ResponseFormatType,
}

/// The output formats fount produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormatType {
    /// Plain text.
    Text,
}

/// The parameters chat and completions share, as validation reads them.
#[derive(Debug, Clone, Default)]
pub struct CommonParams {
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Choices per prompt.
    pub n: Option<u32>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Sampler seed.
    pub seed: Option<i64>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Token id → logit bias.
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

macro_rules! common_params {
    ($($t:ty),*) => {$(
        impl $t {
            /// The parameters shared with the other generation route.
            pub fn common(&self) -> CommonParams {
                CommonParams {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stop: self.stop.clone(),
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.clone(),
                }
            }
        }
    )*};
}
common_params!(ChatCompletionRequest, CompletionRequest);

/// One message of a conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text, or a list of text parts.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An optional participant name.
    #[serde(default)]
    pub name: Option<String>,
}

/// The author of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions (OpenAI's newer name for `system`).
    Developer,
    /// Instructions.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": …}` is supported.
    Parts(Vec<ContentPart>),
}

/// A part of a message's content.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// The kind of part (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to 4 stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage (and `"usage": null` on every other chunk).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The base model's name or an adapter's.
    pub model: String,
    /// The prompt(s): text, a list of texts, token ids, or a list of token-id lists.
    pub prompt: Prompt,
    /// Most tokens to generate per choice. Default 16, as OpenAI's.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2 (0: greedy). Default 1.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, above 0 and at most 1. Default 1.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Choices per prompt, 1 to 16. Default 1.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    /// Up to 4 strings that end generation (not included in the output).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<i64>,
    /// −2 to 2: penalise tokens that have appeared at all.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// −2 to 2: penalise tokens by how often they have appeared.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias from −100 to 100 added to its logit.
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Return log-probabilities with this many alternatives per token, 0 to 5.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 5)]
    pub logprobs: Option<u32>,
    /// Echo the prompt before the completion: only `false` is supported.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Generate this many choices per prompt and return the `n` with the highest total
    /// log-probability (at least `n`, at most 16; not with `stream`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub best_of: Option<u32>,
    /// Text after the completion: not supported.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An end-user identifier (recorded, not interpreted).
    #[serde(default)]
    pub user: Option<String>,
}

/// A completion prompt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts, each completed separately.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// Token counts of a response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens in the prompt(s).
    pub prompt_tokens: usize,
    /// Tokens generated, over all choices.
    pub completion_tokens: usize,
    /// The sum of the two.
    pub total_tokens: usize,
    /// Where the prompt tokens came from.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// A non-streamed chat answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix time of creation.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// One per `n`.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// The server build, for reproducibility with `seed`.
    pub system_fingerprint: String,
}

/// One chat choice.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    /// Its index.
    pub index: usize,
    /// The generated message.
    pub message: AssistantMessage,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop string or an end-of-sequence token.
    Stop,
    /// `max_tokens`, or the model's context.
    Length,
    /// A content policy stopped the answer (the text before the match is kept).
    #[serde(rename = "content_filter")]
    ContentFilter,
}

/// The message of a chat choice.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: Role,
    /// The generated text.
    pub content: String,
}

/// `choices[].logprobs` of a chat answer.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The log-probability of one generated token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes (a token may hold part of a character).
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position.
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// A streamed chat chunk (`data:` of one server-sent event).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time of creation.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// The server build.
    pub system_fingerprint: String,
    /// Deltas (empty in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Present when `stream_options.include_usage`: `null`, then the counts in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One server-sent event of a streamed chat answer, as an event-stream parser reads it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkEvent {
    /// A `ChatCompletionChunk` as JSON; the last event's data is `[DONE]`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// One server-sent event of a streamed completion, as an event-stream parser reads it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChunkEvent {
    /// A `Completion` chunk as JSON; the last event's data is `[DONE]`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// One choice's part of a chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    /// The choice.
    pub index: usize,
    /// What is new.
    pub delta: Delta,
    /// Log-probabilities of the tokens in this delta, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// New text of a streamed choice.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    /// `assistant` in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A non-streamed completion (or one streamed chunk: the same shape).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix time of creation.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// `n` per prompt, prompt-major.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (`null` in streamed chunks when `include_usage`, absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// The server build.
    pub system_fingerprint: String,
}

/// One completion choice.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// `prompt index × n + choice`.
    pub index: usize,
    /// The generated text (new text, when streamed).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Set when the choice ends.
    pub finish_reason: Option<FinishReason>,
}

/// `choices[].logprobs` of a completion.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    /// The generated tokens' texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Per token: the most likely alternatives, text → log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Each token's offset in the choice's text, in bytes.
    pub text_offset: Vec<usize>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The base model, then its adapters.
    pub data: Vec<ModelCard>,
}

/// A model or an adapter.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name to pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix time the server started or the adapter was registered.
    pub created: u64,
    /// Always `fount`.
    pub owned_by: &'static str,
    /// The base model an adapter applies to (absent for the base model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The model's context length in tokens.
    pub max_model_len: usize,
}

/// `POST /v1/adapters`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RegisterAdapter {
    /// The name requests will use as `model` (letters, digits, `-`, `_`, `.`, `:`; not the base
    /// model's name).
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// A PEFT adapter directory on the server's file system (uploaded to the artifacts store,
    /// when the server has one, for every replica), or `artifacts:{key}`: an adapter already
    /// stored there (`fount artifacts put`).
    pub path: String,
}

/// `DELETE /v1/adapters/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    /// The adapter's name.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Always true.
    pub deleted: bool,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `draining` after SIGTERM.
    pub status: &'static str,
}

/// The OpenAI error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorBody,
}

/// The error object.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A sentence for people.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error`, `server_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`, …).
    pub code: Option<String>,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageReport {
    /// Always `list`.
    pub object: &'static str,
    /// By UTC day, then model.
    pub data: Vec<UsageRow>,
}

/// A tenant's usage of one model on one day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageRow {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// The model as requested (for training: the base model of a fine-tuning job, or the
    /// pool job's kind, `finetune`, for its slot time).
    pub model: String,
    /// `inference` (requests) or `training` (pool job attempts and fine-tuning jobs).
    pub kind: String,
    /// Requests (job attempts and fine-tuning jobs for training).
    pub requests: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Of those, from the prefix cache.
    pub cached_tokens: i64,
    /// Generated tokens.
    pub completion_tokens: i64,
    /// Tokens trained on by fine-tuning jobs (billed at the model's training price).
    pub trained_tokens: i64,
    /// Slot time of pool jobs, in seconds.
    pub slot_seconds: f64,
    /// What it cost in US dollars, as a decimal string with six places (exact).
    pub cost_usd: String,
}
