//! Kernel module selection from a package's modules.dep / modules.alias (written by depmod).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Modules shipped in every guest: nf_tables and all nft_* expressions (with their dependencies),
/// so `nft` works, loaded up front (nf_tables) or on demand by the kernel through /sbin/modprobe.
pub const DEFAULT_SHIPPED: &[&str] = &["nf_tables", "nft_*"];
/// Modules loaded by the guest's init before any command runs.
pub const DEFAULT_PRELOADED: &[&str] = &["nf_tables"];

#[derive(Debug)]
struct Module {
    /// Path relative to lib/modules/<release>.
    path: String,
    /// Every module this one needs (depmod lists the transitive closure).
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

impl ModuleDb {
    pub fn load(modules_dir: &Path) -> Result<ModuleDb> {
        let dep_path = modules_dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_path).with_context(|| format!("reading {}", dep_path.display()))?;
        let alias_path = modules_dir.join("modules.alias");
        let alias = fs::read_to_string(&alias_path).with_context(|| format!("reading {}", alias_path.display()))?;
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
            modules.insert(module_name(path), Module { path: path.to_string(), deps });
        }
        let aliases = modules_alias
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("alias"), Some(alias), Some(module)) => Some((alias.to_string(), module_name(module))),
                    _ => None,
                }
            })
            .collect();
        Ok(ModuleDb { modules, aliases })
    }

    /// Names matching the patterns (exact names, or prefixes ending in `*`). A pattern that
    /// matches nothing is an error: the module is missing or built in (check the kernel config).
    pub fn matching(&self, patterns: &[String]) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for pattern in patterns {
            let pattern = pattern.replace('-', "_");
            let before = names.len();
            match pattern.strip_suffix('*') {
                Some(prefix) => names.extend(self.modules.keys().filter(|n| n.starts_with(prefix)).cloned()),
                None if self.modules.contains_key(&pattern) => {
                    names.insert(pattern.clone());
                }
                None => {}
            }
            if names.len() == before && !pattern.ends_with('*') {
                bail!("no loadable module {pattern} (missing, or built into the kernel)");
            }
        }
        Ok(names)
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
        let module = self.modules.get(name).with_context(|| format!("modules.dep names unknown module {name}"))?;
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

    /// modules.dep restricted to `names` (which must be closed under dependencies).
    pub fn dep_file(&self, names: &[String]) -> String {
        let mut out = String::new();
        for name in names {
            let module = &self.modules[name];
            let deps: Vec<&str> = module.deps.iter().map(|d| self.modules[d].path.as_str()).collect();
            out.push_str(&format!("{}: {}\n", module.path, deps.join(" ")));
        }
        out
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
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nft_ct.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nft-fake.ko: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/drivers/net/dummy.ko.xz:
";
    const ALIAS: &str = "# Aliases\nalias nft-expr-ct nft_ct\nalias rtnl-link-dummy dummy\nalias nfnetlink-subsys-10 nf_tables\n";

    fn db() -> ModuleDb {
        ModuleDb::parse(DEP, ALIAS).unwrap()
    }

    #[test]
    fn names_strip_directories_and_compression() {
        assert_eq!(module_name("kernel/net/netfilter/nft_ct.ko.xz"), "nft_ct");
        assert_eq!(module_name("kernel/net/netfilter/nft-fake.ko"), "nft_fake");
        assert_eq!(module_name("nf_tables"), "nf_tables");
    }

    #[test]
    fn patterns_match_names_and_prefixes() {
        let names = db().matching(&["nft_*".into(), "dummy".into()]).unwrap();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["dummy", "nft_ct", "nft_fake"]);
        assert!(db().matching(&["nosuch".into()]).is_err());
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let db = db();
        let order = db.load_order(&db.matching(&["nft_*".into()]).unwrap()).unwrap();
        let pos = |n: &str| order.iter().position(|m| m == n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!(order.len(), 6);
        assert!(pos("libcrc32c") < pos("nf_tables"));
        assert!(pos("nfnetlink") < pos("nf_tables"));
        assert!(pos("nf_conntrack") < pos("nft_ct"));
        assert!(pos("nf_tables") < pos("nft_ct"));
        assert!(pos("nf_tables") < pos("nft_fake"));
    }

    #[test]
    fn restricted_index_files() {
        let db = db();
        let order = db.load_order(&["nf_tables".to_string()].into()).unwrap();
        assert_eq!(
            db.dep_file(&order),
            "kernel/lib/libcrc32c.ko.xz: \nkernel/net/netfilter/nfnetlink.ko.xz: \n\
             kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz\n"
        );
        assert_eq!(db.alias_file(&order), "alias nfnetlink-subsys-10 nf_tables\n");
    }

    #[test]
    fn cycles_are_reported() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(db.load_order(&["a".to_string()].into()).is_err());
    }
}
