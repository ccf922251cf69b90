//! The contract between the Raft driver and the replicated state it drives.

use serde::{de::DeserializeOwned, Serialize};

/// A deterministic state machine replicated by the driver.
///
/// `apply` must depend only on the current state and the command: ids and timestamps
/// travel inside the command, never from the clock, so every server reaches the same
/// state from the same log.
pub trait StateMachine: Send + Sync + 'static {
    /// One typed mutation, stored in a log entry as JSON.
    type Command: Serialize + DeserializeOwned + Send + 'static;
    /// What applying a command answers to the client that proposed it.
    type Output: Send + 'static;

    /// Reads the command a log entry carries. The default reads the JSON `serde`
    /// writes; a state machine with a faster reading of the same bytes gives it here.
    fn decode(data: &[u8]) -> Result<Self::Command, String> {
        serde_json::from_slice(data).map_err(|e| e.to_string())
    }

    /// Applies one committed command at log `index`.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Output;

    /// Serialises the whole state. Equal states give equal bytes.
    fn snapshot(&self) -> Result<Vec<u8>, SnapshotError>;

    /// Captures the state as it is now and returns the work that serialises it to
    /// what [`StateMachine::snapshot`] would give now, to run on another thread while
    /// this state keeps applying. The default serialises at once; a state whose
    /// serialisation is much dearer than a copy should capture a copy.
    fn capture(&self) -> SnapshotJob {
        let snapshot = self.snapshot();
        Box::new(move || snapshot)
    }

    /// Replaces the whole state with one produced by [`StateMachine::snapshot`].
    fn restore(&mut self, data: &[u8]) -> Result<(), SnapshotError>;
}

/// Serialises a state captured by [`StateMachine::capture`].
pub type SnapshotJob = Box<dyn FnOnce() -> Result<Vec<u8>, SnapshotError> + Send>;

/// A snapshot that could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("state snapshot: {0}")]
pub struct SnapshotError(pub String);
