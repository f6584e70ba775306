//! The binaries the matrix runs: the agent and the integration test binaries of the scenarios'
//! targets (`tests/tests/keepalive.rs`, `tests/tests/privilege.rs`), built in release with cargo
//! and located through cargo's JSON messages (so `CARGO_TARGET_DIR` and the hash in a test
//! binary's name need no guessing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::host::run;

/// The package holding the scenarios' test targets.
const TEST_PACKAGE: &str = "keepalive-tests";
const AGENT_PACKAGE: &str = "keepalive-agent";
const AGENT_BIN: &str = "keepalive-agent";

/// `cargo build --release -p keepalive-agent`; the path of the agent binary.
pub fn build_agent(workspace: &Path) -> Result<PathBuf> {
    let messages = cargo_json(
        workspace,
        &["build", "--release", "-p", AGENT_PACKAGE, "--bin", AGENT_BIN],
    )?;
    executable(&messages, AGENT_BIN, |kinds| kinds.iter().any(|k| k == "bin"))
        .with_context(|| format!("cargo built no {AGENT_BIN} binary"))
}

/// `cargo test --release -p keepalive-tests --test TARGET... --no-run`; each target with its test
/// binary's path.
pub fn build_tests(workspace: &Path, targets: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["test", "--release", "-p", TEST_PACKAGE];
    for target in targets {
        args.extend(["--test", target]);
    }
    args.push("--no-run");
    let messages = cargo_json(workspace, &args)?;
    targets
        .iter()
        .map(|target| {
            executable(&messages, target, |kinds| kinds.iter().any(|k| k == "test"))
                .map(|path| (target.to_string(), path))
                .with_context(|| format!("cargo built no test binary for --test {target}"))
        })
        .collect()
}

/// The tests a libtest binary contains (`--list --format terse`).
pub fn list_tests(test_binary: &Path) -> Result<Vec<String>> {
    let out = run(Command::new(test_binary).args(["--list", "--format", "terse"]))?;
    Ok(parse_test_list(&out))
}

fn parse_test_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// Runs cargo with `--message-format=json` (its diagnostics still reach the terminal through
/// stderr) and returns the JSON messages.
fn cargo_json(workspace: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    log::info!("cargo {}", args.join(" "));
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}

/// The executable of the compiler artifact whose target is `name` and whose kinds satisfy `kind`.
fn executable(
    messages: &[Value],
    name: &str,
    kind: impl Fn(&[String]) -> bool,
) -> Option<PathBuf> {
    messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| {
            let kinds: Vec<String> = m["target"]["kind"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            kind(&kinds)
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// Checks that every scenario is a test of the binary (a renamed test must not silently pass as
/// "0 tests run").
pub fn ensure_tests_exist(available: &[String], wanted: &[&str]) -> Result<()> {
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|w| !available.iter().any(|a| a == **w))
        .collect();
    ensure!(
        missing.is_empty(),
        "the test binary has no test named {missing:?} (it has {available:?})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_test_executable_among_messages() {
        let messages = vec![
            json!({"reason": "compiler-artifact", "target": {"name": "keepalive_tests", "kind": ["lib"]}, "executable": null}),
            json!({"reason": "compiler-artifact", "target": {"name": "keepalive", "kind": ["test"]}, "executable": "/t/release/deps/keepalive-0123"}),
            json!({"reason": "build-finished", "success": true}),
        ];
        assert_eq!(
            executable(&messages, "keepalive", |k| k.iter().any(|k| k == "test")),
            Some(PathBuf::from("/t/release/deps/keepalive-0123"))
        );
        assert_eq!(executable(&messages, "keepalive", |k| k.iter().any(|k| k == "bin")), None);
        assert_eq!(executable(&messages, "other", |_| true), None);
    }

    #[test]
    fn test_list_and_missing_names() {
        let list = parse_test_list("a_test: test\nb_test: test\nsome_bench: bench\n");
        assert_eq!(list, ["a_test", "b_test"]);
        assert!(ensure_tests_exist(&list, &["a_test"]).is_ok());
        assert!(ensure_tests_exist(&list, &["a_test", "c_test"]).is_err());
    }
}
