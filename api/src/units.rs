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

    /// The time as UTC text for people, `2026-11-18 11:06:40Z`.
    pub fn utc_text(self) -> String {
        let secs = self.0 / 1000;
        let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
        // Civil date from days since the Unix epoch (proleptic Gregorian).
        let z = d as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_utc() {
        assert_eq!(Timestamp::from_millis(0).utc_text(), "1970-01-01 00:00:00Z");
        let t = Timestamp::from_millis(1_795_000_000_000);
        assert_eq!(t.utc_text(), "2026-11-18 11:06:40Z");
    }

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
