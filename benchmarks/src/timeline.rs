//! How writes fared over a disruption: when acknowledgements stopped and when they
//! came back around moments a script marked (a leader killed, a member added and
//! another removed).
//!
//! The script appends its marks to a file while the load runs, one
//! `LABEL UNIX_SECONDS` line each (bash's `$EPOCHREALTIME`). The first mark opens
//! the watched interval and the mark labelled [`END`] closes it. Times here are
//! wall-clock durations since the Unix epoch, the clock the script reads too.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// The label of the mark that closes the watched interval.
pub const END: &str = "end";

/// One moment a script marked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// What happened then, e.g. `kill`; [`END`] closes the interval.
    pub label: String,
    /// Since the Unix epoch.
    pub at: Duration,
}

/// The marks in `text`. Only complete lines count: a last line without its
/// newline may still be being written, and the next read will see it whole.
pub fn parse_marks(text: &str) -> Result<Vec<Mark>> {
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_mark)
        .collect()
}

fn parse_mark(line: &str) -> Result<Mark> {
    let mut parts = line.split_whitespace();
    let (Some(label), Some(at), None) = (parts.next(), parts.next(), parts.next()) else {
        bail!("mark `{line}` is not `LABEL UNIX_SECONDS`");
    };
    let at = parse_unix_seconds(at).with_context(|| format!("mark `{line}`"))?;
    Ok(Mark {
        label: label.to_owned(),
        at,
    })
}

/// `1700000000.123456` as a duration since the epoch; the fraction may also
/// follow a comma, as `$EPOCHREALTIME` prints it in some locales.
fn parse_unix_seconds(text: &str) -> Result<Duration> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (secs, fraction) = match text.split_once(['.', ',']) {
        Some((secs, fraction)) if digits(fraction) && fraction.len() <= 9 => (secs, fraction),
        Some(_) => bail!("`{text}` is not a number of seconds with 1 to 9 decimals"),
        None => (text, ""),
    };
    if !digits(secs) {
        bail!("`{text}` is not a number of seconds");
    }
    let secs: u64 = secs
        .parse()
        .map_err(|_| anyhow!("`{text}` is too many seconds"))?;
    let nanos = format!("{fraction:0<9}")
        .parse()
        .expect("at most 9 digits fit a u32");
    Ok(Duration::new(secs, nanos))
}

/// The watched interval, from the first mark to the [`END`] mark; `None` while
/// there is no [`END`] mark yet.
pub fn interval(marks: &[Mark]) -> Result<Option<(Duration, Duration)>> {
    let Some(end) = marks.iter().find(|m| m.label == END) else {
        return Ok(None);
    };
    let from = marks[0].at;
    if end.at < from {
        bail!(
            "the `{END}` mark comes {:?} before the first mark, `{}`",
            from - end.at,
            marks[0].label
        );
    }
    Ok(Some((from, end.at)))
}

/// One acknowledged write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// When the request was sent.
    pub sent: Duration,
    /// When its acknowledgement arrived.
    pub acked: Duration,
}

/// How writes fared over a watched interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disruption {
    /// From the interval's start to the first acknowledgement of a write sent at
    /// or after it. Writes sent earlier do not count: an acknowledgement written
    /// just before a leader died can arrive just after the mark. `None` when no
    /// such write was acknowledged.
    pub resume: Option<Duration>,
    /// The longest stretch without an acknowledgement that overlaps the
    /// interval: from the last acknowledgement before it (or the load's start)
    /// to the first after it (or the load's stop).
    pub max_gap: Duration,
    /// Acknowledgements that arrived inside the interval.
    pub acks: usize,
}

/// Measures `acks` (in any order) over `from..=to`, for a load that ran from
/// `start` to `stop`.
pub fn disruption(
    acks: &[Ack],
    (from, to): (Duration, Duration),
    (start, stop): (Duration, Duration),
) -> Disruption {
    let resume = acks
        .iter()
        .filter(|a| a.sent >= from)
        .map(|a| a.acked)
        .min()
        .map(|acked| acked - from);
    let mut times: Vec<Duration> = acks.iter().map(|a| a.acked).collect();
    times.sort_unstable();
    let first_inside = times.partition_point(|t| *t < from);
    let first_after = times.partition_point(|t| *t <= to);
    let before = first_inside.checked_sub(1).map_or(start, |i| times[i]);
    let after = times.get(first_after).copied().unwrap_or(stop.max(to));
    let inside = &times[first_inside..first_after];
    let max_gap = std::iter::once(before)
        .chain(inside.iter().copied())
        .chain(std::iter::once(after))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    Disruption {
        resume,
        max_gap,
        acks: inside.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ack(sent: u64, acked: u64) -> Ack {
        Ack {
            sent: ms(sent),
            acked: ms(acked),
        }
    }

    #[test]
    fn marks_parse_complete_lines_only() {
        let marks = parse_marks("kill 1700000000.5\nend 1700000003,000250\nend 17").unwrap();
        assert_eq!(
            marks,
            vec![
                Mark {
                    label: "kill".into(),
                    at: Duration::new(1_700_000_000, 500_000_000)
                },
                Mark {
                    label: "end".into(),
                    at: Duration::new(1_700_000_003, 250_000)
                },
            ]
        );
        assert!(parse_marks("").unwrap().is_empty());
        assert!(parse_marks("kill 12").unwrap().is_empty());
        assert_eq!(
            parse_marks("kill 12\n").unwrap()[0].at,
            Duration::from_secs(12)
        );
    }

    #[test]
    fn malformed_marks_are_refused() {
        for bad in [
            "kill\n",
            "kill 1 2\n",
            "kill now\n",
            "kill -1.5\n",
            "kill 1.\n",
            "kill .5\n",
            "kill 1.0000000001\n",
            "kill 99999999999999999999\n",
        ] {
            assert!(parse_marks(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_interval_runs_from_the_first_mark_to_end() {
        let mark = |label: &str, at| Mark {
            label: label.into(),
            at: ms(at),
        };
        assert_eq!(interval(&[mark("kill", 5)]).unwrap(), None);
        assert_eq!(
            interval(&[mark("add", 5), mark("remove", 7), mark("end", 9)]).unwrap(),
            Some((ms(5), ms(9)))
        );
        assert!(interval(&[mark("kill", 5), mark("end", 4)]).is_err());
    }

    #[test]
    fn resume_counts_only_writes_sent_after_the_mark() {
        // Acks every 10 ms until 100, a late ack of a write sent before the
        // mark at 1002, then writes sent from 1000 on acknowledged from 1300.
        let mut acks: Vec<Ack> = (1..=10).map(|i| ack(i * 10 - 5, i * 10)).collect();
        acks.push(ack(95, 1002));
        acks.extend([ack(1000, 1300), ack(1290, 1310), ack(1310, 1320)]);
        let d = disruption(&acks, (ms(1000), ms(2000)), (ms(0), ms(2100)));
        assert_eq!(d.resume, Some(ms(300)));
        // The stretches: 100 -> 1002 straddles the mark, 1320 -> 2100 the end.
        assert_eq!(d.max_gap, ms(902));
        assert_eq!(d.acks, 4);
    }

    #[test]
    fn the_gap_runs_to_the_stop_when_writes_never_resume() {
        let acks = [ack(0, 10), ack(10, 20)];
        let d = disruption(&acks, (ms(50), ms(500)), (ms(0), ms(600)));
        assert_eq!(d.resume, None);
        assert_eq!(d.max_gap, ms(580));
        assert_eq!(d.acks, 0);
        // No acknowledgement at all: the whole load is one gap.
        let d = disruption(&[], (ms(50), ms(500)), (ms(0), ms(600)));
        assert_eq!(d.max_gap, ms(600));
    }

    #[test]
    fn gaps_outside_the_interval_do_not_count() {
        // A long gap before the last ack preceding the interval, and after the
        // first ack following it; inside, acks every 10 ms.
        let mut acks = vec![ack(0, 0), ack(10, 900)];
        acks.extend((100..=200).map(|i| ack(i * 10 - 5, i * 10)));
        acks.push(ack(2000, 5000));
        let d = disruption(&acks, (ms(1000), ms(1995)), (ms(0), ms(6000)));
        assert_eq!(d.max_gap, ms(100));
        assert_eq!(d.resume, Some(ms(10)));
    }
}
