//! Debian kernel packages: choosing the newest of a series with `apt-cache`, fetching it with
//! `apt-get download`, unpacking it with `dpkg -x` and indexing its modules with `busybox depmod`.
//!
//! Cache layout under the cache directory:
//! - `kernels/<package>/`: the unpacked package (boot/vmlinuz-*, lib/modules/<release>/ with
//!   modules.dep and modules.alias). It only exists once complete (built as `<package>.partial`).
//! - `downloads/`: the .deb while it is being unpacked; removed afterwards.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use super::host::run;

/// The kernel series `--kernel all` stands for.
pub const DEFAULT_SERIES: &[&str] = &["6.1", "6.12"];

const PACKAGE_PREFIX: &str = "linux-image-";
const PACKAGE_SUFFIX: &str = "-amd64";

/// What the user asked for with `--kernel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSpec {
    /// The newest generic amd64 image of a series such as "6.1".
    Series(String),
    /// An exact package name such as `linux-image-6.1.0-56-amd64`.
    Package(String),
}

impl KernelSpec {
    pub fn parse_list(values: &[String]) -> Result<Vec<KernelSpec>> {
        let mut specs = Vec::new();
        for value in values {
            let value = value.trim();
            let new: Vec<KernelSpec> = if value == "all" {
                DEFAULT_SERIES
                    .iter()
                    .map(|s| KernelSpec::Series(s.to_string()))
                    .collect()
            } else if value.starts_with(PACKAGE_PREFIX) {
                vec![KernelSpec::Package(value.to_string())]
            } else if !value.is_empty()
                && value
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                vec![KernelSpec::Series(value.to_string())]
            } else {
                bail!("--kernel {value:?}: expected 6.1, 6.12, all, or a package name starting with {PACKAGE_PREFIX}");
            };
            for spec in new {
                if !specs.contains(&spec) {
                    specs.push(spec);
                }
            }
        }
        Ok(specs)
    }
}

/// If `package` is a generic (not cloud/rt/dbg) amd64 image of `series`, its version numbers
/// for ordering: `linux-image-6.1.0-56-amd64` → [6, 1, 0, 56], `linux-image-6.12.117+deb12-amd64`
/// → [6, 12, 117].
pub fn series_version(series: &str, package: &str) -> Option<Vec<u64>> {
    let version = package
        .strip_prefix(PACKAGE_PREFIX)?
        .strip_suffix(PACKAGE_SUFFIX)?;
    let rest = version.strip_prefix(series)?;
    if !rest.starts_with('.') {
        return None;
    }
    // Debian tags the ABI name: "+deb12" (stable, security) or "+bpo" (backports).
    let without_deb_tag = match version.split_once('+') {
        Some((head, "bpo")) => head,
        Some((head, tag))
            if tag
                .strip_prefix("deb")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            head
        }
        Some(_) => return None,
        None => version,
    };
    without_deb_tag
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().ok())
        .collect()
}

/// The newest package of `series` among `names`.
pub fn newest_of_series<'a>(
    series: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    names
        .into_iter()
        .filter_map(|name| series_version(series, name).map(|v| (v, name)))
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, name)| name)
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub package: String,
    /// `uname -r` of this kernel (the directory name under lib/modules).
    pub release: String,
    pub root: PathBuf,
    /// Whether this run downloaded it (false: served from the cache).
    pub downloaded: bool,
}

impl Kernel {
    fn open(package: &str, root: PathBuf, downloaded: bool) -> Result<Kernel> {
        let modules_parent = modules_parent(&root)?;
        let mut releases = fs::read_dir(&modules_parent)
            .with_context(|| format!("reading {}", modules_parent.display()))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<String>>>()?;
        releases.sort();
        let release = match releases.as_slice() {
            [one] => one.clone(),
            other => bail!(
                "{}: expected one kernel release, found {other:?}",
                modules_parent.display()
            ),
        };
        let kernel = Kernel {
            package: package.to_string(),
            release,
            root,
            downloaded,
        };
        ensure!(
            kernel.vmlinuz().is_file(),
            "{} is missing",
            kernel.vmlinuz().display()
        );
        Ok(kernel)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules_dir(&self) -> PathBuf {
        modules_parent(&self.root)
            .expect("checked when opened")
            .join(&self.release)
    }

    /// The kernel's build configuration (`boot/config-<release>`), as CONFIG_X → value.
    pub fn config(&self) -> Result<BTreeMap<String, String>> {
        let path = self
            .root
            .join("boot")
            .join(format!("config-{}", self.release));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("CONFIG_"))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// lib/modules inside an unpacked package (usr/lib/modules for merged-/usr packages).
fn modules_parent(root: &Path) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("{}: no lib/modules directory", root.display()))
}

pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(cache_dir: &Path) -> Result<KernelCache> {
        let dir = cache_dir.join("kernels");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(KernelCache { dir })
    }

    /// The package a spec stands for: the newest one `apt-cache` knows for a series, or, when apt
    /// knows none (no network, no `apt-get update`), the newest one already in the cache.
    pub fn resolve(&self, spec: &KernelSpec) -> Result<String> {
        let series = match spec {
            KernelSpec::Package(name) => return Ok(name.clone()),
            KernelSpec::Series(series) => series,
        };
        let from_apt = apt_package_names(&format!("{PACKAGE_PREFIX}{series}.")).map(|names| {
            newest_of_series(series, names.iter().map(String::as_str)).map(str::to_string)
        });
        match from_apt {
            Ok(Some(name)) => return Ok(name),
            Ok(None) => {
                log::warn!("apt-cache knows no {PACKAGE_PREFIX}{series}.*{PACKAGE_SUFFIX} package")
            }
            Err(e) => log::warn!("apt-cache failed: {e:#}"),
        }
        let cached = self.cached_packages()?;
        match newest_of_series(series, cached.iter().map(String::as_str)) {
            Some(name) => {
                log::warn!("using cached {name} for {series}");
                Ok(name.to_string())
            }
            None => bail!(
                "no Debian {series} kernel package found: run `apt-get update` (bookworm-security or \
                 bookworm-backports must be in the apt sources), or pass an exact package name"
            ),
        }
    }

    /// The unpacked package, fetching and unpacking it first if it is not cached.
    pub fn get(&self, package: &str) -> Result<Kernel> {
        ensure!(
            package.starts_with(PACKAGE_PREFIX)
                && !package.contains('/')
                && !package.contains(".."),
            "not a kernel image package name: {package:?}"
        );
        let root = self.dir.join(package);
        if root.is_dir() {
            log::info!("{package}: cached in {}", root.display());
            return Kernel::open(package, root, false);
        }
        self.fetch(package, &root)?;
        Kernel::open(package, root, true)
    }

    /// Removes cached packages of `series` other than `keep` (older point releases).
    pub fn prune_series(&self, series: &str, keep: &str) -> Result<()> {
        for name in self.cached_packages()? {
            if name != keep && series_version(series, &name).is_some() {
                log::info!("removing superseded cached kernel {name}");
                let path = self.dir.join(&name);
                fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    fn cached_packages(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && !name.ends_with(".partial") {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn fetch(&self, package: &str, root: &Path) -> Result<()> {
        let downloads = self
            .dir
            .parent()
            .expect("kernels dir has a parent")
            .join("downloads");
        fs::create_dir_all(&downloads)
            .with_context(|| format!("creating {}", downloads.display()))?;
        // A .deb left by an interrupted run would make the downloaded one ambiguous.
        for stale in debs_of(&downloads, package)? {
            fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
        }
        log::info!("{package}: apt-get download");
        run(Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(&downloads))
        .with_context(|| {
            format!("downloading {package} (is it in `apt-cache policy {package}`?)")
        })?;
        let deb = find_deb(&downloads, package)?;

        let partial = self.dir.join(format!("{package}.partial"));
        if partial.exists() {
            fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        log::info!("{package}: dpkg -x {}", deb.display());
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        let release = Kernel::open(package, partial.clone(), true)?.release;
        let modules_parent = modules_parent(&partial)?;
        let depmod_base = modules_parent
            .parent()
            .and_then(Path::parent)
            .expect("…/lib/modules has two parents");
        log::info!("{package}: busybox depmod {release}");
        run(Command::new("busybox")
            .arg("depmod")
            .arg("-b")
            .arg(depmod_base)
            .arg(&release))
        .context("indexing kernel modules")?;
        fs::rename(&partial, root)
            .with_context(|| format!("renaming {} to {}", partial.display(), root.display()))?;
        fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
        Ok(())
    }
}

/// Package names that start with `prefix`, as apt knows them.
fn apt_package_names(prefix: &str) -> Result<Vec<String>> {
    let out = run(Command::new("apt-cache").arg("pkgnames").arg(prefix))?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    match debs_of(dir, package)?.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "apt-get download left no {package}_*.deb in {}",
            dir.display()
        ),
        _ => bail!("several {package}_*.deb in {}", dir.display()),
    }
}

/// The .deb files of `package` in `dir` (`<package>_<version>_<arch>.deb`).
fn debs_of(dir: &Path, package: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!("{package}_");
    let mut debs = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            debs.push(path);
        }
    }
    Ok(debs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_versions_accept_only_generic_images_of_the_series() {
        assert_eq!(
            series_version("6.1", "linux-image-6.1.0-56-amd64"),
            Some(vec![6, 1, 0, 56])
        );
        assert_eq!(
            series_version("6.12", "linux-image-6.12.117+deb12-amd64"),
            Some(vec![6, 12, 117])
        );
        assert_eq!(
            series_version("6.1", "linux-image-6.12.117+deb12-amd64"),
            None
        );
        assert_eq!(
            series_version("6.1", "linux-image-6.1.0-56-cloud-amd64"),
            None
        );
        assert_eq!(
            series_version("6.12", "linux-image-6.12.117+deb12-rt-amd64"),
            None
        );
        assert_eq!(
            series_version("6.1", "linux-image-6.1.0-56-amd64-dbg"),
            None
        );
        assert_eq!(
            series_version("6.1", "linux-image-6.1.0-56-amd64-unsigned"),
            None
        );
        assert_eq!(series_version("6.1", "linux-image-amd64"), None);
    }

    #[test]
    fn newest_compares_numerically() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-56-rt-amd64",
            "linux-image-6.1.0-100-cloud-amd64",
            "linux-image-6.12.99+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.120+deb12-cloud-amd64",
        ];
        assert_eq!(
            newest_of_series("6.1", names),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            newest_of_series("6.12", names),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(newest_of_series("6.6", names), None);
    }

    #[test]
    fn specs_expand_all_and_reject_garbage() {
        let specs = KernelSpec::parse_list(&[
            "all".into(),
            "6.12".into(),
            "linux-image-6.1.0-9-amd64".into(),
        ])
        .unwrap();
        assert_eq!(
            specs,
            vec![
                KernelSpec::Series("6.1".into()),
                KernelSpec::Series("6.12".into()),
                KernelSpec::Package("linux-image-6.1.0-9-amd64".into()),
            ]
        );
        assert!(KernelSpec::parse_list(&["latest".into()]).is_err());
        assert!(KernelSpec::parse_list(&["6.".into()]).is_err());
    }
}
