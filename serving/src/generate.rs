//! The continuous-batching generation engine.
//!
//! One dedicated thread owns the model and every running sequence. Each step it
//! takes what arrived, drops sequences whose client went away, and builds one batch
//! under a token budget: first one decode token for every running sequence, then
//! prompt chunks for sequences still in their prefill, shared fairly (round robin,
//! each at most an equal share of what is left), so a long prompt is prefilled over
//! several steps instead of stalling everyone's next token. New requests join
//! between steps; finished ones leave. Sampling is per sequence with its own seeded
//! generator, so batching changes no result.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::kv_pool::{Chunk, KvPool, SeqCache};
use crate::metrics::Metrics;
use crate::model::Decoder;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use crate::ServingError;

/// One generation request.
#[derive(Debug)]
pub struct GenRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one).
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
    /// Where events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<GenEvent>,
    /// When the request arrived, for latency metrics.
    pub arrived: Instant,
}

/// Why a sequence ended (`length` also when the context is full).
pub use aigrid_api::openai::FinishReason;

/// What a request hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// New text (possibly empty while a multi-byte character or a possible stop
    /// string is held back), after one more generated token.
    Text(String),
    /// The end.
    Done {
        /// Why it ended.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (the end-of-sequence token not counted).
        completion_tokens: usize,
    },
    /// The engine failed on this request.
    Failed(String),
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Tokens one step may process.
    pub max_batch_tokens: usize,
    /// Sequences in the batch at once.
    pub max_running_sequences: usize,
    /// Requests waiting to be admitted; more are refused.
    pub max_waiting: usize,
    /// Bytes of KV cache for the running sequences together. It is cut into slots
    /// of the model's context (or the whole budget, when less), at most
    /// `max_running_sequences` of them; a sequence holds a slot from admission to its
    /// end, and requests wait while none is free.
    pub kv_cache_bytes: usize,
}

/// A handle to the engine thread; the thread ends when every handle is dropped and
/// the running sequences are done.
#[derive(Clone)]
pub struct GenerationEngine {
    tx: SyncSender<GenRequest>,
    context: usize,
    metrics: Metrics,
}

impl GenerationEngine {
    /// Starts the engine thread, with its KV pool.
    pub fn start(
        model: Arc<dyn Decoder>,
        tokenizer: TextTokenizer,
        options: EngineOptions,
        metrics: Metrics,
    ) -> Result<GenerationEngine, ServingError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(options.max_waiting.max(1));
        // Every running sequence gets its decode token each step.
        let options = EngineOptions {
            max_running_sequences: options
                .max_running_sequences
                .clamp(1, options.max_batch_tokens.max(1)),
            ..options
        };
        let (slots, capacity) = pool_shape(model.as_ref(), &options);
        let pool = model.new_pool(slots, capacity)?;
        let context = pool.capacity();
        let worker = Worker {
            pool,
            model,
            tokenizer,
            options,
            metrics: metrics.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            turn: 0,
        };
        std::thread::Builder::new()
            .name("aigrid-generate".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the generation thread");
        Ok(GenerationEngine {
            tx,
            context,
            metrics,
        })
    }

    /// The longest sequence (prompt and output) served: the model's context length,
    /// or the whole KV cache budget when that is less.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Queues a request; refuses it when the queue is full.
    pub fn submit(&self, request: GenRequest) -> Result<(), ServingError> {
        if request.prompt.is_empty() || request.max_tokens == 0 {
            return Err(ServingError::invalid(
                "prompt",
                "a request needs a prompt token and max_tokens of at least 1",
            ));
        }
        match self.tx.try_send(request) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(ServingError::Overloaded(
                "the generation queue is full; retry later".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(ServingError::NotReady(
                "the generation engine stopped".into(),
            )),
        }
    }
}

struct Seq {
    req: GenRequest,
    cache: SeqCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    generated: usize,
    decoder: IncrementalDecoder,
    sampler: Sampler,
    /// Decoded text not yet sent: it may be the start of a stop string.
    held: String,
    last_token: Option<Instant>,
}

impl Seq {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.req.prompt.len()
    }
}

/// Slots and tokens per slot of the KV pool: a slot holds the whole context (or the
/// whole budget, when less), and there are as many as the budget holds, at most one
/// per running sequence.
fn pool_shape(model: &dyn Decoder, options: &EngineOptions) -> (usize, usize) {
    let per_token = model.kv_bytes_per_token().max(1);
    let budget = (options.kv_cache_bytes / per_token).max(1);
    let capacity = model.context().min(budget);
    let slots = (budget / capacity).clamp(1, options.max_running_sequences.max(1));
    (slots, capacity)
}

struct Worker {
    pool: KvPool,
    model: Arc<dyn Decoder>,
    tokenizer: TextTokenizer,
    options: EngineOptions,
    metrics: Metrics,
    waiting: VecDeque<GenRequest>,
    active: Vec<Seq>,
    /// Rotates which prefilling sequence is served first.
    turn: usize,
}

impl Worker {
    fn run(mut self, rx: Receiver<GenRequest>) {
        loop {
            if self.waiting.is_empty() && self.active.is_empty() {
                match rx.recv() {
                    Ok(req) => self.waiting.push_back(req),
                    Err(_) => return,
                }
            }
            while let Ok(req) = rx.try_recv() {
                self.waiting.push_back(req);
            }
            self.drop_cancelled();
            self.admit();
            self.metrics.running_sequences.set(self.active.len() as i64);
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        self.metrics
            .queue_depth
            .sub((before - self.waiting.len()) as i64);
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].req.events.is_closed() {
                let seq = self.active.swap_remove(i);
                self.pool.release(seq.cache);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.options.max_running_sequences && !self.waiting.is_empty() {
            let Some(cache) = self.pool.acquire() else {
                break;
            };
            let req = self.waiting.pop_front().expect("checked not empty");
            self.metrics.queue_depth.dec();
            self.active.push(Seq {
                cache,
                prefilled: 0,
                next: None,
                generated: 0,
                decoder: self.tokenizer.decoder(),
                sampler: Sampler::new(req.sampling),
                held: String::new(),
                last_token: None,
                req,
            });
        }
    }

    /// Which part of each active sequence goes into this step: `(index, start, len)`
    /// where a decode is `len` 1 of the pending token.
    fn plan(&mut self) -> Vec<(usize, usize, usize)> {
        let mut budget = self.options.max_batch_tokens.max(1);
        let mut plan = Vec::new();
        for (i, seq) in self.active.iter().enumerate() {
            if !seq.in_prefill() && budget > 0 {
                plan.push((i, 0, 1));
                budget -= 1;
            }
        }
        let prefilling: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].in_prefill())
            .collect();
        if prefilling.is_empty() || budget == 0 {
            return plan;
        }
        let n = prefilling.len();
        self.turn = self.turn.wrapping_add(1);
        let mut left = n;
        for k in 0..n {
            let i = prefilling[(self.turn + k) % n];
            if budget == 0 {
                break;
            }
            let seq = &self.active[i];
            let remaining = seq.req.prompt.len() - seq.prefilled;
            let share = (budget / left).max(1);
            let len = remaining.min(share).min(budget);
            plan.push((i, seq.prefilled, len));
            budget -= len;
            left -= 1;
        }
        plan
    }

    fn step(&mut self) {
        let plan = self.plan();
        if plan.is_empty() {
            return;
        }
        let tokens: usize = plan.iter().map(|p| p.2).sum();
        self.metrics.generation_batch.observe(plan.len() as f64);
        self.metrics.generation_step_tokens.observe(tokens as f64);
        // Inputs first (they borrow the prompts), then the caches mutably.
        let inputs: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, start, len)| {
                let seq = &self.active[i];
                match seq.next {
                    Some(t) if !seq.in_prefill() => vec![t],
                    _ => seq.req.prompt[start..start + len].to_vec(),
                }
            })
            .collect();
        let order: Vec<usize> = plan.iter().map(|p| p.0).collect();
        let result = {
            let mut caches: Vec<Option<&mut SeqCache>> =
                self.active.iter_mut().map(|s| Some(&mut s.cache)).collect();
            let mut chunks: Vec<Chunk<'_>> = order
                .iter()
                .zip(&inputs)
                .map(|(&i, tokens)| Chunk {
                    tokens,
                    cache: caches[i].take().expect("a sequence appears once per step"),
                })
                .collect();
            self.model.forward(&self.pool, &mut chunks)
        };
        let rows = match result.and_then(|l| Ok(l.to_vec2::<f32>()?)) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "generation step failed");
                let mut failed: Vec<usize> = order.clone();
                failed.sort_unstable();
                for i in failed.into_iter().rev() {
                    let seq = self.active.swap_remove(i);
                    let _ = seq.req.events.send(GenEvent::Failed(e.to_string()));
                    self.pool.release(seq.cache);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for ((&(i, _, len), logits), input) in plan.iter().zip(&rows).zip(&inputs) {
            let seq = &mut self.active[i];
            if seq.in_prefill() {
                seq.prefilled += len;
                if seq.in_prefill() {
                    continue;
                }
                self.metrics.tokens_in.inc_by(seq.req.prompt.len() as u64);
            }
            debug_assert_eq!(input.len(), len);
            let token = seq.sampler.sample(logits);
            if let Some(reason) = self.accept(i, token) {
                finished.push((i, reason));
            }
        }
        finished.sort_unstable_by_key(|f| f.0);
        for (i, reason) in finished.into_iter().rev() {
            let mut seq = self.active.swap_remove(i);
            finish(&mut seq, reason);
            self.pool.release(seq.cache);
        }
    }

    /// Takes a sampled token; says when the sequence is done.
    fn accept(&mut self, i: usize, token: u32) -> Option<FinishReason> {
        let context = self.pool.capacity();
        let eos = self.tokenizer.eos_ids().contains(&token);
        let seq = &mut self.active[i];
        let now = Instant::now();
        match seq.last_token {
            None => self
                .metrics
                .time_to_first_token
                .observe(now.duration_since(seq.req.arrived).as_secs_f64()),
            Some(at) => self
                .metrics
                .inter_token_latency
                .observe(now.duration_since(at).as_secs_f64()),
        }
        seq.last_token = Some(now);
        if eos {
            // A multi-byte character cut short by the end is sent as it decodes.
            if let Ok(tail) = seq.decoder.finish() {
                seq.held.push_str(&tail);
            }
            if let Some(at) = find_stop(&seq.held, &seq.req.stop) {
                seq.held.truncate(at);
            }
            return Some(FinishReason::Stop);
        }
        seq.generated += 1;
        self.metrics.tokens_out.inc();
        seq.next = Some(token);
        let text = match seq.decoder.push(token) {
            Ok(text) => text,
            Err(e) => {
                let _ = seq.req.events.send(GenEvent::Failed(e.to_string()));
                return Some(FinishReason::Stop);
            }
        };
        seq.held.push_str(&text);
        if let Some(at) = find_stop(&seq.held, &seq.req.stop) {
            seq.held.truncate(at);
            return Some(FinishReason::Stop);
        }
        let keep = held_back(&seq.held, &seq.req.stop);
        let send: String = seq.held.drain(..seq.held.len() - keep).collect();
        let _ = seq.req.events.send(GenEvent::Text(send));
        if seq.generated >= seq.req.max_tokens || seq.cache.len() + 1 >= context {
            return Some(FinishReason::Length);
        }
        None
    }
}

/// Sends what is left and the end.
fn finish(seq: &mut Seq, reason: FinishReason) {
    let mut rest = std::mem::take(&mut seq.held);
    if reason == FinishReason::Length {
        if let Ok(tail) = seq.decoder.finish() {
            rest.push_str(&tail);
        }
        if let Some(at) = find_stop(&rest, &seq.req.stop) {
            rest.truncate(at);
        }
    }
    if !rest.is_empty() {
        let _ = seq.req.events.send(GenEvent::Text(rest));
    }
    let _ = seq.req.events.send(GenEvent::Done {
        reason,
        prompt_tokens: seq.req.prompt.len(),
        completion_tokens: seq.generated,
    });
}

/// Where the earliest stop string starts in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How many bytes at the end of `text` could begin a stop string, so must wait.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for stop in stops.iter().filter(|s| !s.is_empty()) {
        for (at, _) in stop.char_indices().skip(1) {
            let prefix = &stop[..at];
            if at > keep && text.ends_with(prefix) {
                keep = at;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_starts_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\ndef", &stops), Some(3));
        assert_eq!(find_stop("xxENDyy\n\n", &stops), Some(2));
        assert_eq!(find_stop("nothing", &stops), None);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abcE", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
    }
}
