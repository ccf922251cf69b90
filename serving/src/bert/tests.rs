//! Pooling files, padding and batching invariance, bf16 beside f32, and the fused
//! kernels beside candle's ops.

use super::pooling::*;
use super::*;
use candle_nn::VarMap;
use std::collections::HashMap;

const CONFIG: &str = r#"{
    "architectures": ["BertModel"], "model_type": "bert",
    "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
    "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0
}"#;

const MODULES: &str = r#"[
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
]"#;

fn pooling_config(mode: &str) -> String {
    format!(
        r#"{{"word_embedding_dimension": 384, "pooling_mode_cls_token": {},
            "pooling_mode_mean_tokens": {}, "pooling_mode_max_tokens": {},
            "pooling_mode_mean_sqrt_len_tokens": false}}"#,
        mode == "cls",
        mode == "mean",
        mode == "max"
    )
}

/// A randomly initialized BERT and its tensors by name.
fn random_bert(pooling: Pooling, precision: Precision) -> (Embedder, HashMap<String, Tensor>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let embedder = Embedder::new(vb, CONFIG.as_bytes(), pooling, precision).unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    (embedder, tensors)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn pooling_from_sentence_transformers_files() {
    for (mode, want) in [
        ("mean", PoolingMode::Mean),
        ("cls", PoolingMode::Cls),
        ("max", PoolingMode::Max),
    ] {
        let config = pooling_config(mode);
        let pooling =
            Pooling::from_files(Some(MODULES.as_bytes()), Some(config.as_bytes())).unwrap();
        assert_eq!(
            pooling,
            Pooling {
                mode: want,
                normalize: true
            }
        );
    }
    let no_normalize = r#"[{"idx": 1, "name": "1", "path": "1_Pooling/",
        "type": "sentence_transformers.models.Pooling"}]"#;
    let config = pooling_config("cls");
    let pooling =
        Pooling::from_files(Some(no_normalize.as_bytes()), Some(config.as_bytes())).unwrap();
    assert!(!pooling.normalize);
    assert_eq!(
        Pooling::config_path(no_normalize.as_bytes())
            .unwrap()
            .as_deref(),
        Some("1_Pooling/config.json")
    );
    assert_eq!(
        Pooling::config_path(MODULES.as_bytes()).unwrap().as_deref(),
        Some("1_Pooling/config.json")
    );
    assert_eq!(Pooling::config_path(b"[]").unwrap(), None);
    assert_eq!(
        Pooling::from_files(None, None).unwrap(),
        Pooling {
            mode: PoolingMode::Mean,
            normalize: true
        }
    );
    let weighted = br#"{"pooling_mode_weightedmean_tokens": true}"#;
    assert!(Pooling::from_files(None, Some(weighted)).is_err());
    let two = br#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#;
    assert!(Pooling::from_files(None, Some(two)).is_err());
}

#[test]
fn padding_does_not_change_embeddings() {
    padding_does_not_change_embeddings_in(Precision::F32);
}

#[test]
#[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
fn padding_does_not_change_embeddings_with_bf16_products() {
    padding_does_not_change_embeddings_in(Precision::Bf16);
}

fn padding_does_not_change_embeddings_in(precision: Precision) {
    for mode in [PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max] {
        let pooling = Pooling {
            mode,
            normalize: true,
        };
        let (embedder, _) = random_bert(pooling, precision);
        let short = vec![2, 17, 33, 3];
        let long: Vec<u32> = (0..60).map(|i| 1 + (i * 7) % 99).collect();
        let alone = embedder.embed(std::slice::from_ref(&short)).unwrap();
        let batch = embedder
            .embed(&[long.clone(), short.clone(), long])
            .unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[1].len(), embedder.dimensions());
        let cos = cosine(&alone[0], &batch[1]);
        assert!(cos > 0.9999, "{mode:?} {precision}: cosine {cos}");
        let norm: f32 = batch[1].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{mode:?}: norm {norm}");
        assert!(cosine(&batch[0], &batch[1]) < 0.9999);
    }
}

#[test]
#[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
fn bf16_products_keep_embeddings_close_to_f32() {
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: true,
    };
    let (f32_embedder, tensors) = random_bert(pooling, Precision::F32);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let bf16 = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::Bf16).unwrap();
    let inputs: Vec<Vec<u32>> = (1..6)
        .map(|n| (0..n * 9).map(|i| 1 + (i * 13 + n) % 99).collect())
        .collect();
    let (a, b) = (
        f32_embedder.embed(&inputs).unwrap(),
        bf16.embed(&inputs).unwrap(),
    );
    for (a, b) in a.iter().zip(&b) {
        let cos = cosine(a, b);
        assert!(cos > 0.999 && cos < 1.0 - 1e-9, "cosine {cos}");
    }
}

#[test]
fn loads_with_the_bert_prefix() {
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: false,
    };
    let (plain, tensors) = random_bert(pooling, Precision::F32);
    let prefixed = tensors
        .into_iter()
        .map(|(name, t)| (format!("bert.{name}"), t))
        .collect();
    let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
    let prefixed = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::F32).unwrap();
    let input = vec![vec![5, 6, 7]];
    let (a, b) = (
        plain.embed(&input).unwrap(),
        prefixed.embed(&input).unwrap(),
    );
    assert!(cosine(&a[0], &b[0]) > 0.99999);
    assert_eq!(prefixed.max_tokens(), 64);
    assert_eq!(prefixed.dimensions(), 32);
}

#[test]
fn bad_inputs_are_errors() {
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: true,
    };
    let (embedder, _) = random_bert(pooling, Precision::F32);
    assert!(embedder.embed(&[]).unwrap().is_empty());
    assert!(matches!(
        embedder.embed(&[vec![]]),
        Err(ServingError::InvalidRequest { .. })
    ));
    assert!(matches!(
        embedder.embed(&[vec![1; 65]]),
        Err(ServingError::ContextLength(_))
    ));
    assert!(matches!(
        embedder.embed(&[vec![100]]),
        Err(ServingError::InvalidRequest { .. })
    ));
}

#[test]
fn a_packed_batch_embeds_each_input_as_alone() {
    for mode in [PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max] {
        let pooling = Pooling {
            mode,
            normalize: mode != PoolingMode::Max,
        };
        let (embedder, _) = random_bert(pooling, Precision::F32);
        let inputs: Vec<Vec<u32>> = [1usize, 9, 2, 64, 17, 5]
            .iter()
            .enumerate()
            .map(|(s, &len)| {
                (0..len)
                    .map(|i| 1 + ((i * 13 + s * 5) % 99) as u32)
                    .collect()
            })
            .collect();
        let batch = embedder.embed(&inputs).unwrap();
        assert_eq!(batch.len(), inputs.len());
        for (input, packed) in inputs.iter().zip(&batch) {
            let alone = embedder.embed(std::slice::from_ref(input)).unwrap();
            let cos = cosine(&alone[0], packed);
            assert!(
                cos >= 0.99999,
                "{mode:?}, {} tokens: cosine {cos}",
                input.len()
            );
        }
    }
}

#[test]
fn candles_ops_match_the_fused_kernels() {
    // f16 and bf16 take candle's ops (as other devices do; a GPU runs an encoder
    // wholly in bf16 for `Precision::Bf16`); f32 the CPU kernels.
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: true,
    };
    let (fused, tensors) = random_bert(pooling, Precision::F32);
    let inputs = vec![
        vec![2, 17, 33, 3],
        (0..40).map(|i| 1 + (i * 11) % 99).collect(),
    ];
    let want = fused.embed(&inputs).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &Device::Cpu);
        let plain = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::F32).unwrap();
        for (a, b) in want.iter().zip(&plain.embed(&inputs).unwrap()) {
            assert!(cosine(a, b) > 0.999, "{dtype:?}: cosine {}", cosine(a, b));
        }
    }
}

/// The padded batch a GPU runs attends as the sequences do one at a time.
#[test]
fn padded_attention_equals_attention_one_sequence_at_a_time() {
    use rand::{Rng, SeedableRng};
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: true,
    };
    let (embedder, _) = random_bert(pooling, Precision::F32);
    let layer = &embedder.layers[0];
    let lens = [1usize, 9, 2, 33, 17];
    let tokens: usize = lens.iter().sum();
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..tokens * 3 * 32)
            .map(|_| rng.random_range(-1f32..1.))
            .collect();
        let qkv = Tensor::from_vec(values, (tokens, 3 * 32), &Device::Cpu).unwrap();
        let each = layer.attention_each(&qkv, &lens).unwrap();
        let padded = layer.attention_padded(&qkv, &lens).unwrap();
        assert_eq!(padded.dims(), &[tokens, 32]);
        let diff = crate::max_abs_diff(&each, &padded);
        assert!(diff < 1e-5, "seed {seed}: {diff}");
        // One sequence alone is its own longest.
        let nine = qkv.narrow(0, 0, 9).unwrap();
        let one = layer.attention_padded(&nine, &[9]).unwrap();
        let alone = layer.attention_each(&nine, &[9]).unwrap();
        assert!(crate::max_abs_diff(&one, &alone) < 1e-5, "seed {seed}");
        // In bf16, as a GPU runs it: the mask in the scores' type. Against
        // f32 attention over the same rounded inputs, so only the products'
        // and the softmax's bf16 rounding differ. Scores here reach about 6
        // (the test's queries are not scaled), where bf16 steps by 1/32; the
        // outputs are averages of values within 1. Over 400 seeds the largest
        // difference was 0.013.
        let rounded = qkv.to_dtype(DType::BF16).unwrap();
        let want = layer
            .attention_each(&rounded.to_dtype(DType::F32).unwrap(), &lens)
            .unwrap();
        let padded = layer.attention_padded(&rounded, &lens).unwrap();
        assert_eq!(padded.dtype(), DType::BF16);
        let diff = crate::max_abs_diff(&want, &padded);
        assert!(diff < 0.05, "seed {seed}: bf16 differs by {diff}");
    }
}

#[test]
fn embedder_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Embedder>();
    check::<crate::tokenizer::TextTokenizer>();
    fn send<T: Send>() {}
    send::<crate::tokenizer::IncrementalDecoder>();
}
