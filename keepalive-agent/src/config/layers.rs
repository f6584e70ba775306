//! Layering: flags, then `OTEL_*` environment variables, then the file, then defaults.
//!
//! [`layer`] folds the file's values into the parsed [`RunArgs`] wherever neither a flag on the
//! command line (clap's `ArgMatches::value_source`) nor one of the setting's environment variables
//! gives one, and records where each value came from. The export settings are then resolved by
//! `ExportConfig::resolve` exactly as without a file: a file value reaches it as if it were a flag,
//! but only when no flag and no variable of the same setting is set, so the order holds.
//!
//! The generic export keys both signals share ([`SHARED`]: protocol, timeout, headers, TLS) are the
//! exception: the traces and the metrics push have different variables for them
//! (`OTEL_EXPORTER_OTLP_TRACES_*`, `OTEL_EXPORTER_OTLP_METRICS_*`), so their file values are kept
//! apart (`ExportArgs::file`, `TlsArgs::file`) and each signal's resolver puts them after all of its
//! own variables.
//!
//! Header and resource-attribute tables merge key by key with their flags (a flag wins for the
//! same key); their environment variable, when set, replaces the file's table (as the
//! traces-specific header variable replaces the generic one).

use std::path::PathBuf;

use clap::{parser::ValueSource, ArgMatches};

use super::file::{self, FileConfig};
use crate::RunArgs;

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A flag on the command line (its long name, e.g. `--otlp-queue-size`).
    Flag(String),
    /// An environment variable.
    Env(&'static str),
    /// The configuration file.
    File,
    /// The built-in default.
    Default,
    /// Found on this host (the resource's `host.name`, `host.id`, `os.type`).
    Detected,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(name) => write!(f, "flag {name}"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::File => f.write_str("file"),
            Source::Default => f.write_str("default"),
            Source::Detected => f.write_str("detected"),
        }
    }
}

/// One option of `run`: its dotted key in the file, the clap ids of the flags that set it, the
/// environment variables that stand for it (`VAR[key]` names one key of a `k=v,...` list), and
/// how a file value is put into the arguments (false: the file does not set it).
pub struct Setting {
    pub key: &'static str,
    pub flags: &'static [&'static str],
    pub vars: &'static [&'static str],
    /// Tables merged key by key with their flags: the file's entries go under the flags'.
    pub merges: bool,
    pub apply: fn(&FileConfig, &mut RunArgs) -> bool,
}

/// Sets `arg` to the file's value, if the file has one.
fn put<T: Clone>(file: &Option<T>, arg: &mut T) -> bool {
    file.as_ref().map(|v| *arg = v.clone()).is_some()
}

/// Sets an optional `arg` to the file's value, if the file has one.
fn put_some<T: Clone>(file: &Option<T>, arg: &mut Option<T>) -> bool {
    file.as_ref().map(|v| *arg = Some(v.clone())).is_some()
}

/// Puts the file's `KEY=VALUE` entries before those of the flags (which then win for the same
/// key); `encode` percent-encodes `%` for flags whose values are percent-decoded.
fn put_pairs(file: &Option<std::collections::BTreeMap<String, String>>, arg: &mut Vec<String>, encode: bool) -> bool {
    let Some(map) = file else { return false };
    let entries = map.iter().map(|(k, v)| if encode { format!("{k}={}", v.replace('%', "%25")) } else { format!("{k}={v}") });
    arg.splice(0..0, entries);
    true
}

/// Settings whose file value is kept apart from the flags (see the module documentation): always
/// stored, ranked by each signal's resolver.
pub const SHARED: &[&str] = &[
    "export.protocol",
    "export.headers",
    "export.timeout_ms",
    "export.certificate",
    "export.client_certificate",
    "export.client_key",
    "export.insecure",
];

/// Stores the file's `[export.headers]` table apart from the flags.
fn keep_headers(file: &Option<std::collections::BTreeMap<String, String>>, kept: &mut Vec<(String, String)>) -> bool {
    let Some(map) = file else { return false };
    *kept = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    true
}

/// Every option of `run`, in the order `config` prints them.
pub const SETTINGS: &[Setting] = &[
    Setting { key: "attach.method", flags: &["attach"], vars: &[], merges: false, apply: |f, a| put(&f.attach.method, &mut a.attach.attach) },
    Setting { key: "attach.probe_answers", flags: &["probe_answers"], vars: &[], merges: false, apply: |f, a| put(&f.attach.probe_answers, &mut a.attach.probe_answers) },
    Setting { key: "attach.cgroup", flags: &["cgroup"], vars: &[], merges: false, apply: |f, a| put_some(&f.attach.cgroup, &mut a.attach.cgroup) },
    Setting { key: "attach.ringbuf_size", flags: &["ringbuf_size"], vars: &[], merges: false, apply: |f, a| put(&f.attach.ringbuf_size, &mut a.attach.ringbuf_size) },
    Setting { key: "attach.no_snapshot", flags: &["no_snapshot"], vars: &[], merges: false, apply: |f, a| put(&f.attach.no_snapshot, &mut a.attach.no_snapshot) },
    Setting { key: "attach.all_closes", flags: &["all_closes"], vars: &[], merges: false, apply: |f, a| put(&f.attach.all_closes, &mut a.attach.all_closes) },
    Setting { key: "filter.netns", flags: &["netns"], vars: &[], merges: false, apply: |f, a| put_some(&f.filter.netns, &mut a.netns) },
    Setting { key: "limits.max_connections", flags: &["max_connections"], vars: &[], merges: false, apply: |f, a| put(&f.limits.max_connections, &mut a.max_connections) },
    Setting { key: "limits.shutdown_timeout", flags: &["shutdown_timeout"], vars: &[], merges: false, apply: |f, a| put(&f.limits.shutdown_timeout, &mut a.shutdown_timeout) },
    Setting { key: "limits.duration", flags: &["duration"], vars: &[], merges: false, apply: |f, a| put_some(&f.limits.duration, &mut a.duration) },
    Setting {
        key: "export.endpoint",
        flags: &["otlp_traces_endpoint", "otlp_endpoint"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"],
        merges: false,
        apply: |f, a| {
            let traces = put_some(&f.export.traces_endpoint, &mut a.export.otlp_traces_endpoint);
            put_some(&f.export.endpoint, &mut a.export.otlp_endpoint) | traces
        },
    },
    Setting {
        key: "export.protocol",
        flags: &["otlp_protocol"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"],
        merges: false,
        apply: |f, a| put_some(&f.export.protocol, &mut a.export.file.protocol),
    },
    Setting {
        key: "export.headers",
        flags: &["otlp_headers"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"],
        merges: true,
        apply: |f, a| keep_headers(&f.export.headers, &mut a.export.file.headers),
    },
    Setting {
        key: "export.timeout_ms",
        flags: &["otlp_timeout_ms"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"],
        merges: false,
        apply: |f, a| put_some(&f.export.timeout_ms, &mut a.export.file.timeout_ms),
    },
    Setting { key: "export.queue_size", flags: &["otlp_queue_size"], vars: &["OTEL_BSP_MAX_QUEUE_SIZE"], merges: false, apply: |f, a| put_some(&f.export.queue_size, &mut a.export.otlp_queue_size) },
    Setting { key: "export.batch_size", flags: &["otlp_batch_size"], vars: &["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"], merges: false, apply: |f, a| put_some(&f.export.batch_size, &mut a.export.otlp_batch_size) },
    Setting { key: "export.batch_delay_ms", flags: &["otlp_batch_delay_ms"], vars: &["OTEL_BSP_SCHEDULE_DELAY"], merges: false, apply: |f, a| put_some(&f.export.batch_delay_ms, &mut a.export.otlp_batch_delay_ms) },
    Setting { key: "export.retry_max_s", flags: &["otlp_retry_max_s"], vars: &[], merges: false, apply: |f, a| put_some(&f.export.retry_max_s, &mut a.export.otlp_retry_max_s) },
    Setting { key: "export.max_span_events", flags: &["max_span_events"], vars: &["OTEL_SPAN_EVENT_COUNT_LIMIT"], merges: false, apply: |f, a| put_some(&f.export.max_span_events, &mut a.export.max_span_events) },
    Setting {
        key: "export.certificate",
        flags: &["otlp_certificate"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"],
        merges: false,
        apply: |f, a| put_some(&f.export.certificate, &mut a.export.tls.file.certificate),
    },
    Setting {
        key: "export.client_certificate",
        flags: &["otlp_client_certificate"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"],
        merges: false,
        apply: |f, a| put_some(&f.export.client_certificate, &mut a.export.tls.file.client_certificate),
    },
    Setting {
        key: "export.client_key",
        flags: &["otlp_client_key"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"],
        merges: false,
        apply: |f, a| put_some(&f.export.client_key, &mut a.export.tls.file.client_key),
    },
    Setting {
        key: "export.insecure",
        flags: &["otlp_insecure"],
        vars: &["OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"],
        merges: false,
        apply: |f, a| put_some(&f.export.insecure, &mut a.export.tls.file.insecure),
    },
    Setting { key: "export.spans", flags: &["spans"], vars: &[], merges: false, apply: |f, a| put_some(&f.export.spans, &mut a.export.spans) },
    Setting {
        key: "export.service_name",
        flags: &["service_name"],
        vars: &["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES[service.name]"],
        merges: false,
        apply: |f, a| put_some(&f.export.service_name, &mut a.export.service_name),
    },
    Setting {
        key: "export.resource_attributes",
        flags: &["resource_attributes"],
        vars: &["OTEL_RESOURCE_ATTRIBUTES"],
        merges: true,
        apply: |f, a| put_pairs(&f.export.resource_attributes, &mut a.export.resource_attributes, true),
    },
    Setting { key: "metrics.listen", flags: &["metrics_listen"], vars: &[], merges: false, apply: |f, a| put_some(&f.metrics.listen, &mut a.metrics.metrics_listen) },
    Setting { key: "metrics.max_series", flags: &["metrics_max_series"], vars: &[], merges: false, apply: |f, a| put_some(&f.metrics.max_series, &mut a.metrics.metrics_max_series) },
    Setting { key: "metrics.peer_labels", flags: &["metrics_peer_labels"], vars: &[], merges: false, apply: |f, a| put(&f.metrics.peer_labels, &mut a.metrics.metrics_peer_labels) },
    Setting { key: "metrics.exporter", flags: &["metrics_exporter"], vars: &["OTEL_METRICS_EXPORTER"], merges: false, apply: |f, a| put_some(&f.metrics.exporter, &mut a.metrics.metrics_exporter) },
    // The metrics-specific endpoint and protocol: the generic `--otlp-endpoint`/`--otlp-protocol`
    // and their variables are weaker (OpenTelemetry: a signal's own setting wins over the generic one).
    Setting {
        key: "metrics.endpoint",
        flags: &["otlp_metrics_endpoint"],
        vars: &["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"],
        merges: false,
        apply: |f, a| put_some(&f.metrics.endpoint, &mut a.metrics.otlp_metrics_endpoint),
    },
    Setting {
        key: "metrics.protocol",
        flags: &["otlp_metrics_protocol"],
        vars: &["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"],
        merges: false,
        apply: |f, a| put_some(&f.metrics.protocol, &mut a.metrics.otlp_metrics_protocol),
    },
    Setting {
        key: "metrics.export_interval_ms",
        flags: &["metrics_export_interval_ms"],
        vars: &["OTEL_METRIC_EXPORT_INTERVAL"],
        merges: false,
        apply: |f, a| put_some(&f.metrics.export_interval_ms, &mut a.metrics.metrics_export_interval_ms),
    },
    Setting {
        key: "metrics.temporality",
        flags: &["metrics_temporality"],
        vars: &["OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"],
        merges: false,
        apply: |f, a| put_some(&f.metrics.temporality, &mut a.metrics.metrics_temporality),
    },
    Setting { key: "metrics.audit_interval", flags: &["audit_interval"], vars: &[], merges: false, apply: |f, a| put(&f.metrics.audit_interval, &mut a.audit_interval) },
];

/// The arguments of `run` with the file folded in, and where each setting came from.
pub struct Layered {
    pub args: RunArgs,
    /// The file, when `--config` names one.
    pub file: Option<PathBuf>,
    /// Per [`SETTINGS`] row, by key: the strongest layer that set it.
    pub sources: Vec<(&'static str, Source)>,
}

impl Layered {
    /// Where the setting `key` came from.
    pub fn source(&self, key: &str) -> Source {
        self.sources.iter().find(|(k, _)| *k == key).map_or(Source::Default, |(_, s)| s.clone())
    }
}

/// Folds the `--config` file (if any) into `args`, under the flags given on the command line
/// (`matches`) and the environment (`env`, a lookup; empty values count as unset).
pub fn layer(mut args: RunArgs, matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<Layered, LayerError> {
    let file = args.config.as_deref().map(file::load).transpose()?;
    if let Some(path) = &args.config {
        args.export.tls.file.path = path.display().to_string();
    }
    let mut sources = Vec::with_capacity(SETTINGS.len());
    for s in SETTINGS {
        let flag = s.flags.iter().find(|id| given(matches, id));
        let var = s.vars.iter().copied().find(|v| env_sets(env, v));
        let shared = SHARED.contains(&s.key);
        let from_file = match &file {
            Some(f) if shared || (var.is_none() && (flag.is_none() || s.merges)) => (s.apply)(f, &mut args),
            _ => false,
        };
        let source = match (flag, var) {
            (Some(id), _) => Source::Flag(long_flag(id)),
            (None, Some(v)) => Source::Env(v),
            (None, None) if from_file => Source::File,
            (None, None) => Source::Default,
        };
        sources.push((s.key, source));
    }
    add_node_name(&mut args, matches, env)?;
    Ok(Layered { file: args.config.clone(), args, sources })
}

/// `k8s.node.name` from `K8S_NODE_NAME` (the DaemonSet's downward API) as a resource attribute
/// under `OTEL_RESOURCE_ATTRIBUTES` and the flags but over the file: it goes between the file's
/// entries and the flags' in the flags' list, and not at all when the variable list names it.
fn add_node_name(args: &mut RunArgs, matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<(), LayerError> {
    let Some(node) = keepalive_agent::k8s::node_name(env).map_err(LayerError::Env)? else { return Ok(()) };
    if env_sets(env, "OTEL_RESOURCE_ATTRIBUTES[k8s.node.name]") {
        return Ok(());
    }
    let attrs = &mut args.export.resource_attributes;
    let from_flags = if given(matches, "resource_attributes") { matches.get_raw("resource_attributes").map_or(0, |v| v.len()) } else { 0 };
    attrs.insert(attrs.len() - from_flags, format!("k8s.node.name={node}"));
    Ok(())
}

/// Why the layers cannot be combined.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    File(#[from] file::FileError),
    /// An environment variable the layering reads itself is malformed (the message names it).
    #[error("{0}")]
    Env(String),
}

/// Whether the flag with clap id `id` was on the command line.
pub fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

/// Whether `var` is set (non-empty); `VAR[key]` asks whether the `k=v,...` list in `VAR` has `key`.
pub fn env_sets(env: &dyn Fn(&str) -> Option<String>, var: &str) -> bool {
    let value = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    match var.strip_suffix(']').and_then(|v| v.split_once('[')) {
        Some((name, key)) => value(name).is_some_and(|list| list_keys(&list).any(|k| k == key)),
        None => value(var).is_some(),
    }
}

/// The keys of a `k1=v1,k2=v2` list (keys percent-decoded, as the exporter reads them).
pub fn list_keys(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',')
        .filter_map(|e| e.split_once('='))
        .map(|(k, _)| percent_encoding::percent_decode_str(k.trim()).decode_utf8_lossy().into_owned())
}

/// `--long-name` of the `run` flag with clap id `id`.
pub fn long_flag(id: &str) -> String {
    use clap::CommandFactory as _;
    let cli = crate::Cli::command();
    let long = cli
        .find_subcommand("run")
        .and_then(|run| run.get_arguments().find(|a| a.get_id() == id))
        .and_then(|a| a.get_long().map(str::to_string));
    format!("--{}", long.unwrap_or_else(|| id.replace('_', "-")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashMap, time::Duration};

    use clap::{CommandFactory as _, FromArgMatches as _};

    /// `run` parsed from `argv` with a file holding `toml`, layered over the environment `env`.
    fn layered(argv: &[&str], toml: &str, env: &[(&str, &str)]) -> Layered {
        let file = tempfile_with(toml);
        let path = file.path().to_str().unwrap().to_string();
        let mut full = vec!["keepalive-agent", "run", "--config", path.as_str()];
        full.extend_from_slice(argv);
        let matches = crate::Cli::command().try_get_matches_from(full).unwrap();
        let crate::Command::Run(args) = crate::Cli::from_arg_matches(&matches).unwrap().command else { panic!("not run") };
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        layer(args, matches.subcommand_matches("run").unwrap(), &move |n| env.get(n).cloned()).unwrap()
    }

    /// A named temporary file holding `text`.
    fn tempfile_with(text: &str) -> NamedFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!("keepalive-config-{}-{}.toml", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        NamedFile(path)
    }

    struct NamedFile(PathBuf);
    impl NamedFile {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for NamedFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const FILE: &str = r#"
[limits]
max_connections = 100
duration = 3
[export]
endpoint = "http://127.0.0.1:1111"
queue_size = 64
retry_max_s = 7
service_name = "file-svc"
[export.headers]
authorization = "file"
x-file = "1"
[export.resource_attributes]
team = "file"
"a%b" = "50%"
"#;

    #[test]
    fn file_alone_fills_every_unset_option() {
        let l = layered(&[], FILE, &[]);
        assert_eq!(l.args.max_connections, 100);
        assert_eq!(l.args.duration, Some(Duration::from_secs(3)));
        assert_eq!(l.args.export.otlp_endpoint.as_deref(), Some("http://127.0.0.1:1111"));
        assert_eq!((l.args.export.otlp_queue_size, l.args.export.otlp_retry_max_s), (Some(64), Some(7)));
        assert_eq!(l.source("limits.max_connections"), Source::File);
        assert_eq!(l.source("export.queue_size"), Source::File);
        assert_eq!(l.source("attach.method"), Source::Default);
        assert_eq!(l.source("limits.shutdown_timeout"), Source::Default);
        let cfg = keepalive_agent::export::ExportConfig::resolve(&l.args.export, &|_| None, &Default::default()).unwrap();
        assert_eq!(cfg.queue_size, 64);
        assert_eq!(cfg.service_name(), "file-svc");
        // `%` in a file value is literal (the flag path percent-decodes).
        assert!(cfg.resource.iter().any(|kv| kv.key.as_str() == "a%b" && kv.value.as_str() == "50%"), "{:?}", cfg.resource);
    }

    #[test]
    fn flags_win_over_environment_over_file() {
        let env = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:2222/v1/traces"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "32"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=env"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=env-svc"),
        ];
        let l = layered(&["--max-connections", "5", "--otlp-header", "x-flag=2"], FILE, &env);
        assert_eq!(l.source("limits.max_connections"), Source::Flag("--max-connections".into()));
        assert_eq!(l.args.max_connections, 5);
        // Environment over file: neither the endpoint nor the queue size is taken from the file.
        assert_eq!(l.source("export.endpoint"), Source::Env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
        assert_eq!(l.args.export.otlp_endpoint, None);
        assert_eq!(l.source("export.queue_size"), Source::Env("OTEL_BSP_MAX_QUEUE_SIZE"));
        assert_eq!(l.source("export.service_name"), Source::Env("OTEL_RESOURCE_ATTRIBUTES[service.name]"));
        // The header variable replaces the file's table; the flag still adds to it.
        assert_eq!(l.args.export.otlp_headers, vec!["x-flag=2"]);
        // Settings the environment does not touch still come from the file.
        assert_eq!(l.source("export.retry_max_s"), Source::File);
        let env_fn = |n: &str| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
        let cfg = keepalive_agent::export::ExportConfig::resolve(&l.args.export, &env_fn, &Default::default()).unwrap();
        assert_eq!((cfg.queue_size, cfg.retry_max), (32, Duration::from_secs(7)));
        assert_eq!(cfg.service_name(), "env-svc");
        let keepalive_agent::export::Target::Otlp { endpoint, headers, .. } = cfg.target else { panic!("stdout") };
        assert_eq!(endpoint, "http://127.0.0.1:2222/v1/traces");
        assert_eq!(headers, vec![("authorization".to_string(), "env".to_string()), ("x-flag".to_string(), "2".to_string())]);
    }

    #[test]
    fn merged_tables_keep_file_entries_under_flags() {
        let l = layered(&["--otlp-header", "authorization=flag", "--otlp-endpoint", "http://127.0.0.1:3333"], FILE, &[]);
        assert_eq!(l.source("export.headers"), Source::Flag("--otlp-header".into()));
        assert_eq!(l.source("export.endpoint"), Source::Flag("--otlp-endpoint".into()));
        let cfg = keepalive_agent::export::ExportConfig::resolve(&l.args.export, &|_| None, &Default::default()).unwrap();
        let keepalive_agent::export::Target::Otlp { endpoint, headers, .. } = cfg.target else { panic!("stdout") };
        assert_eq!(endpoint, "http://127.0.0.1:3333/v1/traces");
        assert_eq!(headers, vec![("authorization".to_string(), "flag".to_string()), ("x-file".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_flag_left_at_its_default_does_not_hide_the_file() {
        // `--max-connections` has a clap default: only a value typed on the command line wins.
        let l = layered(&["--shutdown-timeout", "1"], "[limits]\nmax_connections = 9\nshutdown_timeout = 2\n", &[]);
        assert_eq!(l.args.max_connections, 9);
        assert_eq!(l.args.shutdown_timeout, Duration::from_secs(1));
        assert_eq!(l.source("limits.shutdown_timeout"), Source::Flag("--shutdown-timeout".into()));
    }

    #[test]
    fn node_name_sits_between_file_and_environment() {
        let file = "[export.resource_attributes]\n\"k8s.node.name\" = \"file-node\"\nteam = \"a\"\n";
        let resource = |argv: &[&str], env: &[(&str, &str)]| {
            let l = layered(argv, file, env);
            let env_fn = |n: &str| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
            let cfg = keepalive_agent::export::ExportConfig::resolve(&l.args.export, &env_fn, &Default::default()).unwrap();
            cfg.resource.iter().find(|kv| kv.key.as_str() == "k8s.node.name").map(|kv| kv.value.as_str().into_owned())
        };
        assert_eq!(resource(&[], &[]).as_deref(), Some("file-node"));
        assert_eq!(resource(&[], &[("K8S_NODE_NAME", "env-node")]).as_deref(), Some("env-node"));
        let otel = ("OTEL_RESOURCE_ATTRIBUTES", "k8s.node.name=otel-node");
        assert_eq!(resource(&[], &[("K8S_NODE_NAME", "env-node"), otel]).as_deref(), Some("otel-node"));
        let flag = ["--resource-attribute", "k8s.node.name=flag-node"];
        assert_eq!(resource(&flag, &[("K8S_NODE_NAME", "env-node")]).as_deref(), Some("flag-node"));
        // A malformed variable is an error naming it.
        let matches = crate::Cli::command().try_get_matches_from(["k", "run"]).unwrap();
        let crate::Command::Run(args) = crate::Cli::from_arg_matches(&matches).unwrap().command else { panic!() };
        let bad = |n: &str| (n == "K8S_NODE_NAME").then(|| "Bad Name".to_string());
        let e = layer(args, matches.subcommand_matches("run").unwrap(), &bad).err().unwrap().to_string();
        assert!(e.starts_with("K8S_NODE_NAME: "), "{e}");
    }

    #[test]
    fn metrics_table_layers_like_the_flags() {
        use keepalive_agent::metrics::config::MetricsConfig;
        let file = "[metrics]\nmax_series = 50\npeer_labels = true\nendpoint = \"http://127.0.0.1:5555/m\"\nexport_interval_ms = 700\ntemporality = \"delta\"\n";
        let resolve = |l: &Layered, env: &[(&str, &str)]| {
            let env_fn = |n: &str| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
            MetricsConfig::resolve(&l.args.metrics, &l.args.export, &[], &env_fn).unwrap()
        };
        let l = layered(&[], file, &[]);
        let c = resolve(&l, &[]);
        assert_eq!((c.max_series, c.peer_labels), (50, true));
        let push = c.otlp.unwrap();
        assert_eq!((push.endpoint.as_str(), push.interval, push.temporality), ("http://127.0.0.1:5555/m", Duration::from_millis(700), opentelemetry_sdk::metrics::Temporality::Delta));
        assert_eq!((l.source("metrics.endpoint"), l.source("metrics.listen")), (Source::File, Source::Default));
        // The variable beats the file, the flag beats both; the generic endpoint does not hide the file's own.
        let env = [("OTEL_METRIC_EXPORT_INTERVAL", "800"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:6666")];
        let l = layered(&["--metrics-max-series", "60"], file, &env);
        let c = resolve(&l, &env);
        assert_eq!(c.max_series, 60);
        assert_eq!(l.source("metrics.max_series"), Source::Flag("--metrics-max-series".into()));
        assert_eq!(l.source("metrics.export_interval_ms"), Source::Env("OTEL_METRIC_EXPORT_INTERVAL"));
        let push = c.otlp.unwrap();
        assert_eq!((push.endpoint.as_str(), push.interval), ("http://127.0.0.1:5555/m", Duration::from_millis(800)));
    }

    /// For the metrics push, every `OTEL_EXPORTER_OTLP_METRICS_*` variable beats the file's generic
    /// `export.*` key, a traces variable does not hide the file from the metrics, flags beat both,
    /// and `metrics.protocol` beats `export.protocol`.
    #[test]
    fn metrics_variables_beat_the_files_generic_export_keys() {
        use keepalive_agent::export::{ExportConfig, Protocol, Target};
        use keepalive_agent::metrics::config::{MetricsConfig, OtlpMetrics};
        let file = "[export]\nprotocol = \"grpc\"\ntimeout_ms = 111\n[export.headers]\nx-a = \"file\"\nx-b = \"file\"\n";
        let ep = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4318/v1/metrics");
        let env_fn = |env: &[(&str, &str)]| {
            let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            move |n: &str| env.get(n).cloned()
        };
        let push = |argv: &[&str], file: &str, env: &[(&str, &str)]| -> OtlpMetrics {
            let l = layered(argv, file, env);
            MetricsConfig::resolve(&l.args.metrics, &l.args.export, &[], &env_fn(env)).unwrap().otlp.unwrap()
        };
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        // The file alone serves the push.
        let m = push(&[], file, &[ep]);
        assert_eq!((m.protocol, m.timeout), (Protocol::Grpc, Duration::from_millis(111)));
        assert_eq!(m.headers, pairs(&[("x-a", "file"), ("x-b", "file")]));
        // Each metrics variable wins over the file's generic key; the header variable replaces the table.
        let metrics_env = [
            ep,
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2222"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-a=env"),
        ];
        let m = push(&[], file, &metrics_env);
        assert_eq!((m.protocol, m.timeout), (Protocol::HttpProtobuf, Duration::from_millis(2222)));
        assert_eq!(m.headers, pairs(&[("x-a", "env")]));
        // The traces, with their own endpoint, keep the file's values under the metrics variables.
        let l = layered(&["--otlp-endpoint", "http://127.0.0.1:4317"], file, &metrics_env);
        let t = ExportConfig::resolve(&l.args.export, &env_fn(&metrics_env), &Default::default()).unwrap();
        let Target::Otlp { protocol, headers, .. } = t.target else { panic!("stdout") };
        assert_eq!((protocol, t.timeout, headers.len()), (Protocol::Grpc, Duration::from_millis(111), 2));
        // Traces variables do not hide the file from the metrics push.
        let traces_env = [ep, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3333"), ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-c=t")];
        let m = push(&[], file, &traces_env);
        assert_eq!((m.protocol, m.timeout, m.headers.len()), (Protocol::Grpc, Duration::from_millis(111), 2));
        assert_eq!(layered(&[], file, &traces_env).source("export.protocol"), Source::Env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"));
        // Flags beat the variables and the file.
        let m = push(&["--otlp-protocol", "http/protobuf", "--otlp-timeout-ms", "444", "--otlp-header", "x-b=flag"], file, &metrics_env);
        assert_eq!((m.protocol, m.timeout), (Protocol::HttpProtobuf, Duration::from_millis(444)));
        assert_eq!(m.headers, pairs(&[("x-a", "env"), ("x-b", "flag")]));
        // The file's metrics-specific key beats its generic one.
        let with_metrics = format!("{file}[metrics]\nprotocol = \"http/protobuf\"\n");
        assert_eq!(push(&[], &with_metrics, &[ep]).protocol, Protocol::HttpProtobuf);
    }

    /// A TLS file named by the configuration file is reported with the file and key, and ranks
    /// below the metrics variables.
    #[test]
    fn tls_file_keys_are_named_and_rank_below_every_variable() {
        use keepalive_agent::metrics::config::MetricsConfig;
        let junk = tempfile_with("-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n");
        let file = format!("[export]\ncertificate = \"{}\"\n", junk.path().display());
        let l = layered(&[], &file, &[]);
        let e = keepalive_agent::export::ExportConfig::resolve(&l.args.export, &|_| None, &Default::default()).unwrap_err().to_string();
        let key = format!("{}: key `export.certificate`: ", l.file.as_ref().unwrap().display());
        assert!(e.starts_with(&key) && e.contains("bad PEM"), "{e}");
        // A metrics variable naming a file hides the file's key from the metrics push (the
        // variable's own file is then read: here a junk one too, named by the variable).
        let env = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://127.0.0.1:4318/v1/metrics"), ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", junk.path().to_str().unwrap())];
        let l = layered(&[], &file, &env);
        let lookup = |n: &str| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
        let e = MetricsConfig::resolve(&l.args.metrics, &l.args.export, &[], &lookup).unwrap_err().to_string();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE: "), "{e}");
    }

    /// The commented default configuration the Debian package installs.
    const PACKAGED: &str = include_str!("../../../packaging/config.toml");

    #[test]
    fn packaged_default_config_is_valid_and_complete() {
        let p = std::path::Path::new("packaging/config.toml");
        file::parse(p, PACKAGED).unwrap();
        // Uncommenting every `#key = default` line gives a valid file whose values are the defaults,
        // but for the one setting the package chooses for a fleet: no program on received segments.
        let uncommented: String = PACKAGED.lines().map(|l| l.strip_prefix('#').filter(|r| !r.starts_with([' ', '#'])).unwrap_or(l)).map(|l| format!("{l}\n")).collect();
        let l = layered(&[], &uncommented, &[]);
        let d = layered(&[], "", &[]);
        let mut fleet = d.args.attach.clone();
        fleet.probe_answers = keepalive_agent::attach::Answers::NextFiring;
        assert_eq!(format!("{:?}", l.args.attach), format!("{fleet:?}"));
        assert_eq!(l.source("attach.probe_answers"), Source::File);
        assert_eq!((l.args.max_connections, l.args.shutdown_timeout), (d.args.max_connections, d.args.shutdown_timeout));
        let resolve = |l: &Layered| keepalive_agent::export::ExportConfig::resolve(&l.args.export, &|_| None, &Default::default()).unwrap();
        assert_eq!(format!("{:?}", resolve(&l)), format!("{:?}", resolve(&d)));
        let metrics = |l: &Layered| keepalive_agent::metrics::config::MetricsConfig::resolve(&l.args.metrics, &l.args.export, &[], &|_| None).unwrap();
        assert_eq!(format!("{:?}", metrics(&l)), format!("{:?}", metrics(&d)));
        let timing = |l: &Layered| keepalive_agent::metrics::config::push_timing_from(&l.args.metrics, &|_| None).unwrap();
        assert_eq!(timing(&l), timing(&d));
        assert_eq!(l.args.audit_interval, d.args.audit_interval);
        assert_eq!((l.source("metrics.temporality"), l.source("export.spans")), (Source::File, Source::File));
        // Every key of every setting is shown in its own table, as a default or an example.
        for s in SETTINGS {
            let (table, leaf) = s.key.split_once('.').unwrap();
            let section = table_text(PACKAGED, table);
            let shown = |leaf: &str| {
                section.contains(&format!("#{leaf} = "))
                    || section.contains(&format!("Example: {leaf} = "))
                    || s.key == "attach.probe_answers" && section.contains(&format!("\n{leaf} = "))
            };
            let present = match leaf {
                "headers" | "resource_attributes" => PACKAGED.contains(&format!("[{table}.{leaf}]")),
                "endpoint" if table == "export" => shown("endpoint") && shown("traces_endpoint"),
                _ => shown(leaf),
            };
            assert!(present, "{} is missing from packaging/config.toml", s.key);
        }
    }

    /// The text of `[table]` in a TOML file (up to the next table header).
    fn table_text<'a>(text: &'a str, table: &str) -> &'a str {
        let start = text.find(&format!("\n[{table}]\n")).unwrap_or_else(|| panic!("no [{table}]"));
        let rest = &text[start + table.len() + 4..];
        &rest[..rest.find("\n[").unwrap_or(rest.len())]
    }

    #[test]
    fn env_list_keys() {
        let env = |n: &str| (n == "V").then(|| "a=1, service%2Ename=x,b".to_string());
        assert!(env_sets(&env, "V"));
        assert!(env_sets(&env, "V[service.name]"));
        assert!(!env_sets(&env, "V[b]"));
        assert!(!env_sets(&env, "W"));
        assert!(!env_sets(&|_| Some(" ".into()), "V"));
    }

    #[test]
    fn every_setting_names_real_flags() {
        let cli = crate::Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        for s in SETTINGS {
            for id in s.flags {
                assert!(run.get_arguments().any(|a| a.get_id() == *id), "{}: no flag {id}", s.key);
            }
        }
        // And the other way: the file holds every option of `run`.
        for arg in run.get_arguments().filter(|a| !["config", "help", "log_level"].contains(&a.get_id().as_str())) {
            let id = arg.get_id().as_str();
            assert!(SETTINGS.iter().any(|s| s.flags.contains(&id)), "--{}: no key in the configuration file", id.replace('_', "-"));
        }
        assert_eq!(long_flag("otlp_headers"), "--otlp-header");
        assert_eq!(long_flag("attach"), "--attach");
    }
}
