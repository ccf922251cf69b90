//! The model written for a run: random tensors in a safetensors file and a
//! `config.json`, with what every file and tensor should hash to.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::{RngCore, SeedableRng};

/// The model written for the run, with what its bytes should hash to.
pub(crate) struct Model {
    pub(crate) dir: PathBuf,
    /// Relative path, size and BLAKE3 of each file, sorted by path.
    pub(crate) files: Vec<(String, u64, blake3::Hash)>,
    /// The safetensors file.
    pub(crate) safetensors: String,
    /// Tensor names and the BLAKE3 of their bytes.
    pub(crate) tensors: BTreeMap<String, blake3::Hash>,
}

impl Model {
    pub(crate) fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }
}

/// Writes `config.json` and a safetensors file of `tensors` random F32 tensors of
/// `tensor_bytes` each.
pub(crate) fn write_model(
    dir: &Path,
    tensors: usize,
    tensor_bytes: usize,
    seed: u64,
) -> Result<Model> {
    std::fs::create_dir_all(dir)?;
    let names: Vec<String> = (0..tensors)
        .map(|i| format!("model.layers.{i:03}.weight"))
        .collect();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    for (i, name) in names.iter().enumerate() {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": [tensor_bytes / 4],
                "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
            }),
        );
    }
    let mut json = serde_json::to_vec(&header)?;
    // The format pads its header with spaces so that the data is 8-byte aligned.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let safetensors = "model.safetensors".to_string();
    let path = dir.join(&safetensors);
    let mut file = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(&path).with_context(|| path.display().to_string())?,
    );
    let mut whole = blake3::Hasher::new();
    let prefix = (json.len() as u64).to_le_bytes();
    for part in [&prefix[..], &json] {
        file.write_all(part)?;
        whole.update(part);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; tensor_bytes];
    let mut hashes = BTreeMap::new();
    for name in names {
        rng.fill_bytes(&mut buf);
        file.write_all(&buf)?;
        whole.update(&buf);
        hashes.insert(name, blake3::hash(&buf));
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let size = 8 + json.len() as u64 + (tensors * tensor_bytes) as u64;
    let config = serde_json::to_vec_pretty(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": tensors,
        "torch_dtype": "float32",
    }))?;
    std::fs::write(dir.join("config.json"), &config)?;
    let mut files = vec![
        (
            "config.json".to_string(),
            config.len() as u64,
            blake3::hash(&config),
        ),
        (safetensors.clone(), size, whole.finalize()),
    ];
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Model {
        dir: dir.to_path_buf(),
        files,
        safetensors,
        tensors: hashes,
    })
}
