//! The dynamic-batching embedding engine.
//!
//! One dedicated thread owns the model. It waits for a request, then gathers more
//! until the batch holds `max_batch_tokens` tokens or the first request has waited
//! `max_delay`, and embeds them together: inputs sorted by length and cut into
//! forwards of at most `max_batch_tokens` padded tokens, so a long input does not
//! pad a batch of short ones. Requests whose client went away are skipped.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::bert::Embedder;
use crate::metrics::Metrics;
use crate::ServingError;

/// One embedding request: token ids of each input.
pub struct EmbedRequest {
    /// Inputs, already tokenized and truncated to the model's length.
    pub inputs: Vec<Vec<u32>>,
    /// Where the vectors go, one per input in order.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ServingError>>,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Most padded tokens in one forward, and the size a batch waits for.
    pub max_batch_tokens: usize,
    /// Longest the first request of a batch waits for company.
    pub max_delay: Duration,
    /// Requests waiting; more are refused.
    pub max_waiting: usize,
}

/// A handle to the engine thread.
#[derive(Clone)]
pub struct EmbeddingEngine {
    tx: SyncSender<EmbedRequest>,
    metrics: Metrics,
}

impl EmbeddingEngine {
    /// Starts the engine thread.
    pub fn start(model: Arc<Embedder>, options: EmbedOptions, metrics: Metrics) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(options.max_waiting.max(1));
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("aigrid-embed".into())
            .spawn(move || run(model, options, m, rx))
            .expect("spawning the embedding thread");
        EmbeddingEngine { tx, metrics }
    }

    /// Queues a request; refuses it when the queue is full.
    pub fn submit(&self, request: EmbedRequest) -> Result<(), ServingError> {
        match self.tx.try_send(request) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(ServingError::Overloaded(
                "the embedding queue is full; retry later".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(ServingError::NotReady(
                "the embedding engine stopped".into(),
            )),
        }
    }
}

fn tokens(request: &EmbedRequest) -> usize {
    request.inputs.iter().map(Vec::len).sum()
}

fn run(model: Arc<Embedder>, options: EmbedOptions, metrics: Metrics, rx: Receiver<EmbedRequest>) {
    let budget = options.max_batch_tokens.max(1);
    let mut carry: Option<EmbedRequest> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + options.max_delay;
        let mut total = tokens(&first);
        let mut batch = vec![first];
        while total < budget {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(r) if total + tokens(&r) > budget => {
                    carry = Some(r);
                    break;
                }
                Ok(r) => {
                    total += tokens(&r);
                    batch.push(r);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queue_depth.sub(batch.len() as i64);
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let results = embed_all(&model, &batch, budget, &metrics);
        let mut at = 0;
        for request in batch {
            let n = request.inputs.len();
            let answer = match &results {
                Ok(vectors) => Ok(vectors[at..at + n].to_vec()),
                Err(e) => Err(ServingError::model(e.to_string())),
            };
            at += n;
            let _ = request.reply.send(answer);
        }
    }
}

/// Every input of the batch, in order, embedded in forwards of at most `budget`
/// padded tokens over inputs sorted by length.
fn embed_all(
    model: &Embedder,
    batch: &[EmbedRequest],
    budget: usize,
    metrics: &Metrics,
) -> Result<Vec<Vec<f32>>, ServingError> {
    let inputs: Vec<&Vec<u32>> = batch.iter().flat_map(|r| r.inputs.iter()).collect();
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| inputs[i].len());
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
    let mut start = 0;
    while start < order.len() {
        // Sorted by length: the padded size of order[start..end] is (end-start) × the last length.
        let mut end = start + 1;
        while end < order.len() && (end + 1 - start) * inputs[order[end]].len().max(1) <= budget {
            end += 1;
        }
        let group: Vec<Vec<u32>> = order[start..end]
            .iter()
            .map(|&i| inputs[i].clone())
            .collect();
        metrics.embedding_batch.observe(group.len() as f64);
        let vectors = model.embed(&group)?;
        for (&i, v) in order[start..end].iter().zip(vectors) {
            out[i] = v;
        }
        start = end;
    }
    Ok(out)
}
