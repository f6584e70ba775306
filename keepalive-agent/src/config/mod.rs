//! The configuration file of `keepalive-agent run` (`--config PATH`, TOML) and the `config`
//! subcommand that prints the effective configuration.
//!
//! Precedence, strongest first: flags on the command line, then the standard `OTEL_*` environment
//! variables, then the file, then the built-in defaults. [`file`] is the file's schema (unknown
//! keys and wrong types stop the agent with the file, line and key); [`layers`] folds it into the
//! parsed flags and records each value's source; [`show`] prints the result.
//!
//! A new table is one struct and one field in [`file::FileConfig`], one row
//! per key in [`layers::SETTINGS`], and one line per key in [`show::write_config`].

pub mod file;
pub mod layers;
pub mod show;

use anyhow::{Context as _, Result};
use clap::ArgMatches;
use keepalive_agent::export::ExportConfig;

use crate::RunArgs;

/// The process environment as a lookup.
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `run`'s arguments with the `--config` file (if any) folded in under the flags and the
/// environment; `matches` are the `run` subcommand's.
pub fn run_args(args: RunArgs, matches: &ArgMatches) -> Result<RunArgs> {
    let layered = layers::layer(args, matches, &process_env)?;
    if let Some(path) = &layered.file {
        log::info!("configuration file {} (flags and OTEL_* variables win over it)", path.display());
    }
    Ok(layered.args)
}

/// `keepalive-agent config`: resolves everything `run` would (file, environment, flags, export
/// settings) and prints it with each value's source.
pub fn show(args: RunArgs, matches: &ArgMatches) -> Result<()> {
    let layered = layers::layer(args, matches, &process_env)?;
    let export = ExportConfig::from_args(&layered.args.export).context("configuring the OpenTelemetry export")?;
    let metrics = show::Metrics::resolve(&layered.args, &export, &process_env).context("configuring the metrics")?;
    let mut out = std::io::stdout().lock();
    show::write_config(&mut out, &layered, &export, &metrics, matches, &process_env).context("writing the configuration")
}
