//! The timeline engine: a pure state machine, events in, records out. No I/O.
pub mod engine;
pub mod types;
pub use types::*;
