//! Kernel symbol addresses from `/proc/kallsyms`.
//!
//! Lines look like `ffffffff8202bdf0 t tcp_keepalive_timer`, with a tab and `[module]` appended
//! for module symbols. Only text symbols (`t`/`T`) whose name matches exactly count: compiler
//! split-offs such as `tcp_keepalive_timer.cold` are other symbols.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Looking a symbol up in a kallsyms file failed.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{}: no text symbol named exactly {symbol}", path.display())]
    NotFound { path: PathBuf, symbol: String },
    #[error(
        "{}: the address of {symbol} reads as 0: kernel addresses are hidden from this process \
         (kernel.kptr_restrict; reading them needs root / CAP_SYSLOG)",
        path.display()
    )]
    Hidden { path: PathBuf, symbol: String },
    #[error("{}:{line}: bad address {address:?} for {symbol}", path.display())]
    BadAddress { path: PathBuf, line: usize, symbol: String, address: String },
    #[error("{}: {symbol} has several addresses: {addresses}", path.display())]
    Ambiguous { path: PathBuf, symbol: String, addresses: String },
}

/// Address of text symbol `symbol` in the kallsyms file at `path`.
pub fn lookup(path: &Path, symbol: &str) -> Result<u64, KallsymsError> {
    let file = File::open(path).map_err(|error| KallsymsError::Read { path: path.to_path_buf(), error })?;
    let addr = find_symbol(BufReader::new(file), symbol, path)?;
    log::debug!("kallsyms: {symbol} = {addr:#x}");
    Ok(addr)
}

/// Address of text symbol `symbol` in kallsyms-formatted text; `source` names it in errors.
///
/// The name must match exactly (`tcp_keepalive_timer.cold` is not `tcp_keepalive_timer`). Several
/// lines with the same name and address are fine; different addresses are an error (the caller
/// could not know which one runs). An address of 0 means the kernel hides addresses from us.
pub fn find_symbol<R: BufRead>(reader: R, symbol: &str, source: &Path) -> Result<u64, KallsymsError> {
    find_symbol_of_kinds(reader, symbol, source, &["t", "T"])
}

/// Address of data symbol `symbol` (`jiffies_64`) at `path`; `Ok(None)` when kallsyms does not list
/// it (kernels without CONFIG_KALLSYMS_ALL list only text symbols).
pub fn lookup_data(path: &Path, symbol: &str) -> Result<Option<u64>, KallsymsError> {
    let file = File::open(path).map_err(|error| KallsymsError::Read { path: path.to_path_buf(), error })?;
    match find_symbol_of_kinds(BufReader::new(file), symbol, path, &["d", "D", "b", "B"]) {
        Ok(addr) => Ok(Some(addr)),
        Err(KallsymsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Like [`find_symbol`], for symbols of the given kallsyms kinds.
pub fn find_symbol_of_kinds<R: BufRead>(
    mut reader: R,
    symbol: &str,
    source: &Path,
    kinds: &[&str],
) -> Result<u64, KallsymsError> {
    let mut line = String::new();
    let mut line_no = 0usize;
    let mut found: Vec<u64> = Vec::new();
    loop {
        line.clear();
        let n =
            reader.read_line(&mut line).map_err(|error| KallsymsError::Read { path: source.to_path_buf(), error })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let mut fields = line.split_whitespace();
        let (Some(address), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if name != symbol || !kinds.contains(&kind) {
            continue;
        }
        let addr = u64::from_str_radix(address, 16).map_err(|_| KallsymsError::BadAddress {
            path: source.to_path_buf(),
            line: line_no,
            symbol: symbol.to_string(),
            address: address.to_string(),
        })?;
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    match found.as_slice() {
        [] => Err(KallsymsError::NotFound { path: source.to_path_buf(), symbol: symbol.to_string() }),
        [0] => Err(KallsymsError::Hidden { path: source.to_path_buf(), symbol: symbol.to_string() }),
        [addr] => Ok(*addr),
        many => Err(KallsymsError::Ambiguous {
            path: source.to_path_buf(),
            symbol: symbol.to_string(),
            addresses: many.iter().map(|a| format!("{a:#x}")).collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SAMPLE: &str = "\
ffffffff81243c71 t tcp_keepalive_timer.cold
ffffffff8202bd00 t tcp_keepalive_timer_helper
ffffffff8202bdf0 t tcp_keepalive_timer
ffffffff8202be40 T tcp_set_keepalive
ffffffff83000000 d tcp_keepalive_timer_data
ffffffffc0a01000 t some_mod_fn\t[some_mod]
";

    fn find(text: &str, sym: &str) -> Result<u64, KallsymsError> {
        find_symbol(Cursor::new(text.as_bytes()), sym, Path::new("sample-kallsyms"))
    }

    #[test]
    fn exact_match_ignores_cold_and_prefixes() {
        assert_eq!(find(SAMPLE, "tcp_keepalive_timer").unwrap(), 0xffffffff8202bdf0);
        assert_eq!(find(SAMPLE, "tcp_set_keepalive").unwrap(), 0xffffffff8202be40);
        assert_eq!(find(SAMPLE, "some_mod_fn").unwrap(), 0xffffffffc0a01000);
        // `.cold` first in the file must not win; neither may a data symbol.
        let cold_only = "ffffffff81243c71 t tcp_keepalive_timer.cold\n";
        assert!(matches!(find(cold_only, "tcp_keepalive_timer"), Err(KallsymsError::NotFound { .. })));
        assert!(matches!(find(SAMPLE, "tcp_keepalive_timer_data"), Err(KallsymsError::NotFound { .. })));
    }

    #[test]
    fn data_symbols_are_found_only_as_data() {
        let data = |sym| find_symbol_of_kinds(Cursor::new(SAMPLE.as_bytes()), sym, Path::new("s"), &["d", "D", "b", "B"]);
        assert_eq!(data("tcp_keepalive_timer_data").unwrap(), 0xffffffff83000000);
        assert!(matches!(data("tcp_keepalive_timer"), Err(KallsymsError::NotFound { .. })));
    }

    #[test]
    fn zero_address_means_hidden() {
        let hidden = "0000000000000000 t tcp_keepalive_timer.cold\n0000000000000000 t tcp_keepalive_timer\n";
        let err = find(hidden, "tcp_keepalive_timer").unwrap_err();
        assert!(matches!(err, KallsymsError::Hidden { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("sample-kallsyms") && msg.contains("kptr_restrict"), "{msg}");
    }

    #[test]
    fn missing_duplicate_and_bad_lines() {
        let err = find(SAMPLE, "no_such_symbol").unwrap_err();
        assert!(err.to_string().contains("no_such_symbol"), "{err}");
        let dup_same = "ffffffff8202bdf0 t f\nffffffff8202bdf0 t f\n";
        assert_eq!(find(dup_same, "f").unwrap(), 0xffffffff8202bdf0);
        let dup_diff = "ffffffff8202bdf0 t f\nffffffff8202be00 t f\n";
        assert!(matches!(find(dup_diff, "f"), Err(KallsymsError::Ambiguous { .. })));
        let bad = "short\n\nzzzz t f\n";
        match find(bad, "f").unwrap_err() {
            KallsymsError::BadAddress { line, .. } => assert_eq!(line, 3),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = lookup(Path::new("/nonexistent/kallsyms"), "f").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kallsyms"), "{err}");
    }
}
