//! The fake Proxmox VE harness itself (tests/fakepve, tests/support/fakepve.rs): it starts, its
//! TLS verifies against the test CA, the control API round-trips, and the guest model carries a
//! build from an imported cloud image through agent exec, template and clones.

use crate::support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::fakepve::{CommandFailure, Failure, FakePve, GuestSettings, Image, sshkeys_param};

/// A bare API caller: JSON bodies, the main token unless `limited`.
struct Api<'a> {
    pve: &'a FakePve,
    http: reqwest::Client,
    limited: bool,
}

impl<'a> Api<'a> {
    fn new(pve: &'a FakePve) -> Self {
        Api {
            pve,
            http: pve.api_client(),
            limited: false,
        }
    }

    fn limited(pve: &'a FakePve) -> Self {
        Api {
            pve,
            http: pve.api_client(),
            limited: true,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let auth = if self.limited {
            self.pve.limited_auth_header()
        } else {
            self.pve.auth_header()
        };
        let mut req = self
            .http
            .request(method, self.pve.api_url(path))
            .header("Authorization", auth);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let rsp = req.send().await.expect("request to the fake");
        let status = rsp.status();
        let text = rsp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, body) = self.call(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
        body["data"].clone()
    }

    /// Polls a task to its end; returns its exitstatus.
    async fn wait(&self, upid: &Value) -> String {
        let upid = upid.as_str().expect("a UPID");
        let path = format!("/nodes/{}/tasks/{}/status", self.pve.node, upid);
        for _ in 0..600 {
            let data = self.ok(Method::GET, &path, None).await;
            if data["status"] == "stopped" {
                return data["exitstatus"].as_str().unwrap_or_default().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("task {upid} did not end");
    }

    /// Runs a command through the guest agent; returns (exitcode, stdout, stderr).
    async fn exec(&self, vmid: u32, script: &str) -> (i64, String, String) {
        let node = &self.pve.node;
        let started = self
            .ok(
                Method::POST,
                &format!("/nodes/{node}/qemu/{vmid}/agent/exec"),
                Some(json!({"command": ["/bin/sh", "-c", script]})),
            )
            .await;
        let pid = started["pid"].as_i64().expect("pid");
        for _ in 0..600 {
            let st = self
                .ok(
                    Method::GET,
                    &format!("/nodes/{node}/qemu/{vmid}/agent/exec-status?pid={pid}"),
                    None,
                )
                .await;
            if st["exited"] == 1 {
                return (
                    st["exitcode"].as_i64().unwrap_or(-1),
                    st["out-data"].as_str().unwrap_or_default().to_string(),
                    st["err-data"].as_str().unwrap_or_default().to_string(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("exec {script:?} did not end");
    }
}

#[tokio::test]
async fn starts_with_verified_tls_tokens_and_control_round_trip() {
    let pve = FakePve::start().await;
    assert!(pve.url.starts_with("https://127."), "{}", pve.url);
    let api = Api::new(&pve);
    let version = api.ok(Method::GET, "/version", None).await;
    assert!(version["version"].is_string(), "{version}");

    // The read-only token reads, and gets PVE's 403 on a write.
    let ro = Api::limited(&pve);
    let (status, _) = ro.call(Method::GET, "/cluster/resources", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = ro
        .call(Method::POST, "/nodes/pve1/qemu", Some(json!({"vmid": 150})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Fault injection by status, then by catalogue name.
    pve.fail(Failure::status("GET", "/version", 503, "Service Unavailable").times(1))
        .await;
    assert_eq!(
        api.call(Method::GET, "/version", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        api.call(Method::GET, "/version", None).await.0,
        StatusCode::OK
    );
    let names: Vec<String> = pve
        .errors_for("POST", "/nodes/pve1/qemu/100/status/start")
        .await
        .iter()
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect();
    assert!(names.iter().any(|n| n == "already_running"), "{names:?}");

    // The request log has what was asked, never a secret.
    let requests = pve.requests().await;
    assert!(requests.iter().any(|r| r.method == "POST"
        && r.path == "/api2/json/nodes/pve1/qemu"
        && r.status == Some(403)));
    let logged = serde_json::to_string(&pve.control("/requests", None).await).unwrap();
    assert!(!logged.contains(&pve.token_secret) && !logged.contains(&pve.limited_token_secret));

    // A client that does not trust the test CA is refused.
    let stranger = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(stranger.get(pve.api_url("/version")).send().await.is_err());
}

#[tokio::test]
async fn download_checks_the_checksum_and_import_from_carries_the_image() {
    let pve = FakePve::start().await;
    let api = Api::new(&pve);
    let img = pve.add_image(Image::new("noble.qcow2")).await;
    let dl = "/nodes/pve1/storage/local/download-url";
    let params = |sum: &str| {
        json!({"content": "import", "filename": "noble.qcow2", "url": img.url,
               "checksum": sum, "checksum-algorithm": "sha256"})
    };
    let upid = api
        .ok(Method::POST, dl, Some(params(&"0".repeat(64))))
        .await;
    assert!(api.wait(&upid).await.starts_with("checksum mismatch"));
    let upid = api
        .ok(Method::POST, dl, Some(params(&img.checksums["sha256"])))
        .await;
    assert_eq!(api.wait(&upid).await, "OK");
    let content = api
        .ok(
            Method::GET,
            "/nodes/pve1/storage/local/content?content=import",
            None,
        )
        .await;
    assert_eq!(content[0]["volid"], "local:import/noble.qcow2");

    let create = json!({
        "vmid": 9000, "name": "build", "agent": "enabled=1", "boot": "order=scsi0",
        "scsi0": "local-lvm:0,import-from=local:import/noble.qcow2,discard=on",
        "net0": "virtio,bridge=vmbr0", "ipconfig0": "ip=127.0.0.50/8",
    });
    let upid = api.ok(Method::POST, "/nodes/pve1/qemu", Some(create)).await;
    assert_eq!(api.wait(&upid).await, "OK");
    let config = api
        .ok(Method::GET, "/nodes/pve1/qemu/9000/config", None)
        .await;
    let scsi0 = config["scsi0"].as_str().unwrap();
    assert!(
        scsi0.starts_with("local-lvm:vm-9000-disk-") && scsi0.contains("size=3584M"),
        "{scsi0}"
    );
    assert!(!scsi0.contains("import-from"), "{scsi0}");

    // The cloud image has no guest agent: started, it never answers.
    let upid = api
        .ok(Method::POST, "/nodes/pve1/qemu/9000/status/start", None)
        .await;
    assert_eq!(api.wait(&upid).await, "OK");
    let (status, body) = api
        .call(Method::POST, "/nodes/pve1/qemu/9000/agent/ping", None)
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["message"], "QEMU guest agent is not running\n");
    let guest = pve.guest(9000).await;
    assert!(guest.has_package("cloud-init") && !guest.has_package("qemu-guest-agent"));
    assert_eq!(guest.cloud_init_status(), "done");
    assert_eq!(guest.machine_id().len(), 32);
}

#[tokio::test]
async fn agent_exec_installs_and_template_and_clones_carry_the_contents() {
    let pve = FakePve::start().await;
    let api = Api::new(&pve);
    let img = pve
        .add_image(Image::new("agent.qcow2").agent().present())
        .await;
    let create = json!({
        "vmid": 9001, "name": "build", "agent": "1", "ipconfig0": "ip=127.0.0.51/8", "net0": "virtio,bridge=vmbr0",
        "ide2": "local-lvm:cloudinit",
        "scsi0": format!("local-lvm:0,import-from={}", img.volid.unwrap()),
    });
    assert_eq!(
        api.wait(&api.ok(Method::POST, "/nodes/pve1/qemu", Some(create)).await)
            .await,
        "OK"
    );
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9001/status/start", None)
                .await
        )
        .await,
        "OK"
    );
    api.ok(Method::POST, "/nodes/pve1/qemu/9001/agent/ping", None)
        .await;
    let ifaces = api
        .ok(
            Method::GET,
            "/nodes/pve1/qemu/9001/agent/network-get-interfaces",
            None,
        )
        .await;
    assert_eq!(
        ifaces["result"][1]["ip-addresses"][0]["ip-address"],
        "127.0.0.51"
    );

    // A fresh cloud image knows no packages until apt-get update.
    let (code, _, err) = api.exec(9001, "apt-get install -y htop").await;
    assert_eq!(
        (code, err.as_str()),
        (100, "E: Unable to locate package htop\n")
    );
    let (code, _, _) = api
        .exec(
            9001,
            "apt-get update && apt-get upgrade -y && apt-get install -y htop",
        )
        .await;
    assert_eq!(code, 0);
    let (code, out, _) = api.exec(9001, "dpkg-query -W -f='${Package}\\n'").await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l == "htop"), "{out}");
    let (code, _, err) = api.exec(9001, "frobnicate").await;
    assert_eq!(
        (code, err.as_str()),
        (127, "/bin/sh: 1: frobnicate: not found\n")
    );

    // Injected command failures, once.
    pve.set_guest(
        Some(9001),
        GuestSettings {
            failures: Some(vec![
                CommandFailure::new("^apt-get clean", 100, "E: disk full").times(1),
            ]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(api.exec(9001, "apt-get clean").await.0, 100);
    assert_eq!(
        api.exec(
            9001,
            "apt-get clean && cloud-init clean --logs --machine-id"
        )
        .await
        .0,
        0
    );
    let commands = pve.agent_commands(9001).await;
    assert!(
        commands
            .iter()
            .any(|c| c.line().contains("apt-get upgrade -y") && c.exitcode == 0)
    );

    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9001/status/shutdown", None)
                .await
        )
        .await,
        "OK"
    );
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9001/template", None)
                .await
        )
        .await,
        "OK"
    );
    let linked = json!({"newid": 9100, "name": "validate"});
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9001/clone", Some(linked))
                .await
        )
        .await,
        "OK"
    );
    let full = json!({"newid": 9101, "name": "copy", "full": 1});
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9001/clone", Some(full))
                .await
        )
        .await,
        "OK"
    );

    let clone_config = api
        .ok(Method::GET, "/nodes/pve1/qemu/9100/config", None)
        .await;
    assert_eq!(
        clone_config["ide2"],
        "local-lvm:vm-9100-cloudinit,media=cdrom"
    );
    assert!(
        clone_config["scsi0"]
            .as_str()
            .unwrap()
            .starts_with("local-lvm:"),
        "{clone_config}"
    );
    let template = pve.guest(9001).await;
    assert!(template.has_package("htop"));
    assert_eq!(template.machine_id(), "");
    assert_eq!(template.cloud_init_status(), "not-run");
    for vmid in [9100, 9101] {
        let clone = pve.guest(vmid).await;
        assert!(
            clone.has_package("htop") && clone.has_package("qemu-guest-agent"),
            "{vmid}"
        );
    }

    // The linked clone boots: cloud-init runs again and systemd writes a new machine-id.
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9100/status/start", None)
                .await
        )
        .await,
        "OK"
    );
    let (code, out, _) = api.exec(9100, "cloud-init status --wait").await;
    // `--wait` prints a dot per quarter second it waited, then a newline (none waited here).
    assert_eq!((code, out.as_str()), (0, "\nstatus: done\n"));
    assert_eq!(pve.guest(9100).await.machine_id().len(), 32);
    assert!(
        pve.guest(9101).await.machine_id().is_empty(),
        "the full clone has not booted"
    );
}

#[tokio::test]
async fn ssh_installs_the_agent_into_a_cloud_image_without_it() {
    let pve = FakePve::start().await;
    let api = Api::new(&pve);
    pve.add_image(Image::new("noble.qcow2").present()).await;
    let key = pve.ssh_keygen();
    let ip = pve.guest_ip(10);
    let create = json!({
        "vmid": 9002, "name": "build", "agent": "1", "ciuser": "ubuntu",
        "sshkeys": sshkeys_param(&[&key.public_key]), "ipconfig0": format!("ip={ip}/8"),
        "scsi0": "local-lvm:0,import-from=local:import/noble.qcow2", "net0": "virtio,bridge=vmbr0",
    });
    assert_eq!(
        api.wait(&api.ok(Method::POST, "/nodes/pve1/qemu", Some(create)).await)
            .await,
        "OK"
    );
    assert_eq!(
        api.wait(
            &api.ok(Method::POST, "/nodes/pve1/qemu/9002/status/start", None)
                .await
        )
        .await,
        "OK"
    );

    let script = "sudo apt-get update && sudo apt-get install -y qemu-guest-agent && sudo systemctl enable --now qemu-guest-agent";
    let mut result = Err(String::new());
    for _ in 0..100 {
        result = pve.ssh_run(&ip, "ubuntu", &key, script).await;
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // sshd comes up with the boot
    }
    let out = result.expect("ssh into the guest");
    assert_eq!(out.exitcode, 0, "{out:?}");
    api.ok(Method::POST, "/nodes/pve1/qemu/9002/agent/ping", None)
        .await;

    // Another user, or another key, is refused.
    assert!(pve.ssh_run(&ip, "root", &key, "true").await.is_err());
    assert!(
        pve.ssh_run(&ip, "ubuntu", &pve.ssh_keygen(), "true")
            .await
            .is_err()
    );
    let commands = pve.agent_commands(9002).await;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].via, "ssh");
}
/// One command recorded on a real Debian 12 guest (tests/transcripts/debian-12/*.json, written
/// by scripts/record-guest-transcripts.sh) and how a replay compares it.
#[derive(Debug, serde::Deserialize)]
struct Recorded {
    /// `ssh` (a line, as the build sends it), `agent` (exec of a program and its arguments, as
    /// validation sends it) or `agent-call` (another agent endpoint: `ping`, `get-osinfo`, ...).
    via: String,
    command: Value,
    #[serde(default)]
    exitcode: Option<i64>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    /// PVE's 500 message when qemu-ga refused the command ("Agent error: ...").
    #[serde(default)]
    agent_error: Option<String>,
    /// `agent-call`: the `result` PVE returns.
    #[serde(default)]
    result: Value,
    /// `exact` (after `normalise`), `exitcode`, `lines` (each regex of `lines` matches both
    /// sides' `stream`) or `json-keys` (the same keys, values free).
    compare: String,
    #[serde(default)]
    lines: Vec<String>,
    #[serde(default)]
    normalise: Vec<(String, String)>,
    #[serde(default)]
    stream: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Transcript {
    entries: Vec<Recorded>,
}

/// What the model answered to a recorded command.
#[derive(Debug, Default)]
struct Observed {
    exitcode: Option<i64>,
    stdout: String,
    stderr: String,
    agent_error: Option<String>,
    result: Value,
}

fn transcript(name: &str) -> Transcript {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/transcripts/debian-12")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (record it with scripts/record-guest-transcripts.sh)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn normalised(rules: &[(String, String)], text: &str) -> String {
    rules.iter().fold(text.to_string(), |t, (pattern, with)| {
        let re = regex::Regex::new(&format!("(?m){pattern}")).expect("a normalise regex");
        re.replace_all(&t, with.as_str()).into_owned()
    })
}

fn json_keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = match v {
        Value::Object(m) => m.keys().cloned().collect(),
        // A list of objects (interfaces): the keys any of them has.
        Value::Array(a) => a.iter().flat_map(json_keys).collect(),
        _ => Vec::new(),
    };
    keys.sort();
    keys.dedup();
    keys
}

/// `Err(why)` when the model's answer differs from the recorded one where it matters.
fn compare(rec: &Recorded, got: &Observed) -> Result<(), String> {
    let mut diffs = Vec::new();
    if rec.agent_error.is_some() != got.agent_error.is_some() {
        diffs.push(format!(
            "agent error: recorded {:?}, model {:?}",
            rec.agent_error, got.agent_error
        ));
    }
    if rec.via != "agent-call" && rec.exitcode != got.exitcode {
        diffs.push(format!(
            "exit code: recorded {:?}, model {:?} (model stderr {:?})",
            rec.exitcode, got.exitcode, got.stderr
        ));
    }
    match rec.compare.as_str() {
        "exact" => {
            for (what, r, g) in [
                ("stdout", &rec.stdout, &got.stdout),
                ("stderr", &rec.stderr, &got.stderr),
                (
                    "agent error",
                    &rec.agent_error.clone().unwrap_or_default(),
                    &got.agent_error.clone().unwrap_or_default(),
                ),
            ] {
                let (r, g) = (normalised(&rec.normalise, r), normalised(&rec.normalise, g));
                if r != g {
                    diffs.push(format!("{what}: recorded {r:?}, model {g:?}"));
                }
            }
            if rec.via == "agent-call" && rec.result != got.result {
                diffs.push(format!(
                    "result: recorded {}, model {}",
                    rec.result, got.result
                ));
            }
        }
        "exitcode" => {}
        "lines" => {
            let pick = |o_stdout: &str, o_stderr: &str| match rec.stream.as_deref() {
                Some("stderr") => o_stderr.to_string(),
                _ => o_stdout.to_string(),
            };
            let (r, g) = (
                pick(&rec.stdout, &rec.stderr),
                pick(&got.stdout, &got.stderr),
            );
            for pattern in &rec.lines {
                let re = regex::Regex::new(pattern).expect("a lines regex");
                if !re.is_match(&r) {
                    diffs.push(format!("the recording itself lacks /{pattern}/"));
                }
                if !re.is_match(&g) {
                    diffs.push(format!("model output lacks /{pattern}/: {g:?}"));
                }
            }
        }
        "json-keys" => {
            let parse = |text: &str, result: &Value| {
                if rec.via == "agent-call" {
                    result.clone()
                } else {
                    serde_json::from_str(text).unwrap_or(Value::Null)
                }
            };
            let (r, g) = (
                json_keys(&parse(&rec.stdout, &rec.result)),
                json_keys(&parse(&got.stdout, &got.result)),
            );
            if r != g {
                diffs.push(format!("JSON keys: recorded {r:?}, model {g:?}"));
            }
        }
        other => diffs.push(format!("unknown compare mode {other:?}")),
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

impl Api<'_> {
    /// An agent exec as validation sends it (program and arguments, no shell), the outcome as
    /// the model answers: an exit, or PVE's 500 with the agent's error.
    async fn exec_argv(&self, vmid: u32, argv: &[String]) -> Observed {
        let node = &self.pve.node;
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/nodes/{node}/qemu/{vmid}/agent/exec"),
                Some(json!({ "command": argv })),
            )
            .await;
        if status != StatusCode::OK {
            return Observed {
                agent_error: Some(
                    body["message"]
                        .as_str()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                ),
                ..Default::default()
            };
        }
        let pid = body["data"]["pid"].as_i64().expect("pid");
        for _ in 0..600 {
            let st = self
                .ok(
                    Method::GET,
                    &format!("/nodes/{node}/qemu/{vmid}/agent/exec-status?pid={pid}"),
                    None,
                )
                .await;
            if st["exited"] == 1 {
                return Observed {
                    exitcode: st["exitcode"].as_i64(),
                    stdout: st["out-data"].as_str().unwrap_or_default().to_string(),
                    stderr: st["err-data"].as_str().unwrap_or_default().to_string(),
                    ..Default::default()
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("exec {argv:?} did not end");
    }
}

/// Replays every command recorded on the real Debian 12 guest against the guest model (the
/// `debian-12` profile) in the same order and state (a build over SSH, then a linked clone of
/// the template through the agent) and compares the answers. A model change that drifts from
/// the real guest fails here; re-record with scripts/record-guest-transcripts.sh when the build
/// or validation sends other commands.
#[tokio::test]
async fn the_model_answers_as_the_recorded_debian_12_guest() {
    let build = transcript("build.json");
    let clone = transcript("clone.json");
    let pve = FakePve::start().await;
    let api = Api::new(&pve);
    pve.add_image(
        Image::new("debian-12-genericcloud-amd64.qcow2")
            .contents(json!({"profile": "debian-12"}))
            .present(),
    )
    .await;
    let key = pve.ssh_keygen();
    let ip = pve.guest_ip(60);
    let create = json!({
        "vmid": 9060, "name": "build", "agent": "enabled=1", "ciuser": "sombrero",
        "sshkeys": sshkeys_param(&[&key.public_key]), "ipconfig0": format!("ip={ip}/8"),
        "ide2": "local-lvm:cloudinit", "net0": "virtio,bridge=vmbr0",
        "scsi0": "local-lvm:0,import-from=local:import/debian-12-genericcloud-amd64.qcow2",
    });
    assert_eq!(
        api.wait(&api.ok(Method::POST, "/nodes/pve1/qemu", Some(create)).await)
            .await,
        "OK"
    );
    let start = |vmid: u32| {
        let api = &api;
        async move {
            let path = format!("/nodes/pve1/qemu/{vmid}/status/start");
            assert_eq!(
                api.wait(&api.ok(Method::POST, &path, None).await).await,
                "OK"
            );
        }
    };
    start(9060).await;
    for _ in 0..200 {
        if pve.ssh_run(&ip, "sombrero", &key, "true").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One connection for the whole recipe, as the build (and the recorder) keep one.
    let lines: Vec<&str> = build
        .entries
        .iter()
        .map(|rec| rec.command.as_str().expect("an SSH entry is a line"))
        .collect();
    let outs = pve
        .ssh_run_all(&ip, "sombrero", &key, &lines)
        .await
        .unwrap_or_else(|e| panic!("build.json over SSH: {e}"));
    let mut mismatches = Vec::new();
    for (i, (rec, out)) in build.entries.iter().zip(outs).enumerate() {
        let got = Observed {
            exitcode: Some(out.exitcode),
            stdout: out.stdout,
            stderr: out.stderr,
            ..Default::default()
        };
        if let Err(why) = compare(rec, &got) {
            mismatches.push(format!("build.json[{i}] `{}`: {why}", lines[i]));
        }
    }

    // Shut down, template, linked clone with validation's cloud-init settings, boot.
    for (path, body) in [
        ("/nodes/pve1/qemu/9060/status/shutdown", None),
        ("/nodes/pve1/qemu/9060/template", None),
        (
            "/nodes/pve1/qemu/9060/clone",
            Some(json!({"newid": 9160, "name": "validate"})),
        ),
    ] {
        assert_eq!(
            api.wait(&api.ok(Method::POST, path, body).await).await,
            "OK"
        );
    }
    let key2 = pve.ssh_keygen();
    api.ok(
        Method::PUT,
        "/nodes/pve1/qemu/9160/config",
        Some(
            json!({"ciuser": "sombrero", "sshkeys": sshkeys_param(&[&key2.public_key]),
                    "ipconfig0": format!("ip={}/8", pve.guest_ip(61))}),
        ),
    )
    .await;
    start(9160).await;
    let mut up = false;
    for _ in 0..200 {
        let (status, _) = api
            .call(Method::POST, "/nodes/pve1/qemu/9160/agent/ping", None)
            .await;
        if status == StatusCode::OK {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the clone's agent never answered");
    for (i, rec) in clone.entries.iter().enumerate() {
        let got = match rec.via.as_str() {
            "agent" => {
                let argv: Vec<String> = serde_json::from_value(rec.command.clone())
                    .expect("an agent entry is a program and its arguments");
                api.exec_argv(9160, &argv).await
            }
            "agent-call" => {
                let command = rec.command.as_str().expect("an agent call name");
                let method = if command == "ping" {
                    Method::POST
                } else {
                    Method::GET
                };
                let (status, body) = api
                    .call(
                        method,
                        &format!("/nodes/pve1/qemu/9160/agent/{command}"),
                        None,
                    )
                    .await;
                if status == StatusCode::OK {
                    Observed {
                        result: body["data"]["result"].clone(),
                        ..Default::default()
                    }
                } else {
                    Observed {
                        agent_error: body["message"].as_str().map(|m| m.trim().to_string()),
                        ..Default::default()
                    }
                }
            }
            other => panic!("clone.json[{i}]: unknown via {other:?}"),
        };
        if let Err(why) = compare(rec, &got) {
            mismatches.push(format!("clone.json[{i}] {}: {why}", rec.command));
        }
    }
    assert!(
        mismatches.is_empty(),
        "the guest model differs from the real Debian 12 guest in {} of {} recorded commands:\n{}",
        mismatches.len(),
        build.entries.len() + clone.entries.len(),
        mismatches.join("\n")
    );
}

/// The replay's comparison fails where the model would be wrong (so the replay test can fail).
#[test]
fn the_replay_comparison_catches_a_different_answer() {
    let rec = |compare: &str, stdout: &str| Recorded {
        via: "agent".into(),
        command: json!(["systemctl", "is-enabled", "qemu-guest-agent"]),
        exitcode: Some(0),
        stdout: stdout.into(),
        stderr: String::new(),
        agent_error: None,
        result: Value::Null,
        compare: compare.into(),
        lines: vec!["(?m)^static$".into()],
        normalise: vec![(r"^\.+".into(), String::new())],
        stream: None,
    };
    let got = |code: i64, stdout: &str| Observed {
        exitcode: Some(code),
        stdout: stdout.into(),
        ..Default::default()
    };
    assert!(compare(&rec("exact", "static\n"), &got(0, "static\n")).is_ok());
    assert!(compare(&rec("exact", "static\n"), &got(0, "enabled\n")).is_err());
    assert!(compare(&rec("exact", "static\n"), &got(1, "static\n")).is_err());
    assert!(
        compare(
            &rec("exact", "...\nstatus: done\n"),
            &got(0, "\nstatus: done\n")
        )
        .is_ok()
    );
    assert!(compare(&rec("lines", "static\n"), &got(0, "enabled\n")).is_err());
    assert!(compare(&rec("exitcode", "static\n"), &got(0, "anything")).is_ok());
    assert!(
        compare(
            &rec("json-keys", r#"{"a":1,"b":2}"#),
            &got(0, r#"{"b":3,"a":4}"#)
        )
        .is_ok()
    );
    assert!(compare(&rec("json-keys", r#"{"a":1,"b":2}"#), &got(0, r#"{"a":1}"#)).is_err());
    let refused = Observed {
        agent_error: Some("Agent error: ...".into()),
        ..Default::default()
    };
    assert!(compare(&rec("exitcode", ""), &refused).is_err());
}
