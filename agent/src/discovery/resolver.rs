//! Where libc's `getaddrinfo` lives, for the resolver uprobes: the C
//! libraries on this machine (the daemon's own and the usual paths), once
//! per file.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol};

use super::tls_libraries::file_offset;

const LIBC_PATHS: &[&str] = &[
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
    "/lib/libc.so.6",
    "/lib/ld-musl-x86_64.so.1",
];

/// A C library and the file offset of its `getaddrinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverTarget {
    pub path: PathBuf,
    pub getaddrinfo: u64,
}

/// The C libraries found, one per file (by device and inode); files that
/// cannot be read or lack the symbol are skipped with the reason.
pub fn find_libc() -> (Vec<ResolverTarget>, Vec<String>) {
    let mut candidates: Vec<PathBuf> = LIBC_PATHS.iter().map(PathBuf::from).collect();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            if let Some(path) = line.split_whitespace().nth(5) {
                let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with("libc.so") || name.starts_with("libc-") {
                    candidates.insert(0, PathBuf::from(path));
                }
            }
        }
    }
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        match getaddrinfo_offset(&path) {
            Ok(offset) => found.push(ResolverTarget { path, getaddrinfo: offset }),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    (found, problems)
}

fn getaddrinfo_offset(path: &Path) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: read-only private map of a library file, dropped after parsing;
    // libraries are replaced by rename, not rewritten in place.
    let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let elf = object::File::parse(&*data).map_err(|e| format!("malformed ELF: {e}"))?;
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        let name = sym.name_bytes().unwrap_or_default();
        let base = name.split(|&b| b == b'@').next().unwrap_or_default();
        if base == b"getaddrinfo" && sym.is_definition() {
            return file_offset(&elf, &sym).ok_or_else(|| "getaddrinfo has no file offset".to_string());
        }
    }
    Err("no getaddrinfo symbol".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_machines_libc() {
        let (found, _) = find_libc();
        assert!(!found.is_empty(), "no libc with getaddrinfo found");
        assert!(found.iter().all(|t| t.getaddrinfo > 0));
    }

    #[test]
    fn a_file_without_the_symbol_is_an_error() {
        // The test binary imports getaddrinfo but does not define it.
        assert!(getaddrinfo_offset(Path::new("/proc/self/exe")).is_err());
        assert!(getaddrinfo_offset(Path::new("/nonexistent")).is_err());
    }
}
