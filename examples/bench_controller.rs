//! Steady-state cost of `sombrero controller` (run by `make bench-controller` through
//! `scripts/bench-controller.sh`; not a test: it measures and prints, it asserts nothing about
//! time).
//!
//! `cargo run --example bench_controller -- <GoldenImages> [window seconds, default 65: two
//! requeue rounds] [other VMs in the cluster, default 0]`:
//! 1. a real kube-apiserver (tests/support/kube.rs) and the fake Proxmox (time scale 0);
//! 2. N GoldenImages, and for each its latest template already on Proxmox (`add_vm` with our
//!    marker, the image's spec hash and tags, validated and carrying the channel tag), so no
//!    build is due;
//! 3. the controller as its own process (`$SOMBRERO_BIN controller`, which the script sets to the
//!    release build, else `target/debug/sombrero`; resync 5 s, requeue 30 s) until every image is
//!    Ready (seen through a watch of the images, so that measuring does not load the API server),
//!    with the times of the first and the 500th;
//! 4. a measuring window: Proxmox requests from the fake's request log, by endpoint, per
//!    resync interval; the reconcile latency from the controller's
//!    `sombrero_reconcile_duration_seconds` histogram (window only); the controller's RSS;
//! 5. one image's template deleted through the API (as in the PVE UI): the time until the
//!    image's status no longer lists it (resync 5 s, requeue 30 s).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::controller;
use sombrero::image::marker::{
    BUILDER, MARKER_SCHEMA_VERSION, Marker, Owner, Role, SourceInfo, TemplateMetadata,
    ValidationRecord, render_description,
};
use sombrero::image::tags::{LATEST_TAG, base_tags};
use support::fakepve::{FakePve, Image};
use support::kube::control_plane;

const RESYNC: Duration = Duration::from_secs(5);
const REQUEUE: Duration = Duration::from_secs(30);

/// A memory field of a process's `/proc/<pid>/status` (`VmRSS`, `VmHWM`: peak, `RssAnon`,
/// `RssFile`), KiB.
fn mem_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| {
                v.trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// `le` -> cumulative count, plus sum and count, of the GoldenImage reconcile histogram.
#[derive(Default, Clone)]
struct Hist {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn parse_hist(text: &str) -> Hist {
    let mut h = Hist::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("sombrero_reconcile_duration_seconds_") else {
            continue;
        };
        if !rest.contains("kind=\"GoldenImage\"") {
            continue;
        }
        let value: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if rest.starts_with("bucket") {
            let le = rest
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(|s| {
                    if s == "+Inf" {
                        f64::INFINITY
                    } else {
                        s.parse().unwrap_or(f64::INFINITY)
                    }
                })
                .unwrap_or(f64::INFINITY);
            h.buckets.push((le, value));
        } else if rest.starts_with("sum") {
            h.sum = value;
        } else if rest.starts_with("count") {
            h.count = value;
        }
    }
    h
}

/// Upper bucket bound holding quantile `q` of the window's observations.
fn quantile(before: &Hist, after: &Hist, q: f64) -> f64 {
    let total = after.count - before.count;
    for (i, (le, c)) in after.buckets.iter().enumerate() {
        let prev = before.buckets.get(i).map(|b| b.1).unwrap_or(0.0);
        if total > 0.0 && (c - prev) >= q * total {
            return *le;
        }
    }
    f64::INFINITY
}

async fn scrape(addr: &str) -> Hist {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("metrics text");
    parse_hist(&text)
}

async fn put_secret(client: &Client, ns: &str, pve: &FakePve) {
    let mut data = BTreeMap::new();
    data.insert("url".to_string(), pve.url.clone());
    data.insert("tokenId".to_string(), pve.token_id.clone());
    data.insert("tokenSecret".to_string(), pve.token_secret.clone());
    data.insert("caCert".to_string(), pve.ca_pem.clone());
    let mut v = serde_json::to_value(Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("pve".into()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    })
    .unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            "pve",
            &PatchParams::apply("sombrero-bench").force(),
            &Patch::Apply(v),
        )
        .await
        .expect("apply Secret");
}

/// The template a finished build would have left: our marker for its VMID, validated, latest.
fn template_for(gi: &GoldenImage, vmid: u32, node: &str) -> serde_json::Value {
    let now = Utc::now();
    let today = now.date_naive();
    let name = format!(
        "{}-{}-{}-001",
        gi.spec.os,
        gi.spec.type_,
        today.format("%Y%m%d")
    );
    let ns = gi.namespace().unwrap();
    let marker = Marker {
        schema: MARKER_SCHEMA_VERSION,
        owner: Owner {
            namespace: ns.clone(),
            name: gi.name_any(),
            uid: gi.uid().unwrap(),
        },
        build_id: format!("b-bench-{vmid}"),
        role: Role::Template,
        vmid,
        metadata: TemplateMetadata {
            name: name.clone(),
            os: gi.spec.os.clone(),
            image_type: gi.spec.type_.clone(),
            builder: BUILDER.into(),
            builder_version: env!("CARGO_PKG_VERSION").into(),
            build_date: today,
            build_number: 1,
            source: gi
                .spec
                .source
                .cloud_image
                .as_ref()
                .map(|c| SourceInfo::CloudImage {
                    url: c.url.clone(),
                    checksum: c.checksum.clone(),
                }),
            spec_hash: controller::reconcile::current_spec_hash(gi).unwrap(),
            package_manifest_digest: None,
            validation: ValidationRecord::Passed { at: now },
            created_at: Some(now),
        },
        build: None,
    };
    let mut tags = base_tags(&ns, &gi.name_any(), &gi.spec.os, &gi.spec.type_).unwrap();
    tags.mark_validated();
    tags.insert(LATEST_TAG);
    json!({
        "vmid": vmid, "name": name, "node": node, "status": "stopped", "template": true,
        "config": {
            "tags": tags.to_config_string(),
            "description": render_description("", &marker).unwrap(),
        },
    })
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let window = Duration::from_secs(args.next().and_then(|a| a.parse().ok()).unwrap_or(65));
    let others: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);

    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "bench").await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, &pve).await;
    let img = pve.add_image(Image::new("bench.qcow2").agent()).await;
    let checksum = format!("sha256:{}", img.checksums["sha256"]);

    // N GoldenImages, then their templates.
    let t = Instant::now();
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), &ns);
    let gis: Vec<GoldenImage> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let gi: GoldenImage = serde_json::from_value(json!({
                "apiVersion": "images.sombrero.dev/v1alpha1",
                "kind": "GoldenImage",
                "metadata": {"name": format!("img-{i:04}")},
                "spec": {
                    "proxmox": {"secretRef": {"name": "pve"}},
                    "os": "ubuntu-24.04",
                    "type": "minimal",
                    "source": {"cloudImage": {"url": img.url, "checksum": checksum}},
                    "placement": {"node": pve.node},
                    "provisioning": {"via": "guestAgent"},
                    "output": {"configMapName": format!("img-{i:04}-template")},
                }
            }))
            .unwrap();
            async move {
                api.create(&PostParams::default(), &gi)
                    .await
                    .expect("create GoldenImage")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let pve = Arc::new(pve);
    futures::stream::iter(gis.iter().enumerate())
        .map(|(i, gi)| {
            let pve = pve.clone();
            let spec = template_for(gi, 10_000 + i as u32, &pve.node);
            async move {
                pve.add_vm(spec).await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    // VMs that are not ours (a consumer's cluster): listed every resync, never read.
    futures::stream::iter(0..others)
        .map(|i| {
            let pve = pve.clone();
            let node = pve.node.clone();
            async move {
                pve.add_vm(
                    json!({"vmid": 100_000 + i as u32, "name": format!("vm-{i}"),
                                  "node": node, "status": "running"}),
                )
                .await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    eprintln!(
        "prepared {n} GoldenImages and their templates, and {others} other VMs, in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // The controller: the real binary ($SOMBRERO_BIN, else `target/debug/sombrero`), so its RSS is
    // its own.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let bin = std::env::var("SOMBRERO_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| support::kube::repo_root().join("target/debug/sombrero"));
    // The images' statuses from a watch (a local store), not from listing all N objects every
    // half second: such lists would cost the API server more than the controller's writes.
    let (images, writer) = kube::runtime::reflector::store::<GoldenImage>();
    let watch = tokio::spawn(
        kube::runtime::watcher(api.clone(), kube::runtime::watcher::Config::default())
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
    );
    images.wait_until_ready().await.expect("the bench's watch");
    let seq_start = pve.requests().await.last().map(|r| r.seq).unwrap_or(0);
    let mut ctl = tokio::process::Command::new(&bin)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env_remove("RUST_LOG")
        .args([
            "controller",
            "--leader-election",
            "false",
            "--log-level",
            "warn",
        ])
        .args(["--metrics-addr", &metrics_addr, "--namespace", &ns])
        .args(["--controller-namespace", &ns, "--identity", "bench"])
        .args(["--resync-seconds", &RESYNC.as_secs().to_string()])
        .args(["--requeue-seconds", &REQUEUE.as_secs().to_string()])
        // BENCH_CONCURRENCY=n: `--concurrency n` (else the controller's default).
        .args(
            std::env::var("BENCH_CONCURRENCY")
                .ok()
                .map(|c| vec!["--concurrency".to_string(), c])
                .unwrap_or_default(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; run `cargo build --bin sombrero`",
                bin.display()
            )
        });
    let pid = ctl.id().expect("controller pid");

    // Until every image is Ready with its prepared template (no build was due). When the first
    // one is Ready the shared inventory's first snapshot (its config reads) is done; the rest
    // is the reconciles' own work (finalizer, status, ConfigMap writes).
    let t = Instant::now();
    let mut first_ready: Option<(Duration, usize)> = None;
    let mut half_ready: Option<Duration> = None;
    loop {
        let list = images.state();
        let ready = list
            .iter()
            .filter(|gi| {
                gi.status.as_ref().is_some_and(|s| {
                    s.latest.as_ref().is_some_and(|l| l.vmid >= 10_000) && s.build.is_none()
                })
            })
            .count();
        if ready > 0 && first_ready.is_none() {
            let configs = pve
                .requests_since(seq_start)
                .await
                .iter()
                .filter(|r| r.path.ends_with("/config"))
                .count();
            first_ready = Some((t.elapsed(), configs));
        }
        if ready * 2 >= n && half_ready.is_none() {
            half_ready = Some(t.elapsed());
        }
        if ready == n {
            break;
        }
        if t.elapsed() > Duration::from_secs(60 + n as u64) {
            let building = list
                .iter()
                .filter(|gi| gi.status.as_ref().is_some_and(|s| s.build.is_some()))
                .count();
            panic!(
                "only {ready}/{n} Ready after {:?} ({building} building)",
                t.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch.abort();
    let rss_ready = mem_kib(pid, "VmRSS");
    let first_round = pve.requests_since(seq_start).await;
    let cold = t.elapsed();
    println!(
        "cold start: all {n} Ready {:.1} s after the controller started; first round: {} Proxmox requests",
        cold.as_secs_f64(),
        first_round.len()
    );
    if let (Some((first, configs)), Some(half)) = (first_ready, half_ready) {
        println!(
            "cold start: first Ready after {:.1} s ({configs} config reads done by then), half after {:.1} s",
            first.as_secs_f64(),
            half.as_secs_f64()
        );
    }

    // The window: steady state.
    let seq0 = pve.requests().await.last().map(|r| r.seq).unwrap_or(0);
    let h0 = scrape(&metrics_addr).await;
    tokio::time::sleep(window).await;
    let reqs = pve.requests_since(seq0).await;
    let h1 = scrape(&metrics_addr).await;
    let rss_after = mem_kib(pid, "VmRSS");
    let peak = mem_kib(pid, "VmHWM");
    // Anonymous pages (heap, stacks) apart from file pages (the binary's code and data as mapped):
    // a debug build's code alone is tens of MiB more than a release build's.
    let (anon, file) = (mem_kib(pid, "RssAnon"), mem_kib(pid, "RssFile"));

    let mut by_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reqs {
        let endpoint = controller::metrics::endpoint_label(&r.path.replace("/api2/json", ""));
        *by_endpoint
            .entry(format!("{} {endpoint}", r.method))
            .or_default() += 1;
    }
    let mut cold: BTreeMap<String, usize> = BTreeMap::new();
    for r in &first_round {
        let endpoint = controller::metrics::endpoint_label(&r.path.replace("/api2/json", ""));
        *cold.entry(format!("{} {endpoint}", r.method)).or_default() += 1;
    }
    let resyncs = window.as_secs_f64() / RESYNC.as_secs_f64();
    let reconciles = h1.count - h0.count;
    println!("GoldenImages: {n}, other VMs in the cluster: {others}");
    println!(
        "first round (cold cache) Proxmox requests: {} {cold:?}",
        first_round.len()
    );
    println!(
        "steady state: {} Proxmox requests in {:.0}s = {:.2} per resync ({:.0} s); by endpoint: {by_endpoint:?}",
        reqs.len(),
        window.as_secs_f64(),
        reqs.len() as f64 / resyncs,
        RESYNC.as_secs_f64(),
    );
    let rounds = window.as_secs_f64() / REQUEUE.as_secs_f64();
    println!(
        "per reconcile round (every image reconciled once, every {:.0} s): {:.2} Proxmox requests",
        REQUEUE.as_secs_f64(),
        reqs.len() as f64 / rounds,
    );
    println!(
        "reconciles in the window: {reconciles:.0} (requeue {:.0} s); latency mean {:.1} ms, p50 <= {:.1} ms, p99 <= {:.1} ms",
        REQUEUE.as_secs_f64(),
        if reconciles > 0.0 {
            (h1.sum - h0.sum) / reconciles * 1000.0
        } else {
            0.0
        },
        quantile(&h0, &h1, 0.5) * 1000.0,
        quantile(&h0, &h1, 0.99) * 1000.0,
    );
    println!(
        "controller RSS: {:.1} MiB when all were Ready, {:.1} MiB at steady state ({:.1} MiB anonymous, {:.1} MiB file-backed), peak {:.1} MiB",
        rss_ready as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    if let Ok(Some(status)) = ctl.try_wait() {
        panic!("the controller exited during the window: {status}");
    }

    // A template deleted in the PVE UI: how long until its image's status no longer lists it.
    let victim = gis[n / 2].name_any();
    let vmid = 10_000 + (n / 2) as u32;
    let t = Instant::now();
    let rsp = pve
        .api_client()
        .delete(pve.api_url(&format!("/nodes/{}/qemu/{vmid}", pve.node)))
        .header("Authorization", pve.auth_header())
        .send()
        .await
        .expect("delete the template");
    assert!(rsp.status().is_success(), "delete: {}", rsp.status());
    let shown = loop {
        let gi = api.get(&victim).await.expect("get the image");
        let listed = gi
            .status
            .as_ref()
            .is_some_and(|s| s.versions.iter().any(|v| v.vmid == vmid));
        if !listed {
            break Some(t.elapsed());
        }
        if t.elapsed() > REQUEUE * 3 {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match shown {
        Some(d) => println!(
            "template deleted in Proxmox shows in the image's status after {:.1} s (resync {} s, requeue {} s)",
            d.as_secs_f64(),
            RESYNC.as_secs(),
            REQUEUE.as_secs()
        ),
        None => println!(
            "template deleted in Proxmox still listed in the image's status after {} s",
            (REQUEUE * 3).as_secs()
        ),
    }
    let _ = ctl.kill().await;
}
