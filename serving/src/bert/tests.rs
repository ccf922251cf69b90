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
fn the_vectorized_erf_is_within_2e7() {
    let mut worst = (0f64, 0f32);
    for i in -600_000..=600_000 {
        let z = i as f32 * 1e-5;
        let err = (f64::from(erf(z)) - candle_core::cpu::erf::erf_f64(f64::from(z))).abs();
        if err > worst.0 {
            worst = (err, z);
        }
    }
    assert!(worst.0 <= 2e-7, "erf error {} at {}", worst.0, worst.1);
    assert_eq!((erf(10.0), erf(-1e30)), (1.0, -1.0));
}

#[test]
fn the_gelu_kernel_matches_candles_gelu_erf() {
    let mut values: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 1e-3).collect();
    values.extend([
        -1e4, -300.0, -40.0, -10.0, -7.5, -5.0, 5.0, 7.5, 10.0, 40.0, 300.0, 1e4,
    ]);
    values.extend(
        (0..)
            .map(|i: i64| ((i * 7919) % 20_011) as f32 * 1e-3 - 10.0)
            .take(120_000 - values.len()),
    );
    let x = Tensor::from_vec(values, (120, 1000), &Device::Cpu).unwrap();
    let exact = |x: &Tensor| {
        x.to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let diff = crate::max_abs_diff(&gelu_erf(&x).unwrap(), &exact(&x));
    assert!(diff <= 1e-5, "max abs diff {diff}");
    // With a bias, and on a strided input.
    let bias = Tensor::randn(0f32, 3., 120, &Device::Cpu).unwrap();
    let xt = x.t().unwrap();
    let ours = bias_act(
        Backend::for_device(&Device::Cpu),
        xt.clone(),
        &bias,
        Some(Activation::Gelu),
    )
    .unwrap();
    let diff = crate::max_abs_diff(&ours, &exact(&xt.broadcast_add(&bias).unwrap()));
    assert!(diff <= 1e-5, "with a bias: max abs diff {diff}");
    let ours = bias_act(Backend::for_device(&Device::Cpu), xt.clone(), &bias, None).unwrap();
    assert_eq!(
        crate::max_abs_diff(&ours, &xt.broadcast_add(&bias).unwrap()),
        0.0
    );
}

#[test]
fn the_softmax_kernel_matches_candles() {
    let d = Device::Cpu;
    for width in [1, 7, 16, 23, 64, 100] {
        let x = (Tensor::randn(0f32, 5., (3, 11, width), &d).unwrap() - 30.0).unwrap();
        let ours = softmax(Backend::for_device(&d), x.copy().unwrap()).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let diff = crate::max_abs_diff(&ours, &reference);
        assert!(diff < 1e-6, "width {width}: max abs diff {diff}");
    }
    // Far below the maximum, e^x underflows to (nearly) nothing.
    let x = Tensor::new(&[[0f32, -50.0, -90.0, -1e30]], &d).unwrap();
    let p = softmax(Backend::for_device(&d), x.copy().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(
        (p[0][0] - 1.0).abs() < 1e-6 && p[0][1..].iter().all(|&v| v < 1e-21),
        "{p:?}"
    );
}

#[test]
fn the_add_norm_kernel_matches_candles_layer_norm() {
    let d = Device::Cpu;
    let (rows, width) = (57, 384);
    let x = (Tensor::randn(0f32, 4., (rows, width), &d).unwrap() + 20.0).unwrap();
    let residual = Tensor::randn(0f32, 1., (rows, width), &d).unwrap();
    let bias = Tensor::randn(0f32, 1., width, &d).unwrap();
    let weight = Tensor::randn(1f32, 0.2, width, &d).unwrap();
    let beta = Tensor::randn(0f32, 0.2, width, &d).unwrap();
    let norm = AddNorm {
        packed: Tensor::stack(&[&bias, &weight, &beta], 0).unwrap(),
        bias: bias.clone(),
        weight: weight.clone(),
        beta: beta.clone(),
        eps: 1e-12,
        backend: Backend::for_device(&d),
    };
    let ours = norm.forward(x.copy().unwrap(), &residual).unwrap();
    let sum = (&x + &residual).unwrap().broadcast_add(&bias).unwrap();
    let reference = candle_nn::ops::layer_norm_slow(
        &sum.to_dtype(DType::F64).unwrap(),
        &weight.to_dtype(DType::F64).unwrap(),
        &beta.to_dtype(DType::F64).unwrap(),
        1e-12,
    )
    .unwrap();
    let diff = crate::max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "max abs diff {diff}");
}

#[test]
fn candles_ops_match_the_fused_kernels() {
    // f16 takes candle's ops (as other devices do); f32 the CPU kernels.
    let pooling = Pooling {
        mode: PoolingMode::Mean,
        normalize: true,
    };
    let (fused, tensors) = random_bert(pooling, Precision::F32);
    let vb = VarBuilder::from_tensors(tensors, DType::F16, &Device::Cpu);
    let plain = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::F32).unwrap();
    let inputs = vec![
        vec![2, 17, 33, 3],
        (0..40).map(|i| 1 + (i * 11) % 99).collect(),
    ];
    let (a, b) = (fused.embed(&inputs).unwrap(), plain.embed(&inputs).unwrap());
    for (a, b) in a.iter().zip(&b) {
        assert!(cosine(a, b) > 0.999, "cosine {}", cosine(a, b));
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
