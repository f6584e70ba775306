//! keepalive-agent: makes TCP keep-alive visible.
pub mod attach;
pub mod audit;
pub mod clock;
pub mod container;
pub mod decode;
pub mod event;
pub mod export;
pub mod json_text;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod output;
pub mod owners;
pub mod privilege;
pub mod reconcile;
pub mod runtime;
pub mod timeline;
