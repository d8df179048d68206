//! The daemon's Prometheus metrics (`GET /metrics`), rendered with `prometheus-client`.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::{Pool, Tier};

/// Labels of per-template, per-tier series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    template: String,
    tier: String,
}

/// Labels of per-tier series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pool_vms: Family<PoolLabels, Gauge>,
    acquires: Family<TierLabels, Counter>,
    acquire_seconds: Histogram,
    refill_failures: Counter,
    vm_deaths: Counter,
    build_seconds: Histogram,
    live: Gauge,
    seen: Mutex<[u64; 2]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let pool_vms = Family::<PoolLabels, Gauge>::default();
        let acquires = Family::<TierLabels, Counter>::default();
        let acquire_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let refill_failures = Counter::default();
        let vm_deaths = Counter::default();
        let build_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        let live = Gauge::default();
        registry.register(
            "runv_pool_vms",
            "Ready VMs in each template's pool, by tier (warm, shell)",
            pool_vms.clone(),
        );
        registry.register(
            "runv_acquires",
            "Sandboxes acquired, by the tier that served them (warm, shell, cold)",
            acquires.clone(),
        );
        registry.register(
            "runv_acquire_seconds",
            "Acquire latency: request to the clone running",
            acquire_seconds.clone(),
        );
        registry.register(
            "runv_refill_failures",
            "Pooled VMs that failed to start",
            refill_failures.clone(),
        );
        registry.register(
            "runv_vm_deaths",
            "VMMs found dead by the monitor (pooled and leased)",
            vm_deaths.clone(),
        );
        registry.register(
            "runv_template_build_seconds",
            "Template builds: boot to published snapshot",
            build_seconds.clone(),
        );
        registry.register("runv_sandboxes_live", "Leased sandboxes", live.clone());
        for t in Tier::ALL {
            let _ = acquires.get_or_create(&TierLabels {
                tier: t.as_str().into(),
            });
        }
        Self {
            registry,
            pool_vms,
            acquires,
            acquire_seconds,
            refill_failures,
            vm_deaths,
            build_seconds,
            live,
            seen: Mutex::new([0; 2]),
        }
    }

    /// Records one acquire.
    pub fn acquired(&self, tier: Tier, ms: f64) {
        self.acquires
            .get_or_create(&TierLabels {
                tier: tier.as_str().into(),
            })
            .inc();
        self.acquire_seconds.observe(ms / 1e3);
    }

    /// Records one template build.
    pub fn built(&self, seconds: f64) {
        self.build_seconds.observe(seconds);
    }

    /// Refreshes the gauges from `pool` and renders the text format.
    pub fn render(&self, pool: &Pool) -> String {
        self.pool_vms.clear();
        for p in pool.pools() {
            for (tier, n) in [("warm", p.warm), ("shell", p.shells)] {
                self.pool_vms
                    .get_or_create(&PoolLabels {
                        template: p.template.clone(),
                        tier: tier.into(),
                    })
                    .set(n as i64);
            }
        }
        self.live.set(pool.sandboxes().len() as i64);
        let c = pool.counters();
        let now = [
            c.refill_failures.load(Ordering::Relaxed),
            c.vm_deaths.load(Ordering::Relaxed),
        ];
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            self.refill_failures.inc_by(now[0].saturating_sub(seen[0]));
            self.vm_deaths.inc_by(now[1].saturating_sub(seen[1]));
            *seen = now;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
