//! Middlebox idle timeouts: how long a load balancer, NAT or firewall on the path keeps an idle
//! TCP flow before it forgets it (and then drops or resets the next segment).

use std::{fmt, path::Path};

/// A documented middlebox idle timeout (`--middlebox NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// The `--middlebox` value.
    pub name: &'static str,
    /// What it is.
    pub what: &'static str,
    /// Idle timeout in seconds.
    pub timeout_s: u64,
    /// Where the value is documented.
    pub source: &'static str,
}

/// The presets, smallest timeout first. `conntrack` is read from the host (see [`conntrack`]).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "azure-lb",
        what: "Azure Load Balancer (default idle timeout)",
        timeout_s: 240,
        source: "https://learn.microsoft.com/azure/load-balancer/load-balancer-tcp-idle-timeout",
    },
    Preset {
        name: "azure-nat-gateway",
        what: "Azure NAT Gateway (default TCP idle timeout)",
        timeout_s: 240,
        source: "https://learn.microsoft.com/azure/nat-gateway/nat-gateway-resource#tcp-idle-timeout",
    },
    Preset {
        name: "aws-nlb",
        what: "AWS Network Load Balancer (TCP idle timeout)",
        timeout_s: 350,
        source: "https://docs.aws.amazon.com/elasticloadbalancing/latest/network/network-load-balancers.html#connection-idle-timeout",
    },
    Preset {
        name: "aws-nat-gateway",
        what: "AWS NAT gateway (idle connection timeout)",
        timeout_s: 350,
        source: "https://docs.aws.amazon.com/vpc/latest/userguide/nat-gateway-troubleshooting.html#nat-gateway-troubleshooting-timeout",
    },
    Preset {
        name: "gcp-vpc",
        what: "Google Cloud VPC firewall connection tracking",
        timeout_s: 600,
        source: "https://cloud.google.com/firewall/docs/firewalls#specifications",
    },
    Preset {
        name: "gcp-cloud-nat",
        what: "Google Cloud NAT (TCP established connection idle timeout)",
        timeout_s: 1200,
        source: "https://cloud.google.com/nat/docs/tune-nat-configuration#tcp-established",
    },
];

/// The preset used when neither `--idle-timeout` nor `--middlebox` is given: the smallest common
/// timeout (Azure's 4 minutes).
pub const DEFAULT_PRESET: &str = "azure-lb";

/// The `--middlebox` name of this host's connection tracking.
pub const CONNTRACK: &str = "conntrack";

/// `nf_conntrack`'s timeout of established TCP flows (present when the module is loaded).
pub const CONNTRACK_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";

/// Largest idle timeout accepted (a year).
pub const MAX_TIMEOUT_S: f64 = 31_536_000.0;

/// The idle timeout the audit judges against, and where it comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Middlebox {
    /// Idle timeout, seconds.
    pub timeout_s: f64,
    /// How it was chosen, for the output (`--idle-timeout 2`, `aws-nlb: AWS Network ...`).
    pub origin: String,
}

impl fmt::Display for Middlebox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} s ({})", self.timeout_s, self.origin)
    }
}

impl Middlebox {
    /// The default: [`DEFAULT_PRESET`], said so.
    pub fn default_preset() -> Middlebox {
        let p = PRESETS.iter().find(|p| p.name == DEFAULT_PRESET).expect("default preset listed");
        Middlebox {
            timeout_s: p.timeout_s as f64,
            origin: format!("default: {}, the smallest common one; change with --idle-timeout or --middlebox", p.what),
        }
    }
}

/// `--idle-timeout SECS`: a finite number of seconds above 0, at most a year.
pub fn parse_idle_timeout(s: &str) -> Result<Middlebox, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_TIMEOUT_S => Ok(Middlebox { timeout_s: v, origin: format!("--idle-timeout {s}") }),
        _ => Err(format!("`{s}` must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}")),
    }
}

/// `--middlebox NAME`: one of [`PRESETS`] or [`CONNTRACK`] (read from `conntrack_sysctl`).
pub fn parse_middlebox(s: &str, conntrack_sysctl: &Path) -> Result<Middlebox, String> {
    if s == CONNTRACK {
        let secs = conntrack(conntrack_sysctl)?;
        return Ok(Middlebox {
            timeout_s: secs as f64,
            origin: format!("conntrack: this host's {}", conntrack_sysctl.display()),
        });
    }
    match PRESETS.iter().find(|p| p.name == s) {
        Some(p) => Ok(Middlebox { timeout_s: p.timeout_s as f64, origin: format!("{}: {}, {}", p.name, p.what, p.source) }),
        None => {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).chain([CONNTRACK]).collect();
            Err(format!("unknown middlebox `{s}` (known: {})", names.join(", ")))
        }
    }
}

/// This host's established-flow conntrack timeout, seconds.
pub fn conntrack(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("{}: {e} (is the nf_conntrack module loaded?)", path.display())
    })?;
    let v: u64 = text.trim().parse().map_err(|e| format!("{}: `{}`: {e}", path.display(), text.trim()))?;
    if v == 0 {
        return Err(format!("{}: 0 is not an idle timeout", path.display()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::hz::tests::TempDir;

    #[test]
    fn presets_are_documented_and_sorted() {
        assert!(PRESETS.windows(2).all(|w| w[0].timeout_s <= w[1].timeout_s));
        for p in PRESETS {
            assert!(p.source.starts_with("https://"), "{p:?}");
        }
        let want = [("aws-nlb", 350), ("aws-nat-gateway", 350), ("gcp-cloud-nat", 1200), ("gcp-vpc", 600), ("azure-lb", 240), ("azure-nat-gateway", 240)];
        for (name, secs) in want {
            let m = parse_middlebox(name, Path::new("/nonexistent")).unwrap();
            assert_eq!(m.timeout_s, secs as f64, "{name}");
            assert!(m.origin.contains("https://"), "{m}");
        }
        assert_eq!(Middlebox::default_preset().timeout_s, 240.0);
        assert!(Middlebox::default_preset().origin.contains("default"));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        for bad in ["-1", "0", "nan", "inf", "abc", "", "1e300"] {
            assert!(parse_idle_timeout(bad).unwrap_err().contains("above 0"), "{bad}");
        }
        assert_eq!(parse_idle_timeout("2").unwrap().timeout_s, 2.0);
        assert_eq!(parse_idle_timeout("0.5").unwrap().timeout_s, 0.5);
        let e = parse_middlebox("aws-alb", Path::new("/nonexistent")).unwrap_err();
        assert!(e.contains("unknown middlebox `aws-alb`") && e.contains("aws-nlb") && e.contains("conntrack"), "{e}");
    }

    #[test]
    fn conntrack_reads_the_sysctl() {
        let dir = TempDir::new("conntrack");
        let path = dir.0.join("nf_conntrack_tcp_timeout_established");
        let e = parse_middlebox(CONNTRACK, &path).unwrap_err();
        assert!(e.contains("nf_conntrack module loaded"), "{e}");
        std::fs::write(&path, "432000\n").unwrap();
        let m = parse_middlebox(CONNTRACK, &path).unwrap();
        assert_eq!(m.timeout_s, 432000.0);
        assert!(m.origin.contains("nf_conntrack_tcp_timeout_established"));
        std::fs::write(&path, "x\n").unwrap();
        assert!(parse_middlebox(CONNTRACK, &path).is_err());
    }
}
