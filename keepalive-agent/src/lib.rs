//! keepalive-agent: makes TCP keep-alive visible.
pub mod attach;
pub mod clock;
pub mod container;
pub mod decode;
pub mod event;
pub mod export;
pub mod kernel;
pub mod output;
pub mod owners;
pub mod privilege;
pub mod reconcile;
pub mod runtime;
pub mod timeline;
