//! Events (`events.k8s.io/v1`) about our objects, named so the API server always accepts them.
//!
//! kube's `Recorder` names an Event `<object name>.<nanoseconds in hex>`: for an object whose
//! name is longer than ~236 characters that exceeds the 253 an object name may have, and every
//! Event about the object is refused. This recorder takes the same [`Event`] and shortens the
//! object's part of the name when needed. Like kube's, it folds a repeat (same type, reason,
//! action, reporter and objects) within six minutes into a series on the first Event.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType, Reporter};

use crate::api::time::{from_micro_time, to_micro_time};

/// How long a published Event is kept to fold repeats into.
const SERIES_WINDOW: TimeDelta = TimeDelta::minutes(6);

/// Longest object name (DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// `<object>.<nanos hex>`, the object's part cut (at a letter or digit, so the name stays a
/// DNS subdomain) when the whole would be longer than [`MAX_NAME_LEN`].
pub fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", nanos.max(0));
    let room = MAX_NAME_LEN.saturating_sub(suffix.len());
    let mut head: &str = object;
    if head.len() > room {
        // Object names are ASCII; `get` keeps this safe for anything else.
        head = head.get(..room).unwrap_or("event");
        head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    }
    if head.is_empty() {
        head = "event";
    }
    format!("{head}{suffix}")
}

/// What makes two Events the same occurrence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    type_: &'static str,
    action: String,
    reason: String,
    regarding: [Option<String>; 5],
    related: Option<[Option<String>; 2]>,
}

fn type_str(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

fn key(ev: &Event, regarding: &ObjectReference) -> Key {
    Key {
        type_: type_str(ev.type_),
        action: ev.action.clone(),
        reason: ev.reason.clone(),
        regarding: [
            regarding.api_version.clone(),
            regarding.kind.clone(),
            regarding.namespace.clone(),
            regarding.name.clone(),
            regarding.uid.clone(),
        ],
        related: ev
            .secondary
            .as_ref()
            .map(|r| [r.kind.clone(), r.name.clone()]),
    }
}

pub struct Recorder {
    client: kube::Client,
    reporter: Reporter,
    published: Mutex<HashMap<Key, K8sEvent>>,
}

impl Recorder {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            published: Mutex::new(HashMap::new()),
        }
    }

    fn published(&self) -> std::sync::MutexGuard<'_, HashMap<Key, K8sEvent>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: DateTime<Utc>) -> K8sEvent {
        let object = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(event_name(
                    object,
                    i128::from(now.timestamp_nanos_opt().unwrap_or_default()),
                )),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            type_: Some(type_str(ev.type_).to_string()),
            event_time: Some(to_micro_time(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Default::default()
        }
    }

    /// Publishes `ev` about `regarding` (a new Event, or the next count of its series).
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Utc::now();
        let key = key(ev, regarding);
        let repeat = {
            let mut published = self.published();
            published.retain(|_, e| {
                let last = e
                    .series
                    .as_ref()
                    .map(|s| from_micro_time(&s.last_observed_time))
                    .or(e.event_time.as_ref().map(from_micro_time));
                last.is_some_and(|t| t + SERIES_WINDOW > now)
            });
            published.get(&key).cloned()
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let event = match repeat {
            Some(mut e) => {
                e.series = Some(EventSeries {
                    count: e.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: to_micro_time(now),
                });
                let name = e.metadata.name.clone().unwrap_or_default();
                let patch = serde_json::json!({"series": e.series});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                e
            }
            None => {
                let e = self.new_event(ev, regarding, now);
                api.create(&PostParams::default(), &e).await?
            }
        };
        self.published().insert(key, event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_subdomain(s: &str) -> bool {
        s.len() <= MAX_NAME_LEN
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }

    #[test]
    fn event_names_stay_valid_for_any_object_name() {
        let nanos = 1_764_627_000_123_456_789_i128;
        // Short names as kube names them.
        assert_eq!(event_name("img", nanos), format!("img.{nanos:x}"));
        // 236 characters and more (up to the 253 an object may have) are cut.
        for len in [230, 236, 237, 240, 253] {
            let object = format!("img-{}", "x".repeat(len - 4));
            let name = event_name(&object, nanos);
            assert!(is_dns_subdomain(&name), "{len}: {name}");
            assert!(name.ends_with(&format!(".{nanos:x}")), "{name}");
            assert!(name.starts_with("img-xxx"), "{name}");
        }
        // A cut never leaves a '-' or '.' before the suffix.
        let dashes = format!("{}-{}", "a".repeat(234), "-".repeat(18));
        let name = event_name(&dashes, nanos);
        assert!(is_dns_subdomain(&name), "{name}");
        let dotted = format!("{}.b", "a".repeat(234));
        assert!(is_dns_subdomain(&event_name(&dotted, nanos)));
        assert!(is_dns_subdomain(&event_name("", nanos)));
    }

    #[test]
    fn repeats_share_a_key_other_objects_do_not() {
        let ev = |reason: &str, related: Option<&str>| Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some("n".into()),
            action: "Reconcile".into(),
            secondary: related.map(|n| ObjectReference {
                kind: Some("SombreroBuild".into()),
                name: Some(n.into()),
                ..Default::default()
            }),
        };
        let gi = ObjectReference {
            kind: Some("GoldenImage".into()),
            name: Some("img".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        };
        assert_eq!(key(&ev("A", None), &gi), key(&ev("A", None), &gi));
        assert_ne!(key(&ev("A", None), &gi), key(&ev("B", None), &gi));
        assert_ne!(
            key(&ev("A", Some("b1")), &gi),
            key(&ev("A", Some("b2")), &gi)
        );
    }
}
