//! `sombrero prune -f policy.yaml [--dry-run]`: a TemplateRetention run once, without a cluster.
//!
//! Proxmox comes from the environment (`PROXMOX_URL`, `PROXMOX_TOKEN_ID`, `PROXMOX_TOKEN_SECRET`,
//! optionally `PROXMOX_CA_CERT` / `PROXMOX_FINGERPRINT` / `PROXMOX_INSECURE`). The file is checked
//! as the CRD checks it; the plan is printed as a table on stdout, then executed unless
//! `--dry-run` (or `spec.dryRun: true`), one result line per action. Progress goes to stderr.
//! Before the first change the token's privileges are checked against what the plan does
//! (`INSUFFICIENT_PRIVILEGES`, nothing changed, when any is missing).
//! Exit codes: see [`super::exit`] (`WORK_FAILED` when any action failed).
//!
//! Whose templates: the file names a namespace (`metadata.namespace`, default `default`) and,
//! for a `goldenImageRef`, an image name, but no uid (a TemplateRetention's own uid is not the
//! image's). The CLI acts only on templates whose marker names that namespace and name and the
//! uid `sombrero build -f` writes for them ([`crate::builder::cli_owner_uid`]), or with
//! `--owner-uid` the uid given (a controller-built image's: `kubectl get goldenimage <name> -n
//! <namespace> -o jsonpath='{.metadata.uid}'`). A `tagSelector` acts on the images of the file's
//! namespace. Everything else is listed as "not ours" and never touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::exit;
use crate::api::admission::admit;
use crate::api::template_retention::{ExecutedAction, TemplateRetention};
use crate::builder::cli_owner_uid;
use crate::image::version::TemplateVersion;
use crate::proxmox::{Client, Config};
use crate::retention::{self, Plan, Policy, Purpose, Scope, Target};

/// Arguments of `sombrero prune`.
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// A TemplateRetention manifest (YAML).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Print the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// For a `goldenImageRef` target: the GoldenImage's `metadata.uid` (templates a controller
    /// built). Default: the uid `sombrero build -f` writes for the file's namespace and name.
    #[arg(long, value_name = "UID")]
    pub owner_uid: Option<String>,
}

pub async fn run(args: &PruneArgs) -> ExitCode {
    if let Err(e) = crate::telemetry::init_cli() {
        eprintln!("error: {e}");
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let policy = match load(&args.file) {
        Ok(p) => p,
        Err(problems) => return super::refuse_retention(&args.file, &problems),
    };
    let scope = match scope(&policy.target, args.owner_uid.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let client = match Config::from_env().and_then(Client::new) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: Proxmox connection from the environment: {e}");
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let inventory =
        match retention::gather(&client, &policy.target, &scope, Purpose::Rotation).await {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: reading templates from Proxmox: {e}");
                return ExitCode::from(exit::PROXMOX);
            }
        };
    eprintln!(
        "{}: {} templates, acting on those of {scope} ({} Proxmox requests)",
        policy.target,
        inventory.versions.len(),
        inventory.requests
    );
    let plan = retention::plan(
        &inventory.versions,
        &scope,
        &policy.rules,
        policy.mode,
        chrono::Utc::now(),
    );
    print!("{}", table(&plan, &inventory.versions));
    let dry_run = args.dry_run || policy.dry_run;
    if dry_run {
        println!("dry run: nothing was changed");
        return ExitCode::from(exit::OK);
    }
    if plan.removals().next().is_none() {
        println!("nothing to do");
        return ExitCode::from(exit::OK);
    }
    // The privileges of exactly what the plan does, before its first write.
    let acting: Vec<u32> = plan.removals().map(|d| d.vmid).collect();
    let needs = crate::privileges::retention_needs(
        policy.mode,
        policy.backup_storage.as_deref(),
        Some(&acting),
    );
    match crate::privileges::check(&client, &needs).await {
        Ok(()) => {}
        Err(crate::privileges::PrivilegeError::Insufficient(r)) => {
            eprintln!("error: {r}");
            return ExitCode::from(exit::INSUFFICIENT_PRIVILEGES);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::PROXMOX);
        }
    }
    let progress = |line: &str| eprintln!("{line}");
    let results = retention::execute(
        &client,
        &plan,
        policy.backup_storage.as_deref(),
        false,
        &progress,
    )
    .await;
    print!("{}", results_text(&results));
    if results.iter().all(|r| r.succeeded) {
        ExitCode::from(exit::OK)
    } else {
        ExitCode::from(exit::WORK_FAILED)
    }
}

/// Reads and checks a manifest. Errors name the field (`spec.keepLast: ...`).
pub fn load(path: &Path) -> Result<Policy, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    parse(&text)
}

/// Checks a manifest's text as the API server would ([`admit`]: kind, apiVersion, the CRD's
/// schema with unknown fields refused, defaults, its CEL rules), then what only a run needs
/// ([`Policy::from_spec`]: durations, the target).
pub fn parse(text: &str) -> Result<Policy, Vec<String>> {
    let admitted = admit::<TemplateRetention>(text)
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let namespace = admitted.namespace.unwrap_or_else(|| "default".into());
    Policy::from_spec(&namespace, &admitted.object.spec)
        .map_err(|problems| problems.iter().map(ToString::to_string).collect())
}

/// Whose templates the run may change (see the module docs).
pub fn scope(target: &Target, owner_uid: Option<&str>) -> Result<Scope, String> {
    match (target, owner_uid) {
        (Target::Image { .. }, Some(uid)) if uid.trim().is_empty() => {
            Err("--owner-uid: must not be empty; give the GoldenImage's metadata.uid".into())
        }
        (Target::Image { .. }, Some(uid)) => Ok(target.scope(uid.trim())),
        (Target::Image { namespace, name }, None) => Ok(target.scope(&cli_owner_uid(namespace, name))),
        (Target::Tags { .. }, Some(_)) => Err(
            "--owner-uid: only for a spec.target.goldenImageRef; a tagSelector acts on the images of the file's namespace"
                .into(),
        ),
        (Target::Tags { .. }, None) => Ok(target.scope("")),
    }
}

/// The plan as a table: VMID, NAME, BUILD DATE, ACTION, REASON.
pub fn table(plan: &Plan, versions: &[TemplateVersion]) -> String {
    // A template without a marker has no build date to show.
    let dates: BTreeMap<u32, String> = versions
        .iter()
        .filter(|v| v.owner.is_some())
        .map(|v| (v.vmid, v.build_date.to_string()))
        .collect();
    let rows: Vec<[String; 5]> = plan
        .decisions
        .iter()
        .map(|d| {
            let reason = d.reason.describe();
            [
                d.vmid.to_string(),
                d.name.clone(),
                dates.get(&d.vmid).cloned().unwrap_or_default(),
                d.action.to_string(),
                reason,
            ]
        })
        .collect();
    let header = ["VMID", "NAME", "BUILD DATE", "ACTION", "REASON"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no templates match the target)\n");
    }
    out
}

fn results_text(results: &[ExecutedAction]) -> String {
    let mut out = String::new();
    for r in results {
        let _ = writeln!(
            out,
            "{} {} {}: {}",
            r.vmid,
            r.action,
            if r.succeeded { "ok" } else { "FAILED" },
            r.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::{Action, ArchiveMode, Decision, Reason};

    const GOOD: &str = "apiVersion: images.sombrero.dev/v1alpha1\nkind: TemplateRetention\nmetadata: {name: r, namespace: platform}\nspec:\n  target: {goldenImageRef: {name: ubuntu}}\n  archive: {mode: delete}\n";

    #[test]
    fn parses_a_good_manifest() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.mode, ArchiveMode::Delete);
        assert_eq!(
            p.target,
            crate::retention::Target::Image {
                namespace: "platform".into(),
                name: "ubuntu".into()
            }
        );
    }

    #[test]
    fn scope_from_the_file_and_the_flag() {
        let image = parse(GOOD).unwrap().target;
        let default = scope(&image, None).unwrap();
        assert_eq!(
            default,
            Scope::Image(crate::image::marker::Owner {
                namespace: "platform".into(),
                name: "ubuntu".into(),
                uid: cli_owner_uid("platform", "ubuntu"),
            })
        );
        let given = scope(&image, Some("7d1c0c6e-0000-4000-8000-000000000001")).unwrap();
        assert!(
            given
                .to_string()
                .contains("uid 7d1c0c6e-0000-4000-8000-000000000001")
        );
        assert!(
            scope(&image, Some(" "))
                .unwrap_err()
                .contains("--owner-uid")
        );
        let tags = parse(&GOOD.replace(
            "{goldenImageRef: {name: ubuntu}}",
            "{tagSelector: [ubuntu]}",
        ))
        .unwrap()
        .target;
        assert_eq!(
            scope(&tags, None).unwrap(),
            Scope::Namespace("platform".into())
        );
        assert!(
            scope(&tags, Some("x"))
                .unwrap_err()
                .contains("goldenImageRef")
        );
    }

    #[test]
    fn refuses_unknown_fields_kind_and_types() {
        let e = parse(&GOOD.replace("archive:", "keeplast: 5\n  archive:")).unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.starts_with(".spec.keeplast: ") && p.contains("unknown field")),
            "{e:?}"
        );
        let e = parse(&GOOD.replace("{mode: delete}", "{mode: delete, storage: x}")).unwrap_err();
        assert!(
            e.iter().any(|p| p.starts_with(".spec.archive.storage")),
            "{e:?}"
        );
        let e = parse(&GOOD.replace("TemplateRetention", "GoldenImage")).unwrap_err();
        assert!(e[0].starts_with("kind:"), "{e:?}");
        let e = parse(&GOOD.replace("{mode: delete}", "{mode: shred}")).unwrap_err();
        assert!(e[0].contains("spec.archive.mode"), "{e:?}");
    }

    /// Every malformed TemplateRetention fixture is refused, naming the field the API server names.
    #[test]
    fn malformed_fixtures_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            if !file.starts_with("tr-") {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&path).expect("read");
            let field = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect-field: "))
                .expect("expect-field");
            let problems = parse(&text).expect_err(&file);
            assert!(
                problems
                    .iter()
                    .any(|p| p.trim_start_matches('.').starts_with(field)),
                "{file}: expected a problem on {field}, got {problems:?}"
            );
        }
        assert!(seen >= 7, "only {seen} fixtures");
    }

    #[test]
    fn the_example_policy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/retention.yaml");
        let p = load(&path).unwrap();
        assert_eq!(p.rules, crate::retention::RetentionRules::default());
        assert_eq!(p.mode, ArchiveMode::Tag);
    }

    #[test]
    fn the_crds_cel_rules_run_on_the_defaulted_object() {
        // keepLast defaults to 3; only CEL compares it with retainAtLeast before from_spec runs.
        let e = parse(&GOOD.replace("archive:", "retainAtLeast: 9\n  archive:")).unwrap_err();
        assert_eq!(
            e,
            vec!["spec: retainAtLeast must not exceed keepLast".to_string()],
            "{e:?}"
        );
    }

    #[test]
    fn table_lines_up() {
        let plan = Plan {
            mode: ArchiveMode::Tag,
            scope: Scope::Namespace("x".into()),
            purpose: Purpose::Rotation,
            decisions: vec![
                Decision {
                    vmid: 101,
                    name: "ubuntu-24.04-minimal-20250118-001".into(),
                    node: "pve1".into(),
                    action: Action::Keep,
                    reason: Reason::CurrentLatest,
                },
                Decision {
                    vmid: 9,
                    name: "x".into(),
                    node: "pve1".into(),
                    action: Action::Archive,
                    reason: Reason::AlreadyArchived,
                },
            ],
        };
        let t = table(&plan, &[]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("VMID  NAME"), "{t}");
        let col = lines[0].find("ACTION").unwrap();
        assert_eq!(&lines[1][col..col + 4], "keep");
        assert_eq!(&lines[2][col..col + 7], "archive");
        assert!(lines[1].ends_with("current latest"));
        assert!(
            table(
                &Plan {
                    mode: ArchiveMode::Tag,
                    scope: Scope::Namespace("x".into()),
                    purpose: Purpose::Rotation,
                    decisions: vec![]
                },
                &[]
            )
            .contains("no templates")
        );
    }
}
