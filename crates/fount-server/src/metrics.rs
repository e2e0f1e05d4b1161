//! Prometheus metrics: HTTP requests by route, method and status with their latencies, and the
//! engine's queue, batch, KV cache, prefix cache, adapters, throughput and latencies, read from
//! the engine at each scrape.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fount_engine::MetricsSnapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of an HTTP request count.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern (`/v1/models/{*id}`), or `unmatched`.
    pub route: String,
    /// The HTTP method.
    pub method: String,
    /// The status code.
    pub status: u16,
}

/// Labels of an HTTP latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route pattern.
    pub route: String,
    /// The HTTP method.
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: i64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Quantile {
    quantile: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 1 ms to ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The server's registry.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    waiting: Gauge,
    running: Gauge,
    blocks_used: Gauge,
    blocks_free: Gauge,
    hit_rate: FloatGauge,
    adapters: Gauge,
    adapter_bytes: Gauge,
    tokens_per_second: FloatGauge,
    ttft: Family<Quantile, FloatGauge>,
    itl: Family<Quantile, FloatGauge>,
    generated: Counter,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    preemptions: Counter,
    steps: Counter,
    billed_prompt: Counter,
    billed_cached: Counter,
    billed_completion: Counter,
    records: Family<StatusLabel, Counter>,
    guard: Counter,
    /// Serialises scrapes, so two never add the same increments.
    scrape: std::sync::Mutex<()>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics::new()
    }
}

impl ServerMetrics {
    /// A registry with every metric registered.
    pub fn new() -> ServerMetrics {
        let mut r = Registry::with_prefix("fount");
        let m = ServerMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            waiting: Gauge::default(),
            running: Gauge::default(),
            blocks_used: Gauge::default(),
            blocks_free: Gauge::default(),
            hit_rate: FloatGauge::default(),
            adapters: Gauge::default(),
            adapter_bytes: Gauge::default(),
            tokens_per_second: FloatGauge::default(),
            ttft: Family::default(),
            itl: Family::default(),
            generated: Counter::default(),
            prompt_tokens: Counter::default(),
            cached_tokens: Counter::default(),
            preemptions: Counter::default(),
            steps: Counter::default(),
            billed_prompt: Counter::default(),
            billed_cached: Counter::default(),
            billed_completion: Counter::default(),
            records: Family::default(),
            guard: Counter::default(),
            scrape: std::sync::Mutex::new(()),
        };
        r.register(
            "guard_tokens",
            "Tokens a guard model read and wrote for policies and moderations (the operator's)",
            m.guard.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to the response head, by route and method",
            m.latency.clone(),
        );
        r.register(
            "requests_waiting",
            "Requests waiting for admission",
            m.waiting.clone(),
        );
        r.register(
            "sequences_running",
            "Sequences in the running batch",
            m.running.clone(),
        );
        r.register(
            "kv_blocks_used",
            "KV cache blocks in use",
            m.blocks_used.clone(),
        );
        r.register(
            "kv_blocks_free",
            "KV cache blocks free or holding only evictable cached prefixes",
            m.blocks_free.clone(),
        );
        r.register(
            "prefix_cache_hit_rate",
            "Prefix-cache block hits per lookup",
            m.hit_rate.clone(),
        );
        r.register(
            "adapters_resident",
            "LoRA adapters loaded",
            m.adapters.clone(),
        );
        r.register(
            "adapter_bytes",
            "Memory held by loaded LoRA adapters",
            m.adapter_bytes.clone(),
        );
        r.register(
            "generation_tokens_per_second",
            "Generated tokens per second of forward time",
            m.tokens_per_second.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time to first token of recent requests",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between tokens of recent requests",
            m.itl.clone(),
        );
        r.register("generated_tokens", "Tokens generated", m.generated.clone());
        r.register(
            "prompt_tokens",
            "Prompt tokens admitted",
            m.prompt_tokens.clone(),
        );
        r.register(
            "cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            m.cached_tokens.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for lack of KV blocks",
            m.preemptions.clone(),
        );
        r.register("engine_steps", "Forward steps run", m.steps.clone());
        r.register(
            "billed_prompt_tokens",
            "Prompt tokens in usage records",
            m.billed_prompt.clone(),
        );
        r.register(
            "billed_cached_tokens",
            "Cached prompt tokens in usage records",
            m.billed_cached.clone(),
        );
        r.register(
            "billed_completion_tokens",
            "Completion tokens in usage records",
            m.billed_completion.clone(),
        );
        r.register(
            "usage_records",
            "Usage records written, by HTTP status",
            m.records.clone(),
        );
        ServerMetrics { registry: r, ..m }
    }

    /// Counts tokens a guard model read and wrote.
    pub fn guard_tokens(&self, n: usize) {
        self.guard.inc_by(n as u64);
    }

    /// A function counting each usage record into the billed-token counters.
    pub fn billing(&self) -> impl Fn(&fount_store::UsageRecord) + Send + Sync + 'static {
        let (p, c, g, r) = (
            self.billed_prompt.clone(),
            self.billed_cached.clone(),
            self.billed_completion.clone(),
            self.records.clone(),
        );
        move |u| {
            let n = |v: i64| u64::try_from(v).unwrap_or(0);
            p.inc_by(n(u.prompt_tokens));
            c.inc_by(n(u.cached_tokens));
            g.inc_by(n(u.completion_tokens));
            r.get_or_create(&StatusLabel { status: u.status }).inc();
        }
    }

    /// Counts one finished HTTP exchange.
    pub fn record(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method: method.into(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.into(),
                method: method.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition, with the engine's figures as of now.
    pub fn render(&self, e: &MetricsSnapshot) -> String {
        let _one_at_a_time = self.scrape.lock();
        let int = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.waiting.set(int(e.waiting));
        self.running.set(int(e.running));
        self.blocks_used.set(int(e.blocks_used));
        self.blocks_free.set(int(e.blocks_free));
        self.hit_rate.set(e.prefix_hit_rate);
        self.adapters.set(int(e.adapters_resident));
        self.adapter_bytes.set(int(e.adapter_bytes));
        self.tokens_per_second.set(e.tokens_per_second);
        for (family, p50, p99) in [
            (&self.ttft, e.ttft_p50, e.ttft_p99),
            (&self.itl, e.itl_p50, e.itl_p99),
        ] {
            family
                .get_or_create(&Quantile { quantile: "0.5" })
                .set(p50.as_secs_f64());
            family
                .get_or_create(&Quantile { quantile: "0.99" })
                .set(p99.as_secs_f64());
        }
        // the engine keeps running totals; the counters catch up to them
        for (counter, total) in [
            (&self.generated, e.generated_tokens),
            (&self.prompt_tokens, e.prompt_tokens),
            (&self.cached_tokens, e.cached_prompt_tokens),
            (&self.preemptions, e.preemptions),
            (&self.steps, e.steps),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
