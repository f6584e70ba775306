//! Kernel module selection from a package's modules.dep / modules.alias (written by depmod),
//! plus the soft dependencies declared in the modules themselves (libcrc32c needs crc32c first,
//! or nf_tables fails with "Unknown symbol crc32c").

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::host::run_bytes;
use super::modinfo;

/// Modules shipped in every guest: nf_tables and all nft_* expressions (with their dependencies),
/// so `nft` works, loaded up front (nf_tables) or on demand by the kernel through /sbin/modprobe.
pub const DEFAULT_SHIPPED: &[&str] = &["nf_tables", "nft_*"];
/// Modules loaded by the guest's init before any command runs.
pub const DEFAULT_PRELOADED: &[&str] = &["nf_tables"];

/// Compression suffixes depmod accepts on module files.
const COMPRESSION_SUFFIXES: &[&str] = &[".xz", ".gz", ".zst"];

#[derive(Debug)]
struct Module {
    /// Path relative to lib/modules/<release>.
    path: String,
    /// Every module this one needs (depmod lists the transitive closure), then soft "pre"
    /// dependencies once known.
    deps: Vec<String>,
}

#[derive(Debug)]
pub struct ModuleDb {
    modules: BTreeMap<String, Module>,
    /// (alias, module name)
    aliases: Vec<(String, String)>,
}

/// The module name of a path: `kernel/net/netfilter/nft_ct.ko.xz` → `nft_ct` (dashes become
/// underscores, as the kernel does).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

/// A module path without its compression suffix: the guest gets modules decompressed because
/// busybox insmod hands the file to the kernel as it is.
pub fn uncompressed_path(path: &str) -> &str {
    COMPRESSION_SUFFIXES
        .iter()
        .find_map(|s| path.strip_suffix(s))
        .unwrap_or(path)
}

/// The modules chosen for one guest.
#[derive(Debug)]
pub struct Selection {
    /// (path relative to lib/modules/<release>, uncompressed contents), dependencies first.
    pub shipped: Vec<(String, Vec<u8>)>,
    /// Relative paths to insmod at boot, in order.
    pub preload: Vec<String>,
    /// modules.dep and modules.alias for the shipped modules (for busybox modprobe).
    pub dep_file: String,
    pub alias_file: String,
}

/// Resolves the patterns against the package's module index, following hard and soft
/// dependencies, and reads (decompressing) every module to ship.
pub fn select(modules_dir: &Path, ship: &[String], preload: &[String]) -> Result<Selection> {
    let mut db = ModuleDb::load(modules_dir)?;
    let preload_roots = db.matching(preload)?;
    let mut roots = db.matching(ship)?;
    roots.extend(preload_roots.iter().cloned());

    // Reading a module can reveal soft dependencies, which can pull in more modules.
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    loop {
        let unread: Vec<String> = db
            .load_order(&roots)?
            .into_iter()
            .filter(|n| !contents.contains_key(n))
            .collect();
        if unread.is_empty() {
            break;
        }
        for name in unread {
            let rel = db
                .path(&name)
                .expect("load_order returns known modules")
                .to_string();
            let data = read_module(&modules_dir.join(&rel))?;
            let info =
                modinfo::parse(&data).with_context(|| format!("reading .modinfo of {rel}"))?;
            let (pre, post) = modinfo::softdeps(&info);
            for soft in pre {
                let resolved = db.resolve(&soft);
                if resolved.is_empty() {
                    log::debug!("{name}: soft dependency {soft} is built in or absent");
                }
                db.add_deps(&name, resolved);
            }
            for soft in post {
                roots.extend(db.resolve(&soft));
            }
            contents.insert(name, data);
        }
    }

    let shipped_names = db.load_order(&roots)?;
    Ok(Selection {
        dep_file: db.dep_file(&shipped_names)?,
        alias_file: db.alias_file(&shipped_names),
        preload: db
            .load_order(&preload_roots)?
            .iter()
            .map(|n| uncompressed_path(db.path(n).expect("known module")).to_string())
            .collect(),
        shipped: shipped_names
            .iter()
            .map(|n| {
                let rel = uncompressed_path(db.path(n).expect("known module")).to_string();
                (
                    rel,
                    contents.remove(n).expect("every shipped module was read"),
                )
            })
            .collect(),
    })
}

/// A module file's contents, decompressed (busybox has xz and gzip; zstd needs the zstd tool).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let command = if name.ends_with(".xz") {
        Some(("busybox", "xzcat"))
    } else if name.ends_with(".gz") {
        Some(("busybox", "zcat"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "-dc"))
    } else {
        None
    };
    match command {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some((program, arg)) => run_bytes(Command::new(program).arg(arg).arg(path))
            .with_context(|| format!("decompressing {}", path.display())),
    }
}

impl ModuleDb {
    pub fn load(modules_dir: &Path) -> Result<ModuleDb> {
        let dep_path = modules_dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let alias_path = modules_dir.join("modules.alias");
        let alias = fs::read_to_string(&alias_path)
            .with_context(|| format!("reading {}", alias_path.display()))?;
        ModuleDb::parse(&dep, &alias)
    }

    pub fn parse(modules_dep: &str, modules_alias: &str) -> Result<ModuleDb> {
        let mut modules = BTreeMap::new();
        for (n, line) in modules_dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                bail!("modules.dep line {}: no ':' in {line:?}", n + 1);
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(
                module_name(path),
                Module {
                    path: path.to_string(),
                    deps,
                },
            );
        }
        let aliases = modules_alias
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("alias"), Some(alias), Some(module)) => {
                        Some((alias.to_string(), module_name(module)))
                    }
                    _ => None,
                }
            })
            .collect();
        Ok(ModuleDb { modules, aliases })
    }

    /// Names matching the patterns (exact names, or prefixes ending in `*`). An exact name that
    /// matches nothing is an error: the module is missing or built in (check the kernel config).
    pub fn matching(&self, patterns: &[String]) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for pattern in patterns {
            let pattern = pattern.replace('-', "_");
            match pattern.strip_suffix('*') {
                Some(prefix) => names.extend(
                    self.modules
                        .keys()
                        .filter(|n| n.starts_with(prefix))
                        .cloned(),
                ),
                None if self.modules.contains_key(&pattern) => {
                    names.insert(pattern);
                }
                None => bail!("no loadable module {pattern} (missing, or built into the kernel)"),
            }
        }
        Ok(names)
    }

    /// The modules a module name or alias (exact, no wildcards) stands for.
    pub fn resolve(&self, name_or_alias: &str) -> Vec<String> {
        let name = name_or_alias.replace('-', "_");
        if self.modules.contains_key(&name) {
            return vec![name];
        }
        let mut found: Vec<String> = self
            .aliases
            .iter()
            .filter(|(a, _)| a == name_or_alias)
            .map(|(_, m)| m.clone())
            .collect();
        found.sort();
        found.dedup();
        found.retain(|m| self.modules.contains_key(m));
        found
    }

    /// Records that `name` needs `deps` loaded first (soft "pre" dependencies).
    pub fn add_deps(&mut self, name: &str, deps: Vec<String>) {
        if let Some(module) = self.modules.get_mut(name) {
            for dep in deps {
                if dep != name && !module.deps.contains(&dep) {
                    module.deps.push(dep);
                }
            }
        }
    }

    /// The modules and everything they depend on, each after its dependencies.
    pub fn load_order(&self, names: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut visiting = BTreeSet::new();
        for name in names {
            self.visit(name, &mut visiting, &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            bail!("module dependency cycle through {name}");
        }
        let module = self
            .modules
            .get(name)
            .with_context(|| format!("modules.dep names unknown module {name}"))?;
        for dep in &module.deps {
            self.visit(dep, visiting, done, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }

    /// Path of a module relative to lib/modules/<release>.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.modules.get(name).map(|m| m.path.as_str())
    }

    /// modules.dep restricted to `names` (closed under dependencies), with uncompressed paths.
    /// Each line lists the module's whole dependency closure, soft "pre" dependencies included,
    /// in depmod's order: the last one is loaded first.
    pub fn dep_file(&self, names: &[String]) -> Result<String> {
        let mut out = String::new();
        for name in names {
            let mut order = self.load_order(&[name.clone()].into())?;
            order.pop();
            let deps: Vec<&str> = order
                .iter()
                .rev()
                .map(|d| uncompressed_path(&self.modules[d].path))
                .collect();
            out.push_str(&format!(
                "{}: {}\n",
                uncompressed_path(&self.modules[name].path),
                deps.join(" ")
            ));
        }
        Ok(out)
    }

    /// modules.alias restricted to `names`.
    pub fn alias_file(&self, names: &[String]) -> String {
        let set: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        self.aliases
            .iter()
            .filter(|(_, module)| set.contains(module.as_str()))
            .map(|(alias, module)| format!("alias {alias} {module}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/lib/libcrc32c.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nft_ct.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nft-fake.ko: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/drivers/net/dummy.ko.xz:
";
    const ALIAS: &str = "# Aliases\nalias nft-expr-ct nft_ct\nalias rtnl-link-dummy dummy\n\
                         alias nfnetlink-subsys-10 nf_tables\nalias crc32c crc32c_generic\nalias crc32c crc32c_intel\n";

    fn db() -> ModuleDb {
        ModuleDb::parse(DEP, ALIAS).unwrap()
    }

    #[test]
    fn names_strip_directories_and_compression() {
        assert_eq!(module_name("kernel/net/netfilter/nft_ct.ko.xz"), "nft_ct");
        assert_eq!(module_name("kernel/net/netfilter/nft-fake.ko"), "nft_fake");
        assert_eq!(module_name("nf_tables"), "nf_tables");
        assert_eq!(uncompressed_path("kernel/a.ko.xz"), "kernel/a.ko");
        assert_eq!(uncompressed_path("kernel/a.ko.zst"), "kernel/a.ko");
        assert_eq!(uncompressed_path("kernel/a.ko"), "kernel/a.ko");
    }

    #[test]
    fn patterns_match_names_and_prefixes() {
        let names = db().matching(&["nft_*".into(), "dummy".into()]).unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["dummy", "nft_ct", "nft_fake"]
        );
        assert!(db().matching(&["nosuch".into()]).is_err());
        assert!(db().matching(&["nosuch*".into()]).unwrap().is_empty());
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let db = db();
        let order = db
            .load_order(&db.matching(&["nft_*".into()]).unwrap())
            .unwrap();
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| m == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(order.len(), 6);
        assert!(pos("libcrc32c") < pos("nf_tables"));
        assert!(pos("nfnetlink") < pos("nf_tables"));
        assert!(pos("nf_conntrack") < pos("nft_ct"));
        assert!(pos("nf_tables") < pos("nft_ct"));
        assert!(pos("nf_tables") < pos("nft_fake"));
    }

    #[test]
    fn soft_dependencies_resolve_through_aliases_and_load_first() {
        let mut db = db();
        // crc32c_intel is only an alias target, not in modules.dep: ignored.
        assert_eq!(db.resolve("crc32c"), ["crc32c_generic"]);
        assert_eq!(db.resolve("nft-fake"), ["nft_fake"]);
        assert!(db.resolve("nosuch").is_empty());
        db.add_deps("libcrc32c", db.resolve("crc32c"));
        let order = db.load_order(&["nf_tables".to_string()].into()).unwrap();
        assert_eq!(
            order,
            ["nfnetlink", "crc32c_generic", "libcrc32c", "nf_tables"]
        );
        assert!(db.dep_file(&order).unwrap().ends_with(
            "kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko kernel/crypto/crc32c_generic.ko \
             kernel/net/netfilter/nfnetlink.ko\n"
        ));
    }

    #[test]
    fn restricted_index_files() {
        let db = db();
        let order = db.load_order(&["nf_tables".to_string()].into()).unwrap();
        assert_eq!(
            db.dep_file(&order).unwrap(),
            "kernel/net/netfilter/nfnetlink.ko: \nkernel/lib/libcrc32c.ko: \n\
             kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko kernel/net/netfilter/nfnetlink.ko\n"
        );
        assert_eq!(
            db.alias_file(&order),
            "alias nfnetlink-subsys-10 nf_tables\n"
        );
    }

    #[test]
    fn cycles_are_reported() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(db.load_order(&["a".to_string()].into()).is_err());
    }
}
