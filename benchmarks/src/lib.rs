//! Code shared by the benchmark binaries (`src/bin/*`).
//!
//! | module | owns |
//! |---|---|
//! | [`link`] | simulated per-backend network links: object stores whose GETs share a bandwidth |
//! | [`sentences`] | the seeded sentences the embedding benchmarks embed |
//! | [`serve`] | an in-process model server and the HTTP client side of the serving benchmarks |
//! | [`measure`] | the machine's load average, CPU count and percentiles, for table headers |
//! | [`timeline`] | marks a script writes while disrupting a cluster, and the write gaps around them |

pub mod link;
pub mod measure;
pub mod sentences;
pub mod serve;
pub mod timeline;
