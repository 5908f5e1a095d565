//! `/metrics`: Prometheus (OpenMetrics) text, by prometheus-client. Names
//! carry their unit (`_seconds`, `_bytes`, `_total`); labels are bounded —
//! route (a config section), transport, result, step — never a file or host
//! name.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::Queue;
use crate::event::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Delivery {
    route: String,
    transport: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Bytes {
    route: String,
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Fallback {
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Step {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

/// The daemon's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<Delivery, Counter>,
    bytes: Family<Bytes, Counter>,
    fallbacks: Family<Fallback, Counter>,
    retries: Counter,
    steps: Family<Step, Histogram>,
    queue_pending: Gauge,
    queue_waiting: Gauge,
    retries_waiting: Gauge,
    parked: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    sse_clients: Gauge,
}

fn step_histogram() -> Histogram {
    // 10 ms … ~5.8 min
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("dispatch"),
            deliveries: Family::default(),
            bytes: Family::default(),
            fallbacks: Family::default(),
            retries: Counter::default(),
            steps: Family::new_with_constructor(step_histogram),
            queue_pending: Gauge::default(),
            queue_waiting: Gauge::default(),
            retries_waiting: Gauge::default(),
            parked: Gauge::default(),
            last_success: Gauge::default(),
            sse_clients: Gauge::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "deliveries",
            "File x host deliveries that ended, by route, transport and result",
            self.deliveries.clone(),
        );
        r.register_with_unit(
            "uploaded",
            "Bytes put in place on hosts",
            Unit::Bytes,
            self.bytes.clone(),
        );
        r.register(
            "fallbacks",
            "Transports that could not be used on a host, and what was tried instead",
            self.fallbacks.clone(),
        );
        r.register(
            "retries",
            "Upload attempts that failed transiently and were retried",
            self.retries.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "How long steps took: upload (first attempt to verified in place), install, delivery (queued to finished)",
            Unit::Seconds,
            self.steps.clone(),
        );
        r.register(
            "queue_packages",
            "Packages being worked on (in flight, waiting for a retry, or parked)",
            self.queue_pending.clone(),
        );
        r.register(
            "queue_waiting_files",
            "Complete files waiting for a free slot",
            self.queue_waiting.clone(),
        );
        r.register(
            "retries_waiting",
            "File x host retries waiting for their time",
            self.retries_waiting.clone(),
        );
        r.register(
            "parked",
            "File x host failures given up on until SIGHUP or restart",
            self.parked.clone(),
        );
        r.register_with_unit(
            "last_success_timestamp",
            "When a delivery last succeeded (Unix time)",
            Unit::Seconds,
            self.last_success.clone(),
        );
        r.register(
            "status_clients",
            "Clients following /api/v1/events",
            self.sse_clients.clone(),
        );
        r.register(
            "build",
            "The running dispatch",
            Info::new(Build {
                version: env!("CARGO_PKG_VERSION").into(),
            }),
        );
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        match prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            Ok(()) => s,
            Err(_) => "# EOF\n".into(),
        }
    }

    pub fn delivery(&self, o: &Outcome) {
        let transport = o.transport.clone().unwrap_or_else(|| "none".into());
        let result = match o.state.as_str() {
            "installed" | "uploaded" | "failed" | "dry-run" => o.state.clone(),
            _ => "other".into(),
        };
        self.deliveries
            .get_or_create(&Delivery {
                route: o.section.clone(),
                transport: transport.clone(),
                result,
            })
            .inc();
        if o.ok && o.bytes > 0 && o.state != "dry-run" {
            self.bytes
                .get_or_create(&Bytes {
                    route: o.section.clone(),
                    transport,
                })
                .inc_by(o.bytes);
        }
        if o.ok {
            let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
            self.last_success.set(now);
        }
    }

    pub fn fallback(&self, from: &str, to: &str) {
        self.fallbacks
            .get_or_create(&Fallback {
                from: from.into(),
                to: to.into(),
            })
            .inc();
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    pub fn step(&self, step: &str, took: Duration) {
        self.steps
            .get_or_create(&Step { step: step.into() })
            .observe(took.as_secs_f64());
    }

    pub fn queue(&self, q: Queue) {
        self.queue_pending.set(q.pending as i64);
        self.queue_waiting.set(q.waiting as i64);
        self.retries_waiting.set(q.retries as i64);
    }

    pub fn parked(&self, n: usize) {
        self.parked.set(n as i64);
    }

    pub fn sse_clients(&self, delta: i64) {
        self.sse_clients.inc_by(delta);
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
