//! Generated English sentences for the embedding benchmarks: a subject, a verb and
//! an object, then tails up to 10 to 30 words, drawn from a seeded generator so a
//! seed gives the same list everywhere (ours and the baseline embed the same file).

use rand::{Rng, SeedableRng};

const SUBJECTS: &[&str] = &[
    "The scheduler",
    "A small team of engineers",
    "Every storage node in the second rack",
    "The new GPU cluster",
    "Our embedding service",
    "The night shift operator",
    "A curious student from Ghent",
    "The city library",
    "Most weather models",
    "The old lighthouse keeper",
    "A delivery drone",
    "The finance department",
    "My neighbour's cat",
    "The committee",
    "A tired violinist",
    "The open source community",
    "Two researchers at the lab",
    "The train to Amsterdam",
];
const VERBS: &[&str] = &[
    "moved",
    "carefully inspected",
    "quietly rebuilt",
    "measured",
    "described",
    "forgot about",
    "rejected",
    "celebrated",
    "painted",
    "translated",
    "optimised",
    "lost track of",
    "compared",
    "recommended",
    "scheduled",
    "repaired",
];
const OBJECTS: &[&str] = &[
    "the failing disk",
    "a long list of pending jobs",
    "the quarterly budget report",
    "an unexpected spike in latency",
    "the recipe for apple pie",
    "three boxes of old photographs",
    "the map of the northern coast",
    "a broken umbrella",
    "the results of the election",
    "every model checkpoint from last year",
    "the garden behind the school",
    "a proposal for a faster network",
    "the noise coming from the basement",
    "a poem about the sea",
];
const TAILS: &[&str] = &[
    "before the morning meeting started",
    "because the network link was slow",
    "while the rain kept falling over the harbour",
    "and nobody noticed until much later",
    "after three weeks of careful testing",
    "without asking anyone for permission",
    "during the long winter holidays",
    "so that the customers would be happy again",
    "even though the manual said otherwise",
    "in front of a surprisingly large audience",
    "with help from a friendly volunteer",
    "at exactly half past nine",
    "although the budget had already been spent",
    "and then went home to sleep",
];

/// `n` varied English sentences of 10 to 30 words, the same for a seed.
pub fn sentences(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut words: Vec<&str> = Vec::new();
            for list in [SUBJECTS, VERBS, OBJECTS] {
                words.extend(list[rng.random_range(0..list.len())].split(' '));
            }
            let target = rng.random_range(10..=30);
            while words.len() < target {
                words.extend(TAILS[rng.random_range(0..TAILS.len())].split(' '));
            }
            words.truncate(target);
            format!("{}.", words.join(" "))
        })
        .collect()
}
