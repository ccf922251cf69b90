//! Allocations' output, as their agents last shipped it: one allocation by id or
//! by a prefix that names one, all of a job's, and followed as it grows.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aigrid_api::{Allocation, AllocationLogs, Job, JobSummary};
use anyhow::bail;
use reqwest::Method;

use crate::client::{path_segment, Client};

/// Length of a full allocation id (a UUID): such an id is asked for as it is.
const FULL_ID_LEN: usize = 36;

/// How often `-f` asks for more output.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The allocation `text` names: itself when it is a full id, else the one
/// allocation of any job whose id starts with it.
pub async fn resolve_alloc(client: &Client, text: &str) -> anyhow::Result<String> {
    let text = path_segment(text.trim())?;
    if text.len() >= FULL_ID_LEN {
        return Ok(text.to_owned());
    }
    let jobs: Vec<JobSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/jobs", None)
        .await?;
    let mut found = Vec::new();
    for summary in &jobs {
        let job = job(client, summary.id.as_str()).await?;
        found.extend(
            job.allocations
                .into_iter()
                .map(|a| a.id.to_string())
                .filter(|id| id.starts_with(text)),
        );
    }
    pick(text, found)
}

/// The one of `found` (ids starting with `text`) that `text` names.
fn pick(text: &str, mut found: Vec<String>) -> anyhow::Result<String> {
    found.sort();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        // Asked as it is: the server says what it knows of it.
        [] => Ok(text.to_owned()),
        many => bail!(
            "allocation prefix `{text}` matches {} allocations: {}",
            many.len(),
            many.join(", ")
        ),
    }
}

/// One allocation's output.
pub async fn fetch(client: &Client, id: &str) -> anyhow::Result<AllocationLogs> {
    let path = format!("/api/v1/allocations/{}/logs", path_segment(id)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

async fn job(client: &Client, id: &str) -> anyhow::Result<Job> {
    let path = format!("/api/v1/jobs/{}", path_segment(id)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

/// `aigrid job logs`: the output of every allocation of job `id`, each under a
/// header naming it; with `follow`, then what each adds, until Ctrl-C.
pub async fn job_logs(client: &Client, id: &str, stderr: bool, follow: bool) -> anyhow::Result<()> {
    // What was printed of each allocation, to print only what follows it.
    let mut printed: BTreeMap<String, String> = BTreeMap::new();
    let mut last_header: Option<String> = None;
    loop {
        let job = job(client, id).await?;
        let mut allocs: Vec<&Allocation> = job.allocations.iter().collect();
        allocs.sort_by(|a, b| {
            (a.job_version, &a.group, a.index).cmp(&(b.job_version, &b.group, b.index))
        });
        if allocs.is_empty() && !follow {
            eprintln!("(job {} has no allocations)", job.name);
        }
        let mut seen = HashSet::new();
        for a in allocs {
            seen.insert(a.id.to_string());
            let logs = fetch(client, a.id.as_str()).await?;
            let text = if stderr { logs.stderr } else { logs.stdout };
            let old = printed.get(a.id.as_str()).map(String::as_str).unwrap_or("");
            let new = new_part(old, &text);
            let header = format!("==> {} {}[{}] on {} <==", a.id, a.group, a.index, a.node_id);
            if !new.is_empty() || (!follow && last_header.as_deref() != Some(header.as_str())) {
                if last_header.as_deref() != Some(header.as_str()) {
                    println!("{header}");
                    last_header = Some(header);
                }
                print!("{new}");
                if !new.is_empty() && !new.ends_with('\n') {
                    println!();
                }
            }
            printed.insert(a.id.to_string(), text);
        }
        printed.retain(|id, _| seen.contains(id));
        if !follow {
            return Ok(());
        }
        tokio::select! {
            _ = crate::shutdown::shutdown_signal() => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
}

/// What `new` adds to `old`, two tails of one growing output. A tail keeps only
/// the last bytes, so `new` may begin inside `old`: where the rest of `old` from
/// some point is the front of `new`, what follows it is the addition. When `new`
/// does not begin inside `old` (or begins within its last 64 bytes), all of it is
/// new.
fn new_part<'a>(old: &str, new: &'a str) -> &'a str {
    if let Some(rest) = new.strip_prefix(old) {
        return rest;
    }
    // Long enough to be found in few places; an overlap shorter than this means
    // nearly the whole tail is new, and it is printed whole.
    let mut head_len = new.len().min(64);
    while !new.is_char_boundary(head_len) {
        head_len -= 1;
    }
    let head = &new[..head_len];
    if head.is_empty() {
        return new;
    }
    for (at, _) in old.match_indices(head) {
        let overlap = &old[at..];
        if let Some(rest) = new.strip_prefix(overlap) {
            return rest;
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_names_one_allocation_or_lists_its_candidates() {
        assert_eq!(pick("ab", vec!["abc".into()]).unwrap(), "abc");
        assert_eq!(pick("zz", vec![]).unwrap(), "zz");
        let err = pick("a", vec!["ab".into(), "ac".into(), "ab".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "allocation prefix `a` matches 2 allocations: ab, ac");
    }

    #[test]
    fn only_what_a_tail_adds_is_new() {
        assert_eq!(new_part("", "a\nb\n"), "a\nb\n");
        assert_eq!(new_part("a\nb\n", "a\nb\nc\n"), "c\n");
        assert_eq!(new_part("a\nb\n", "a\nb\n"), "");
        // The tail slid: its front is gone.
        let old: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let new = format!("{}line 20\n", &old[30..]);
        assert_eq!(new_part(&old, &new), "line 20\n");
        // Nothing of the old tail is left.
        assert_eq!(new_part("old\n", "fresh\n"), "fresh\n");
    }
}
