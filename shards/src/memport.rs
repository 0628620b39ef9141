//! In-memory implementations of the port traits for tests and benchmarks. PLACEHOLDER.
