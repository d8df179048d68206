//! Shared helpers for runv's criterion benchmarks (see `benches/benches/`).
