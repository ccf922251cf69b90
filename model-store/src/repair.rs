//! Scrub and repair. Scrub reads every shard of a model and checks it against the
//! signed manifest; repair rebuilds missing or corrupt shards from the survivors and
//! writes them back — to the same backend when it answers, else to another one the
//! model's placement policy allows — and answers the updated locations to register.

use futures_util::StreamExt;
use serde::Serialize;

use crate::backend::Backend;
use crate::codec::{Codec, Params};
use crate::error::StoreError;
use crate::manifest::{shard_object, Locations, Registration};
use crate::placement::Place;
use crate::store::{hex, Store};

/// What is wrong with a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The backend answered but does not have it.
    Missing,
    /// It is there but its bytes do not match the manifest.
    Corrupt,
    /// The backend did not answer.
    Unreachable,
    /// The backend is not configured here.
    UnknownBackend,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultKind::Missing => "missing",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Unreachable => "backend unreachable",
            FaultKind::UnknownBackend => "backend not configured",
        })
    }
}

/// A bad shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardFault {
    /// Its stripe.
    pub stripe: usize,
    /// Its index in the stripe.
    pub shard: usize,
    /// The backend that should hold it.
    pub backend: String,
    /// What is wrong.
    pub kind: FaultKind,
}

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    /// Stripes checked.
    pub stripes: usize,
    /// Shards checked.
    pub shards: usize,
    /// Bad shards.
    pub faults: Vec<ShardFault>,
    /// Stripes with fewer than k intact shards: data lost.
    pub unrecoverable: Vec<usize>,
}

impl ScrubReport {
    /// Whether every shard is intact.
    pub fn healthy(&self) -> bool {
        self.faults.is_empty()
    }
}

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// What was found before repairing.
    pub scrub: ScrubReport,
    /// Shards rebuilt and written.
    pub rebuilt: usize,
    /// Of those, shards written to a different backend than before.
    pub moved: usize,
    /// Shards that could not be rebuilt or placed.
    pub failed: usize,
    /// Where the shards are now.
    pub locations: Locations,
}

impl RepairReport {
    /// Whether the locations changed and must be registered.
    pub fn moved_any(&self) -> bool {
        self.moved > 0
    }
}

/// Stripes checked at once.
const SCRUB_PARALLEL: usize = 4;

struct StripeCheck {
    index: usize,
    shards: Vec<Option<Vec<u8>>>,
    faults: Vec<ShardFault>,
}

impl Store {
    async fn check_stripe(&self, registration: &Registration, index: usize) -> StripeCheck {
        let manifest = &registration.manifest.manifest;
        let stripe = &manifest.stripes[index];
        let names = &registration.locations.stripes[index];
        let reads = stripe
            .shards
            .iter()
            .zip(names)
            .enumerate()
            .map(|(j, (digest, name))| {
                let backend = self.backend(name);
                async move {
                    let Some(backend) = backend else {
                        return Err(FaultKind::UnknownBackend);
                    };
                    match backend.get(&shard_object(digest)).await {
                        Ok(Some(bytes))
                            if bytes.len() as u64 == stripe.shard_len && &hex(&bytes) == digest =>
                        {
                            Ok(bytes.to_vec())
                        }
                        Ok(Some(_)) => Err(FaultKind::Corrupt),
                        Ok(None) => Err(FaultKind::Missing),
                        Err(e) => {
                            tracing::debug!(shard = j, error = %e, "shard unreachable");
                            Err(FaultKind::Unreachable)
                        }
                    }
                }
            });
        let mut check = StripeCheck {
            index,
            shards: Vec::new(),
            faults: Vec::new(),
        };
        for (j, result) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            match result {
                Ok(bytes) => check.shards.push(Some(bytes)),
                Err(kind) => {
                    check.shards.push(None);
                    check.faults.push(ShardFault {
                        stripe: index,
                        shard: j,
                        backend: names[j].clone(),
                        kind,
                    });
                }
            }
        }
        check
    }

    /// Reads every shard of a registered model and reports the bad ones.
    pub async fn scrub(&self, registration: &Registration) -> Result<ScrubReport, StoreError> {
        Ok(self.check(registration, false).await?.scrub)
    }

    /// Scrubs, then rebuilds every bad shard of a stripe that still has k intact ones
    /// and writes it where the policy allows; answers the new locations.
    pub async fn repair(&self, registration: &Registration) -> Result<RepairReport, StoreError> {
        self.check(registration, true).await
    }

    /// Checks every stripe, rebuilding bad shards when `rebuild`.
    async fn check(
        &self,
        registration: &Registration,
        rebuild: bool,
    ) -> Result<RepairReport, StoreError> {
        registration.verify()?;
        let manifest = &registration.manifest.manifest;
        let k = manifest.codec.k;
        let codec = std::sync::Arc::new(Codec::new(Params {
            k,
            m: manifest.codec.m,
        })?);
        let mut report = RepairReport {
            scrub: ScrubReport::default(),
            rebuilt: 0,
            moved: 0,
            failed: 0,
            locations: registration.locations.clone(),
        };
        let count = manifest.stripes.len();
        let mut checks =
            futures_util::stream::iter((0..count).map(|i| self.check_stripe(registration, i)))
                .buffered(SCRUB_PARALLEL);
        while let Some(check) = checks.next().await {
            note(&mut report.scrub, &check, k);
            if !rebuild || check.faults.is_empty() {
                continue;
            }
            if check.shards.iter().flatten().count() < k {
                // Too few survivors: every bad shard of the stripe stays bad.
                report.failed += check.faults.len();
                continue;
            }
            let (rebuilt, moved, failed) = self
                .rebuild_stripe(registration, &codec, check, &mut report.locations)
                .await?;
            report.rebuilt += rebuilt;
            report.moved += moved;
            report.failed += failed;
        }
        report.scrub.faults.sort_by_key(|f| (f.stripe, f.shard));
        Ok(report)
    }

    async fn rebuild_stripe(
        &self,
        registration: &Registration,
        codec: &std::sync::Arc<Codec>,
        check: StripeCheck,
        locations: &mut Locations,
    ) -> Result<(usize, usize, usize), StoreError> {
        let manifest = &registration.manifest.manifest;
        let stripe = &manifest.stripes[check.index];
        let len = stripe.len as usize;
        let shards = {
            let codec = codec.clone();
            let survivors = check.shards;
            tokio::task::spawn_blocking(move || {
                codec
                    .decode(survivors, len)
                    .and_then(|bytes| codec.code_stripe(vec![bytes.into()]))
            })
            .await
            .expect("coding does not panic")?
        };
        let attributes = self.attributes();
        let names = &mut locations.stripes[check.index];
        let (mut rebuilt, mut moved, mut failed) = (0, 0, 0);
        // Backends that failed us in this stripe are not tried again for it.
        let mut refused: Vec<String> = check
            .faults
            .iter()
            .filter(|f| matches!(f.kind, FaultKind::Unreachable | FaultKind::UnknownBackend))
            .map(|f| f.backend.clone())
            .collect();
        for fault in &check.faults {
            let shard = &shards[fault.shard];
            if hex(shard) != stripe.shards[fault.shard] {
                // The codec does not reproduce the manifest's shard: never write it.
                failed += 1;
                continue;
            }
            let mut target: Option<Backend> = match fault.kind {
                FaultKind::Missing | FaultKind::Corrupt => self.backend(&fault.backend).cloned(),
                _ => None,
            };
            let mut written = false;
            for _ in 0..self.backends().len() + 1 {
                let backend = match target.take() {
                    Some(b) => b,
                    None => {
                        let others: Vec<String> = names
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != fault.shard)
                            .map(|(_, n)| n.clone())
                            .collect();
                        // Candidates: every backend that has not failed this stripe;
                        // the stripe's other shards count against the policy's caps.
                        let pool: Vec<usize> = (0..self.backends().len())
                            .filter(|i| !refused.contains(&self.backends()[*i].name))
                            .collect();
                        let pool_attributes: Vec<_> = pool.iter().map(|i| attributes[*i]).collect();
                        let taken: Vec<usize> = pool
                            .iter()
                            .enumerate()
                            .filter(|(_, i)| others.contains(&self.backends()[**i].name))
                            .map(|(p, _)| p)
                            .collect();
                        match manifest
                            .policy
                            .place(&pool_attributes, 1, &taken, check.index)
                        {
                            Ok(picked) => self.backends()[pool[picked[0]]].clone(),
                            Err(e) => {
                                tracing::warn!(stripe = check.index, error = %e, "no backend for a rebuilt shard");
                                break;
                            }
                        }
                    }
                };
                match backend
                    .put(&shard_object(&stripe.shards[fault.shard]), shard.clone())
                    .await
                {
                    Ok(()) => {
                        if names[fault.shard] != backend.name {
                            moved += 1;
                            names[fault.shard] = backend.name.clone();
                        }
                        written = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot write a rebuilt shard");
                        refused.push(backend.name.clone());
                    }
                }
            }
            if written {
                rebuilt += 1;
            } else {
                failed += 1;
            }
        }
        Ok((rebuilt, moved, failed))
    }
}

fn note(report: &mut ScrubReport, check: &StripeCheck, k: usize) {
    report.stripes += 1;
    report.shards += check.shards.len();
    report.faults.extend(check.faults.iter().cloned());
    if check.shards.iter().flatten().count() < k {
        report.unrecoverable.push(check.index);
    }
}
