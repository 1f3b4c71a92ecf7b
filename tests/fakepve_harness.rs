//! The fake Proxmox VE harness itself (tests/fakepve, tests/support/fakepve.rs): it starts, its
//! TLS verifies against the test CA, the control API round-trips, and the guest model carries a
//! build from an imported cloud image through agent exec, template and clones.

mod support;

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
        (127, "sh: 1: frobnicate: not found\n")
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
    assert_eq!((code, out.as_str()), (0, "status: done\n"));
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
