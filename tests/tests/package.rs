//! The Debian package: built by `cargo xtask package` (a release build; nothing is rebuilt when
//! `target/release` is up to date), its contents listed with `dpkg-deb -c`, installed with
//! `dpkg -i`, the installed binary run (`check` and the unit's `run --config` line, scoped to the
//! test's cgroup and namespace, and `config` on the packaged default configuration), the unit checked by `systemd-analyze verify`, and the package
//! purged again (`dpkg --purge`, also when the test fails), leaving the machine as it was.
//!
//! `KEEPALIVE_DEB` names a prebuilt .deb instead (then nothing is built). The test refuses to run
//! when a `keepalive-agent` package is already installed: it would replace the machine's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keepalive_tests::Env;

const PACKAGE: &str = "keepalive-agent";
const UNIT: &str = "/lib/systemd/system/keepalive-agent.service";
const CONFIG: &str = "/etc/keepalive-agent/config.toml";
const BIN: &str = "/usr/bin/keepalive-agent";

/// Every path the package must hold (as `dpkg-deb -c` prints them).
const CONTENTS: &[&str] = &[
    "./usr/bin/keepalive-agent",
    "./lib/systemd/system/keepalive-agent.service",
    "./etc/keepalive-agent/config.toml",
    "./usr/share/man/man1/keepalive-agent.1.gz",
    "./usr/share/man/man1/keepalive-agent-run.1.gz",
    "./usr/share/man/man1/keepalive-agent-config.1.gz",
    "./usr/share/man/man1/keepalive-agent-check.1.gz",
    "./usr/share/man/man1/keepalive-agent-trace.1.gz",
    "./usr/share/bash-completion/completions/keepalive-agent",
    "./usr/share/zsh/vendor-completions/_keepalive-agent",
    "./usr/share/fish/vendor_completions.d/keepalive-agent.fish",
    "./usr/share/doc/keepalive-agent/copyright",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd`, which must succeed; its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
    String::from_utf8_lossy(&out.stdout).contains("installed") && !String::from_utf8_lossy(&out.stdout).contains("not-installed")
}

/// The .deb: `KEEPALIVE_DEB`, or the one `cargo xtask package` builds (the last line it prints).
fn deb() -> PathBuf {
    if let Some(deb) = std::env::var_os("KEEPALIVE_DEB") {
        return PathBuf::from(deb);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = ok(Command::new(cargo).current_dir(workspace()).args(["xtask", "package"]));
    PathBuf::from(out.lines().last().expect("cargo xtask package printed no path").trim())
}

/// Purges the package when dropped: the machine is left as it was, whatever the test did.
struct Installed;

impl Installed {
    fn install(deb: &Path) -> Installed {
        ok(Command::new("dpkg").arg("-i").arg(deb));
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = run(Command::new("dpkg").args(["--purge", PACKAGE]));
        if !out.status.success() && !std::thread::panicking() {
            panic!("dpkg --purge {PACKAGE}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn debian_package_builds_installs_runs_and_purges() {
    let env = Env::new();
    assert!(!installed(), "a {PACKAGE} package is already installed on this machine; not replacing it");
    let deb = deb();

    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in CONTENTS {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} is not in the package:\n{listing}");
    }
    assert!(listing.lines().any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with("./usr/bin/keepalive-agent")), "{listing}");
    let control = ok(Command::new("dpkg-deb").arg("-f").arg(&deb));
    assert!(control.contains("Package: keepalive-agent") && control.contains("Depends: libc6 (>= 2."), "{control}");

    let guard = Installed::install(&deb);
    assert!(installed());
    check_installed_files();
    // `check` attaches and detaches every program: scoped to the test's cgroup.
    let out = ok(Command::new(BIN).arg("check").arg("--cgroup").arg(env.cgroup.path()));
    assert!(out.contains("HOOK") && (out.contains("ok: every hook") || out.contains("degraded:")), "{out}");
    // The packaged configuration is valid and sets one value, the fleet's probe-answer mode (no
    // program on received segments); everything else, commented out, is the default.
    let out = ok(Command::new(BIN).args(["config", "--config", CONFIG]).env_remove("K8S_NODE_NAME"));
    assert!(out.contains(&format!("(file: {CONFIG})")), "{out}");
    let from_file: Vec<&str> = out.lines().filter(|l| l.ends_with("# file")).collect();
    assert_eq!(from_file, ["probe_answers = \"next-firing\"  # file"], "the default configuration sets a value:\n{out}");
    // The unit's command line, as root, scoped to the test's cgroup and namespace and stopped at once.
    let cgroup = env.cgroup.path().to_str().unwrap();
    let netns = env.ns.path().to_str().unwrap();
    ok(Command::new(BIN).args(["run", "--config", CONFIG, "--cgroup", cgroup, "--netns", netns, "--duration", "0"]));
    verify_unit();

    drop(guard);
    assert!(!installed(), "{PACKAGE} is still installed after dpkg --purge");
    for path in [BIN, UNIT, CONFIG, "/etc/keepalive-agent"] {
        assert!(!Path::new(path).exists(), "{path} is left after dpkg --purge");
    }
}

/// The unit's hardening and capabilities, the conffile, the man page, the completions.
fn check_installed_files() {
    let unit = std::fs::read_to_string(UNIT).expect("reading the installed unit");
    let caps = std::fs::read_to_string(workspace().join("packaging/capabilities")).unwrap();
    let caps = caps.split_whitespace().collect::<Vec<_>>().join(" ");
    for line in [
        format!("AmbientCapabilities={caps}"),
        format!("CapabilityBoundingSet={caps}"),
        "NoNewPrivileges=yes".into(),
        "ProtectSystem=strict".into(),
        "ProtectHome=yes".into(),
        "PrivateTmp=yes".into(),
        "Restart=on-failure".into(),
        "DynamicUser=yes".into(),
        format!("ExecStart={BIN} run --config {CONFIG}"),
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`:\n{unit}");
    }
    let conffiles = std::fs::read_to_string(format!("/var/lib/dpkg/info/{PACKAGE}.conffiles")).unwrap_or_default();
    assert_eq!(conffiles.trim(), CONFIG);
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/keepalive-agent").unwrap();
    assert!(bash.contains("--config") && bash.contains("--otlp-endpoint"), "bash completions lack run's flags");
    let man = ok(Command::new("sh").arg("-c").arg("gzip -dc /usr/share/man/man1/keepalive-agent-run.1.gz"));
    assert!(man.contains("config") && man.contains(".TH"), "not a man page of run:\n{man}");
}

/// `systemd-analyze verify` on the installed unit: no error and no warning about it.
fn verify_unit() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        panic!("systemd-analyze is missing (apt-get install systemd); scripts/setup.sh installs it");
    }
    let out = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify {UNIT}: {}\n{stderr}", out.status);
    assert!(!stderr.contains("keepalive-agent.service"), "systemd-analyze verify warns about the unit:\n{stderr}");
}
