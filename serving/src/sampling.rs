//! Logits to tokens: greedy at temperature 0, otherwise temperature-scaled sampling
//! restricted to the top-p nucleus, from a generator seeded per request so a seed
//! gives the same tokens whatever else is in the batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a request's tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy; higher flattens the distribution.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (0 < p ≤ 1).
    pub top_p: f32,
    /// Seed of the request's generator; random when absent.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// One sequence's sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for one request.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// The next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .filter(|(_, p)| p.is_finite())
            .collect();
        let total: f32 = probs.iter().map(|(_, p)| p).sum();
        if total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        if self.params.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let want = self.params.top_p * total;
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, (_, p)) in probs.iter().enumerate() {
                acc += p;
                if acc >= want {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|(_, p)| p).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if draw < p {
                return id;
            }
            draw -= p;
        }
        probs.last().map(|&(id, _)| id).unwrap_or(0)
    }
}

/// The index of the largest logit; the lowest index among equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(params(0.0, 1.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(0.9, 0.95, seed));
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~0.64, 0.24, 0.09, 0.03: p = 0.8 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0.8, 3));
        for _ in 0..2000 {
            assert!(s.sample(&logits) <= 1);
        }
        let mut s = Sampler::new(params(1.0, 1.0, 3));
        let seen: std::collections::HashSet<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert_eq!(seen.len(), 4);
    }
}
