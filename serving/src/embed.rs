//! The continuous-batching embedding engine.
//!
//! One dedicated thread owns the model. It waits for a request, then takes the
//! requests already queued behind it, up to `max_batch_tokens` tokens, and embeds
//! them together; requests that arrive during that forward make up the next batch,
//! as in text-embeddings-inference. So a lone client never waits for company, and
//! under load batches grow by themselves. A `max_delay` above zero makes the first
//! request of a batch wait that long for more. The encoder packs its inputs (no
//! padding), so a batch is cut, in order, into forwards of at most
//! `max_batch_tokens` real tokens. Requests whose client went away are skipped.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::model::Encoder;
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
    /// Most tokens in one forward, and in one batch taken from the queue.
    pub max_batch_tokens: usize,
    /// Longest the first request of a batch waits for company; zero runs at once
    /// with whatever is already queued.
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
    pub fn start(model: Arc<dyn Encoder>, options: EmbedOptions, metrics: Metrics) -> Self {
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

/// The next request for the batch being gathered: one already queued, or one that
/// arrives before `deadline`. `None` when there is none (or the engine's handles
/// are gone; the next `recv` sees that).
fn next_request(rx: &Receiver<EmbedRequest>, deadline: Instant) -> Option<EmbedRequest> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(wait) if !wait.is_zero() => rx.recv_timeout(wait).ok(),
        _ => rx.try_recv().ok(),
    }
}

fn run(
    model: Arc<dyn Encoder>,
    options: EmbedOptions,
    metrics: Metrics,
    rx: Receiver<EmbedRequest>,
) {
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
            match next_request(&rx, deadline) {
                Some(r) if total + tokens(&r) > budget => {
                    carry = Some(r);
                    break;
                }
                Some(r) => {
                    total += tokens(&r);
                    batch.push(r);
                }
                None => break,
            }
        }
        metrics.queue_depth.sub(batch.len() as i64);
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let results = embed_all(model.as_ref(), &batch, budget, &metrics);
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
/// tokens (one input alone may exceed it). The encoder packs its inputs, so a
/// forward costs its real tokens and the order does not matter.
fn embed_all(
    model: &dyn Encoder,
    batch: &[EmbedRequest],
    budget: usize,
    metrics: &Metrics,
) -> Result<Vec<Vec<f32>>, ServingError> {
    let inputs: Vec<Vec<u32>> = batch
        .iter()
        .flat_map(|r| r.inputs.iter().cloned())
        .collect();
    let mut out = Vec::with_capacity(inputs.len());
    let mut start = 0;
    while start < inputs.len() {
        let mut end = start + 1;
        let mut total = inputs[start].len();
        while end < inputs.len() && total + inputs[end].len() <= budget {
            total += inputs[end].len();
            end += 1;
        }
        metrics.embedding_batch.observe((end - start) as f64);
        out.extend(model.embed(&inputs[start..end])?);
        start = end;
    }
    Ok(out)
}
