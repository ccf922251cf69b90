//! Identifier newtypes. Ids are opaque strings chosen by whoever creates the object
//! (the API server mints UUIDs, agents name their node), and travel inside Raft
//! commands so every replica stores the same id.

string_id!(
    /// Identifies a submitted job for its whole life, across spec updates.
    JobId
);
string_id!(
    /// Identifies a worker node; chosen by its agent so a restarted agent keeps it.
    NodeId
);
string_id!(
    /// Identifies one placed instance of a task group.
    AllocId
);
string_id!(
    /// Identifies one evaluation; it doubles as the idempotency key of the command
    /// that created it, so a re-proposed command is recognised.
    EvalId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bare_json_strings() {
        let id = JobId::new("abc");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"abc\"");
        let back: JobId = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(back, id);
        assert_eq!(id.to_string(), "abc");
        assert_eq!(NodeId::from("n1").as_str(), "n1");
    }
}
