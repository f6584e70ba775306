//! The timeline engine: a pure state machine, events in, records out. No I/O.
pub mod engine;
mod packed;
mod table;
pub mod types;
pub use types::*;
