//! End-to-end tests of Mixlab's binaries, one test binary for the crate, one module per
//! topic; `common` holds the helpers they share.

mod common;
mod errors;
mod mixers;
#[cfg(feature = "mpi")]
mod mpi;
mod repo;
mod resume;
mod runs;
mod tools;
