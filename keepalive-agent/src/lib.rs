//! keepalive-agent: makes TCP keep-alive visible.
pub mod event;
pub mod timeline;
