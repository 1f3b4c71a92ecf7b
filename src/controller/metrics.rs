//! Prometheus metrics (prometheus-client, OpenMetrics text on `/metrics`). Labels are bounded:
//! kinds, categories, stages, endpoints with ids replaced, and one series per image for the
//! per-image gauges (`namespace/name`, as many as there are GoldenImages).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub endpoint: String,
    pub status: String,
}

/// Proxmox requests of the whole process: the client reports through a plain function hook, so
/// the family is process-wide and registered into every registry.
static PROXMOX_REQUESTS: LazyLock<Family<RequestLabels, Counter>> = LazyLock::new(Family::default);

fn observe_proxmox_request(method: &str, path: &str, status: u16) {
    PROXMOX_REQUESTS
        .get_or_create(&RequestLabels {
            method: method.to_string(),
            endpoint: endpoint_label(path),
            status: status.to_string(),
        })
        .inc();
}

/// `nodes/pve1/qemu/100/config` -> `nodes/{node}/qemu/{vmid}/config`: ids out, so the label
/// set stays small however many VMs there are.
pub fn endpoint_label(path: &str) -> String {
    let mut out = Vec::new();
    let mut prev = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let label = match prev {
            "nodes" => "{node}",
            "storage" if !out.is_empty() => "{storage}",
            "tasks" => "{upid}",
            "content" => "{volume}",
            _ if seg.chars().all(|c| c.is_ascii_digit()) => "{vmid}",
            _ => seg,
        };
        out.push(label.to_string());
        prev = seg;
    }
    format!("/{}", out.join("/"))
}

/// Every metric of the controller.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub build_stage_duration: Family<StageLabels, Histogram>,
    pub validation_check_duration: Family<StageLabels, Histogram>,
    pub builds_running: Gauge,
    pub templates: Family<ImageLabels, Gauge>,
    pub latest_age_seconds: Family<ImageLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        crate::proxmox::client::set_request_observer(observe_proxmox_request);
        let mut registry = Registry::with_prefix("sombrero");
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind and error category",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile, by kind",
            reconcile_duration.clone(),
        );
        let build_stage_duration = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 14))
        });
        registry.register(
            "build_stage_duration_seconds",
            "Duration of build stages",
            build_stage_duration.clone(),
        );
        let validation_check_duration =
            Family::<StageLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.5, 2.0, 14))
            });
        registry.register(
            "validation_check_duration_seconds",
            "Duration of validation checks",
            validation_check_duration.clone(),
        );
        let builds_running = Gauge::default();
        registry.register(
            "builds_running",
            "Builds (and validations) running in the background",
            builds_running.clone(),
        );
        let templates = Family::<ImageLabels, Gauge>::default();
        registry.register(
            "templates",
            "Templates of each GoldenImage on Proxmox",
            templates.clone(),
        );
        let latest_age_seconds = Family::<ImageLabels, Gauge>::default();
        registry.register(
            "latest_template_age_seconds",
            "Age of each GoldenImage's latest validated template",
            latest_age_seconds.clone(),
        );
        registry.register(
            "proxmox_requests",
            "HTTP requests to Proxmox VE, by method, endpoint and status (0: no response)",
            PROXMOX_REQUESTS.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            build_stage_duration,
            validation_check_duration,
            builds_running,
            templates,
            latest_age_seconds,
        }
    }

    /// Counts a reconcile and measures it until the guard drops.
    pub fn reconcile_started(self: &Arc<Self>, kind: &str) -> ReconcileTimer {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self.clone(),
            labels,
            start: Instant::now(),
        }
    }

    /// Drops a deleted GoldenImage's per-image series, so `/metrics` stops reporting it.
    pub fn forget_image(&self, namespace: &str, name: &str) {
        let image = ImageLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.templates.remove(&image);
        self.latest_age_seconds.remove(&image);
    }

    pub fn reconcile_failed(&self, kind: &str, category: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
                category: category.to_string(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Observes the reconcile duration on drop.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    labels: KindLabels,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_lose_their_ids() {
        assert_eq!(
            endpoint_label("nodes/pve1/qemu/100/config"),
            "/nodes/{node}/qemu/{vmid}/config"
        );
        assert_eq!(endpoint_label("cluster/resources"), "/cluster/resources");
        assert_eq!(
            endpoint_label("nodes/pve1/tasks/UPID:pve1:1:2:3:qmstart:100:a@pam!t:/status"),
            "/nodes/{node}/tasks/{upid}/status"
        );
        assert_eq!(
            endpoint_label("nodes/pve1/storage/local/content"),
            "/nodes/{node}/storage/{storage}/content"
        );
    }

    #[test]
    fn a_deleted_image_leaves_no_series_behind() {
        let m = Metrics::new();
        let image = ImageLabels {
            namespace: "ns".into(),
            name: "gone".into(),
        };
        m.templates.get_or_create(&image).set(3);
        m.latest_age_seconds.get_or_create(&image).set(60);
        assert!(m.encode().contains("name=\"gone\""));
        m.forget_image("ns", "gone");
        assert!(!m.encode().contains("name=\"gone\""), "{}", m.encode());
    }

    #[test]
    fn encodes_counters_and_errors() {
        let m = Arc::new(Metrics::new());
        drop(m.reconcile_started("GoldenImage"));
        m.reconcile_failed("GoldenImage", "proxmox_transient");
        let text = m.encode();
        assert!(
            text.contains("sombrero_reconciles_total{kind=\"GoldenImage\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sombrero_reconcile_errors_total{kind=\"GoldenImage\",category=\"proxmox_transient\"} 1"),
            "{text}"
        );
    }
}
