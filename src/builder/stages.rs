//! The build as a resumable sequence of stages; its progress lives in the build VM's marker.

use std::time::{Duration, Instant};

use chrono::Utc;

use super::commands::{self, Step};
use super::error::{BuildError, ErrorCategory};
use super::inventory::{self, ImageNames, TaggedVm};
use super::plan::{first_ipv4, hardware_config, static_ip};
use super::provision::{self, AgentWait, Channel};
use super::source::{self, Prepared};
use super::{BuildOutcome, BuildRequest, Progress, Stage, StageTiming, Timeouts};
use crate::api::GoldenImageSpec;
use crate::api::golden_image::ProvisioningChannel;
use crate::image::marker::{
    BUILDER, BuildProgress, MARKER_SCHEMA_VERSION, Marker, MarkerError, Owner, Role, SourceInfo,
    TemplateMetadata, ValidationRecord, parse_description, render_description,
    render_description_fitting,
};
use crate::image::naming::{CLAIMS, NameTemplate, NamingError};
use crate::image::spec_hash::spec_hash;
use crate::image::tags::{BUILD_TAG, base_tags};
use crate::proxmox::readback::{
    self, TaskCall, TaskOrigin, run_task, run_task_traced, settled_config,
};
use crate::proxmox::{
    self, Client, CloneRequest, ConfigUpdate, DeleteVm, QemuConfig, Shutdown, VmConfig,
};
use crate::ssh::ThrowawayKey;

/// Comment of the build's public key, so a person who finds it in `sshkeys` knows its origin.
const BUILD_KEY_COMMENT: &str = "sombrero-build";

/// Runs (or resumes) one build to a finished, unvalidated template. See the module docs.
pub async fn run_build(
    client: &Client,
    req: &BuildRequest,
    progress: &dyn Progress,
) -> Result<BuildOutcome, BuildError> {
    run_build_with(client, req, progress, &Timeouts::default()).await
}

const PROVISION_TIMEOUT_HINT: &str = "fix spec.provisioning.timeout, e.g. 30m or 1h30m";

/// [`run_build`] with explicit Proxmox timeouts.
pub async fn run_build_with(
    client: &Client,
    req: &BuildRequest,
    progress: &dyn Progress,
    timeouts: &Timeouts,
) -> Result<BuildOutcome, BuildError> {
    let spec = &req.spec;
    let names = name_template(spec)?;
    // Refused before any write rather than in the Provision stage.
    spec.provisioning
        .timeout
        .get("provisioning.timeout")
        .map_err(|e| BuildError::invalid_spec(e.to_string(), PROVISION_TIMEOUT_HINT))?;
    let hash = spec_hash(spec)
        .map_err(|e| BuildError::invalid_spec(e.to_string(), "the spec must serialize to JSON"))?;
    let image = ImageNames {
        template: names.clone(),
        os: spec.os.clone(),
        image_type: spec.type_.clone(),
    };
    let clones = clone_names(spec);
    let mut vms = inventory::scan(
        client,
        &req.owner,
        Some(&image),
        clones.as_ref(),
        timeouts.task,
    )
    .await?;
    // The image's templates are read only as far as a decision below needs them: all of them
    // for a build id that may have run before (its template may be any), else our newest one
    // (an adoptable unvalidated template), and those a build VM's name may duplicate.
    if !req.fresh_id {
        inventory::read_templates(client, &mut vms, |_| true).await?;
    } else if req.adopt_unvalidated {
        inventory::read_newest_template(client, &mut vms, &req.owner, &image).await?;
    }
    let build_names: Vec<String> = vms
        .iter()
        .filter(|v| v.is_our_build(&req.owner))
        .filter_map(|v| Some(v.marker.as_ref()?.metadata.name.clone()))
        .collect();
    for name in build_names {
        inventory::read_templates(client, &mut vms, |v| {
            v.name.as_deref() == Some(name.as_str())
        })
        .await?;
    }
    // Finished already: the process died after Finalize, before the outcome was recorded.
    if let Some((done, marker)) = (!req.fresh_id)
        .then(|| inventory::finished_build(&vms, &req.owner, &req.build_id, &hash))
        .flatten()
    {
        progress.message(&format!(
            "build {} already finished: template {} (VM {})",
            req.build_id, done.name, done.vmid
        ));
        return Ok(finished_outcome(done, marker, progress));
    }
    let mut resume: Option<TaggedVm> = None;
    for vm in vms.iter().filter(|v| v.is_our_build(&req.owner)) {
        let same_spec = vm
            .marker
            .as_ref()
            .is_some_and(|m| m.metadata.spec_hash == hash);
        // A build VM holding the number of a finished template is a second VM of that build
        // (left by a create whose run died): resumed, it would be a second template of the
        // same name.
        let duplicate = inventory::number_taken_by_template(&vms, &req.owner, vm);
        if same_spec && !duplicate && resume.is_none() {
            resume = Some(vm.clone());
        } else {
            progress.message(&format!(
                "destroying abandoned build VM {} (another spec or a duplicate)",
                vm.vmid
            ));
            destroy_vm(client, &vm.node, vm.vmid, vm.running, timeouts)
                .await
                .map_err(|e| BuildError::proxmox("destroy abandoned build VM", &e))?;
        }
    }
    let mut run = Run {
        client,
        spec,
        progress,
        timeouts,
        timings: Vec::new(),
        claimed: None,
    };
    let resumed = match resume {
        Some(vm) => run.resume_state(vm).await?,
        None => None,
    };
    let mut state = match resumed {
        Some(s) => s,
        None => {
            // No build VM to continue: an unvalidated template of this spec is the build in
            // flight whose outcome was lost (e.g. status.build too), not something to redo.
            if let Some((t, marker)) = req
                .adopt_unvalidated
                .then(|| inventory::unvalidated_template(&vms, &req.owner, &hash))
                .flatten()
            {
                progress.message(&format!(
                    "template {} (VM {}) of this spec is built but not validated yet: using it",
                    t.name, t.vmid
                ));
                return Ok(finished_outcome(t, marker, progress));
            }
            run.start(req, &names, &hash, &vms).await?
        }
    };
    let result = run.continue_build(&mut state).await;
    match result {
        Ok(outcome) => Ok(outcome),
        Err(mut err) => {
            if destroys_on_failure(&err) {
                if spec.provisioning.keep_failed_build {
                    err.kept_vmid = Some(state.vmid);
                } else {
                    progress.message(&format!("destroying the failed build VM {}", state.vmid));
                    if let Err(e) =
                        destroy_vm(client, &state.node, state.vmid, true, timeouts).await
                    {
                        tracing::warn!(vmid = state.vmid, error = %e, "could not destroy the failed build VM; the next run cleans it up");
                    }
                }
            }
            Err(err)
        }
    }
}

/// The outcome of a template a previous run finished, from its marker and config; nothing is
/// changed on it.
fn finished_outcome(vm: &TaggedVm, marker: &Marker, progress: &dyn Progress) -> BuildOutcome {
    let m = &marker.metadata;
    BuildOutcome {
        vmid: vm.vmid,
        name: m.name.clone(),
        node: vm.node.clone(),
        build_date: m.build_date,
        build_number: m.build_number,
        size_bytes: boot_disk(&vm.config).and_then(|(_, s)| s).unwrap_or(0),
        source_checksum: cloud_image_checksum(marker),
        spec_hash: m.spec_hash.clone(),
        package_manifest: recorded_manifest(marker, progress),
        validation: m.validation.clone(),
        stages: Vec::new(),
    }
}

/// The manifest the marker records; an unreadable one (notes edited by hand) counts as none,
/// which validation's `packageDrift` reports.
fn recorded_manifest(marker: &Marker, progress: &dyn Progress) -> Vec<String> {
    marker.package_manifest().unwrap_or_else(|e| {
        progress.message(&format!("{e}; continuing without a package baseline"));
        Vec::new()
    })
}

fn cloud_image_checksum(marker: &Marker) -> Option<String> {
    match &marker.metadata.source {
        Some(SourceInfo::CloudImage { checksum, .. }) => checksum.clone(),
        _ => None,
    }
}

/// Whether the build numbers are listed again after a Source stage that took `source_took`:
/// after a download, yes (another build may have taken a number meanwhile); after a template
/// source or a cloud image already on the storage (well under a second), the first look is
/// about as fresh as a second one would be (the same order as the nextid and create requests
/// that follow, the window two processes share anyway; in one process `naming::CLAIMS`
/// separates builds).
fn reread_before_numbering(source_took: Duration) -> bool {
    source_took >= REREAD_AFTER
}

/// See [`reread_before_numbering`].
const REREAD_AFTER: Duration = Duration::from_secs(1);

/// Proxmox trouble keeps the VM for the next run to resume; everything else is a failed build.
fn destroys_on_failure(err: &BuildError) -> bool {
    match err.category {
        ErrorCategory::ProxmoxTransient | ErrorCategory::ProxmoxAuth => false,
        ErrorCategory::Timeout => err.stage == Some(Stage::Provision),
        _ => true,
    }
}

/// Destroys every build VM (role `build`, written for its own VMID, this owner) and answers
/// their VMIDs. Templates are never touched. `names` ([`clone_names`] of the spec) also finds a
/// build VM cloned from a base template that still carries the base's tags.
pub async fn cleanup_abandoned_builds(
    client: &Client,
    owner: &Owner,
    names: Option<&ImageNames>,
) -> Result<Vec<u32>, BuildError> {
    let timeouts = Timeouts::default();
    let mut removed = Vec::new();
    for vm in inventory::scan(client, owner, None, names, timeouts.task).await? {
        if vm.is_our_build(owner) {
            destroy_vm(client, &vm.node, vm.vmid, vm.running, &timeouts)
                .await
                .map_err(|e| BuildError::proxmox("destroy build VM", &e))?;
            removed.push(vm.vmid);
        }
    }
    Ok(removed)
}

/// For a template source: the names that find our build VM between the clone and its first
/// config write, when it still carries the base template's tags
/// ([`inventory::may_be_our_clone`]). A cloud image's create carries our tags, so `None`.
pub fn clone_names(spec: &GoldenImageSpec) -> Option<ImageNames> {
    spec.source.template.as_ref()?;
    Some(ImageNames {
        template: name_template(spec).ok()?,
        os: spec.os.clone(),
        image_type: spec.type_.clone(),
    })
}

fn name_template(spec: &GoldenImageSpec) -> Result<NameTemplate, BuildError> {
    match &spec.name_template {
        None => Ok(NameTemplate::default()),
        Some(t) => NameTemplate::parse(t)
            .map_err(|e| BuildError::invalid_spec(e.to_string(), "fix spec.nameTemplate")),
    }
}

/// Where a build is.
struct State {
    vmid: u32,
    node: String,
    marker: Marker,
    /// The last stage recorded in the marker (Shutdown and Convert are not recorded: each
    /// looks at the VM itself, its power state, its template flag).
    done: Stage,
    source_checksum: Option<String>,
    /// What this run knows of the VM's config without reading it again: read by this run and
    /// changed since by its own writes only. `None` (a resumed build): read when needed.
    known: Option<Known>,
    /// Whether the VM runs, when this run knows (it created, started or stopped it).
    running: Option<bool>,
    /// The build key this run wrote into the config (in the create call, or with the CreateVm
    /// record).
    key: Option<ThrowawayKey>,
}

/// The parts of the build VM's config the later stages need, kept by the run that wrote them
/// so it does not read the config before each write: the notes (around the marker), the system
/// disk's size, the build-only settings present.
#[derive(Debug, Clone, PartialEq)]
struct Known {
    template: bool,
    notes: String,
    disk_bytes: Option<u64>,
    build_settings: Vec<String>,
}

/// What a run knows of the build VM it just created.
enum Created {
    /// Read once its create (or clone) task ended: a clone, or a create whose answer was lost.
    Read(VmConfig),
    /// A cloud image's VM created by this run's own call (its answer arrived): the config is
    /// what the call sent, except the imported disk's size, which is the image's.
    Sent(Known),
}

impl Known {
    fn of(config: &VmConfig) -> Known {
        Known {
            template: config.template,
            notes: config.description.clone().unwrap_or_default(),
            disk_bytes: boot_disk(config).and_then(|(_, s)| s),
            build_settings: without_build_settings(config).delete,
        }
    }

    /// The VM created with `config`, its system disk's size unknown.
    fn sent(config: &QemuConfig) -> Known {
        Known {
            template: false,
            // PVE trims trailing whitespace.
            notes: config
                .get("description")
                .unwrap_or("")
                .trim_end()
                .to_string(),
            disk_bytes: None,
            build_settings: BUILD_ONLY_SETTINGS
                .iter()
                .filter(|k| config.get(k).is_some())
                .map(|k| k.to_string())
                .collect(),
        }
    }

    /// After this run wrote `update`. A build-only setting it deleted still counts: deleted
    /// while the VM runs it is only pending in PVE (until the next start), so Finalize deletes
    /// it again on the stopped template (PVE skips a key that is not set, with a warning).
    fn after(&mut self, update: &ConfigUpdate) {
        if let Some(notes) = update.set.get("description") {
            self.notes = notes.to_string();
        }
        for key in BUILD_ONLY_SETTINGS {
            if update.set.get(key).is_some() && !self.build_settings.iter().any(|k| k == key) {
                self.build_settings.push(key.to_string());
            }
        }
    }
}

struct Run<'a> {
    client: &'a Client,
    spec: &'a GoldenImageSpec,
    progress: &'a dyn Progress,
    timeouts: &'a Timeouts,
    timings: Vec<StageTiming>,
    /// The name this run claimed in [`CLAIMS`]; given back when the run ends.
    claimed: Option<String>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.claimed.take() {
            CLAIMS.release(self.client.base_url().as_str(), &name);
        }
    }
}

impl Run<'_> {
    fn begin(&self, stage: Stage) -> Instant {
        self.progress.stage(stage);
        Instant::now()
    }

    fn end(&mut self, stage: Stage, started: Instant) {
        self.timings.push(StageTiming {
            stage,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    fn pve<'e>(&self, stage: Stage, step: &'e str) -> impl Fn(proxmox::Error) -> BuildError + 'e {
        move |e| BuildError::proxmox(step, &e).at(stage)
    }

    /// A build VM found in Proxmox: continue it, or `None` to start over (it was destroyed
    /// because its creation never finished).
    async fn resume_state(&mut self, vm: TaggedVm) -> Result<Option<State>, BuildError> {
        let Some(marker) = vm.marker.clone() else {
            return Ok(None);
        };
        let done = marker
            .build
            .as_ref()
            .and_then(|b| Stage::parse(&b.stage))
            .unwrap_or(Stage::Source);
        let half_created =
            done == Stage::Source && (vm.config.lock.is_some() || boot_disk(&vm.config).is_none());
        if half_created {
            self.progress.message(&format!(
                "build VM {} was interrupted while being created: destroying it",
                vm.vmid
            ));
            destroy_vm(self.client, &vm.node, vm.vmid, vm.running, self.timeouts)
                .await
                .map_err(|e| BuildError::proxmox("destroy half-created build VM", &e))?;
            return Ok(None);
        }
        self.progress.message(&format!(
            "resuming build {} in VM {} after stage {done}",
            marker.metadata.name, vm.vmid
        ));
        let source_checksum = cloud_image_checksum(&marker);
        Ok(Some(State {
            vmid: vm.vmid,
            node: vm.node,
            marker,
            done,
            source_checksum,
            known: None,
            running: None,
            key: None,
        }))
    }

    /// A new build: source, number, then the VM created with its marker.
    async fn start(
        &mut self,
        req: &BuildRequest,
        names: &NameTemplate,
        hash: &str,
        seen: &inventory::Scan,
    ) -> Result<State, BuildError> {
        let t = self.begin(Stage::Source);
        let prepared = source::prepare(
            self.client,
            self.spec,
            &seen.listing,
            self.timeouts,
            self.progress,
        )
        .await?;
        let source_took = t.elapsed();
        self.end(Stage::Source, t);

        let t = self.begin(Stage::CreateVm);
        // Numbers are read again right before the VM (which reserves the number) is created,
        // when the Source stage took long enough for another build to take one meanwhile: one
        // list, configs only of VMs new or changed since the first look.
        let reread;
        let vms = if reread_before_numbering(source_took) {
            let clones = clone_names(self.spec);
            let image = ImageNames {
                template: names.clone(),
                os: self.spec.os.clone(),
                image_type: self.spec.type_.clone(),
            };
            reread = inventory::rescan(
                self.client,
                &req.owner,
                Some(&image),
                clones.as_ref(),
                self.timeouts.task,
                Some(seen),
            )
            .await
            .map_err(|e| e.at(Stage::CreateVm))?;
            &reread
        } else {
            seen
        };
        let used = inventory::used_numbers(
            vms,
            vms.cluster_names(),
            names,
            &self.spec.os,
            &self.spec.type_,
        );
        let (number, name) = CLAIMS
            .next(
                self.client.base_url().as_str(),
                names,
                &self.spec.os,
                &self.spec.type_,
                req.today,
                used,
            )
            .map_err(|e| {
                let hint = match e {
                    NamingError::BuildNumbersExhausted { .. } => "wait for the next day",
                    _ => "fix spec.os, spec.type or spec.nameTemplate",
                };
                BuildError::invalid_spec(e.to_string(), hint).at(Stage::CreateVm)
            })?;
        self.claimed = Some(name.clone());
        let marker = Marker {
            schema: MARKER_SCHEMA_VERSION,
            owner: req.owner.clone(),
            build_id: req.build_id.clone(),
            role: Role::Build,
            vmid: 0,
            metadata: TemplateMetadata {
                name: name.clone(),
                os: self.spec.os.clone(),
                image_type: self.spec.type_.clone(),
                builder: BUILDER.to_string(),
                builder_version: env!("CARGO_PKG_VERSION").to_string(),
                build_date: req.today,
                build_number: number,
                source: Some(source::source_info(self.spec, &prepared)),
                spec_hash: hash.to_string(),
                package_manifest_digest: None,
                validation: ValidationRecord::Pending,
                created_at: None,
            },
            build: Some(BuildProgress {
                stage: Stage::Source.as_str().into(),
                ..Default::default()
            }),
        };
        self.progress.message(&format!("creating build VM {name}"));
        // A cloud image's VM gets its build key in the create call (a clone cannot take one).
        let key = match (&prepared, &self.spec.provisioning.via) {
            (Prepared::Image { .. }, ProvisioningChannel::Ssh) => {
                Some(ThrowawayKey::generate(BUILD_KEY_COMMENT).map_err(|e| {
                    BuildError::new(ErrorCategory::Guest, e, "internal error").at(Stage::CreateVm)
                })?)
            }
            _ => None,
        };
        let (vmid, node, created) = self
            .create_vm(&prepared, &marker, &name, key.as_ref())
            .await?;
        let mut state = State {
            vmid,
            node,
            marker: Marker { vmid, ..marker },
            done: Stage::Source,
            source_checksum: prepared.checksum(),
            known: None,
            // Created (or cloned) stopped.
            running: Some(false),
            key,
        };
        self.finish_create(&mut state, Some(created)).await?;
        self.end(Stage::CreateVm, t);
        Ok(state)
    }

    /// nextid + create (or clone) with the marker (and a cloud image's build key) in the same
    /// call; "already exists" takes the next id.
    async fn create_vm(
        &self,
        prepared: &Prepared,
        marker: &Marker,
        name: &str,
        key: Option<&ThrowawayKey>,
    ) -> Result<(u32, String, Created), BuildError> {
        let stage = Stage::CreateVm;
        let spec = self.spec;
        let node = spec.placement.node.clone();
        let tags = build_tags_of(marker)?;
        for _attempt in 0..20 {
            let vmid = self
                .client
                .next_vmid()
                .await
                .map_err(self.pve(stage, "nextid"))?;
            let description = describe(
                &Marker {
                    vmid,
                    ..marker.clone()
                },
                "",
            )?;
            // `Some`: what the create call sent, when its own answer said it ran.
            let created: proxmox::Result<Option<Known>> = match prepared {
                Prepared::Image { volid, .. } => {
                    let mut config = hardware_config(spec)
                        .name(name)
                        .scsi(
                            0,
                            &format!(
                                "{}:0,import-from={volid},discard=on",
                                spec.placement.storage
                            ),
                        )
                        .ide(2, &format!("{}:cloudinit", spec.placement.storage))
                        .boot("order=scsi0")
                        .tags(&tags)
                        .description(&description);
                    if let Some(pool) = &spec.placement.pool {
                        config = config.pool(pool);
                    }
                    if let Some(k) = key {
                        config = config.sshkeys(&[k.public_openssh.as_str()]);
                    }
                    let what = TaskCall {
                        node: &node,
                        vmid: Some(vmid),
                        task_type: "qmcreate",
                        id: vmid.to_string(),
                    };
                    let (client, on, sent) = (self.client, node.as_str(), &config);
                    run_task_traced(client, &what, self.timeouts.task, move || async move {
                        client.create_vm(on, vmid, sent).await.map(Some)
                    })
                    .await
                    .map(|(_, origin)| {
                        (origin == TaskOrigin::Answered).then(|| Known::sent(&config))
                    })
                }
                Prepared::Template {
                    node: base_node,
                    vmid: base,
                } => {
                    let mut req = CloneRequest::new(vmid);
                    req.name = Some(name.to_string());
                    req.description = Some(description.clone());
                    req.full = Some(true);
                    req.storage = Some(spec.placement.storage.clone());
                    req.pool = spec.placement.pool.clone();
                    if *base_node != node {
                        req.target = Some(node.clone());
                    }
                    // The UPID of a clone names the source VM.
                    let what = TaskCall {
                        node: base_node,
                        vmid: Some(*base),
                        task_type: "qmclone",
                        id: base.to_string(),
                    };
                    let (client, base_node, base, req) =
                        (self.client, base_node.as_str(), *base, &req);
                    run_task(client, &what, self.timeouts.task, move || async move {
                        client.clone_vm(base_node, base, req).await.map(Some)
                    })
                    .await
                    .map(|_| None)
                }
            };
            match created {
                Ok(Some(known)) => return Ok((vmid, node, Created::Sent(known))),
                Ok(None) => {}
                Err(e) if e.is_already_exists() => continue,
                Err(proxmox::Error::TaskFailed { exitstatus, .. })
                    if exitstatus.contains("already exists") =>
                {
                    continue;
                }
                Err(e) => return Err(BuildError::proxmox("create VM", &e).at(stage)),
            }
            // Ours only if it carries our marker for this VMID (after a lost answer the task
            // found may, in theory, have been another one's).
            let config = settled_config(self.client, &node, vmid, self.timeouts.task)
                .await
                .map_err(self.pve(stage, "read the created VM"))?;
            let ours = config.as_ref().filter(|c| {
                parse_description(c.description.as_deref().unwrap_or(""))
                    .ok()
                    .flatten()
                    .is_some_and(|m| {
                        m.vmid == vmid
                            && m.owner.uid == marker.owner.uid
                            && m.build_id == marker.build_id
                    })
            });
            if let Some(config) = ours {
                return Ok((vmid, node, Created::Read(config.clone())));
            }
            tracing::warn!(
                vmid,
                "the VM created at this VMID is not ours; taking the next one"
            );
        }
        Err(BuildError::new(
            ErrorCategory::ProxmoxTransient,
            "20 VMIDs in a row were taken between nextid and create",
            "something else is creating VMs very fast; the next run tries again",
        )
        .at(stage))
    }

    /// After the VM exists: the disk resized, then one write with the stage recorded, the build
    /// key and, for a clone, its hardware, tags and cloud-init drive. A cloud image's VM this
    /// run just created has all of that from the create call: no write.
    /// `created`: what the run knows of the VM it created (`None`: a resumed run; read it now).
    async fn finish_create(
        &mut self,
        state: &mut State,
        created: Option<Created>,
    ) -> Result<(), BuildError> {
        let stage = Stage::CreateVm;
        let spec = self.spec;
        let created_here = created.is_some();
        let config = match created {
            Some(Created::Sent(mut known)) => {
                // The create call put the image on scsi0.
                self.grow_disk(state, "scsi0", None, &mut known).await?;
                state.known = Some(known);
                state.done = stage;
                return Ok(());
            }
            Some(Created::Read(c)) => c,
            None => self
                .client
                .vm_config(&state.node, state.vmid)
                .await
                .map_err(self.pve(stage, "read VM config"))?,
        };
        let mut known = Known::of(&config);
        let Some((disk, size)) = boot_disk(&config) else {
            return Err(BuildError::new(
                ErrorCategory::Proxmox,
                format!(
                    "VM {} has no system disk after creation (disks: {:?})",
                    state.vmid,
                    config
                        .extra
                        .keys()
                        .filter(|k| k.starts_with(['s', 'v', 'i']))
                        .collect::<Vec<_>>()
                ),
                "check the import storage and the source image",
            )
            .at(stage));
        };
        self.grow_disk(state, &disk, size, &mut known).await?;
        // The resize does not touch the notes read above.
        state.known = Some(known);
        if created_here && spec.source.template.is_none() {
            // The marker still records Source until Provision's write: a run resuming from it
            // repeats this stage (the resize is done once; a new key is written).
            state.done = stage;
            return Ok(());
        }
        let key = match spec.provisioning.via {
            ProvisioningChannel::Ssh => {
                Some(ThrowawayKey::generate(BUILD_KEY_COMMENT).map_err(|e| {
                    BuildError::new(ErrorCategory::Guest, e, "internal error").at(stage)
                })?)
            }
            ProvisioningChannel::GuestAgent => None,
        };
        let settings = |config: &VmConfig| -> Result<QemuConfig, BuildError> {
            let mut set = QemuConfig::new();
            if spec.source.template.is_some() {
                set = hardware_config(spec).tags(&build_tags_of(&state.marker)?);
                if !has_cloudinit_drive(config) {
                    set = set.ide(2, &format!("{}:cloudinit", spec.placement.storage));
                }
            }
            // A changed cloud-init config is a new instance id: cloud-init runs at the first
            // boot and installs this key.
            if let Some(k) = &key {
                set = set.sshkeys(&[k.public_openssh.as_str()]);
            }
            Ok(set)
        };
        let (update, marker) = self.record_update(state, stage, None, settings(&config)?, None)?;
        let (update, marker) = match self
            .client
            .update_vm_config(&state.node, state.vmid, &update)
            .await
        {
            Ok(()) => (update, marker),
            // A new cloud-init drive is not written twice blindly: look first (the other
            // values are absolute, written again as they are).
            Err(e) if e.outcome_unknown() => {
                let now = self
                    .client
                    .vm_config(&state.node, state.vmid)
                    .await
                    .map_err(self.pve(stage, "read VM config"))?;
                let again = self.record_update(state, stage, None, settings(&now)?, None)?;
                self.client
                    .update_vm_config(&state.node, state.vmid, &again.0)
                    .await
                    .map_err(self.pve(stage, "configure the build VM"))?;
                again
            }
            Err(e) => return Err(self.pve(stage, "configure the build VM")(e)),
        };
        self.recorded(state, stage, &update, marker);
        state.key = key;
        Ok(())
    }

    /// Grows `disk` to `hardware.diskGiB` unless `size` (bytes, `None`: not known) is already
    /// that large. An absolute size, so a lost answer is simply repeated. A disk of unknown size
    /// that turns out larger is left as it is (PVE refuses to shrink) and its size read.
    async fn grow_disk(
        &self,
        state: &State,
        disk: &str,
        size: Option<u64>,
        known: &mut Known,
    ) -> Result<(), BuildError> {
        let stage = Stage::CreateVm;
        let gib = self.spec.hardware.disk_gib;
        let want = u64::from(gib) << 30;
        if size.is_some_and(|s| s >= want) {
            return Ok(());
        }
        self.progress.message(&format!("resize {disk} to {gib}G"));
        let grown: proxmox::Result<()> = async {
            let upid = self
                .client
                .resize_disk(&state.node, state.vmid, disk, &format!("{gib}G"))
                .await?;
            if let Some(u) = upid {
                self.client.wait_task(&u, self.timeouts.task).await?;
            }
            Ok(())
        }
        .await;
        match grown {
            Ok(()) => known.disk_bytes = Some(want),
            Err(e) if size.is_none() && e.is_shrink_refused() => {
                let config = self
                    .client
                    .vm_config(&state.node, state.vmid)
                    .await
                    .map_err(self.pve(stage, "read VM config"))?;
                known.disk_bytes = boot_disk(&config).and_then(|(_, s)| s);
            }
            Err(e) => return Err(self.pve(stage, "resize")(e)),
        }
        Ok(())
    }

    /// Writes the marker with `done` as the last recorded stage, and `delete` in the same write.
    async fn record_on(
        &self,
        state: &mut State,
        done: Stage,
        packages: Option<Vec<String>>,
        delete: Option<&str>,
    ) -> Result<(), BuildError> {
        if state.known.is_none() {
            let config = self
                .client
                .vm_config(&state.node, state.vmid)
                .await
                .map_err(self.pve(done, "read VM config"))?;
            state.known = Some(Known::of(&config));
        }
        let (update, marker) =
            self.record_update(state, done, packages, QemuConfig::new(), delete)?;
        self.client
            .update_vm_config(&state.node, state.vmid, &update)
            .await
            .map_err(self.pve(done, "write the marker"))?;
        self.recorded(state, done, &update, marker);
        Ok(())
    }

    /// The write recording `done` (the notes are the known ones, the marker's block replaced)
    /// with `set` and `delete`, and the marker it writes.
    fn record_update(
        &self,
        state: &State,
        done: Stage,
        packages: Option<Vec<String>>,
        set: QemuConfig,
        delete: Option<&str>,
    ) -> Result<(ConfigUpdate, Marker), BuildError> {
        let mut marker = state.marker.clone();
        let mut progress = marker.build.clone().unwrap_or_default();
        progress.stage = done.as_str().into();
        if let Some(p) = packages {
            marker.metadata.package_manifest_digest = Some(commands::manifest_digest(&p));
            progress.set_packages(&p);
        }
        marker.build = Some(progress);
        let existing = state
            .known
            .as_ref()
            .map(|k| k.notes.as_str())
            .unwrap_or_default();
        let description = describe_fitting(&mut marker, existing).map_err(|e| e.at(done))?;
        let mut update = ConfigUpdate::new(set.description(&description));
        if let Some(key) = delete {
            update = update.delete(key);
        }
        Ok((update, marker))
    }

    /// After a write of [`Self::record_update`]'s answer succeeded.
    fn recorded(&self, state: &mut State, done: Stage, update: &ConfigUpdate, marker: Marker) {
        if let Some(k) = state.known.as_mut() {
            k.after(update);
        }
        state.marker = marker;
        state.done = done;
    }

    async fn continue_build(&mut self, state: &mut State) -> Result<BuildOutcome, BuildError> {
        if state.done == Stage::Source {
            let t = self.begin(Stage::CreateVm);
            self.finish_create(state, None).await?;
            self.end(Stage::CreateVm, t);
        }
        let mut packages = recorded_manifest(&state.marker, self.progress);
        if state.done < Stage::Provision {
            let t = self.begin(Stage::Provision);
            packages = self.provision(state).await?;
            // The key is useless now (removed from the guest), but must not be inherited by
            // clones: deleted in the same write that records the stage.
            let key = (self.spec.provisioning.via == ProvisioningChannel::Ssh).then_some("sshkeys");
            self.record_on(state, Stage::Provision, Some(packages.clone()), key)
                .await?;
            self.end(Stage::Provision, t);
        }
        // Shutdown and Convert record nothing: a run resumed after either sees the VM stopped
        // (and skips the shutdown) or a template (and skips the conversion).
        // (A marker of an older version may record them.)
        if state.done < Stage::Shutdown {
            let t = self.begin(Stage::Shutdown);
            self.shutdown(state).await?;
            self.end(Stage::Shutdown, t);
        }
        if state.done < Stage::Convert {
            self.convert(state).await?;
        }
        let t = self.begin(Stage::Finalize);
        let size = self.finalize(state).await?;
        self.end(Stage::Finalize, t);
        let m = &state.marker.metadata;
        Ok(BuildOutcome {
            vmid: state.vmid,
            name: m.name.clone(),
            node: state.node.clone(),
            build_date: m.build_date,
            build_number: m.build_number,
            size_bytes: size,
            source_checksum: state.source_checksum.clone(),
            spec_hash: m.spec_hash.clone(),
            package_manifest: packages,
            validation: m.validation.clone(),
            stages: std::mem::take(&mut self.timings),
        })
    }

    /// `POST .../template`, unless the VM is one already (a run killed after it). The build-only
    /// settings go in Finalize's write: PVE changes a template's options as any VM's.
    async fn convert(&mut self, state: &mut State) -> Result<(), BuildError> {
        let stage = Stage::Convert;
        let t = self.begin(stage);
        let template = match &state.known {
            Some(k) => k.template,
            None => {
                let config = self
                    .client
                    .vm_config(&state.node, state.vmid)
                    .await
                    .map_err(self.pve(stage, "read VM config"))?;
                state.known = Some(Known::of(&config));
                config.template
            }
        };
        if !template {
            let what = TaskCall {
                node: &state.node,
                vmid: Some(state.vmid),
                task_type: "qmtemplate",
                id: state.vmid.to_string(),
            };
            let (client, node, vmid) = (self.client, state.node.as_str(), state.vmid);
            run_task(client, &what, self.timeouts.task, move || async move {
                client.convert_to_template(node, vmid).await
            })
            .await
            .map_err(self.pve(stage, "template"))?;
            if let Some(k) = state.known.as_mut() {
                k.template = true;
            }
        }
        self.end(stage, t);
        Ok(())
    }

    /// Starts the VM, runs the seed's steps, records the manifest, cleans for cloning.
    async fn provision(&mut self, state: &mut State) -> Result<Vec<String>, BuildError> {
        let stage = Stage::Provision;
        let p = &self.spec.provisioning;
        let limit = p
            .timeout
            .get_std("provisioning.timeout")
            .map_err(|e| BuildError::invalid_spec(e.to_string(), PROVISION_TIMEOUT_HINT))?;
        let deadline = Instant::now() + limit;
        let (node, vmid) = (state.node.clone(), state.vmid);
        let running = match state.running {
            Some(r) => r,
            None => self
                .client
                .vm_status(&node, vmid)
                .await
                .map_err(self.pve(stage, "VM status"))?
                .is_running(),
        };
        if running {
            // An interrupted provisioning: start over from a clean boot with a new key.
            self.progress
                .message("stopping the build VM left running by an interrupted run");
            self.stop(&node, vmid)
                .await
                .map_err(|e| BuildError::proxmox("stop", &e).at(stage))?;
            state.running = Some(false);
        }
        // Written by this run (in the create call or with the CreateVm record): a VM it has not
        // started yet.
        let written = state.key.take();
        let key = match p.via {
            ProvisioningChannel::Ssh if written.is_some() => written,
            ProvisioningChannel::Ssh => {
                let key = ThrowawayKey::generate(BUILD_KEY_COMMENT).map_err(|e| {
                    BuildError::new(ErrorCategory::Guest, e, "internal error").at(stage)
                })?;
                // A changed cloud-init config is a new instance id: cloud-init runs (again) at
                // boot and installs this key.
                let update =
                    ConfigUpdate::new(QemuConfig::new().sshkeys(&[key.public_openssh.as_str()]));
                self.client
                    .update_vm_config(&node, vmid, &update)
                    .await
                    .map_err(self.pve(stage, "set the build key"))?;
                if let Some(k) = state.known.as_mut() {
                    k.after(&update);
                }
                Some(key)
            }
            ProvisioningChannel::GuestAgent => None,
        };
        self.progress.message("starting the build VM");
        let what = TaskCall {
            node: &node,
            vmid: Some(vmid),
            task_type: "qmstart",
            id: vmid.to_string(),
        };
        let (client, on) = (self.client, node.as_str());
        // Unknown from here until a look: a failed start may have started it.
        state.running = None;
        run_task(client, &what, self.timeouts.task, move || async move {
            client.start_vm(on, vmid).await.map(Some)
        })
        .await
        .map_err(self.pve(stage, "start"))?;
        state.running = Some(true);
        let mut channel = match &key {
            Some(key) => {
                let host = self.ssh_host(&node, vmid, deadline).await?;
                let session = provision::wait_for_ssh(
                    &host,
                    p.ssh.port,
                    &p.ssh.user,
                    key,
                    deadline,
                    self.progress,
                )
                .await?;
                Channel::Ssh(session)
            }
            None => {
                provision::wait_for_agent(
                    self.client,
                    &node,
                    vmid,
                    deadline,
                    AgentWait::Channel,
                    self.progress,
                )
                .await?;
                Channel::Agent {
                    client: self.client,
                    node: node.clone(),
                    vmid,
                }
            }
        };
        let result = async {
            provision::run_steps(
                &mut channel,
                &commands::install_steps(p),
                deadline,
                self.progress,
            )
            .await?;
            self.progress.message("recording the package manifest");
            let manifest_step = Step {
                name: "package manifest".into(),
                line: commands::manifest_command(),
                ok_codes: &[0],
                apt_report: false,
            };
            let out = provision::run_step(&mut channel, &manifest_step, deadline).await?;
            let manifest = commands::parse_manifest(&out.stdout);
            provision::run_steps(
                &mut channel,
                &commands::clean_steps(p),
                deadline,
                self.progress,
            )
            .await?;
            Ok::<_, BuildError>(manifest)
        }
        .await;
        channel.close().await;
        result
    }

    /// `provisioning.ssh.host`, else the static IP of `ipConfig`, else what the agent reports.
    async fn ssh_host(
        &self,
        node: &str,
        vmid: u32,
        deadline: Instant,
    ) -> Result<String, BuildError> {
        let ssh = &self.spec.provisioning.ssh;
        if let Some(h) = &ssh.host {
            return Ok(h.clone());
        }
        if let Some(ip) = static_ip(&ssh.ip_config) {
            return Ok(ip);
        }
        // Only the agent knows a DHCP address, and a cloud image usually has none: a bounded
        // wait (a template source may have the agent), then the error says what to set.
        let limit = deadline.min(Instant::now() + self.timeouts.agent_address);
        provision::wait_for_agent(
            self.client,
            node,
            vmid,
            limit,
            AgentWait::Address,
            self.progress,
        )
        .await?;
        let ifaces = self
            .client
            .agent_network_interfaces(node, vmid)
            .await
            .map_err(self.pve(Stage::Provision, "agent network-get-interfaces"))?;
        first_ipv4(&ifaces).ok_or_else(|| {
            BuildError::invalid_spec(
                "the build VM got no IPv4 address the guest agent could report",
                "set provisioning.ssh.host or a static provisioning.ssh.ipConfig",
            )
            .at(Stage::Provision)
        })
    }

    /// Graceful shutdown with a timeout, then a hard stop; done when the VM is stopped.
    /// `state.running`: this run started the VM and provisioned it, so no look first.
    async fn shutdown(&self, state: &mut State) -> Result<(), BuildError> {
        let stage = Stage::Shutdown;
        let running = match state.running.take() {
            Some(r) => r,
            None => self
                .client
                .vm_status(&state.node, state.vmid)
                .await
                .map_err(self.pve(stage, "VM status"))?
                .is_running(),
        };
        if !running {
            state.running = Some(false);
            return Ok(());
        }
        let (node, vmid) = (&state.node, state.vmid);
        self.progress.message("shutting down");
        let secs = self.timeouts.shutdown.as_secs().max(1);
        let what = TaskCall {
            node,
            vmid: Some(vmid),
            task_type: "qmshutdown",
            id: vmid.to_string(),
        };
        let client = self.client;
        let graceful = run_task(
            client,
            &what,
            self.timeouts.shutdown + Duration::from_secs(30),
            move || async move {
                client
                    .shutdown_vm(
                        node,
                        vmid,
                        Shutdown {
                            timeout: Some(secs as u32),
                            force_stop: false,
                        },
                    )
                    .await
                    .map(Some)
            },
        )
        .await;
        match graceful {
            // PVE ends a shutdown task with OK only once the VM is stopped.
            Ok(Some(_)) => {
                state.running = Some(false);
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => {
                self.progress
                    .message(&format!("graceful shutdown failed ({e}); stopping"));
                self.stop(node, vmid)
                    .await
                    .map_err(|e| BuildError::proxmox("stop", &e).at(stage))?;
            }
        }
        let status = self
            .client
            .vm_status(node, vmid)
            .await
            .map_err(self.pve(stage, "VM status"))?;
        if status.is_running() {
            self.stop(node, vmid)
                .await
                .map_err(|e| BuildError::proxmox("stop", &e).at(stage))?;
        }
        Ok(())
    }

    /// A VM gone meanwhile is not an error here: the next call on it says so.
    async fn stop(&self, node: &str, vmid: u32) -> proxmox::Result<()> {
        readback::stop_vm(self.client, node, vmid, self.timeouts.task)
            .await
            .map(|_| ())
    }

    /// Role `template`, final tags, the seed's metadata; the build-only settings removed
    /// (consumers set their own user, network and keys at clone time).
    async fn finalize(&mut self, state: &mut State) -> Result<u64, BuildError> {
        let stage = Stage::Finalize;
        let known = match state.known.take() {
            Some(k) => k,
            None => Known::of(
                &self
                    .client
                    .vm_config(&state.node, state.vmid)
                    .await
                    .map_err(self.pve(stage, "read VM config"))?,
            ),
        };
        let size = known.disk_bytes.unwrap_or(0);
        let mut marker = state.marker.retarget(Role::Template, state.vmid);
        marker.metadata.created_at = Some(Utc::now());
        if let Some(b) = marker.build.as_mut() {
            b.stage = Stage::Finalize.as_str().into();
        }
        let description = describe_fitting(&mut marker, &known.notes).map_err(|e| e.at(stage))?;
        let mut update = ConfigUpdate::new(
            QemuConfig::new()
                .name(&marker.metadata.name)
                .tags(&tags_of(&marker)?)
                .description(&description),
        );
        for key in &known.build_settings {
            update = update.delete(key);
        }
        // The build key's delete in the Provision record ran while the VM ran: pending in PVE,
        // and a config read here may show the pending view. Deleted again on the stopped VM.
        if self.spec.provisioning.via == ProvisioningChannel::Ssh
            && !known.build_settings.iter().any(|k| k == "sshkeys")
        {
            update = update.delete("sshkeys");
        }
        self.client
            .update_vm_config(&state.node, state.vmid, &update)
            .await
            .map_err(self.pve(stage, "finalize tags and description"))?;
        state.marker = marker;
        Ok(size)
    }
}

fn marker_error(e: MarkerError) -> BuildError {
    BuildError::invalid_spec(
        e.to_string(),
        "shorten the notes of the VM outside the sombrero block",
    )
}

fn describe(marker: &Marker, existing: &str) -> Result<String, BuildError> {
    render_description(existing, marker).map_err(marker_error)
}

/// The description with as much of the package manifest as fits (see
/// [`render_description_fitting`]); `marker` becomes what is written.
fn describe_fitting(marker: &mut Marker, existing: &str) -> Result<String, BuildError> {
    render_description_fitting(existing, marker).map_err(marker_error)
}

fn tags_of(marker: &Marker) -> Result<Vec<String>, BuildError> {
    let tags = base_tags(
        &marker.owner.namespace,
        &marker.owner.name,
        &marker.metadata.os,
        &marker.metadata.image_type,
    )
    .map_err(|e| BuildError::invalid_spec(e.to_string(), "fix spec.os / spec.type"))?;
    Ok(tags.iter().map(str::to_string).collect())
}

/// The tags of a build VM: the template's and [`BUILD_TAG`] (removed by Finalize).
fn build_tags_of(marker: &Marker) -> Result<Vec<String>, BuildError> {
    let mut tags = tags_of(marker)?;
    tags.push(BUILD_TAG.to_string());
    Ok(tags)
}

/// The system disk key and its size in bytes (if the config says).
fn boot_disk(config: &VmConfig) -> Option<(String, Option<u64>)> {
    for key in ["scsi0", "virtio0", "sata0", "ide0"] {
        let Some(v) = config.value(key) else { continue };
        if v.contains("media=cdrom") || v.contains("cloudinit") || v.contains("import-from") {
            continue;
        }
        let size = v
            .split(',')
            .find_map(|p| p.strip_prefix("size="))
            .and_then(parse_size);
        return Some((key.to_string(), size));
    }
    None
}

fn has_cloudinit_drive(config: &VmConfig) -> bool {
    config.extra.iter().any(|(k, v)| {
        k.starts_with(['i', 's']) && v.as_str().is_some_and(|s| s.contains("cloudinit"))
    })
}

/// `10G`, `3584M`, `512K`, `1T`, bytes without a unit.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult as f64) as u64)
}

/// Stops (if running) and destroys a VM with its disks.
pub(crate) async fn destroy_vm(
    client: &Client,
    node: &str,
    vmid: u32,
    maybe_running: bool,
    timeouts: &Timeouts,
) -> proxmox::Result<()> {
    if maybe_running {
        match client.vm_status(node, vmid).await {
            Ok(s) if s.is_running() => {
                if !readback::stop_vm(client, node, vmid, timeouts.task).await? {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    let opts = DeleteVm {
        purge: true,
        destroy_unreferenced_disks: true,
    };
    readback::destroy_vm(client, node, vmid, opts, timeouts.task).await?;
    Ok(())
}

/// Settings only the build needs, present in `config`, as a config change removing them:
/// the cloud-init user and password, the throwaway key, the build address.
fn without_build_settings(config: &VmConfig) -> ConfigUpdate {
    let mut update = ConfigUpdate::new(QemuConfig::new());
    for key in BUILD_ONLY_SETTINGS {
        if config.value(key).is_some() {
            update = update.delete(key);
        }
    }
    update
}

/// What [`without_build_settings`] removes before the conversion.
const BUILD_ONLY_SETTINGS: [&str; 4] = ["ciuser", "cipassword", "sshkeys", "ipconfig0"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_disks() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("3584M"), Some(3584 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("x"), None);
        let c: VmConfig = serde_json::from_value(serde_json::json!({
            "ide2": "local-lvm:vm-100-cloudinit,media=cdrom",
            "scsi0": "local-lvm:vm-100-disk-0,discard=on,size=3584M"
        }))
        .unwrap();
        assert_eq!(boot_disk(&c), Some(("scsi0".into(), Some(3584 << 20))));
        assert!(has_cloudinit_drive(&c));
    }

    #[test]
    fn what_a_run_knows_of_its_config_follows_its_own_writes() {
        let c: VmConfig = serde_json::from_value(serde_json::json!({
            "description": "notes",
            "ciuser": "ubuntu",
            "ipconfig0": "ip=dhcp",
            "scsi0": "local-lvm:vm-100-disk-0,size=3584M"
        }))
        .unwrap();
        let mut k = Known::of(&c);
        assert_eq!((k.template, k.notes.as_str()), (false, "notes"));
        assert_eq!(k.disk_bytes, Some(3584 << 20));
        assert_eq!(k.build_settings, ["ciuser", "ipconfig0"]);
        // (update, notes after, build-only settings after)
        let cases = [
            (
                ConfigUpdate::new(QemuConfig::new().sshkeys(&["ssh-ed25519 AAAA k"])),
                "notes",
                vec!["ciuser", "ipconfig0", "sshkeys"],
            ),
            // Deleted while running: pending in PVE, so Finalize deletes it again.
            (
                ConfigUpdate::new(QemuConfig::new().description("marker")).delete("sshkeys"),
                "marker",
                vec!["ciuser", "ipconfig0", "sshkeys"],
            ),
            (
                ConfigUpdate::new(QemuConfig::new().ciuser("debian")),
                "marker",
                vec!["ciuser", "ipconfig0", "sshkeys"],
            ),
        ];
        for (i, (update, notes, settings)) in cases.into_iter().enumerate() {
            k.after(&update);
            assert_eq!(k.notes, notes, "case {i}");
            assert_eq!(k.build_settings, settings, "case {i}");
        }
    }

    #[test]
    fn what_a_create_call_sent_is_what_its_read_back_would_say_but_the_disk_size() {
        let sent = QemuConfig::new()
            .name("ubuntu-001")
            .description("marker\n")
            .ciuser("ubuntu")
            .set("ipconfig0", "ip=dhcp")
            .sshkeys(&["ssh-ed25519 AAAA k"])
            .scsi(0, "local-lvm:0,import-from=local:import/noble.qcow2");
        let read: VmConfig = serde_json::from_value(serde_json::json!({
            "name": "ubuntu-001",
            "description": "marker",
            "ciuser": "ubuntu",
            "ipconfig0": "ip=dhcp",
            "sshkeys": "ssh-ed25519%20AAAA%20k",
            "scsi0": "local-lvm:vm-100-disk-0,size=3584M"
        }))
        .unwrap();
        assert_eq!(
            Known::sent(&sent),
            Known {
                disk_bytes: None,
                ..Known::of(&read)
            }
        );
    }

    #[test]
    fn numbers_are_listed_again_after_a_slow_source_only() {
        let ms = Duration::from_millis;
        for (took, again) in [
            (ms(0), false),
            (ms(300), false),
            (ms(1000), true),
            (ms(90_000), true),
        ] {
            assert_eq!(reread_before_numbering(took), again, "{took:?}");
        }
    }

    #[test]
    fn failures_that_keep_the_vm_for_resume() {
        let t = BuildError::new(ErrorCategory::ProxmoxTransient, "x", "y");
        assert!(!destroys_on_failure(&t));
        let g = BuildError::new(ErrorCategory::Guest, "x", "y");
        assert!(destroys_on_failure(&g));
        let pt = BuildError::new(ErrorCategory::Timeout, "x", "y").at(Stage::Provision);
        assert!(destroys_on_failure(&pt));
        let ct = BuildError::new(ErrorCategory::Timeout, "x", "y").at(Stage::Convert);
        assert!(!destroys_on_failure(&ct));
    }
}
