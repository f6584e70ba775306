//! keepalive-agent: makes TCP keep-alive visible.
pub mod clock;
pub mod event;
pub mod timeline;
