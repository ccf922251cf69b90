//! Checking requests' signatures together. A signature check is the largest piece
//! of a signed write's work at the edge (about 40 µs of a core), and checked in a
//! batch an ed25519 signature costs about half that ([`aigrid_api::verify_all`]).
//! Requests that reach their check while another request is checking signatures
//! queue theirs. The checking request first lets the requests already running on
//! this server reach their checks, so a burst of writes (closed-loop clients
//! answered by one commit) is checked as one, then checks up to 64 of the queue
//! with its own, and one more batch; whatever is still queued then goes on in a
//! task of its own until the queue is empty, so no request waits on more than two
//! batches of others' signatures. A request alone checks its own at once.
//!
//! Every check is answered as it would be alone: a batch that fails is checked
//! signature by signature. The queue holds only requests whose handlers wait on it.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, Registry};
use tokio::sync::oneshot;

use aigrid_api::auth::AuthError;
use aigrid_api::{PublicKey, SignatureCheck};

/// The most signatures one batch checks: past it the batch's saving hardly grows,
/// and the request checking it waits longer.
const MAX_BATCH: usize = 64;

/// Requests' signatures waiting to be checked, and whether a request is checking.
pub(crate) struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<Pending>,
    /// How many signatures each batch checked (`aigrid_http_signature_batch_size`).
    batch_sizes: Histogram,
}

#[derive(Default)]
struct Pending {
    queue: Vec<Job>,
    /// A request (or the task it left the rest to) is checking: others queue.
    checking: bool,
}

/// One queued check and where its verdict goes.
struct Job {
    key: PublicKey,
    message: Vec<u8>,
    signature: Vec<u8>,
    verdict: oneshot::Sender<Result<(), AuthError>>,
}

impl Verifier {
    /// A verifier whose batch sizes `registry` exports.
    pub(crate) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let batch_sizes = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_http_signature_batch_size",
                "Request signatures checked together in one batch",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )?;
        registry.register(Box::new(batch_sizes.clone()))?;
        Ok(Verifier {
            inner: Arc::new(Inner {
                pending: Mutex::default(),
                batch_sizes,
            }),
        })
    }

    /// Checks `signature` by `key` over `message`, as [`PublicKey::verify`] does,
    /// with whatever other requests are checking at the same moment.
    pub(crate) async fn verify(
        &self,
        key: PublicKey,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), AuthError> {
        let (verdict, answer) = oneshot::channel();
        let job = Job {
            key,
            message,
            signature,
            verdict,
        };
        let lead = {
            let mut pending = self.inner.pending.lock();
            if pending.checking {
                pending.queue.push(job);
                None
            } else {
                // Nobody is checking: this request checks its own at once, unless
                // others arrive while it steps aside below.
                pending.checking = true;
                Some(job)
            }
        };
        if let Some(lead) = lead {
            // Whatever happens to this request from here, the queue is worked off:
            // the guard checks when it is dropped, also when the request is
            // dropped while it yields.
            let checking = Checking {
                inner: &self.inner,
                own: Some(lead),
            };
            // Other requests that are ready to run reach their checks first and
            // queue them, so they go into this request's batch.
            tokio::task::yield_now().await;
            drop(checking);
        }
        answer.await.unwrap_or(Err(AuthError::BadSignature))
    }
}

impl Inner {
    /// Checks one batch from the queue, `own` first; false, and the turn to check
    /// ends, when there was nothing to check.
    fn check_next(&self, own: Option<Job>) -> bool {
        let mut batch: Vec<Job> = own.into_iter().collect();
        {
            let mut pending = self.pending.lock();
            let take = pending.queue.len().min(MAX_BATCH - batch.len());
            batch.extend(pending.queue.drain(..take));
            if batch.is_empty() {
                pending.checking = false;
                return false;
            }
        }
        self.batch_sizes.observe(batch.len() as f64);
        check(batch);
        true
    }
}

/// The request checking signatures. Dropped, it checks its own batch and one
/// more, and leaves whatever is still queued to a task of its own, which goes on
/// until the queue is empty: no request answers later for more than two batches
/// of others' signatures, however many keep coming.
struct Checking<'a> {
    inner: &'a Arc<Inner>,
    own: Option<Job>,
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        let inner = self.inner;
        if !(inner.check_next(self.own.take()) && inner.check_next(None)) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let inner = Arc::clone(inner);
                runtime.spawn(async move {
                    while inner.check_next(None) {
                        tokio::task::yield_now().await;
                    }
                });
            }
            // Outside a runtime (one being shut down), here and now.
            Err(_) => while inner.check_next(None) {},
        }
    }
}

/// Checks `batch` and sends each job its verdict.
fn check(batch: Vec<Job>) {
    let checks: Vec<SignatureCheck<'_>> = batch
        .iter()
        .map(|job| SignatureCheck {
            key: &job.key,
            message: &job.message,
            signature: &job.signature,
        })
        .collect();
    let verdicts = aigrid_api::verify_all(&checks);
    drop(checks);
    for (job, verdict) in batch.into_iter().zip(verdicts) {
        // A request that went away no longer waits for its verdict.
        let _ = job.verdict.send(verdict);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future as _;
    use std::task::{Context, Poll, Waker};

    use aigrid_api::{IdentityKey, KeyAlgorithm};

    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(&Registry::new()).unwrap()
    }

    /// Waits until nobody checks and nothing is queued.
    async fn settled(verifier: &Verifier) {
        for _ in 0..5_000 {
            {
                let pending = verifier.inner.pending.lock();
                if pending.queue.is_empty() && !pending.checking {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("the verifier never settled");
    }

    fn key(n: u8) -> IdentityKey {
        IdentityKey::from_seed(KeyAlgorithm::Ed25519, [n; 32])
    }

    /// Many requests checking at once each get their own signature's verdict:
    /// good ones hold, and a bad one among them is refused without the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_request_gets_its_own_verdict_when_checked_together() {
        let verifier = Arc::new(verifier());
        let mut tasks = Vec::new();
        for n in 0..200u16 {
            let verifier = Arc::clone(&verifier);
            tasks.push(tokio::spawn(async move {
                let signer = key((n % 7) as u8 + 1);
                let message = format!("request {n}").into_bytes();
                let mut signature = signer.sign(&message);
                let bad = n % 13 == 5;
                if bad {
                    signature[3] ^= 0x10;
                }
                let verdict = verifier.verify(signer.public(), message, signature).await;
                (bad, verdict)
            }));
        }
        for task in tasks {
            let (bad, verdict) = task.await.unwrap();
            if bad {
                assert!(
                    matches!(verdict, Err(AuthError::BadSignature)),
                    "{verdict:?}"
                );
            } else {
                assert!(verdict.is_ok(), "{verdict:?}");
            }
        }
        settled(&verifier).await;
        // Every signature was checked once, and some together.
        assert_eq!(verifier.inner.batch_sizes.get_sample_sum(), 200.0);
        assert!(
            verifier.inner.batch_sizes.get_sample_count() < 200,
            "no two signatures were checked together"
        );
    }

    /// A hybrid key's signature needs both halves, checked together with others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hybrid_signature_needs_both_halves_in_a_batch() {
        let verifier = Arc::new(verifier());
        let hybrid = IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [9; 32]);
        let message = b"hybrid".to_vec();
        let good = hybrid.sign(&message);
        let mut bent_ml = good.clone();
        let last = bent_ml.len() - 1;
        bent_ml[last - 40] ^= 1;
        let mut tasks = Vec::new();
        for (n, signature) in [good.clone(), bent_ml, good].into_iter().enumerate() {
            let hybrid_check = (Arc::clone(&verifier), hybrid.public(), message.clone());
            tasks.push(tokio::spawn(async move {
                let (verifier, public, message) = hybrid_check;
                (n, verifier.verify(public, message, signature).await)
            }));
            let plain = key(n as u8 + 1);
            let plain_check = (Arc::clone(&verifier), message.clone());
            tasks.push(tokio::spawn(async move {
                let (verifier, message) = plain_check;
                let signature = plain.sign(&message);
                (
                    usize::MAX,
                    verifier.verify(plain.public(), message, signature).await,
                )
            }));
        }
        for task in tasks {
            let (n, verdict) = task.await.unwrap();
            assert_eq!(verdict.is_ok(), n != 1, "{n}: {verdict:?}");
        }
    }

    /// A signature by another key, or of the wrong length for the key, is refused.
    #[tokio::test]
    async fn a_stranger_or_a_malformed_signature_is_refused() {
        let verifier = verifier();
        let (owner, stranger) = (key(1), key(2));
        let message = b"POST /api/v1/jobs".to_vec();
        let forged = stranger.sign(&message);
        assert!(matches!(
            verifier
                .verify(owner.public(), message.clone(), forged)
                .await,
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            verifier
                .verify(owner.public(), message.clone(), vec![0; 10])
                .await,
            Err(AuthError::Malformed(_))
        ));
        let good = owner.sign(&message);
        assert!(verifier.verify(owner.public(), message, good).await.is_ok());
    }

    /// A request dropped while it holds the turn to check still has the queue
    /// worked off: the requests waiting on it get their verdicts.
    #[tokio::test]
    async fn a_checking_request_that_goes_away_leaves_no_one_waiting() {
        let verifier = verifier();
        let signer = key(3);
        let message = b"m".to_vec();
        let mut leading =
            Box::pin(verifier.verify(signer.public(), message.clone(), signer.sign(&message)));
        // First poll: it takes the turn and steps aside.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(leading.as_mut().poll(&mut cx), Poll::Pending));
        let (verdict, answer) = oneshot::channel();
        verifier.inner.pending.lock().queue.push(Job {
            key: signer.public(),
            message: message.clone(),
            signature: signer.sign(&message),
            verdict,
        });
        drop(leading);
        assert!(answer.await.unwrap().is_ok());
        assert!(!verifier.inner.pending.lock().checking);
    }

    /// Under a flood the checking request answers after its own batch and one
    /// more; a task of its own checks the rest, and every request is answered.
    #[tokio::test]
    async fn a_flood_is_left_to_a_task_and_every_request_is_answered() {
        let verifier = verifier();
        let signer = key(4);
        let message = b"m".to_vec();
        let signature = signer.sign(&message);
        let mut leading =
            Box::pin(verifier.verify(signer.public(), message.clone(), signature.clone()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(leading.as_mut().poll(&mut cx), Poll::Pending));
        let mut answers = Vec::new();
        for _ in 0..3 * MAX_BATCH {
            let (verdict, answer) = oneshot::channel();
            verifier.inner.pending.lock().queue.push(Job {
                key: signer.public(),
                message: message.clone(),
                signature: signature.clone(),
                verdict,
            });
            answers.push(answer);
        }
        assert!(leading.await.is_ok());
        // Its own batch (itself and 63 others) and one more of 64; the single
        // threaded test runtime has not run the task yet.
        assert_eq!(
            verifier.inner.pending.lock().queue.len(),
            3 * MAX_BATCH + 1 - 2 * MAX_BATCH
        );
        for answer in answers {
            assert!(answer.await.unwrap().is_ok());
        }
        settled(&verifier).await;
        assert_eq!(
            verifier.inner.batch_sizes.get_sample_sum(),
            (3 * MAX_BATCH + 1) as f64
        );
    }
}
