//! Tiny models are a function of their spec across processes, not only within one:
//! hash maps inside the tokenizer trainer are seeded per process, so a second
//! process (this test binary run again) writes the model and the files must match.

use std::path::Path;
use std::process::Command;

use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::tokenizer::{ChatMessage, TextTokenizer};

/// Set in the child process: the directory it writes the tiny model to.
const CHILD_DIR: &str = "AIGRID_TEST_TINY_DIR";

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn tiny_model_is_identical_across_processes() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        write_tiny_llama(Path::new(&dir), &TinyLlama::default()).unwrap();
        return;
    }
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    write_tiny_llama(ours.path(), &TinyLlama::default()).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tiny_model_is_identical_across_processes"])
        .env(CHILD_DIR, theirs.path())
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "the child failed:\n{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let (ours, theirs) = (files(ours.path()), files(theirs.path()));
    assert_eq!(ours.len(), 5);
    for ((name, a), (other, b)) in ours.iter().zip(&theirs) {
        assert_eq!(name, other);
        assert!(a == b, "{name} differs between processes");
    }
}

#[test]
fn tiny_model_chats_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let tok = TextTokenizer::new(
        &read("tokenizer.json"),
        Some(&read("tokenizer_config.json")),
        Some(&read("generation_config.json")),
        Some(&read("config.json")),
    )
    .unwrap();
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "Which GPU runs my model? 🤔".into(),
            }],
            true,
        )
        .unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    let im_start = tok.encode("<|im_start|>", false).unwrap();
    assert_eq!(im_start.len(), 1, "special tokens are single ids");
    assert_eq!(ids.iter().filter(|&&id| id == im_start[0]).count(), 2);
    // Special tokens are left out of the decoded text.
    assert_eq!(
        tok.decode(&ids).unwrap(),
        "user\nWhich GPU runs my model? 🤔\nassistant\n"
    );
    let mut decoder = tok.decoder();
    let mut streamed = String::new();
    for &id in &ids {
        streamed += &decoder.push(id).unwrap();
    }
    streamed += &decoder.finish().unwrap();
    assert_eq!(streamed, tok.decode(&ids).unwrap());
}
