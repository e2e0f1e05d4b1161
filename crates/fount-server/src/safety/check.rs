//! A request against its caller's policy: the input before admission (refused with 400
//! `content_policy_violation`, or personal data redacted before the model reads it), a guard
//! model asked through the engine, and the output filter each answer runs through.

use std::sync::Arc;

use fount_model::Message;
use fount_safety::filter::{Release, RuleMatcher};
use fount_safety::guard::{self, GuardVerdict, Turn};
use fount_safety::{content_hash, Action, Decision, Hit, OutputFilter, Policy};
use fount_store::AuditRecord;

use crate::error::{ApiError, ApiResult};
use crate::protocol::{ChatCompletionRequest, CompletionRequest, MessageContent, Prompt, Role};
use crate::state::AppState;
use crate::tenancy::Caller;

/// Most tokens a guard model's answer may take (`unsafe\nS1,S2,…`).
const GUARD_TOKENS: usize = 24;

/// Who and what a decision concerns, for its audit record.
#[derive(Debug, Clone)]
pub struct Subject {
    tenant_id: Option<String>,
    key_id: Option<String>,
    request_id: String,
    /// `t:{id}`, `k:{id}` or `operator`.
    policy: String,
    keep_content: bool,
}

impl Subject {
    /// A caller's request under the policy stored as `policy`.
    pub fn new(caller: Option<&Caller>, request_id: &str, policy: &str, keep: bool) -> Subject {
        Subject {
            tenant_id: caller.map(|c| c.tenant.id.clone()),
            key_id: caller.map(|c| c.key.id.clone()),
            request_id: request_id.to_string(),
            policy: policy.to_string(),
            keep_content: keep,
        }
    }

    /// The audit record of `decision` on `content` at `stage`.
    pub fn record(
        &self,
        stage: &str,
        action: &str,
        decision: &Decision,
        content: &str,
    ) -> AuditRecord {
        let json = |v: Vec<String>| serde_json::to_string(&v).unwrap_or_default();
        AuditRecord {
            id: format!("aud-{:032x}", rand::random::<u128>()),
            created_at_ms: fount_store::now_ms(),
            tenant_id: self.tenant_id.clone(),
            key_id: self.key_id.clone(),
            request_id: Some(self.request_id.clone()),
            stage: stage.into(),
            action: action.into(),
            categories: json(
                decision
                    .categories
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect(),
            ),
            rules: json(decision.rules.clone()),
            policy: self.policy.clone(),
            content_sha256: content_hash(content),
            content: self.keep_content.then(|| content.to_string()),
        }
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Log => "log",
        Action::Block => "block",
    }
}

/// Asks the guard model `guard` (the base model's name or a public adapter's) about the last
/// `turn` of `conversation`, greedily, on the engine with no tenant's meter (the operator pays).
/// `None` when the guard is not served or does not answer in the format.
pub async fn ask_guard(
    state: &AppState,
    guard: &str,
    turn: Turn,
    conversation: &[(Turn, &str)],
) -> Option<GuardVerdict> {
    let adapter = if guard == state.cfg.model_name {
        None
    } else if state.engine.adapters().current(guard).is_some() {
        Some(guard.to_string())
    } else {
        tracing::error!(guard, "the policy's guard model is not served");
        return None;
    };
    let question = guard::prompt(turn, conversation);
    let text = match &state.template {
        Some(t) => t.render(&[Message::new("user", &question)], true).ok()?,
        None => question,
    };
    let prompt = state
        .tokenizer
        .encode(&text, state.template.is_none())
        .ok()?;
    let mut req = fount_engine::Request::greedy(prompt, GUARD_TOKENS);
    req.adapter = adapter;
    let mut stream = state.engine.submit(req).ok()?;
    let mut answer = String::new();
    while let Some(e) = stream.next().await {
        match e {
            fount_engine::Event::Token { text, .. } => answer.push_str(&text),
            fount_engine::Event::Finished { text, usage, .. } => {
                answer.push_str(&text);
                state
                    .metrics
                    .guard_tokens(usage.prompt_tokens + usage.completion_tokens);
            }
            fount_engine::Event::Error(e) => {
                tracing::error!(guard, error = %e, "the guard model failed");
                return None;
            }
        }
    }
    tracing::debug!(guard, answer, "the guard model answered");
    let verdict = guard::parse(guard, &answer);
    if verdict.is_none() {
        tracing::warn!(
            guard,
            answer,
            "the guard model's answer is not in the Llama Guard format"
        );
    }
    verdict
}

/// Texts of a request, to check and perhaps redact in place.
fn check_texts(
    state: &AppState,
    policy: &Policy,
    subject: &Subject,
    texts: &mut [&mut String],
    guard: Option<&GuardVerdict>,
    param: &str,
) -> ApiResult<()> {
    let side = &policy.input;
    let pii = side.wants_pii();
    let per_text: Vec<Vec<Hit>> = texts
        .iter()
        .map(|t| state.safety.scan(Some(policy), t, pii))
        .collect();
    let all: Vec<Hit> = per_text.iter().flatten().cloned().collect();
    let decision = side.decide(&all, guard);
    let joined = || {
        texts
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    match decision.action {
        Action::Block => {
            state
                .safety
                .record(subject.record("input", "block", &decision, &joined()));
            let names: Vec<&str> = decision.categories.iter().map(|c| c.name()).collect();
            return Err(ApiError::content_policy(
                param,
                format!(
                    "the request was refused by the content policy: it matched {}",
                    names.join(", ")
                ),
            ));
        }
        Action::Log => state
            .safety
            .record(subject.record("input", "log", &decision, &joined())),
        Action::Allow => {}
    }
    if side.redact_pii {
        let redacted: Vec<&Hit> = all.iter().filter(|h| h.rule.starts_with("pii:")).collect();
        if !redacted.is_empty() {
            let decision = Decision {
                action: Action::Log,
                categories: vec![fount_safety::Category::Pii],
                rules: redacted.iter().map(|h| h.rule.clone()).collect(),
            };
            state
                .safety
                .record(subject.record("input", "redact", &decision, &joined()));
            for (t, hits) in texts.iter_mut().zip(&per_text) {
                if hits.iter().any(|h| h.rule.starts_with("pii:")) {
                    **t = fount_safety::redact(t, hits);
                }
            }
        }
    }
    Ok(())
}

/// What the output side of a request's policy needs.
#[derive(Debug, Clone)]
pub struct OutputCheck {
    state: Arc<AppState>,
    policy: Arc<Policy>,
    subject: Subject,
    hold: usize,
    /// The last user turn, for a guard asked about the answer.
    question: String,
}

/// The policy a caller is held to and the subject of its decisions, if it has one.
fn policy_of(
    state: &AppState,
    caller: Option<&Caller>,
    id: &str,
) -> Option<(Arc<Policy>, Subject)> {
    let (name, policy) = state.safety.policy(caller?)?;
    let subject = Subject::new(caller, id, &name, policy.spec.keep_content);
    Some((policy, subject))
}

/// Holds a chat request's messages to its caller's input policy (redacting them in place
/// where it says so); returns the output side's check, if the policy has one.
pub async fn chat_input(
    state: &Arc<AppState>,
    caller: Option<&Caller>,
    id: &str,
    body: &mut ChatCompletionRequest,
) -> ApiResult<Option<OutputCheck>> {
    let Some((policy, subject)) = policy_of(state, caller, id) else {
        return Ok(None);
    };
    if policy.input.active() {
        let guard = match &policy.spec.guard {
            Some(g) => {
                let conversation: Vec<(Turn, String)> = body
                    .messages
                    .iter()
                    .filter_map(|m| {
                        let turn = match m.role {
                            Role::User => Turn::User,
                            Role::Assistant => Turn::Agent,
                            _ => return None,
                        };
                        Some((turn, content_text(m.content.as_ref())))
                    })
                    .collect();
                let refs: Vec<(Turn, &str)> =
                    conversation.iter().map(|(t, s)| (*t, s.as_str())).collect();
                ask_guard(state, g, Turn::User, &refs).await
            }
            None => None,
        };
        let mut texts: Vec<&mut String> = Vec::new();
        for m in body.messages.iter_mut() {
            match &mut m.content {
                Some(MessageContent::Text(t)) => texts.push(t),
                Some(MessageContent::Parts(parts)) => {
                    texts.extend(parts.iter_mut().filter_map(|p| p.text.as_mut()))
                }
                None => {}
            }
        }
        check_texts(
            state,
            &policy,
            &subject,
            &mut texts,
            guard.as_ref(),
            "messages",
        )?;
    }
    // what a guard asked about the answer reads as the question: the last user turn (redacted)
    let question = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| content_text(m.content.as_ref()))
        .unwrap_or_default();
    Ok(output_check(state, policy, subject, question))
}

fn content_text(c: Option<&MessageContent>) -> String {
    match c {
        None => String::new(),
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join(""),
    }
}

/// Holds a completion request's prompts to its caller's input policy (token-id prompts are
/// decoded to be checked, and become text if redacted).
pub async fn completion_input(
    state: &Arc<AppState>,
    caller: Option<&Caller>,
    id: &str,
    body: &mut CompletionRequest,
) -> ApiResult<Option<OutputCheck>> {
    let Some((policy, subject)) = policy_of(state, caller, id) else {
        return Ok(None);
    };
    if policy.input.active() {
        let decode = |ids: &[u32]| {
            state
                .tokenizer
                .decode(ids, true)
                .map_err(|e| ApiError::Internal(e.to_string()))
        };
        let mut texts: Vec<String> = match &body.prompt {
            Prompt::Text(t) => vec![t.clone()],
            Prompt::Texts(ts) => ts.clone(),
            Prompt::Tokens(ids) => vec![decode(ids)?],
            Prompt::TokenLists(lists) => {
                lists.iter().map(|l| decode(l)).collect::<ApiResult<_>>()?
            }
        };
        let before = texts.clone();
        let guard = match &policy.spec.guard {
            Some(g) => {
                let joined = texts.join("\n");
                ask_guard(state, g, Turn::User, &[(Turn::User, &joined)]).await
            }
            None => None,
        };
        let mut refs: Vec<&mut String> = texts.iter_mut().collect();
        check_texts(
            state,
            &policy,
            &subject,
            &mut refs,
            guard.as_ref(),
            "prompt",
        )?;
        if texts != before {
            body.prompt = match texts.len() {
                1 => Prompt::Text(texts.remove(0)),
                _ => Prompt::Texts(texts),
            };
        }
    }
    let question = match &body.prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Texts(ts) => ts.join("\n"),
        Prompt::Tokens(ids) => state.tokenizer.decode(ids, true).unwrap_or_default(),
        Prompt::TokenLists(lists) => lists
            .iter()
            .map(|l| state.tokenizer.decode(l, true).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Ok(output_check(state, policy, subject, question))
}

fn output_check(
    state: &Arc<AppState>,
    policy: Arc<Policy>,
    subject: Subject,
    question: String,
) -> Option<OutputCheck> {
    if !policy.output.active() {
        return None;
    }
    let hold = policy
        .hold_chars
        .max(state.safety.rules().longest_term())
        .max(policy.rules.longest_term());
    Some(OutputCheck {
        state: state.clone(),
        policy,
        subject,
        hold,
        question,
    })
}

/// One answer's output filter. With a guard on the output side, nothing is sent until the
/// guard has read the whole answer (a stream never sends what it would have to retract).
#[derive(Debug)]
pub struct AnswerFilter {
    check: OutputCheck,
    filter: OutputFilter,
    done: bool,
    /// Text the rules let through, held for the guard.
    held: Option<String>,
}

impl OutputCheck {
    /// A filter for one choice.
    pub fn filter(&self) -> AnswerFilter {
        AnswerFilter {
            check: self.clone(),
            filter: OutputFilter::new(self.hold),
            done: false,
            held: self.policy.spec.guard.as_ref().map(|_| String::new()),
        }
    }
}

impl AnswerFilter {
    /// Adds generated text; returns what may be sent and whether the answer is blocked.
    pub fn push(&mut self, piece: &str) -> Release {
        if self.done {
            return Release {
                text: String::new(),
                blocked: None,
            };
        }
        let operator = self.check.state.safety.rules();
        let policy = &self.check.policy;
        let m = RuleMatcher {
            rules: vec![&operator, &policy.rules],
            pii: policy.output.wants_pii(),
        };
        let r = self.filter.push(piece, &policy.output, &m);
        let r = self.settle(r);
        self.hold(r)
    }

    /// The end of the answer: what is left, once the guard (if any) has read it all.
    pub async fn finish(&mut self) -> Release {
        if self.done {
            return Release {
                text: String::new(),
                blocked: None,
            };
        }
        let operator = self.check.state.safety.rules();
        let policy = self.check.policy.clone();
        let m = RuleMatcher {
            rules: vec![&operator, &policy.rules],
            pii: policy.output.wants_pii(),
        };
        let r = self.filter.finish(&policy.output, &m);
        let r = self.settle(r);
        if self.done {
            return self.hold(r);
        }
        self.done = true;
        if let Some(logged) = self.filter.logged() {
            let rec = self
                .check
                .subject
                .record("output", "log", logged, self.filter.text());
            self.check.state.safety.record(rec);
        }
        let (Some(held), Some(guard)) = (self.held.take(), policy.spec.guard.as_deref()) else {
            return r;
        };
        let (state, question) = (&self.check.state, self.check.question.as_str());
        let conversation = [(Turn::User, question), (Turn::Agent, self.filter.text())];
        let verdict = ask_guard(state, guard, Turn::Agent, &conversation).await;
        let decision = policy.output.decide(&[], verdict.as_ref());
        match decision.action {
            Action::Allow => Release {
                text: held + &r.text,
                blocked: None,
            },
            Action::Log => {
                let rec = self
                    .check
                    .subject
                    .record("output", "log", &decision, self.filter.text());
                state.safety.record(rec);
                Release {
                    text: held + &r.text,
                    blocked: None,
                }
            }
            Action::Block => {
                let rec =
                    self.check
                        .subject
                        .record("output", "block", &decision, self.filter.text());
                state.safety.record(rec);
                Release {
                    text: String::new(),
                    blocked: Some(decision),
                }
            }
        }
    }

    /// With a guard, what the rules let through waits for it (and a rule's block sends none).
    fn hold(&mut self, r: Release) -> Release {
        match &mut self.held {
            None => r,
            Some(_) if r.blocked.is_some() => Release {
                text: String::new(),
                blocked: r.blocked,
            },
            Some(held) => {
                held.push_str(&r.text);
                Release {
                    text: String::new(),
                    blocked: None,
                }
            }
        }
    }

    fn settle(&mut self, r: Release) -> Release {
        if let Some(d) = &r.blocked {
            self.done = true;
            let rec =
                self.check
                    .subject
                    .record("output", action_name(d.action), d, self.filter.text());
            self.check.state.safety.record(rec);
        }
        r
    }
}

/// What a running answer is held to: its output policy (a filter per choice) and the operator's
/// suspensions of its tenant, key, model or adapter.
#[derive(Debug)]
pub struct Controls {
    state: Arc<AppState>,
    caller: Option<Caller>,
    adapter: Option<String>,
    watch: tokio::sync::watch::Receiver<i64>,
    filters: Option<Vec<AnswerFilter>>,
    /// Choices finished or blocked.
    done: Vec<bool>,
    /// Tokens each choice generated.
    pub seen: Vec<usize>,
}

impl Controls {
    /// Controls over `choices` choices.
    pub fn new(
        state: &Arc<AppState>,
        caller: Option<Caller>,
        adapter: Option<String>,
        output: Option<&OutputCheck>,
        choices: usize,
    ) -> Controls {
        Controls {
            state: state.clone(),
            caller,
            adapter,
            watch: {
                // the first look is at once
                let mut w = state.safety.subscribe();
                w.mark_changed();
                w
            },
            filters: output.map(|o| (0..choices).map(|_| o.filter()).collect()),
            done: vec![false; choices],
            seen: vec![0; choices],
        }
    }

    /// Resolves once something this answer uses is suspended (at once if it already is). The
    /// suspensions are looked at only when they were reloaded since the last look, so a stream
    /// pays nothing per token for them.
    pub async fn suspended(&mut self) -> ApiError {
        loop {
            if self.watch.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let model = &self.state.cfg.model_name;
            if let Some(e) =
                self.state
                    .safety
                    .suspension(self.caller.as_ref(), model, self.adapter.as_deref())
            {
                return e;
            }
        }
    }

    /// Text generated for choice `i`: what may be sent, and whether the policy ended it.
    pub fn token(&mut self, i: usize, text: String) -> (String, bool) {
        self.seen[i] += 1;
        self.pass(i, text)
    }

    /// The last text of choice `i`: what may be sent, and whether the policy ended it.
    pub async fn finish(&mut self, i: usize, text: String) -> (String, bool) {
        if self.done[i] {
            return (String::new(), false);
        }
        self.done[i] = true;
        let Some(f) = self.filters.as_mut().and_then(|f| f.get_mut(i)) else {
            return (text, false);
        };
        let mut r = f.push(&text);
        if r.blocked.is_none() {
            let rest = f.finish().await;
            r.text.push_str(&rest.text);
            r.blocked = rest.blocked;
        }
        let blocked = r.blocked.is_some();
        (r.text, blocked)
    }

    fn pass(&mut self, i: usize, text: String) -> (String, bool) {
        if self.done[i] {
            return (String::new(), false);
        }
        let Some(f) = self.filters.as_mut().and_then(|f| f.get_mut(i)) else {
            return (text, false);
        };
        let r = f.push(&text);
        let blocked = r.blocked.is_some();
        self.done[i] = blocked;
        (r.text, blocked)
    }

    /// Whether choice `i` has ended (finished, or ended by the policy).
    pub fn is_done(&self, i: usize) -> bool {
        self.done[i]
    }

    /// Whether every choice has ended.
    pub fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }
}
