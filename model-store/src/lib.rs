//! The dispersed model store: chunking, hashing, erasure coding, object_store
//! backends, signed manifests, the lazy verified reader, repair and peer fetch.
//!
//! Nothing is implemented here yet; the control plane does not depend on it.
