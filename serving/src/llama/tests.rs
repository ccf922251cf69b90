//! The decoder against candle-transformers' Llama, batched and alone, from
//! safetensors and GGUF.

use std::collections::HashMap;

use candle_transformers::models::llama as reference;

use super::*;

const CONFIG: &str = r#"{"model_type":"llama","vocab_size":97,"hidden_size":32,
    "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,
    "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
    "max_position_embeddings":64,"tie_word_embeddings":false}"#;

fn weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut rand = |shape: (usize, usize)| {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-0.2f32..0.2))
            .collect();
        Tensor::from_vec(data, shape, &dev).unwrap()
    };
    let (h, kv, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let (d, f, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), rand((v, d)));
    w.insert("lm_head.weight".into(), rand((v, d)));
    w.insert(
        "model.norm.weight".into(),
        Tensor::ones(d, DType::F32, &dev).unwrap(),
    );
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", (h * hd, d)),
            ("self_attn.k_proj", (kv * hd, d)),
            ("self_attn.v_proj", (kv * hd, d)),
            ("self_attn.o_proj", (d, h * hd)),
            ("mlp.gate_proj", (f, d)),
            ("mlp.up_proj", (f, d)),
            ("mlp.down_proj", (d, f)),
        ] {
            w.insert(format!("{p}.{name}.weight"), rand(shape));
        }
        for name in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("{p}.{name}.weight"),
                (Tensor::ones(d, DType::F32, &dev).unwrap() + 0.1).unwrap(),
            );
        }
    }
    w
}

fn models() -> (Model, reference::Llama, reference::Config) {
    let config = LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap();
    let w = weights(&config, 11);
    let ours = Model::from_safetensors(
        config,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
        Precision::F32,
    )
    .unwrap();
    let cfg: reference::LlamaConfig = serde_json::from_str(CONFIG).unwrap();
    let cfg = cfg.into_config(false);
    let theirs =
        reference::Llama::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &cfg)
            .unwrap();
    (ours, theirs, cfg)
}

#[test]
fn one_sequence_matches_candle_transformers_llama_step_by_step() {
    // The CPU's pool kernel, and candle's ops (the other devices' path).
    for pool_kernel in [true, false] {
        let (mut ours, theirs, cfg) = models();
        ours.pool_kernel = pool_kernel;
        let mut their_cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
        let mut pool = ours.new_pool(2, 64).unwrap();
        let mut cache = pool.acquire().unwrap();
        let prompt = [1u32, 5, 9, 33, 2, 70];
        let x = Tensor::new(&prompt[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut expect = theirs.forward(&x, 0, &mut their_cache).unwrap();
        let mut got = ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &prompt,
                    cache: &mut cache,
                }],
            )
            .unwrap();
        for step in 0..20 {
            assert!(crate::max_abs_diff(&got, &expect) < 1e-4, "step {step}");
            let next = crate::sampling::argmax(&got.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
            let x = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            expect = theirs
                .forward(&x, prompt.len() + step, &mut their_cache)
                .unwrap();
            got = ours
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &[next],
                        cache: &mut cache,
                    }],
                )
                .unwrap();
        }
        assert_eq!(cache.len(), prompt.len() + 20);
    }
}

#[test]
fn a_sliding_window_attends_the_same_through_both_paths() {
    let json = CONFIG.replace(
        r#""model_type":"llama""#,
        r#""model_type":"mistral","sliding_window":5"#,
    );
    let config = LlamaConfig::from_hf_json(json.as_bytes()).unwrap();
    assert_eq!(config.sliding_window, Some(5));
    let w = weights(&config, 3);
    let load = |pool_kernel: bool| {
        let mut m = Model::from_safetensors(
            config.clone(),
            VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
            Precision::F32,
        )
        .unwrap();
        m.pool_kernel = pool_kernel;
        m
    };
    let (kernel, batched) = (load(true), load(false));
    let prompt: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 97).collect();
    let mut logits = Vec::new();
    for model in [&kernel, &batched] {
        let mut pool = model.new_pool(2, 64).unwrap();
        let mut cache = pool.acquire().unwrap();
        // The prompt in two chunks, then decoding past the window.
        let mut run = vec![];
        for tokens in [&prompt[..7], &prompt[7..], &[4], &[9], &[1]] {
            let out = model
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens,
                        cache: &mut cache,
                    }],
                )
                .unwrap();
            run.push(out);
        }
        logits.push(run);
    }
    for (step, (a, b)) in logits[0].iter().zip(&logits[1]).enumerate() {
        assert!(crate::max_abs_diff(a, b) < 1e-5, "step {step}");
    }
    // The window matters: without it the same tokens give other logits.
    let full = {
        let model = Model::from_safetensors(
            LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap(),
            VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
            Precision::F32,
        )
        .unwrap();
        let mut pool = model.new_pool(1, 64).unwrap();
        let mut cache = pool.acquire().unwrap();
        model
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &prompt,
                    cache: &mut cache,
                }],
            )
            .unwrap()
    };
    assert!(crate::max_abs_diff(&full, &logits[0][1]) > 1e-3);
}

#[test]
#[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
fn bf16_projections_stay_close_to_f32_and_batch_alike() {
    let config = LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap();
    let w = weights(&config, 11);
    let load = |precision| {
        Model::from_safetensors(
            config.clone(),
            VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
            precision,
        )
        .unwrap()
    };
    let (f32_model, bf16_model) = (load(Precision::F32), load(Precision::Bf16));
    let a: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
    let b: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
    let run = |model: &Model, prompts: &[&[u32]]| {
        let mut pool = model.new_pool(2, 64).unwrap();
        let mut caches: Vec<_> = prompts.iter().map(|_| pool.acquire().unwrap()).collect();
        let mut chunks: Vec<Chunk> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| Chunk { tokens, cache })
            .collect();
        model.forward(&pool, &mut chunks).unwrap()
    };
    let (exact, rounded) = (run(&f32_model, &[&a]), run(&bf16_model, &[&a]));
    let diff = crate::max_abs_diff(&exact, &rounded);
    assert!(diff > 0.0 && diff < 0.05, "bf16 logits off by {diff}");
    // A sequence's logits are the same alone or batched with another.
    let both = run(&bf16_model, &[&a, &b]);
    assert!(crate::max_abs_diff(&both.get(0).unwrap(), &rounded.squeeze(0).unwrap()) < 1e-5);
}

#[test]
fn batching_and_chunked_prefill_change_no_logit() {
    // The CPU's pool kernel, and candle's ops (the other devices' path).
    for pool_kernel in [true, false] {
        let (mut ours, _, _) = models();
        ours.pool_kernel = pool_kernel;
        let a: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
        let b: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
        // Alone.
        let mut pool = ours.new_pool(4, 64).unwrap();
        let mut ca = pool.acquire().unwrap();
        let alone_a = ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &a,
                    cache: &mut ca,
                }],
            )
            .unwrap();
        let alone_a2 = ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &[9],
                    cache: &mut ca,
                }],
            )
            .unwrap();
        let mut cb = pool.acquire().unwrap();
        let alone_b = ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &b,
                    cache: &mut cb,
                }],
            )
            .unwrap();
        // a prefilled in two chunks, the second batched with b's whole prompt, then
        // both decoding together.
        let mut ca = pool.acquire().unwrap();
        let mut cb = pool.acquire().unwrap();
        ours.forward(
            &pool,
            &mut [Chunk {
                tokens: &a[..5],
                cache: &mut ca,
            }],
        )
        .unwrap();
        let both = ours
            .forward(
                &pool,
                &mut [
                    Chunk {
                        tokens: &a[5..],
                        cache: &mut ca,
                    },
                    Chunk {
                        tokens: &b,
                        cache: &mut cb,
                    },
                ],
            )
            .unwrap();
        assert!(crate::max_abs_diff(&both.get(0).unwrap(), &alone_a.squeeze(0).unwrap()) < 1e-5);
        assert!(crate::max_abs_diff(&both.get(1).unwrap(), &alone_b.squeeze(0).unwrap()) < 1e-5);
        let step = ours
            .forward(
                &pool,
                &mut [
                    Chunk {
                        tokens: &[9],
                        cache: &mut ca,
                    },
                    Chunk {
                        tokens: &[1],
                        cache: &mut cb,
                    },
                ],
            )
            .unwrap();
        assert!(crate::max_abs_diff(&step.get(0).unwrap(), &alone_a2.squeeze(0).unwrap()) < 1e-5);
    }
}

#[test]
fn configs_are_checked() {
    let bad = CONFIG.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
    assert!(LlamaConfig::from_hf_json(bad.as_bytes()).is_err());
    let bert = CONFIG.replace("\"llama\"", "\"bert\"");
    let err = LlamaConfig::from_hf_json(bert.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bert"), "{err}");
    let qwen = CONFIG.replace("\"llama\"", "\"qwen2\"");
    assert!(
        LlamaConfig::from_hf_json(qwen.as_bytes())
            .unwrap()
            .attention_bias
    );
    let (ours, _, _) = models();
    let pool = ours.new_pool(1, 64).unwrap();
    let mut cache = SeqCache { slot: 0, len: 0 };
    let err = ours
        .forward(
            &pool,
            &mut [Chunk {
                tokens: &[500],
                cache: &mut cache,
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"));
    let long = vec![1u32; 65];
    assert!(ours
        .forward(
            &pool,
            &mut [Chunk {
                tokens: &long,
                cache: &mut cache
            }]
        )
        .is_err());
    assert!(cache.is_empty());
}
