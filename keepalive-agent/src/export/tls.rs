//! TLS to the collector, shared by every OTLP exporter (traces here, metrics too).
//!
//! [`TlsArgs`] are the command-line flags; [`TlsSettings::resolve`] combines them with the standard
//! `OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}CERTIFICATE`, `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`
//! and `..._INSECURE` variables (the Rust exporter reads none of the certificate variables itself)
//! with the same precedence as every other export setting: a flag, then the signal-specific
//! variable, then the generic one, then the configuration file's key (`export.certificate`...,
//! [`TlsFile`]). Every file is read and its PEM parsed at start-up, so a bad one stops the agent
//! with an error naming the flag, variable or file key.
//!
//! [`TlsSettings::tonic_channel`] and [`TlsSettings::reqwest_client`] configure the two transports
//! from the same settings. Both use rustls with the *ring* crypto provider (README.md,
//! "TLS to the collector", says why); no OpenSSL is linked.
//!
//! Without a CA file the system's trust store is used (`rustls-native-certs`, i.e. the
//! OpenSSL-compatible store under `/etc/ssl`). With one, only that file's certificates are trusted,
//! as the OpenTelemetry SDKs do.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ExportError;

/// Which OTLP signal the settings are for: selects the signal-specific variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// `TRACES` or `METRICS`, as in `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`.
    pub fn env_word(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }
}

/// TLS flags of `keepalive-agent run` (they apply to every signal).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// PEM file of the CA certificate(s) trusted to verify the collector (https:// endpoints);
    /// replaces the system's trust store.
    /// [env: OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE, OTEL_EXPORTER_OTLP_CERTIFICATE]
    #[arg(long, value_name = "PEM")]
    pub otlp_certificate: Option<PathBuf>,

    /// PEM file of the client certificate (chain) presented to the collector (mutual TLS); needs
    /// --otlp-client-key. [env: OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE,
    /// OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE]
    #[arg(long, value_name = "PEM")]
    pub otlp_client_certificate: Option<PathBuf>,

    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    /// [env: OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY, OTEL_EXPORTER_OTLP_CLIENT_KEY]
    #[arg(long, value_name = "PEM")]
    pub otlp_client_key: Option<PathBuf>,

    /// For a gRPC endpoint given without a scheme (host:port): true connects in plaintext, false
    /// (the default) with TLS. Refused with an https:// endpoint.
    /// [env: OTEL_EXPORTER_OTLP_TRACES_INSECURE, OTEL_EXPORTER_OTLP_INSECURE]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub otlp_insecure: Option<bool>,

    /// The configuration file's TLS keys (not flags: they rank below every variable).
    #[arg(skip)]
    pub file: TlsFile,
}

/// The TLS keys of the configuration file (`export.certificate`, `export.client_certificate`,
/// `export.client_key`, `export.insecure`), kept apart from the flags so that every variable of
/// the signal being resolved wins over them, the signal-specific ones included
/// (`OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE` for the metrics push). Empty without a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFile {
    /// The configuration file, as messages name it.
    pub path: String,
    pub certificate: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure: Option<bool>,
}

impl TlsFile {
    /// How messages name the file's key `export.<leaf>`: `PATH: key `export.certificate``.
    pub fn key(&self, leaf: &str) -> String {
        format!("{}: key `export.{leaf}`", self.path)
    }
}

/// A PEM file read at start-up, with the flag or variable that named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemFile {
    /// The flag or variable, for messages.
    pub source: String,
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

/// Resolved TLS settings of one signal. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Trusted CA certificates; `None`: the system's trust store.
    pub ca: Option<PemFile>,
    /// Client certificate chain and key (mutual TLS).
    pub client: Option<(PemFile, PemFile)>,
    /// `INSECURE` and where it came from; `None` when unset (false).
    pub insecure: Option<(bool, String)>,
}

impl TlsSettings {
    /// Resolves the flags against the environment (a lookup function; empty values count as
    /// unset) for `signal`, then the configuration file's keys, reading and checking every file
    /// named.
    pub fn resolve(
        args: &TlsArgs,
        signal: Signal,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<TlsSettings, ExportError> {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        let pick = |flag: &Option<PathBuf>, flag_name: &str, suffix: &str, file: &Option<PathBuf>, leaf: &str| {
            set(flag)
                .map(|p| (flag_name.to_string(), p))
                .or_else(|| lookup(env, signal, suffix).map(|(var, v)| (var, PathBuf::from(v))))
                .or_else(|| set(file).map(|p| (args.file.key(leaf), p)))
        };
        let f = &args.file;
        let ca = pick(&args.otlp_certificate, "--otlp-certificate", "CERTIFICATE", &f.certificate, "certificate")
            .map(|(src, path)| read_pem(src, path))
            .transpose()?;
        if let Some(ca) = &ca {
            parse_certs(ca)?;
        }
        let cert = pick(&args.otlp_client_certificate, "--otlp-client-certificate", "CLIENT_CERTIFICATE", &f.client_certificate, "client_certificate");
        let key = pick(&args.otlp_client_key, "--otlp-client-key", "CLIENT_KEY", &f.client_key, "client_key");
        let client = match (cert, key) {
            (None, None) => None,
            (Some((src, _)), None) => {
                return Err(ExportError::config(src, "a client certificate needs a client key too (--otlp-client-key, OTEL_EXPORTER_OTLP_CLIENT_KEY or export.client_key)"))
            }
            (None, Some((src, _))) => {
                return Err(ExportError::config(src, "a client key needs a client certificate too (--otlp-client-certificate, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE or export.client_certificate)"))
            }
            (Some((cs, cp)), Some((ks, kp))) => Some((read_pem(cs, cp)?, read_pem(ks, kp)?)),
        };
        if let Some((cert, key)) = &client {
            parse_certs(cert)?;
            parse_key(key)?;
        }
        let insecure = match (args.otlp_insecure, lookup(env, signal, "INSECURE")) {
            (Some(v), _) => Some((v, "--otlp-insecure".to_string())),
            (None, Some((var, v))) => Some((parse_bool(&var, &v)?, var)),
            (None, None) => f.insecure.map(|v| (v, f.key("insecure"))),
        };
        let settings = TlsSettings { ca, client, insecure };
        // Builds the rustls configuration once, so that a key not matching its certificate is
        // refused now, not at the first export.
        settings.rustls_config(false)?;
        Ok(settings)
    }

    /// [`TlsSettings::resolve`] against the process environment.
    pub fn from_args(args: &TlsArgs, signal: Signal) -> Result<TlsSettings, ExportError> {
        Self::resolve(args, signal, &|name| std::env::var(name).ok())
    }

    /// Whether `INSECURE` is set to true.
    pub fn insecure(&self) -> bool {
        self.insecure.as_ref().is_some_and(|(v, _)| *v)
    }

    /// Whether any certificate or key is configured (they only matter for https:// endpoints).
    pub fn has_files(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// The URL to connect to for an endpoint named by `source`: a scheme-less gRPC endpoint
    /// (`host:port`) gets `http://` when `INSECURE` is true and `https://` otherwise, as the
    /// OpenTelemetry specification says; `INSECURE=true` with an `https://` URL is an error.
    pub fn apply_scheme(&self, source: &str, url: &str, grpc: bool) -> Result<String, ExportError> {
        let has_scheme = url.contains("://");
        if !has_scheme && grpc {
            let scheme = if self.insecure() { "http" } else { "https" };
            return Ok(format!("{scheme}://{url}"));
        }
        if self.insecure() && url.starts_with("https://") {
            let (_, by) = self.insecure.as_ref().expect("insecure() is true");
            return Err(ExportError::config(
                by.clone(),
                format!("asks for a plaintext connection, but {source} is `{url}` (https://); use http:// or drop it"),
            ));
        }
        Ok(url.to_string())
    }

    /// A lazily connecting tonic channel to `endpoint` (`http://` or `https://`), with TLS from
    /// these settings for `https://`. Must be called inside a tokio runtime.
    pub fn tonic_channel(&self, endpoint: &str, timeout: Duration) -> Result<tonic::transport::Channel, ExportError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| ExportError::config("OTLP endpoint", format!("`{endpoint}`: {e}")))?
            .timeout(timeout)
            .connect_timeout(timeout);
        if is_https(endpoint) {
            let mut tls = ClientTlsConfig::new().timeout(timeout);
            tls = match &self.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(&ca.pem)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &self.client {
                tls = tls.identity(Identity::from_pem(&cert.pem, &key.pem));
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| ExportError::config("OTLP gRPC TLS", error_chain(&e)))?;
        }
        Ok(ep.connect_lazy())
    }

    /// A reqwest client (HTTP/1.1) with TLS from these settings and the given request timeout.
    /// `https` says whether the endpoint is `https://` (only then is the system trust store
    /// loaded).
    pub fn reqwest_client(&self, timeout: Duration, https: bool) -> Result<reqwest::Client, ExportError> {
        let tls = self.rustls_config(https)?;
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| ExportError::config("OTLP HTTP client", error_chain(&e)))
    }

    /// The rustls client configuration (ring provider, TLS 1.2 and 1.3): the CA file's certificates
    /// or, when `system_roots`, the system's trust store; the client certificate if any.
    pub fn rustls_config(&self, system_roots: bool) -> Result<rustls::ClientConfig, ExportError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for cert in parse_certs(ca)? {
                    roots.add(cert).map_err(|e| {
                        ExportError::config(ca.source.clone(), format!("{}: unusable CA certificate: {e}", ca.path.display()))
                    })?;
                }
            }
            None if system_roots => add_system_roots(&mut roots)?,
            None => {}
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ExportError::config("OTLP TLS", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder.with_client_auth_cert(parse_certs(cert)?, parse_key(key)?).map_err(|e| {
                ExportError::config(
                    key.source.clone(),
                    format!("{} does not go with the certificate of {} ({}): {e}", key.path.display(), cert.source, cert.path.display()),
                )
            })?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Whether a URL is `https://`.
pub fn is_https(url: &str) -> bool {
    url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// Whether an export error message (with its causes) reports a TLS failure that retrying cannot
/// cure: the collector's certificate is not trusted, expired or for another name, or the collector
/// refused our certificate. The pipeline does not retry those (README.md, "TLS to the collector").
pub fn is_permanent_tls_error(msg: &str) -> bool {
    // rustls's own words (Display and Debug) for a certificate it refused, and for an alert the
    // collector sent during the handshake (it refused our certificate, or we sent none).
    const MARKERS: &[&str] = &["invalid peer certificate", "InvalidCertificate", "received fatal alert", "AlertReceived"];
    MARKERS.iter().any(|m| msg.contains(m))
}

/// An error and its sources, `: `-joined (reqwest and tonic hide the rustls cause in the chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The signal-specific variable, else the generic one (`OTEL_EXPORTER_OTLP_{SIGNAL_,}{suffix}`).
fn lookup(env: &dyn Fn(&str) -> Option<String>, signal: Signal, suffix: &str) -> Option<(String, String)> {
    [format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.env_word()), format!("OTEL_EXPORTER_OTLP_{suffix}")]
        .into_iter()
        .find_map(|var| env(&var).filter(|v| !v.trim().is_empty()).map(|v| (var, v.trim().to_string())))
}

fn parse_bool(var: &str, v: &str) -> Result<bool, ExportError> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ExportError::config(var, format!("`{v}` is not a boolean (true, false)"))),
    }
}

fn read_pem(source: String, path: PathBuf) -> Result<PemFile, ExportError> {
    let pem = std::fs::read(&path)
        .map_err(|e| ExportError::config(source.clone(), format!("cannot read {}: {e}", path.display())))?;
    Ok(PemFile { source, path, pem })
}

/// Every certificate of a PEM file; at least one, and no malformed block.
fn parse_certs(f: &PemFile) -> Result<Vec<CertificateDer<'static>>, ExportError> {
    let certs = CertificateDer::pem_slice_iter(&f.pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(f, &format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad_pem(f, "no PEM certificate (-----BEGIN CERTIFICATE-----) in it"));
    }
    for (i, c) in certs.iter().enumerate() {
        webpki_check(c).map_err(|e| bad_pem(f, &format!("certificate {} is not valid X.509: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// A structural X.509 check (rustls would only find out at the first handshake).
fn webpki_check(c: &CertificateDer<'_>) -> Result<(), String> {
    rustls::server::ParsedCertificate::try_from(c).map(|_| ()).map_err(|e| e.to_string())
}

fn parse_key(f: &PemFile) -> Result<PrivateKeyDer<'static>, ExportError> {
    PrivateKeyDer::from_pem_slice(&f.pem)
        .map_err(|e| bad_pem(f, &format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))
}

fn bad_pem(f: &PemFile, why: &str) -> ExportError {
    ExportError::config(f.source.clone(), format!("{}: {why}", f.path.display()))
}

/// The system trust store; an error when it holds no certificate at all.
fn add_system_roots(roots: &mut rustls::RootCertStore) -> Result<(), ExportError> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        log::warn!("reading the system's CA certificates: {e}");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        log::warn!("{ignored} of the system's CA certificates are unusable and were ignored");
    }
    if added == 0 {
        return Err(ExportError::config(
            "OTLP TLS",
            "no CA certificate found in the system's trust store; name one with --otlp-certificate or OTEL_EXPORTER_OTLP_CERTIFICATE",
        ));
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A scratch directory with a CA, a client certificate it signs and its key, and junk.
    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            let dir = std::env::temp_dir().join(format!("keepalive-tls-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            for (name, text) in [
                ("ca.pem", issuer.pem()),
                ("client.pem", cert.pem()),
                ("client.key", key.serialize_pem()),
                ("other.key", other_key.serialize_pem()),
                ("junk.pem", "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n".to_string()),
                ("empty.pem", String::new()),
            ] {
                std::fs::write(dir.join(name), text).unwrap();
            }
            Files { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).to_string_lossy().into_owned()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn resolve(args: &TlsArgs, signal: Signal, env: &[(&str, String)]) -> Result<TlsSettings, ExportError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        TlsSettings::resolve(args, signal, &move |n| env.get(n).cloned())
    }

    #[test]
    fn precedence_flag_then_signal_variable_then_generic() {
        let f = Files::new("precedence");
        let env = [
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", f.path("ca.pem")),
            ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", f.path("client.pem")),
            ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true".into()),
        ];
        let none = TlsArgs::default();
        let t = resolve(&none, Signal::Traces, &env).unwrap();
        assert_eq!(t.ca.as_ref().unwrap().source, "OTEL_EXPORTER_OTLP_CERTIFICATE");
        assert!(t.insecure());
        let m = resolve(&none, Signal::Metrics, &env).unwrap();
        assert_eq!(m.ca.as_ref().unwrap().source, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE");
        assert!(!m.insecure(), "the traces variable does not apply to metrics");
        let flags = TlsArgs { otlp_certificate: Some(f.path("ca.pem").into()), otlp_insecure: Some(false), ..Default::default() };
        let t = resolve(&flags, Signal::Metrics, &env).unwrap();
        assert_eq!(t.ca.as_ref().unwrap().source, "--otlp-certificate");
        assert_eq!(t.insecure, Some((false, "--otlp-insecure".to_string())));
        // Mutual TLS from the variables; the key from the signal-specific one.
        let env = [
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", f.path("client.pem")),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", f.path("client.key")),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", f.path("other.key")),
        ];
        let t = resolve(&none, Signal::Traces, &env).unwrap();
        assert_eq!(t.client.as_ref().unwrap().1.source, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY");
        assert!(t.rustls_config(false).is_ok());
    }

    /// The file's keys rank below every variable, the signal-specific ones included, and a bad
    /// file they name is reported with the file and key.
    #[test]
    fn file_keys_rank_below_the_variables_and_are_named() {
        let f = Files::new("file");
        let file = TlsFile {
            path: "/etc/k.toml".into(),
            certificate: Some(f.path("ca.pem").into()),
            insecure: Some(true),
            ..Default::default()
        };
        let args = TlsArgs { file: file.clone(), ..Default::default() };
        let t = resolve(&args, Signal::Metrics, &[]).unwrap();
        assert_eq!(t.ca.as_ref().unwrap().source, "/etc/k.toml: key `export.certificate`");
        assert_eq!(t.insecure, Some((true, "/etc/k.toml: key `export.insecure`".to_string())));
        let env = [
            ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", f.path("client.pem")),
            ("OTEL_EXPORTER_OTLP_METRICS_INSECURE", "false".into()),
        ];
        let m = resolve(&args, Signal::Metrics, &env).unwrap();
        assert_eq!(m.ca.as_ref().unwrap().source, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE");
        assert_eq!(m.insecure, Some((false, "OTEL_EXPORTER_OTLP_METRICS_INSECURE".to_string())));
        // The metrics variables are not the traces': the traces keep the file's values.
        let t = resolve(&args, Signal::Traces, &env).unwrap();
        assert_eq!(t.ca.as_ref().unwrap().source, "/etc/k.toml: key `export.certificate`");
        // A flag wins over both.
        let flag = TlsArgs { otlp_certificate: Some(f.path("ca.pem").into()), ..args.clone() };
        assert_eq!(resolve(&flag, Signal::Metrics, &env).unwrap().ca.unwrap().source, "--otlp-certificate");
        // Bad files from the configuration file name the file and key, not the flag.
        let junk = TlsArgs { file: TlsFile { certificate: Some(f.path("junk.pem").into()), ..file.clone() }, ..Default::default() };
        let e = resolve(&junk, Signal::Traces, &[]).unwrap_err().to_string();
        assert!(e.starts_with("/etc/k.toml: key `export.certificate`: ") && e.contains("bad PEM"), "{e}");
        let lone = TlsArgs { file: TlsFile { client_key: Some(f.path("client.key").into()), ..file }, ..Default::default() };
        let e = resolve(&lone, Signal::Traces, &[]).unwrap_err().to_string();
        assert!(e.starts_with("/etc/k.toml: key `export.client_key`: a client key needs a client certificate"), "{e}");
    }

    #[test]
    fn bad_files_are_named() {
        let f = Files::new("bad");
        let err = |args: TlsArgs, env: &[(&str, String)]| resolve(&args, Signal::Traces, env).unwrap_err().to_string();
        let e = err(TlsArgs { otlp_certificate: Some("/nonexistent/x.pem".into()), ..Default::default() }, &[]);
        assert!(e.starts_with("--otlp-certificate: cannot read /nonexistent/x.pem"), "{e}");
        let e = err(TlsArgs::default(), &[("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", f.path("junk.pem"))]);
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: ") && e.contains("bad PEM"), "{e}");
        let e = err(TlsArgs::default(), &[("OTEL_EXPORTER_OTLP_CERTIFICATE", f.path("empty.pem"))]);
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = err(TlsArgs { otlp_client_key: Some(f.path("client.key").into()), ..Default::default() }, &[]);
        assert!(e.starts_with("--otlp-client-key: a client key needs a client certificate"), "{e}");
        let pair = |key: &str| TlsArgs {
            otlp_client_certificate: Some(f.path("client.pem").into()),
            otlp_client_key: Some(f.path(key).into()),
            ..Default::default()
        };
        let e = err(pair("client.pem"), &[]);
        assert!(e.starts_with("--otlp-client-key: ") && e.contains("no usable PEM private key"), "{e}");
        let e = err(pair("other.key"), &[]);
        assert!(e.starts_with("--otlp-client-key: ") && e.contains("does not go with the certificate"), "{e}");
        let e = err(TlsArgs::default(), &[("OTEL_EXPORTER_OTLP_INSECURE", "1".into())]);
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_INSECURE: `1` is not a boolean"), "{e}");
        resolve(&pair("client.key"), Signal::Traces, &[]).unwrap();
    }

    #[test]
    fn scheme_follows_insecure_for_grpc_only() {
        let secure = TlsSettings::default();
        let insecure = TlsSettings { insecure: Some((true, "OTEL_EXPORTER_OTLP_INSECURE".into())), ..Default::default() };
        assert_eq!(secure.apply_scheme("e", "h:4317", true).unwrap(), "https://h:4317");
        assert_eq!(insecure.apply_scheme("e", "h:4317", true).unwrap(), "http://h:4317");
        assert_eq!(secure.apply_scheme("e", "h:4318", false).unwrap(), "h:4318", "HTTP: the endpoint check refuses it");
        assert_eq!(insecure.apply_scheme("e", "http://h:1", true).unwrap(), "http://h:1");
        let e = insecure.apply_scheme("--otlp-endpoint", "https://h:1", true).unwrap_err().to_string();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_INSECURE: ") && e.contains("--otlp-endpoint"), "{e}");
        assert!(is_https("HTTPS://x") && !is_https("http://x") && !is_https("h"));
    }

    #[test]
    fn certificate_verdicts_are_permanent_transport_failures_are_not() {
        use opentelemetry_sdk::error::OTelSdkError;
        let retryable = |m: &str| super::super::pipeline::retryable(&OTelSdkError::InternalFailure(m.to_string()));
        // Messages as the exporters produce them (seen in tests/tests/otlp_tls.rs).
        for permanent in [
            "TonicTracesClient export failed with gRPC code: Unavailable: transport error: invalid peer certificate: UnknownIssuer",
            "HTTP export failed: network error: error sending request for url (https://127.0.0.1:1/v1/traces): client error (Connect): invalid peer certificate: certificate expired: verification time 1796000377 (UNIX), but certificate is not valid after 1609372800",
            "HTTP export failed: network error: client error (Connect): received fatal alert: CertificateRequired",
        ] {
            assert!(is_permanent_tls_error(permanent) && !retryable(permanent), "{permanent}");
        }
        for transient in [
            "TonicTracesClient export failed with gRPC code: Unknown: transport error: connection error: peer closed connection without sending TLS close_notify",
            "HTTP export failed: network error: client error (Connect): tcp connect error: Connection refused (os error 111)",
        ] {
            assert!(!is_permanent_tls_error(transient) && retryable(transient), "{transient}");
        }
    }

    #[tokio::test]
    async fn both_transports_build_from_the_settings() {
        let f = Files::new("build");
        let args = TlsArgs {
            otlp_certificate: Some(f.path("ca.pem").into()),
            otlp_client_certificate: Some(f.path("client.pem").into()),
            otlp_client_key: Some(f.path("client.key").into()),
            otlp_insecure: None,
            file: TlsFile::default(),
        };
        let t = resolve(&args, Signal::Metrics, &[]).unwrap();
        t.tonic_channel("https://127.0.0.1:4317", Duration::from_secs(1)).unwrap();
        t.tonic_channel("http://127.0.0.1:4317", Duration::from_secs(1)).unwrap();
        t.reqwest_client(Duration::from_secs(1), true).unwrap();
        let c = t.rustls_config(false).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(c.client_auth_cert_resolver.has_certs());
    }
}
