//! The model registry held in the state: dispersed-store models by digest, with
//! their signed manifests and where their shards are, and the checks a
//! registration or a relocation passes before it applies.
//!
//! A manifest enters the replicated state only if its publisher's signature covers
//! it, it is consistent, and its shard locations fit it. The control API checks that
//! before proposing and this module checks it again as the entry applies, so a
//! handler that forgot cannot let a bad entry in.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::manifest::{is_digest, Locations, ManifestError, Registration, SignedManifest};
use aigrid_api::{AllocState, DesiredState, ModelSummary, ShardHealth, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::*;

/// `GET /api/v1/models/{digest}`: one model whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelDetail {
    /// What listings show of it.
    pub summary: ModelSummary,
    /// Its manifest with the publisher's key and signature, as registered.
    pub manifest: SignedManifest,
    /// The backend of every shard of every stripe, as last set.
    pub locations: Locations,
}

/// The body of `PUT /api/v1/models/{digest}/locations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLocations {
    /// The backend of every shard of every stripe.
    pub locations: Locations,
    /// The `locations_version` the caller read; when given and no longer current the
    /// update is refused with 409, so two repairs cannot overwrite each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
}

/// A registered model as the state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelRecord {
    registration: Registration,
    created_at: Timestamp,
    locations_version: u64,
    locations_updated_at: Timestamp,
    /// What the last scrub found; none until one has reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<ShardHealth>,
}

/// A registered model as the `/v1` gateway knows it: enough to resolve the name or
/// digest a request gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName {
    /// The manifest's digest.
    pub digest: String,
    /// The name it was pushed under.
    pub name: String,
    /// When it was registered.
    pub created_at: Timestamp,
}

/// The replicated table of models, keyed by digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Models(BTreeMap<String, ModelRecord>);

/// Checks a registration whole: signature, manifest, locations. Answers the digest.
/// Both the handler and the state machine call it, so they refuse alike.
pub fn check_registration(registration: &Registration) -> Result<String, StateError> {
    let digest = registration.manifest.verify()?;
    fit_locations(&registration.locations, &registration.manifest)?;
    Ok(digest.into())
}

/// Checks that `locations` name one distinct backend per shard of every stripe.
fn fit_locations(locations: &Locations, manifest: &SignedManifest) -> Result<(), StateError> {
    locations.validate(&manifest.manifest).map_err(|e| match e {
        ManifestError::Inconsistent(m) | ManifestError::Signature(m) => StateError::BadLocations(m),
    })
}

impl ModelRecord {
    fn summary(&self, digest: &str) -> ModelSummary {
        let signed = &self.registration.manifest;
        let m = &signed.manifest;
        ModelSummary {
            digest: digest.to_owned(),
            name: m.name.clone(),
            publisher: signed.publisher.clone(),
            signature: signed.scheme().to_owned(),
            circle: self.registration.circle.clone(),
            files: m.files.len(),
            size: m.size(),
            stored_bytes: m.stored_bytes(),
            k: m.codec.k,
            m: m.codec.m,
            encrypted: m.encryption.is_some(),
            policy: m.policy.to_string(),
            created_at: self.created_at,
            locations_version: self.locations_version,
            locations_updated_at: self.locations_updated_at,
            health: self.health.clone(),
        }
    }
}

impl ClusterState {
    /// Registers a model, refusing an ed25519-only manifest for a circle whose
    /// policy requires hybrid-signed ones.
    pub(super) fn register_model(
        &mut self,
        registration: Registration,
        at: Timestamp,
    ) -> Result<Applied, StateError> {
        if let Some(circle) = &registration.circle {
            aigrid_api::spec::check_name("circle", circle)?;
            let hybrid_required = self
                .governing(circle)
                .is_some_and(|g| g.policy.require_hybrid_manifests);
            if hybrid_required && registration.manifest.ml_dsa.is_none() {
                return Err(StateError::Manifest(ManifestError::Signature(format!(
                    "circle `{circle}` requires hybrid-signed manifests (ed25519 + ML-DSA-65); \
                     push with --hybrid"
                ))));
            }
        }
        self.tables.models.register(registration, at)
    }
}

impl Models {
    // ----- reads -------------------------------------------------------------

    /// Summaries, newest first (ties by digest), of every model or of those named
    /// `name`.
    pub(crate) fn list(&self, name: Option<&str>) -> Vec<ModelSummary> {
        let mut found: Vec<ModelSummary> = self
            .0
            .iter()
            .filter(|(_, r)| name.is_none_or(|n| r.registration.manifest.manifest.name == n))
            .map(|(digest, r)| r.summary(digest))
            .collect();
        found.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.digest.cmp(&b.digest))
        });
        found
    }

    /// Every model's digest, name and registration time, by digest.
    pub(crate) fn names(&self) -> Vec<ModelName> {
        self.0
            .iter()
            .map(|(digest, r)| ModelName {
                digest: digest.clone(),
                name: r.registration.manifest.manifest.name.clone(),
                created_at: r.created_at,
            })
            .collect()
    }

    /// The model with this digest, whole.
    pub(crate) fn detail(&self, digest: &str) -> Option<ModelDetail> {
        self.0.get(digest).map(|r| ModelDetail {
            summary: r.summary(digest),
            manifest: r.registration.manifest.clone(),
            locations: r.registration.locations.clone(),
        })
    }

    /// The summary of the model with this digest.
    pub(crate) fn summary(&self, digest: &str) -> Option<ModelSummary> {
        self.0.get(digest).map(|r| r.summary(digest))
    }

    /// Checks a change of locations as [`Command::SetModelLocations`] will. Answers
    /// the current summary when the locations are already these (nothing to change).
    pub(crate) fn check_locations(
        &self,
        digest: &str,
        locations: &Locations,
        expected_version: Option<u64>,
    ) -> Result<Option<ModelSummary>, StateError> {
        let record = self
            .0
            .get(digest)
            .ok_or_else(|| StateError::not_found(ObjectKind::Model, digest))?;
        if &record.registration.locations == locations {
            return Ok(Some(record.summary(digest)));
        }
        if let Some(expected) = expected_version {
            if expected != record.locations_version {
                return Err(StateError::conflict(format!(
                    "model {digest}: its locations are at version {}, not {expected}; \
                     read them again and retry",
                    record.locations_version
                )));
            }
        }
        fit_locations(locations, &record.registration.manifest)?;
        Ok(None)
    }

    // ----- writes ------------------------------------------------------------

    /// Registers a model unless its digest is known. A known digest keeps its record
    /// (its locations included) and is answered as it is; `created` is true only for
    /// the command that created it, replays included.
    pub(crate) fn register(
        &mut self,
        registration: Registration,
        at: Timestamp,
    ) -> Result<Applied, StateError> {
        let digest = check_registration(&registration)?;
        if let Some(existing) = self.0.get(&digest) {
            return Ok(Applied::ModelRegistered {
                created: existing.created_at == at
                    && existing.registration.manifest.publisher == registration.manifest.publisher,
                summary: existing.summary(&digest),
            });
        }
        let record = ModelRecord {
            registration,
            created_at: at,
            locations_version: 1,
            locations_updated_at: at,
            health: None,
        };
        let summary = record.summary(&digest);
        self.0.insert(digest, record);
        Ok(Applied::ModelRegistered {
            summary,
            created: true,
        })
    }

    /// Replaces a model's locations and bumps their version; the same locations
    /// again change nothing (so a replay answers what the first application did).
    pub(crate) fn set_locations(
        &mut self,
        digest: &str,
        locations: Locations,
        expected_version: Option<u64>,
        at: Timestamp,
    ) -> Result<Applied, StateError> {
        if let Some(unchanged) = self.check_locations(digest, &locations, expected_version)? {
            return Ok(Applied::ModelLocationsSet(unchanged));
        }
        let record = self.0.get_mut(digest).expect("checked above");
        record.registration.locations = locations;
        record.locations_version += 1;
        record.locations_updated_at = at.max(record.created_at);
        Ok(Applied::ModelLocationsSet(record.summary(digest)))
    }

    /// Keeps a scrub's report on a model, unless a later one is kept already (two
    /// servers repairing in turn may report out of order).
    pub(crate) fn record_health(
        &mut self,
        digest: &str,
        health: ShardHealth,
    ) -> Result<Applied, StateError> {
        health.validate()?;
        let Some(record) = self.0.get_mut(digest) else {
            return Err(StateError::not_found(ObjectKind::Model, digest));
        };
        if record
            .health
            .as_ref()
            .is_none_or(|kept| kept.checked_at <= health.checked_at)
        {
            record.health = Some(health);
        }
        Ok(Applied::ModelHealthRecorded(record.summary(digest)))
    }

    /// Forgets a model.
    pub(crate) fn delete(&mut self, digest: String) -> Result<Applied, StateError> {
        match self.0.remove(&digest) {
            Some(_) => Ok(Applied::ModelDeleted { digest }),
            None => Err(StateError::not_found(ObjectKind::Model, &digest)),
        }
    }

    /// How many models are registered.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The table's rules, cheap enough to check after every apply: keys are digests,
    /// versions start at 1, locations name every stripe. Signatures are checked when
    /// a registration applies, not again here.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        for (digest, record) in &self.0 {
            if !is_digest(digest) {
                return Err(format!("model keyed `{digest}` is not a digest"));
            }
            if record.locations_version == 0 {
                return Err(format!("model {digest} has locations version 0"));
            }
            if record.locations_updated_at < record.created_at {
                return Err(format!(
                    "model {digest} was relocated before it was created"
                ));
            }
            let stripes = record.registration.manifest.manifest.stripes.len();
            if record.registration.locations.stripes.len() != stripes {
                return Err(format!(
                    "model {digest} has locations for {} of its {stripes} stripes",
                    record.registration.locations.stripes.len()
                ));
            }
        }
        Ok(())
    }
}

impl From<ManifestError> for StateError {
    fn from(e: ManifestError) -> Self {
        StateError::Manifest(e)
    }
}

impl ClusterState {
    /// Registered models, newest first; only those named `name` when given.
    pub fn models(&self, name: Option<&str>) -> Vec<ModelSummary> {
        self.tables.models.list(name)
    }

    /// The models pushed under `name`, newest first: what a deployment naming a
    /// model rather than a digest resolves to (the first).
    pub fn models_named(&self, name: &str) -> Vec<ModelSummary> {
        self.tables.models.list(Some(name))
    }

    /// The model with this digest: summary, signed manifest and locations.
    pub fn model(&self, digest: &str) -> Option<ModelDetail> {
        self.tables.models.detail(digest)
    }

    /// The model table, for the checks handlers run before proposing.
    pub(crate) fn models_table(&self) -> &Models {
        &self.tables.models
    }

    /// Every registered model's digest, name and registration time, without building
    /// summaries: what the `/v1` gateway resolves request names against.
    pub fn model_names(&self) -> Vec<ModelName> {
        self.tables.models.names()
    }

    /// The live jobs with a `model-server` group, by name.
    pub(super) fn model_job_records(&self) -> impl Iterator<Item = &JobRecord> {
        self.model_jobs
            .iter()
            .filter_map(|name| self.job_names.get(name))
            .filter_map(|id| self.tables.jobs.get(id).map(Arc::as_ref))
    }

    /// The model servers the `/v1` gateway may route to, as (model digest, where
    /// the servers reach it): wanted, running instances of `model-server` groups,
    /// each serving the model of the job version it runs (so a rollout's old
    /// instances keep serving until they are replaced), at their node's recorded
    /// address and their assigned port. What a node reports as an endpoint plays
    /// no part. Costs the model-server jobs plus their allocations, never a scan of
    /// every allocation.
    pub fn model_servers(&self) -> Vec<(&str, String)> {
        let mut found = Vec::new();
        for job in self.model_job_records() {
            for alloc in self.job_allocs(&job.id) {
                if alloc.desired != DesiredState::Run || alloc.state != AllocState::Running {
                    continue;
                }
                let task = job
                    .spec_at(alloc.job_version)
                    .and_then(|spec| spec.group(&alloc.group))
                    .map(|group| &group.task);
                let Some(aigrid_api::TaskSpec::ModelServer(task)) = task else {
                    continue;
                };
                if let Some(endpoint) = self.workload_endpoint(alloc) {
                    found.push((task.model.as_str(), endpoint));
                }
            }
        }
        found
    }

    /// Per live job deploying a model with a `model-server` task, the model's digest
    /// and the job's circle: who may call the model on `/v1`.
    pub fn deployed_circles(&self) -> Vec<(&str, Option<&str>)> {
        self.model_job_records()
            .flat_map(|job| {
                job.spec
                    .groups
                    .iter()
                    .filter_map(|group| match &group.task {
                        aigrid_api::TaskSpec::ModelServer(task) => {
                            Some((task.model.as_str(), job.spec.circle.as_deref()))
                        }
                        _ => None,
                    })
            })
            .collect()
    }

    /// The digests of the models that a live job deploys with a `model-server` task
    /// wanting at least one replica (or scaling, so it may want one), whether or not
    /// a replica runs yet: a request for one of them is told it is loading rather
    /// than that nothing serves it.
    pub fn deployed_models(&self) -> BTreeSet<&str> {
        self.model_job_records()
            .flat_map(|job| &job.spec.groups)
            .filter(|group| group.count > 0 || group.scaling.is_some())
            .filter_map(|group| match &group.task {
                aigrid_api::TaskSpec::ModelServer(task) => Some(task.model.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use aigrid_api::ErrorCode;
    use aigrid_consensus::state_machine::StateMachine;

    use super::*;
    use crate::state::{ClusterState, CommandOutput};
    use crate::testkit::{model_registration, placed, publisher};

    /// A state plus a log index, checking invariants after every command.
    #[derive(Default)]
    struct Log {
        state: ClusterState,
        index: u64,
    }

    impl Log {
        fn apply(&mut self, command: Command) -> CommandOutput {
            self.index += 1;
            let out = self.state.apply(self.index, command);
            self.state.check_invariants().unwrap();
            out
        }

        fn register(&mut self, registration: Registration, at: u64) -> CommandOutput {
            self.apply(Command::RegisterModel {
                registration,
                at: Timestamp::from_millis(at),
            })
        }

        fn relocate(
            &mut self,
            digest: &str,
            locations: Locations,
            expected_version: Option<u64>,
        ) -> CommandOutput {
            self.apply(Command::SetModelLocations {
                digest: digest.to_owned(),
                locations,
                expected_version,
                at: Timestamp::from_millis(50),
            })
        }
    }

    fn registered(out: CommandOutput) -> (ModelSummary, bool) {
        match out {
            Ok(Applied::ModelRegistered { summary, created }) => (summary, created),
            other => panic!("not a registration: {other:?}"),
        }
    }

    fn code(out: CommandOutput) -> ErrorCode {
        out.expect_err("refused").code()
    }

    #[test]
    fn registering_is_idempotent_and_keeps_the_first_record() {
        let mut log = Log::default();
        let reg = model_registration("llama", 1, 3);
        let digest = reg.manifest.manifest.digest();
        let (summary, created) = registered(log.register(reg.clone(), 10));
        assert!(created);
        assert_eq!(summary.digest, digest);
        assert_eq!(
            (
                summary.name.as_str(),
                summary.files,
                summary.size,
                summary.stored_bytes
            ),
            ("llama", 1, 12, 3 * 3 * 2)
        );
        assert_eq!((summary.k, summary.m, summary.encrypted), (2, 1, false));
        assert_eq!(summary.publisher, reg.manifest.publisher);
        assert_eq!(summary.created_at, Timestamp::from_millis(10));
        assert_eq!(summary.locations_version, 1);

        // A replay of the same command answers the same.
        assert_eq!(
            registered(log.register(reg.clone(), 10)),
            (summary.clone(), true)
        );
        // Registering the digest again, even with other locations, changes nothing.
        let mut again = reg.clone();
        again.locations = placed(3, 1);
        assert_eq!(
            registered(log.register(again, 20)),
            (summary.clone(), false)
        );
        let detail = log.state.model(&digest).unwrap();
        assert_eq!(detail.locations, reg.locations);
        assert_eq!(detail.manifest, reg.manifest);
        assert_eq!(log.state.models(None), vec![summary]);
    }

    #[test]
    fn apply_refuses_forged_or_inconsistent_manifests_and_bad_locations() {
        let mut log = Log::default();
        let good = model_registration("llama", 1, 2);

        let mut altered = good.clone();
        altered.manifest.manifest.files[0].path = "other.bin".into();
        assert_eq!(code(log.register(altered, 1)), ErrorCode::SignatureInvalid);

        let mut resigned = good.clone();
        resigned.manifest.publisher = model_registration("llama", 2, 2).manifest.publisher;
        assert_eq!(code(log.register(resigned, 1)), ErrorCode::SignatureInvalid);

        // Properly signed, but it contradicts itself.
        let mut broken = good.manifest.manifest.clone();
        broken.files[0].size += 1;
        let inconsistent = Registration {
            manifest: SignedManifest::sign(broken, &publisher(1)),
            locations: good.locations.clone(),
            circle: None,
        };
        let err = log.register(inconsistent, 1).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidManifest);
        assert!(err.to_string().contains("weights.bin"), "{err}");

        let mut crowded = good.clone();
        crowded.locations.stripes[1][2] = crowded.locations.stripes[1][0].clone();
        let err = log.register(crowded, 1).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidManifest);
        assert!(err.to_string().contains("stripe 1"), "{err}");

        let mut short = good.clone();
        short.locations.stripes.pop();
        assert_eq!(code(log.register(short, 1)), ErrorCode::InvalidManifest);

        assert!(
            log.state.models(None).is_empty(),
            "nothing entered the state"
        );
        assert!(registered(log.register(good, 1)).1);
    }

    #[test]
    fn locations_change_by_version_and_only_when_they_fit() {
        let mut log = Log::default();
        let reg = model_registration("llama", 1, 3);
        let digest = reg.manifest.manifest.digest();
        log.register(reg, 10).unwrap();

        let Ok(Applied::ModelLocationsSet(moved)) = log.relocate(&digest, placed(3, 1), Some(1))
        else {
            panic!("not set");
        };
        assert_eq!(moved.locations_version, 2);
        assert_eq!(moved.locations_updated_at, Timestamp::from_millis(50));
        assert_eq!(log.state.model(&digest).unwrap().locations, placed(3, 1));

        // The same locations again (a replay) change nothing, whatever the version.
        assert_eq!(
            log.relocate(&digest, placed(3, 1), Some(1)),
            Ok(Applied::ModelLocationsSet(moved.clone()))
        );
        // A stale version is a conflict; no version means last writer wins.
        assert_eq!(
            code(log.relocate(&digest, placed(3, 2), Some(1))),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(log.relocate(&digest, placed(2, 2), None)),
            ErrorCode::InvalidManifest
        );
        let mut doubled = placed(3, 2);
        doubled.stripes[0][1] = doubled.stripes[0][0].clone();
        assert_eq!(
            code(log.relocate(&digest, doubled, Some(2))),
            ErrorCode::InvalidManifest
        );
        assert_eq!(log.state.models(None), vec![moved]);
        let Ok(Applied::ModelLocationsSet(last)) = log.relocate(&digest, placed(3, 2), None) else {
            panic!("not set");
        };
        assert_eq!(last.locations_version, 3);
        assert_eq!(
            code(log.relocate(&"0".repeat(64), placed(3, 2), None)),
            ErrorCode::NotFound
        );
    }

    #[test]
    fn models_list_newest_first_survive_snapshots_and_are_deleted() {
        let mut log = Log::default();
        for (name, stripes, at) in [("llama", 1, 10), ("mistral", 1, 30), ("llama", 2, 20)] {
            log.register(model_registration(name, 1, stripes), at)
                .unwrap();
        }
        let listed: Vec<_> = log
            .state
            .models(None)
            .into_iter()
            .map(|m| (m.name, m.created_at.as_millis()))
            .collect();
        assert_eq!(
            listed,
            [
                ("mistral".into(), 30),
                ("llama".into(), 20),
                ("llama".into(), 10)
            ]
        );
        let llamas = log.state.models_named("llama");
        assert_eq!(llamas.len(), 2);
        assert_eq!(llamas[0].files, 1);
        assert_eq!(llamas[0].size, 8, "the newest, with two chunks");
        assert_eq!(log.state.models(Some("llama")), llamas);
        assert!(log.state.models_named("gpt").is_empty());
        assert_eq!(log.state.counts().models, 3);

        let mut restored = ClusterState::default();
        restored.restore(&log.state.snapshot().unwrap()).unwrap();
        assert_eq!(restored.models(None), log.state.models(None));
        let digest = llamas[1].digest.clone();
        assert_eq!(restored.model(&digest), log.state.model(&digest));

        let delete = || Command::DeleteModel {
            digest: digest.clone(),
            at: Timestamp::from_millis(40),
        };
        assert_eq!(
            log.apply(delete()),
            Ok(Applied::ModelDeleted {
                digest: digest.clone()
            })
        );
        assert_eq!(code(log.apply(delete())), ErrorCode::NotFound);
        assert!(log.state.model(&digest).is_none());
        assert_eq!(log.state.models_named("llama").len(), 1);
    }

    #[test]
    fn a_scrub_report_is_kept_unless_a_later_one_is_and_must_add_up() {
        let mut log = Log::default();
        let (summary, _) = registered(log.register(model_registration("llama", 1, 2), 10));
        assert_eq!(summary.health, None);
        let report = |at: u64, missing: u64| ShardHealth {
            checked_at: Timestamp::from_millis(at),
            shards: 6,
            healthy: 6 - missing,
            missing,
            rebuilt: missing,
            ..ShardHealth::default()
        };
        let record = |log: &mut Log, health: ShardHealth| {
            log.apply(Command::RecordModelHealth {
                digest: summary.digest.clone(),
                health,
            })
        };
        let Ok(Applied::ModelHealthRecorded(now)) = record(&mut log, report(20, 2)) else {
            panic!("not recorded");
        };
        assert_eq!(now.health, Some(report(20, 2)));
        // An older report arriving late is answered and changes nothing.
        record(&mut log, report(15, 0)).unwrap();
        assert_eq!(log.state.models(None)[0].health, Some(report(20, 2)));
        record(&mut log, report(30, 0)).unwrap();
        assert!(log.state.models(None)[0]
            .health
            .as_ref()
            .unwrap()
            .is_healthy());
        // Counts that do not add up, and an unknown model, are refused.
        let mut wrong = report(40, 1);
        wrong.healthy = 6;
        assert_eq!(code(record(&mut log, wrong)), ErrorCode::InvalidField);
        assert_eq!(
            code(log.apply(Command::RecordModelHealth {
                digest: "0".repeat(64),
                health: report(40, 0),
            })),
            ErrorCode::NotFound
        );
        // It survives a snapshot.
        let mut restored = ClusterState::default();
        restored.restore(&log.state.snapshot().unwrap()).unwrap();
        assert_eq!(restored.models(None), log.state.models(None));
    }

    #[test]
    fn commands_round_trip_through_the_log_encoding() {
        let command = Command::RegisterModel {
            registration: model_registration("llama", 1, 2),
            at: Timestamp::from_millis(1),
        };
        let json = serde_json::to_vec(&command).unwrap();
        assert_eq!(serde_json::from_slice::<Command>(&json).unwrap(), command);
    }
}
