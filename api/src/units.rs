//! Quantity and time newtypes. They serialise as plain numbers (the JSON keeps
//! `cpu_millis`, `memory_mib`), but in Rust a MiB of memory cannot be added to a
//! thousandth of a CPU by accident.

quantity!(
    /// CPU in thousandths of a core: 1000 is one full core. Millis keep fractional
    /// requests exact without floats, which the deterministic state machine forbids.
    MilliCpu
);
quantity!(
    /// Memory (host or GPU) in MiB.
    MemoryMib
);
quantity!(
    /// Disk space in MiB.
    DiskMib
);
quantity!(
    /// Milliseconds since the Unix epoch. Read from the clock only at the edges (the
    /// API server, the agent) and then carried inside commands, so replicas agree.
    Timestamp
);

impl Timestamp {
    /// The timestamp for a count of milliseconds since the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_bare_json_numbers() {
        assert_eq!(serde_json::to_string(&MilliCpu::new(2000)).unwrap(), "2000");
        let m: MemoryMib = serde_json::from_str("8192").unwrap();
        assert_eq!(m.get(), 8192);
        assert!(serde_json::from_str::<MemoryMib>("-1").is_err());
        assert_eq!(Timestamp::from_millis(5).as_millis(), 5);
        assert!(Timestamp::new(1) < Timestamp::new(2));
    }
}
