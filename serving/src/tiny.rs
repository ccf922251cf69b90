//! Tiny real models: a Llama with random weights and a trained byte-level BPE
//! tokenizer, written in exactly the layout of a Hugging Face model directory.
//!
//! They are real in every way that matters to the serving path (file formats,
//! tensor names, special tokens, chat template, end-of-sequence ids), so the demo
//! model of `aigrid up`, the tests and the benchmarks exercise the same code as a
//! downloaded model, in milliseconds and without a network.
//!
//! Everything is a function of the [`TinyLlama`] spec: the same spec writes
//! byte-identical files, so a tiny model has a stable content hash.

// Unsafe: memory-maps the safetensors file it has just written (candle's `from_mmaped_safetensors`).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::processors::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::ServingError;

/// The shape of a tiny Llama and the seed of its weights.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    /// Hidden size (`hidden_size`).
    pub hidden: usize,
    /// Decoder layers (`num_hidden_layers`).
    pub layers: usize,
    /// Attention heads (`num_attention_heads`); must divide `hidden`.
    pub heads: usize,
    /// Key/value heads (`num_key_value_heads`); must divide `heads`.
    pub kv_heads: usize,
    /// MLP width (`intermediate_size`).
    pub intermediate: usize,
    /// Context length (`max_position_embeddings`).
    pub max_position: usize,
    /// Target vocabulary size, special tokens included. The tokenizer always holds
    /// the 256 byte tokens and 4 special tokens, and the embedded corpus bounds the
    /// number of merges, so the real size (written to config.json) may differ.
    pub vocab: usize,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for TinyLlama {
    fn default() -> Self {
        TinyLlama {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 176,
            max_position: 1024,
            vocab: 512,
            seed: 0,
        }
    }
}

/// The special tokens, in id order: BOS, end of text, and ChatML's turn markers.
const SPECIAL_TOKENS: [&str; 4] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// ChatML, the chat format of the tiny model.
const CHAT_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Standard deviation of the random weights.
const WEIGHT_STD: f64 = 0.05;

/// Writes a tiny Llama model directory: `config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
///
/// Creates `dir` if needed. The same spec always writes byte-identical files.
pub fn write_tiny_llama(dir: &Path, spec: &TinyLlama) -> Result<(), ServingError> {
    validate(spec)?;
    std::fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;

    let tokenizer = train_tokenizer(spec.vocab)?;
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| ServingError::model(format!("tiny tokenizer lacks {token}")))
    };
    let (bos, eos, im_end) = (id("<s>")?, id("</s>")?, id("<|im_end|>")?);
    let vocab = tokenizer.get_vocab_size(true);

    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| ServingError::model(format!("serializing the tiny tokenizer: {e}")))?;
    write(dir, "tokenizer.json", tokenizer_json.as_bytes())?;

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.max_position,
        "vocab_size": vocab,
        "bos_token_id": bos,
        "eos_token_id": [eos, im_end],
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
    });
    write_json(dir, "config.json", &config)?;

    write_json(
        dir,
        "tokenizer_config.json",
        &json!({
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "add_bos_token": true,
            "model_max_length": spec.max_position,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        dir,
        "generation_config.json",
        &json!({
            "bos_token_id": bos,
            "eos_token_id": [eos, im_end],
        }),
    )?;

    let weights = random_weights(spec, vocab);
    let views = weights
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServingError::model(format!("tiny weights: {e}")))?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| ServingError::model(format!("tiny weights: {e}")))?;
    write(dir, "model.safetensors", &bytes)
}

fn validate(spec: &TinyLlama) -> Result<(), ServingError> {
    let fail = |why: &str| Err(ServingError::model(format!("tiny llama {spec:?}: {why}")));
    if [
        spec.hidden,
        spec.layers,
        spec.heads,
        spec.kv_heads,
        spec.intermediate,
    ]
    .contains(&0)
        || spec.max_position == 0
    {
        return fail("every size must be positive");
    }
    if !spec.hidden.is_multiple_of(spec.heads) {
        return fail("heads must divide hidden");
    }
    if !spec.heads.is_multiple_of(spec.kv_heads) {
        return fail("kv_heads must divide heads");
    }
    if !(spec.hidden / spec.heads).is_multiple_of(2) {
        return fail("the head size must be even for rotary embeddings");
    }
    Ok(())
}

/// Trains the byte-level BPE tokenizer on [`CORPUS`].
///
/// The trainer is deterministic: merges are picked by count and then by pair ids,
/// and the byte alphabet is added in code point order.
fn train_tokenizer(vocab: usize) -> Result<Tokenizer, ServingError> {
    let fail =
        |e: tokenizers::Error| ServingError::model(format!("training the tiny tokenizer: {e}"));
    let specials = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);

    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut TrainerWrapper::BpeTrainer(trainer), CORPUS.lines())
        .map_err(fail)?;

    let bos = tokenizer
        .token_to_id("<s>")
        .ok_or_else(|| ServingError::model("the tiny tokenizer lost <s>"))?;
    let template = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A $B:1"))
        .map_err(|e| ServingError::model(format!("tiny post-processor: {e}")))?
        .special_tokens(vec![("<s>", bos)])
        .build()
        .map_err(|e| ServingError::model(format!("tiny post-processor: {e}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Sequence(Sequence::new(vec![
        PostProcessorWrapper::ByteLevel(byte_level),
        PostProcessorWrapper::Template(template),
    ]))));
    Ok(tokenizer)
}

/// Every tensor in Hugging Face's names and `[out, in]` layout, as little-endian
/// F32 bytes, drawn in a fixed order from one seeded generator.
fn random_weights(spec: &TinyLlama, vocab: usize) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let head_dim = spec.hidden / spec.heads;
    let kv = spec.kv_heads * head_dim;
    let (h, i) = (spec.hidden, spec.intermediate);
    let mut tensors = Vec::new();
    let mut normal = |name: String, shape: Vec<usize>| {
        let bytes = normal_bytes(&mut rng, shape.iter().product());
        tensors.push((name, shape, bytes));
    };
    normal("model.embed_tokens.weight".into(), vec![vocab, h]);
    for layer in 0..spec.layers {
        let p = format!("model.layers.{layer}");
        normal(format!("{p}.self_attn.q_proj.weight"), vec![h, h]);
        normal(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        normal(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        normal(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        normal(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
        normal(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
        normal(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
    }
    normal("lm_head.weight".into(), vec![vocab, h]);

    let ones = 1f32.to_le_bytes().repeat(h);
    for layer in 0..spec.layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{layer}.{norm}.weight");
            tensors.push((name, vec![h], ones.clone()));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], ones));
    tensors
}

/// `n` normal samples with standard deviation [`WEIGHT_STD`] (Box-Muller).
fn normal_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(n * 4);
    while bytes.len() < n * 4 {
        // 1 - [0, 1) is in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * WEIGHT_STD;
        let theta = std::f64::consts::TAU * u2;
        for z in [r * theta.cos(), r * theta.sin()] {
            if bytes.len() < n * 4 {
                bytes.extend_from_slice(&(z as f32).to_le_bytes());
            }
        }
    }
    bytes
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<(), ServingError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| ServingError::model(format!("{name}: {e}")))?;
    text.push('\n');
    write(dir, name, text.as_bytes())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ServingError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|source| io_error(&path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> ServingError {
    ServingError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The tokenizer's training text: plain English about the things aigrid does,
/// so common words of prompts about it become single tokens.
const CORPUS: &str = "\
A distributed system is a set of computers that cooperate to look like one. \
Each computer is called a node, and the nodes talk to each other over a network \
that can drop, delay or reorder any message at any time.
The hard part of building such a system is not the happy path. It is deciding \
what to do when a node stops answering: is it dead, or is the network between us \
slow? Nobody can tell for sure, so every protocol has to be safe either way.
Consensus protocols such as Raft solve this for a small group of servers. One \
server is elected leader for a term. The leader appends commands to its log and \
sends them to the followers. A command is committed once a majority of the \
servers have written it to disk, and only committed commands are applied to the \
state machine.
If the leader crashes, the followers notice that its heartbeats have stopped. \
After a random election timeout, one of them becomes a candidate, increments the \
term and asks the others for their votes. A server votes for at most one \
candidate per term, and only for a candidate whose log is at least as up to date \
as its own. This is why a new leader always holds every committed entry.
An AI cloud is a distributed system whose scarce resource is the GPU. A GPU has a \
fixed amount of memory, and a model only runs on it if its weights, its key and \
value cache and its activations all fit. The scheduler therefore has to know how \
much memory each model needs before it places the model on a node.
The scheduler takes a snapshot of the cluster and a list of pending jobs, and \
returns a plan: which job runs on which GPU of which node. A good plan packs \
small models together, keeps large models on GPUs that have enough memory, \
spreads replicas across failure domains and leaves room for the jobs that are \
likely to come next.
Model weights are large files. They are stored in a content addressed store, \
split into chunks, and protected with erasure coding so that the loss of a few \
disks or a few nodes does not lose any data. Every chunk is hashed, and a node \
verifies the hash of every byte it reads before it loads a model.
Serving a language model means turning text into tokens, running the model to \
predict the next token, sampling a token from the predicted distribution, and \
turning the tokens back into text. The model runs one step for every generated \
token, so a server batches many requests together to keep the GPU busy.
Continuous batching adds new requests to the running batch as soon as others \
finish, instead of waiting for the whole batch to complete. This keeps the \
latency low and the throughput high when requests have very different lengths.
Embedding models turn a sentence into a vector of numbers. Sentences with a \
similar meaning get vectors that point in a similar direction, so the cosine of \
the angle between two vectors measures how related the two sentences are. \
Search engines, recommendation systems and retrieval augmented generation all \
rely on embeddings.
Temperature controls how random the sampling is. A temperature of zero always \
picks the most likely token, which makes the output deterministic. Higher \
temperatures flatten the distribution and make the output more varied. Top p \
sampling keeps only the smallest set of tokens whose probabilities add up to p.
Operators need to see what the system is doing. Every node exports metrics: \
requests per second, tokens per second, the time to the first token, queue \
lengths, GPU memory and GPU utilization. Logs tell the story of each request, \
and health checks tell the load balancer which nodes are ready to take traffic.
A cluster must keep working while it is upgraded. Nodes are drained one at a \
time: the scheduler stops placing new work on the node, the running requests \
finish, the models are moved elsewhere, and only then is the node restarted \
with the new version.
Security matters as much as speed. Nodes authenticate each other with keys, \
model files are signed, secrets never appear in logs, and every request is \
checked against a quota before it reaches a GPU. A request that asks for more \
tokens than the model can hold is rejected with a clear error.
The simplest design that works is usually the best one. Write down the \
invariants, test them with random inputs and simulated failures, measure before \
you optimize, and keep the code small enough that a new engineer can read all \
of it in a week.
When the network heals after a partition, the nodes on the minority side learn \
that a newer term exists. Their uncommitted entries are thrown away and replaced \
with the leader's log, and the cluster continues as if the partition had never \
happened. Clients that timed out retry their requests with the same request \
identifier, so a command is never applied twice.
Users talk to the cloud through an interface that looks like the OpenAI API: \
they list the models, send chat messages or prompts, and receive completions, \
either all at once or streamed token by token as server sent events. The \
assistant answers the user, and the system message sets the tone of the \
conversation.
Questions, numbers and code appear in prompts too: What is 2 + 2? How many GPUs \
does the job need? Allocate 16 GiB, 24 GiB or 80 GiB of memory. fn main() { \
println!(\"hello, world\"); } Return the result as JSON: {\"ok\": true, \"n\": 42}.
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TextTokenizer;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

    fn read_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn writes_are_byte_identical_for_a_spec() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        write_tiny_llama(a.path(), &TinyLlama::default()).unwrap();
        write_tiny_llama(b.path(), &TinyLlama::default()).unwrap();
        let other = TinyLlama {
            seed: 1,
            ..TinyLlama::default()
        };
        write_tiny_llama(c.path(), &other).unwrap();
        let (a, b, c) = (read_dir(a.path()), read_dir(b.path()), read_dir(c.path()));
        assert_eq!(a.len(), 5);
        assert!(a == b, "two writes of one spec differ");
        let weights = |files: &[(String, Vec<u8>)]| {
            files
                .iter()
                .find(|(n, _)| n == "model.safetensors")
                .unwrap()
                .1
                .clone()
        };
        assert_ne!(weights(&a), weights(&c), "the seed must change the weights");
    }

    #[test]
    fn the_model_loads_and_runs_in_candle() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
        let config: LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let config = config.into_config(false);
        let device = Device::Cpu;
        // SAFETY: the file was just written by this test and is not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.path().join("model.safetensors")],
                DType::F32,
                &device,
            )
            .unwrap()
        };
        let model = Llama::load(vb, &config).unwrap();
        let mut cache = Cache::new(true, DType::F32, &config, &device).unwrap();

        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        let tok = TextTokenizer::new(
            &read("tokenizer.json"),
            Some(&read("tokenizer_config.json")),
            Some(&read("generation_config.json")),
            Some(&read("config.json")),
        )
        .unwrap();
        assert_eq!(tok.vocab_size(), config.vocab_size);
        assert!(
            config.vocab_size > 300,
            "too few merges: {}",
            config.vocab_size
        );

        let ids = tok
            .encode("The scheduler places a model on a GPU.", true)
            .unwrap();
        let input = Tensor::new(ids.as_slice(), &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, 0, &mut cache).unwrap();
        assert_eq!(logits.dims(), &[1, config.vocab_size]);
        let next = logits.argmax(candle_core::D::Minus1).unwrap();
        let next = next.to_vec1::<u32>().unwrap()[0];
        let step = Tensor::new(&[next], &device).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&step, ids.len(), &mut cache).unwrap();
        let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_tokenizer_round_trips_text() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
        let json = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
        let tok = TextTokenizer::new(&json, None, None, None).unwrap();
        for text in [
            "A distributed system is a set of computers.",
            "  leading spaces, tabs\tand\nnewlines  ",
            "héllo wörld 日本語 🎉",
            "",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
            let with_bos = tok.encode(text, true).unwrap();
            assert_eq!(with_bos.first(), tok.encode("<s>", false).unwrap().first());
            assert_eq!(&with_bos[1..], ids.as_slice());
            assert_eq!(tok.decode(&with_bos).unwrap(), text);
        }
        // Common words are single tokens, so training happened.
        assert!(tok.encode(" the", false).unwrap().len() == 1);
    }

    #[test]
    fn bad_specs_are_rejected() {
        let base = TinyLlama::default();
        let cases = [
            (
                TinyLlama {
                    heads: 3,
                    ..base.clone()
                },
                "heads must divide hidden",
            ),
            (
                TinyLlama {
                    layers: 0,
                    ..base.clone()
                },
                "every size must be positive",
            ),
            (
                TinyLlama {
                    kv_heads: 3,
                    ..base.clone()
                },
                "kv_heads must divide heads",
            ),
        ];
        for (spec, why) in cases {
            // A writable directory, so only the spec can be what fails.
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("model");
            match write_tiny_llama(&target, &spec) {
                Err(ServingError::Model(message)) => {
                    assert!(message.contains(why), "{spec:?}: {message}")
                }
                other => panic!("{spec:?}: {other:?}"),
            }
            assert!(!target.exists(), "{spec:?} wrote {}", target.display());
        }
    }
}
