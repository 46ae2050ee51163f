//! Which processes map which TLS library, and where its uprobes go.
//!
//! Every file-backed executable mapping of a process (and its main
//! executable) is opened once through `/proc/<pid>/root/<path>`, so files
//! inside containers are seen as the process sees them, and its ELF symbol
//! tables (`.dynsym`, then `.symtab`) are searched for the OpenSSL and GnuTLS
//! functions the uprobes hook. A file qualifies by the symbols it defines,
//! never by its name: Node's `/usr/bin/node` exports `SSL_read` itself.
//! The name only decides whether a file without those symbols is worth
//! reporting (`libssl*` stripped, unreadable, or a TLS library we don't
//! support) or is simply not TLS (libc).
//!
//! Results are cached per file (device, inode): the kernel attaches uprobes
//! to the inode, so one attachment covers every process mapping that file.
//!
//! In OpenSSL, the read and write wrappers' probes move to the internal
//! functions they call when the machine code shows it is safe (see
//! [`internal_functions`]).

mod internal_functions;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use procfs::process::{MMPermissions, MMapPath, Process};

pub use internal_functions::{READ_INTERNAL, WRITE_INTERNAL};

/// Functions hooked in OpenSSL (and BoringSSL/LibreSSL builds that export them).
pub const OPENSSL_SYMBOLS: &[&str] = &[
    "SSL_read",
    "SSL_write",
    "SSL_read_ex",
    "SSL_write_ex",
    "SSL_do_handshake",
];
/// Functions hooked in GnuTLS.
pub const GNUTLS_SYMBOLS: &[&str] = &[
    "gnutls_record_send",
    "gnutls_record_recv",
    "gnutls_handshake",
];

/// The symbols a file must define to count as that library.
const OPENSSL_REQUIRED: &[&str] = &["SSL_read", "SSL_write"];
const GNUTLS_REQUIRED: &[&str] = &["gnutls_record_send", "gnutls_record_recv"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsLibraryKind {
    OpenSsl,
    GnuTls,
}

impl TlsLibraryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLibraryKind::OpenSsl => "openssl",
            TlsLibraryKind::GnuTls => "gnutls",
        }
    }

    /// The symbols this kind's uprobes want.
    pub fn wanted_symbols(self) -> &'static [&'static str] {
        match self {
            TlsLibraryKind::OpenSsl => OPENSSL_SYMBOLS,
            TlsLibraryKind::GnuTls => GNUTLS_SYMBOLS,
        }
    }
}

/// A file as the kernel knows it: `dev` is the `dev_t` encoding
/// (`makedev(major, minor)`, as in `stat.st_dev`) of the device shown in
/// `/proc/<pid>/maps`, and `inode` its inode there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub inode: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsTarget {
    pub kind: TlsLibraryKind,
    pub file: FileId,
    /// Path the agent can open/attach from its own mount namespace:
    /// `/proc/<pid>/root/<path as mapped>` (works for containers too). It is
    /// valid while the process it was found through lives.
    pub attach_path: PathBuf,
    /// The path as the traced process sees it, for logs/status.
    pub display_path: String,
    /// Where the uprobes go, as (function, file offset): every wanted
    /// symbol present, in the order of [`OPENSSL_SYMBOLS`] /
    /// [`GNUTLS_SYMBOLS`]; in OpenSSL, when its wrappers were followed,
    /// [`READ_INTERNAL`] and [`WRITE_INTERNAL`] first, in place of
    /// `SSL_read`, `SSL_read_ex`, `SSL_write` and `SSL_write_ex` (never
    /// both: a call must be seen once).
    pub symbols: Vec<(&'static str, u64)>,
}

impl TlsTarget {
    /// The file offset of `symbol`, if the file defines it.
    #[allow(dead_code)] // API for probes and status; used by the tests so far
    pub fn offset_of(&self, symbol: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|(name, _)| *name == symbol)
            .map(|&(_, offset)| offset)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inspection {
    Tls(TlsTarget),
    /// The mapped file is not a TLS library.
    NotTls,
    /// Looks like a TLS library (a name like libssl*/libgnutls*, or a file
    /// defining some TLS symbols) but the needed symbols are missing or the
    /// file is unreadable.
    NotVisible {
        display_path: String,
        reason: String,
    },
}

#[derive(Debug)]
pub enum ScanError {
    /// The process does not exist (any more).
    ProcessGone { pid: u32 },
    /// Its /proc entry could not be read (permissions, or it exited midway).
    Proc { pid: u32, reason: String },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::ProcessGone { pid } => write!(f, "process {pid} is gone"),
            ScanError::Proc { pid, reason } => {
                write!(f, "cannot read /proc entry of process {pid}: {reason}")
            }
        }
    }
}

impl std::error::Error for ScanError {}

impl ScanError {
    fn from_proc(pid: u32, err: procfs::ProcError) -> Self {
        match err {
            procfs::ProcError::NotFound(_) => ScanError::ProcessGone { pid },
            other => ScanError::Proc {
                pid,
                reason: other.to_string(),
            },
        }
    }
}

/// Finds TLS libraries in processes' mappings; each distinct file is parsed once.
pub struct TlsLibraryScanner {
    proc_root: PathBuf,
    cache: HashMap<FileId, Arc<Inspection>>,
}

impl TlsLibraryScanner {
    /// `proc_root` is normally `/proc` (or the host's procfs mounted elsewhere).
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
        }
    }

    /// Number of distinct files inspected so far.
    #[allow(dead_code)] // API for status; used by the tests so far
    pub fn files_inspected(&self) -> usize {
        self.cache.len()
    }

    /// Inspects every file-backed executable mapping of `pid` (r-x segments
    /// plus the main executable) and returns the TLS-relevant ones (`Tls` and
    /// `NotVisible`), each file once. Each file is inspected at most once over
    /// the scanner's life. A process that vanished or an unreadable /proc
    /// entry is an `Err`.
    pub fn scan_process(&mut self, pid: u32) -> Result<Vec<Arc<Inspection>>, ScanError> {
        let pid_dir = self.proc_root.join(pid.to_string());
        let process =
            Process::new_with_root(pid_dir.clone()).map_err(|e| ScanError::from_proc(pid, e))?;
        let maps = process.maps().map_err(|e| ScanError::from_proc(pid, e))?;
        // The main executable, as the process sees it; its mappings count even
        // in the unusual case that none is executable.
        let exe = std::fs::read_link(pid_dir.join("exe")).ok();

        let mut seen = HashSet::new();
        let mut found = Vec::new();
        for map in maps.0 {
            let MMapPath::Path(path) = &map.pathname else {
                continue;
            };
            if map.inode == 0 {
                continue;
            }
            let is_exe = exe.as_deref() == Some(path.as_path());
            if !map.perms.contains(MMPermissions::EXECUTE) && !is_exe {
                continue;
            }
            let file = FileId {
                dev: libc::makedev(map.dev.0 as u32, map.dev.1 as u32),
                inode: map.inode,
            };
            if !seen.insert(file) {
                continue;
            }
            let inspection = match self.cache.get(&file) {
                Some(cached) => Arc::clone(cached),
                None => {
                    let inspection = Arc::new(inspect_mapping(&pid_dir, path, file));
                    self.cache.insert(file, Arc::clone(&inspection));
                    inspection
                }
            };
            if !matches!(*inspection, Inspection::NotTls) {
                found.push(inspection);
            }
        }
        Ok(found)
    }

    /// All pids currently in /proc (numeric directories).
    pub fn all_pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// Inspects the file a process maps at `path` (as it sees it).
fn inspect_mapping(pid_dir: &Path, path: &Path, file: FileId) -> Inspection {
    let display_path = path.to_string_lossy().into_owned();
    if let Some(original) = display_path.strip_suffix(" (deleted)") {
        // The path now names another file (or none): its offsets would be wrong.
        return if looks_like_tls_name(Path::new(original)) {
            Inspection::NotVisible {
                display_path,
                reason: "the mapped file was deleted or replaced on disk since the process started"
                    .into(),
            }
        } else {
            Inspection::NotTls
        };
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let attach_path = pid_dir.join("root").join(relative);
    inspect_file_as(&attach_path, &display_path, file)
}

/// Where OpenSSL's read and write calls are hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the internal functions where they can be found, else on the
    /// exported wrappers.
    Internal,
    /// On the exported wrappers always (the placement before internal
    /// functions; the benchmark compares the two).
    Wrappers,
}

/// Hidden setting (no flag, not in `--help`): `1` hooks OpenSSL's exported
/// wrappers even where its internal functions were found.
pub const PLACEMENT_ENV: &str = "PERISCOPE_TLS_PROBE_WRAPPERS";

impl Placement {
    pub fn from_env() -> Placement {
        match std::env::var_os(PLACEMENT_ENV) {
            Some(v) if v == "1" => Placement::Wrappers,
            _ => Placement::Internal,
        }
    }
}

/// Inspects one file: `attach_path` is opened, `display_path` decides what
/// the name looks like and is what reports show.
pub fn inspect_file_as(attach_path: &Path, display_path: &str, file: FileId) -> Inspection {
    inspect_file_placed(attach_path, display_path, file, Placement::from_env())
}

/// [`inspect_file_as`] with the OpenSSL probe placement given.
fn inspect_file_placed(
    attach_path: &Path,
    display_path: &str,
    file: FileId,
    placement: Placement,
) -> Inspection {
    let name_looks_tls = looks_like_tls_name(Path::new(display_path));
    let not_visible = |reason: String| {
        if name_looks_tls {
            Inspection::NotVisible {
                display_path: display_path.to_owned(),
                reason,
            }
        } else {
            Inspection::NotTls
        }
    };
    let data = match File::open(attach_path) {
        // SAFETY: the map is read-only and private. A file truncated
        // underneath it would fault; library files are replaced by rename,
        // not rewritten in place, and the map is dropped right after parsing.
        Ok(f) => match unsafe { memmap2::Mmap::map(&f) } {
            Ok(map) => map,
            Err(e) => return not_visible(format!("cannot map {}: {e}", attach_path.display())),
        },
        Err(e) => return not_visible(format!("cannot open {}: {e}", attach_path.display())),
    };
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return not_visible("not an ELF file".into());
    }
    let elf = match object::File::parse(&*data) {
        Ok(elf) => elf,
        Err(e) => return not_visible(format!("malformed ELF: {e}")),
    };
    let symbols = find_symbols(&elf);

    for (kind, required) in [
        (TlsLibraryKind::OpenSsl, OPENSSL_REQUIRED),
        (TlsLibraryKind::GnuTls, GNUTLS_REQUIRED),
    ] {
        if required
            .iter()
            .all(|name| symbols.defined.contains_key(name))
        {
            let symbols = hook_points(&elf, &data, display_path, kind, &symbols.defined, placement);
            return Inspection::Tls(TlsTarget {
                kind,
                file,
                attach_path: attach_path.to_owned(),
                display_path: display_path.to_owned(),
                symbols,
            });
        }
    }

    if !symbols.defined.is_empty() {
        let mut have: Vec<&str> = symbols.defined.keys().copied().collect();
        have.sort_unstable();
        return Inspection::NotVisible {
            display_path: display_path.to_owned(),
            reason: format!(
                "defines only some TLS functions ({}); SSL_read+SSL_write or gnutls_record_send+gnutls_record_recv are needed",
                have.join(", ")
            ),
        };
    }
    if symbols.imports_tls {
        // A consumer of a TLS library (Python's _ssl module, curl): the
        // library it imports from is inspected on its own.
        return Inspection::NotTls;
    }
    not_visible(
        "no OpenSSL or GnuTLS functions in its symbol tables (stripped, or an unsupported TLS library)".into(),
    )
}

/// The (function, file offset) pairs to hook in a `kind` library: see
/// [`TlsTarget::symbols`]. `defined` are its wanted symbols' offsets.
fn hook_points(
    elf: &object::File<'_>,
    data: &[u8],
    display_path: &str,
    kind: TlsLibraryKind,
    defined: &HashMap<&'static str, u64>,
    placement: Placement,
) -> Vec<(&'static str, u64)> {
    let exported: Vec<(&'static str, u64)> = kind
        .wanted_symbols()
        .iter()
        .filter_map(|name| defined.get(name).map(|&offset| (*name, offset)))
        .collect();
    if kind != TlsLibraryKind::OpenSsl || placement == Placement::Wrappers {
        return exported;
    }
    let families = internal_functions::FAMILIES;
    match internal_functions::find(elf, data, defined) {
        Ok(offsets) => {
            let is_wrapper = |name: &str| {
                families
                    .iter()
                    .any(|(_, wrappers)| wrappers.contains(&name))
            };
            let internal = families.iter().map(|&(internal, _)| internal).zip(offsets);
            internal
                .chain(exported.into_iter().filter(|(name, _)| !is_wrapper(name)))
                .collect()
        }
        Err(reason) => {
            log::debug!(
                "{display_path}: OpenSSL's exported read/write functions are hooked: {reason}"
            );
            exported
        }
    }
}

#[derive(Default)]
struct FoundSymbols {
    /// Wanted symbol -> file offset.
    defined: HashMap<&'static str, u64>,
    /// Whether the file imports (references undefined) a wanted symbol.
    imports_tls: bool,
}

/// Wanted symbols that `elf` defines, with their file offsets; `.dynsym`
/// first, then `.symtab` for what is still missing.
fn find_symbols(elf: &object::File<'_>) -> FoundSymbols {
    let mut found = FoundSymbols::default();
    // Local (static) definitions only count when no global one exists.
    let mut local: HashMap<&'static str, u64> = HashMap::new();
    for table in [elf.dynamic_symbols(), elf.symbols()] {
        // A big unstripped executable's .symtab (node: 20 ms) is only read
        // when .dynsym did not already give every function of one library.
        let complete = |wanted: &[&str]| wanted.iter().all(|name| found.defined.contains_key(name));
        if complete(OPENSSL_SYMBOLS) || complete(GNUTLS_SYMBOLS) {
            break;
        }
        for sym in table {
            let Some(wanted) = wanted_symbol(sym.name_bytes().unwrap_or_default()) else {
                continue;
            };
            if sym.is_undefined() {
                found.imports_tls = true;
                continue;
            }
            if !sym.is_definition()
                || sym.kind() != SymbolKind::Text
                || found.defined.contains_key(wanted)
            {
                continue;
            }
            let Some(offset) = file_offset(elf, &sym) else {
                continue;
            };
            if sym.is_local() {
                local.entry(wanted).or_insert(offset);
            } else {
                found.defined.insert(wanted, offset);
            }
        }
    }
    for (name, offset) in local {
        found.defined.entry(name).or_insert(offset);
    }
    found
}

/// Maps a symbol name (possibly versioned, `SSL_read@@OPENSSL_3.0.0`) to the
/// wanted name it is.
fn wanted_symbol(name: &[u8]) -> Option<&'static str> {
    let base = match name.iter().position(|&b| b == b'@') {
        Some(at) => &name[..at],
        None => name,
    };
    // Cheap rejection first: every wanted name starts with "SSL_" or "gnutls_".
    if !(base.starts_with(b"SSL_") || base.starts_with(b"gnutls_")) {
        return None;
    }
    OPENSSL_SYMBOLS
        .iter()
        .chain(GNUTLS_SYMBOLS)
        .find(|wanted| wanted.as_bytes() == base)
        .copied()
}

/// File offset of a defined symbol: its address relative to its section, plus
/// where that section sits in the file.
pub(crate) fn file_offset(elf: &object::File<'_>, sym: &object::Symbol<'_, '_>) -> Option<u64> {
    let section = elf.section_by_index(sym.section_index()?).ok()?;
    let (section_offset, section_size) = section.file_range()?;
    let within = sym.address().checked_sub(section.address())?;
    if within >= section_size {
        return None;
    }
    section_offset.checked_add(within)
}

/// Whether a file name suggests a TLS library (libssl*, libgnutls*,
/// libboringssl*, libwolfssl, ...).
fn looks_like_tls_name(path: &Path) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let name = name.to_string_lossy().to_ascii_lowercase();
    // Helper libraries of a TLS stack (libgnutls-dane, libgnutlsxx,
    // libgnutls-openssl's siblings) are not implementations to hook.
    const HELPERS: &[&str] = &["libgnutls-dane", "libgnutlsxx", "libssl-dev"];
    if HELPERS.iter().any(|h| name.starts_with(h)) {
        return false;
    }
    name.contains("ssl") || name.contains("gnutls")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

    fn inspect(path: &str) -> Inspection {
        inspect_file_placed(
            Path::new(path),
            path,
            FileId { dev: 0, inode: 0 },
            Placement::Internal,
        )
    }

    /// With every OpenSSL function hooked at its exported symbol.
    fn inspect_exported(path: &str) -> Inspection {
        inspect_file_placed(
            Path::new(path),
            path,
            FileId { dev: 0, inode: 0 },
            Placement::Wrappers,
        )
    }

    fn names(t: &TlsTarget) -> Vec<&str> {
        t.symbols.iter().map(|(n, _)| *n).collect()
    }

    /// What libssl and the fixtures are hooked at when the wrappers are followed.
    const OPENSSL_INTERNAL_HOOKS: [&str; 3] = [READ_INTERNAL, WRITE_INTERNAL, "SSL_do_handshake"];

    fn target(inspection: &Inspection) -> &TlsTarget {
        match inspection {
            Inspection::Tls(t) => t,
            other => panic!("expected a TLS target, got {other:?}"),
        }
    }

    fn readelf(args: &[&str], path: &str) -> String {
        let out = Command::new("readelf")
            .args(args)
            .arg(path)
            .output()
            .expect("readelf runs");
        assert!(out.status.success(), "readelf {args:?} {path} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Expected file offsets computed from readelf's own output: the symbol's
    /// value and section index from `readelf -Ws --dyn-syms`, that section's
    /// address and offset from `readelf -SW`.
    fn readelf_offsets(path: &str) -> HashMap<String, u64> {
        let sections_text = readelf(&["-SW"], path);
        let mut sections: HashMap<u64, (u64, u64)> = HashMap::new();
        for line in sections_text.lines() {
            // "  [12] .text  PROGBITS  0000000000024000 024000 06d1e2 00  AX  0   0 16"
            let Some(rest) = line.trim_start().strip_prefix('[') else {
                continue;
            };
            let Some((idx, rest)) = rest.split_once(']') else {
                continue;
            };
            let Ok(idx) = idx.trim().parse::<u64>() else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() < 4 {
                continue;
            }
            let addr = u64::from_str_radix(fields[2], 16).unwrap();
            let off = u64::from_str_radix(fields[3], 16).unwrap();
            sections.insert(idx, (addr, off));
        }
        let mut out = HashMap::new();
        let syms = readelf(&["-Ws", "--dyn-syms"], path);
        for line in syms.lines() {
            // "   463: 0000000000038a30   104 FUNC    GLOBAL DEFAULT   14 SSL_read@@OPENSSL_3.0.0"
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[3] != "FUNC" {
                continue;
            }
            let Ok(ndx) = f[6].parse::<u64>() else {
                continue;
            };
            let name = f[7].split('@').next().unwrap().to_string();
            let value = u64::from_str_radix(f[1], 16).unwrap();
            let (addr, off) = sections[&ndx];
            out.entry(name).or_insert(value - addr + off);
        }
        out
    }

    #[test]
    fn libssl_is_openssl_with_readelf_offsets() {
        let path = format!("{LIBDIR}/libssl.so.3");
        let inspection = inspect_exported(&path);
        let t = target(&inspection);
        assert_eq!(t.kind, TlsLibraryKind::OpenSsl);
        assert_eq!(names(t), OPENSSL_SYMBOLS);
        let expected = readelf_offsets(&path);
        for (name, offset) in &t.symbols {
            assert_eq!(Some(offset), expected.get(*name), "{name}");
        }
        assert_eq!(t.offset_of("SSL_read"), expected.get("SSL_read").copied());
    }

    /// A file's virtual addresses as the loader maps them: the PT_LOAD
    /// headers from `readelf -lW`.
    struct Loads(Vec<(u64, u64, u64)>);

    impl Loads {
        fn of(path: &str) -> Loads {
            let headers = readelf(&["-lW"], path);
            let loads = headers
                .lines()
                .filter(|l| l.trim_start().starts_with("LOAD"))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let hex =
                        |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
                    (hex(f[1]), hex(f[2]), hex(f[4])) // offset, vaddr, filesz
                })
                .collect();
            Loads(loads)
        }

        fn file_offset(&self, vaddr: u64) -> u64 {
            let (off, va, _) = self
                .0
                .iter()
                .find(|(_, va, sz)| vaddr >= *va && vaddr < va + sz)
                .expect("address inside a PT_LOAD");
            vaddr - va + off
        }
    }

    /// The virtual address `nm -D` gives `name`.
    fn nm_address(nm: &str, name: &str) -> u64 {
        let line = nm
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .nth(2)
                    .map(|n| n.split('@').next() == Some(name))
                    == Some(true)
            })
            .unwrap_or_else(|| panic!("nm lists {name}"));
        u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
    }

    fn nm_dynamic(path: &str) -> String {
        let nm = Command::new("nm")
            .args(["-D", "--defined-only", path])
            .output()
            .unwrap();
        String::from_utf8(nm.stdout).unwrap()
    }

    #[test]
    fn libssl_offsets_point_at_function_entry() {
        // Independent check against nm -D (virtual addresses) and the
        // PT_LOAD headers: the bytes at the file offset are the bytes at the
        // symbol's virtual address in the loaded image.
        let path = format!("{LIBDIR}/libssl.so.3");
        let inspection = inspect_exported(&path);
        let t = target(&inspection);
        let nm = nm_dynamic(&path);
        let loads = Loads::of(&path);
        for (name, offset) in &t.symbols {
            assert_eq!(*offset, loads.file_offset(nm_address(&nm, name)), "{name}");
        }
    }

    /// The target of the first `call` objdump shows in the 64 bytes at `vaddr`.
    fn objdump_first_call(path: &str, vaddr: u64) -> u64 {
        let out = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(format!("--start-address={vaddr:#x}"))
            .arg(format!("--stop-address={:#x}", vaddr + 64))
            .arg(path)
            .output()
            .expect("objdump runs");
        let text = String::from_utf8(out.stdout).unwrap();
        let call = text
            .lines()
            .find_map(|l| {
                l.split_once("\tcall ")
                    .map(|(_, rest)| rest.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no call at {vaddr:#x}:\n{text}"));
        u64::from_str_radix(call.split_whitespace().next().unwrap(), 16).unwrap()
    }

    #[test]
    fn libssl_read_and_write_go_through_internal_functions() {
        let path = format!("{LIBDIR}/libssl.so.3");
        let inspection = inspect(&path);
        let t = target(&inspection);
        assert_eq!(names(t), OPENSSL_INTERNAL_HOOKS);
        // Both wrappers of each family call the function hooked, as objdump
        // disassembles them.
        let nm = nm_dynamic(&path);
        let loads = Loads::of(&path);
        let bytes = std::fs::read(&path).unwrap();
        for (internal, wrappers) in internal_functions::FAMILIES {
            let offset = t.offset_of(internal).unwrap();
            for wrapper in wrappers {
                let callee = objdump_first_call(&path, nm_address(&nm, wrapper));
                assert_eq!(loads.file_offset(callee), offset, "{wrapper} -> {internal}");
            }
            // `push %r12..%r15` (41 54..57) or `push %rbx/%rbp` (53/55).
            let first = &bytes[offset as usize..offset as usize + 2];
            assert!(
                matches!(first, [0x41, 0x54..=0x57] | [0x53 | 0x55, _]),
                "{internal}: {first:02x?}"
            );
        }
        let exported = inspect_exported(&path);
        assert_eq!(
            t.offset_of("SSL_do_handshake"),
            target(&exported).offset_of("SSL_do_handshake")
        );
    }

    #[test]
    fn libgnutls_is_gnutls() {
        let path = format!("{LIBDIR}/libgnutls.so.30");
        let inspection = inspect(&path);
        let t = target(&inspection);
        assert_eq!(t.kind, TlsLibraryKind::GnuTls);
        let names: Vec<&str> = t.symbols.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, GNUTLS_SYMBOLS);
        let expected = readelf_offsets(&path);
        for (name, offset) in &t.symbols {
            assert_eq!(Some(offset), expected.get(*name), "{name}");
        }
    }

    #[test]
    fn node_executable_is_openssl() {
        let path = "/usr/bin/node";
        if !Path::new(path).exists() {
            eprintln!("skipping: {path} not installed");
            return;
        }
        let inspection = inspect(path);
        let t = target(&inspection);
        assert_eq!(t.kind, TlsLibraryKind::OpenSsl);
        // Node's SSL_read inlines ssl_read_internal and starts with `push`:
        // not a thin wrapper, so the exported functions are hooked.
        assert_eq!(names(t), OPENSSL_SYMBOLS);
        let expected = readelf_offsets(path);
        for (name, offset) in &t.symbols {
            assert_eq!(Some(offset), expected.get(*name), "{name}");
        }
    }

    #[test]
    fn libc_is_not_tls() {
        assert_eq!(inspect(&format!("{LIBDIR}/libc.so.6")), Inspection::NotTls);
    }

    #[test]
    fn ssl_consumer_module_is_not_tls() {
        // curl imports SSL_read from libssl: it is a consumer, not a library.
        assert_eq!(inspect("/usr/bin/curl"), Inspection::NotTls);
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("periscope-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn expect_not_visible(path: &Path) -> String {
        match inspect(path.to_str().unwrap()) {
            Inspection::NotVisible {
                display_path,
                reason,
            } => {
                assert_eq!(display_path, path.to_str().unwrap());
                reason
            }
            other => panic!("expected NotVisible for {}, got {other:?}", path.display()),
        }
    }

    #[test]
    fn symbolless_elf_named_libssl_is_not_visible() {
        use object::write;
        let mut obj = write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let text = obj.section_id(write::StandardSection::Text);
        obj.append_section_data(text, &[0xc3; 64], 16);
        let bytes = obj.write().unwrap();
        let dir = scratch_dir("nosyms");
        let path = dir.join("libssl.so.3");
        std::fs::write(&path, &bytes).unwrap();
        let reason = expect_not_visible(&path);
        assert!(reason.contains("no OpenSSL or GnuTLS"), "{reason}");
        // The same file under a neutral name is simply not TLS.
        let other = dir.join("libfoo.so.1");
        std::fs::write(&other, &bytes).unwrap();
        assert_eq!(inspect(other.to_str().unwrap()), Inspection::NotTls);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An x86-64 ELF object whose .text is `text`, with global functions
    /// `symbols` at the given offsets into it.
    fn elf_with_text(text: &[u8], symbols: &[(&str, u64)]) -> Vec<u8> {
        use object::write;
        let mut obj = write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let section = obj.section_id(write::StandardSection::Text);
        let at = obj.append_section_data(section, text, 16);
        for &(name, offset) in symbols {
            obj.add_symbol(write::Symbol {
                name: name.as_bytes().to_vec(),
                value: at + offset,
                size: 1,
                kind: SymbolKind::Text,
                scope: object::SymbolScope::Dynamic,
                weak: false,
                section: write::SymbolSection::Section(section),
                flags: object::SymbolFlags::None,
            });
        }
        obj.write().unwrap()
    }

    #[test]
    fn partial_tls_symbols_are_not_visible() {
        let dir = scratch_dir("partial");
        let path = dir.join("myserver");
        std::fs::write(&path, elf_with_text(&[0xc3; 64], &[("SSL_read", 0)])).unwrap();
        let reason = expect_not_visible(&path);
        assert!(reason.contains("SSL_read"), "{reason}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_and_truncated_files_named_libssl_are_not_visible() {
        let dir = scratch_dir("garbage");
        let garbage = dir.join("libssl.so.3");
        std::fs::write(&garbage, b"this is not an ELF file at all\n".repeat(100)).unwrap();
        expect_not_visible(&garbage);

        let real = std::fs::read(format!("{LIBDIR}/libssl.so.3")).unwrap();
        for len in [0, 3, 4, 16, 64, 100, 4096, real.len() / 2] {
            let truncated = dir.join(format!("{len}")).join("libssl.so.3");
            std::fs::create_dir_all(truncated.parent().unwrap()).unwrap();
            std::fs::write(&truncated, &real[..len]).unwrap();
            // Must not panic; whatever is left is at most partially usable.
            let _ = inspect(truncated.to_str().unwrap());
        }
        // A header that lies about its tables.
        let mut corrupt = real.clone();
        for b in &mut corrupt[0x20..0x40] {
            *b = 0xff;
        }
        let corrupt_path = dir.join("corrupt").join("libssl.so.3");
        std::fs::create_dir_all(corrupt_path.parent().unwrap()).unwrap();
        std::fs::write(&corrupt_path, &corrupt).unwrap();
        let _ = inspect(corrupt_path.to_str().unwrap());

        let missing = dir.join("missing").join("libssl.so.3");
        let reason = expect_not_visible(&missing);
        assert!(reason.contains("cannot open"), "{reason}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An OpenSSL look-alike in 32-byte slots: `SSL_read`, `SSL_read_ex`,
    /// `SSL_write`, `SSL_write_ex`, `SSL_do_handshake`, then two functions.
    /// Each wrapper is `prologue`, a `call` to the slot its family names
    /// (none if `None`), `ret`; the two functions start with `read_first` and
    /// `write_first`.
    struct Fixture {
        prologue: &'static [u8],
        read_callee: Option<u64>,
        write_callee: Option<u64>,
        read_first: &'static [u8],
        write_first: &'static [u8],
        /// Define SSL_read_ex and SSL_write_ex too.
        with_ex: bool,
    }

    const SLOT: u64 = 32;
    /// `sub $0x8,%rsp`: what Debian's wrappers start with.
    const SUB_RSP: &[u8] = &[0x48, 0x83, 0xec, 0x08];
    const PUSH_R13: &[u8] = &[0x41, 0x55];
    const PUSH_RBP: &[u8] = &[0x55];

    impl Fixture {
        fn thin() -> Fixture {
            Fixture {
                prologue: SUB_RSP,
                read_callee: Some(5),
                write_callee: Some(6),
                read_first: PUSH_R13,
                write_first: PUSH_RBP,
                with_ex: true,
            }
        }

        fn thin_with(change: impl FnOnce(&mut Fixture)) -> Fixture {
            let mut f = Fixture::thin();
            change(&mut f);
            f
        }

        fn wrapper(&self, slot: u64, callee: Option<u64>) -> Vec<u8> {
            let mut code = self.prologue.to_vec();
            if let Some(callee) = callee {
                let next = slot * SLOT + code.len() as u64 + 5;
                let rel = (callee * SLOT) as i64 - next as i64;
                code.push(0xe8);
                code.extend_from_slice(&(rel as i32).to_le_bytes());
            }
            code.push(0xc3);
            code
        }

        fn elf(&self) -> Vec<u8> {
            let bodies = [
                self.wrapper(0, self.read_callee),
                self.wrapper(1, self.read_callee),
                self.wrapper(2, self.write_callee),
                self.wrapper(3, self.write_callee),
                vec![0xc3],
                [self.read_first, &[0xc3]].concat(),
                [self.write_first, &[0xc3]].concat(),
            ];
            let mut text = vec![0xcc; bodies.len() * SLOT as usize];
            for (i, body) in bodies.iter().enumerate() {
                let at = i * SLOT as usize;
                text[at..at + body.len()].copy_from_slice(body);
            }
            let names = [
                "SSL_read",
                "SSL_read_ex",
                "SSL_write",
                "SSL_write_ex",
                "SSL_do_handshake",
            ];
            let symbols: Vec<(&str, u64)> = (0u64..)
                .zip(names)
                .filter(|(_, name)| self.with_ex || !name.ends_with("_ex"))
                .map(|(slot, name)| (name, slot * SLOT))
                .collect();
            elf_with_text(&text, &symbols)
        }
    }

    /// Where the uprobes go in an in-memory ELF (no file).
    fn placed(bytes: &[u8]) -> Vec<(&'static str, u64)> {
        let elf = object::File::parse(bytes).unwrap();
        let defined = find_symbols(&elf).defined;
        hook_points(
            &elf,
            bytes,
            "fixture",
            TlsLibraryKind::OpenSsl,
            &defined,
            Placement::Internal,
        )
    }

    fn placed_names(bytes: &[u8]) -> Vec<&'static str> {
        placed(bytes).into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn thin_wrappers_lead_to_internal_functions() {
        let placed = placed(&Fixture::thin().elf());
        let hooked: Vec<&str> = placed.iter().map(|(n, _)| *n).collect();
        assert_eq!(hooked, OPENSSL_INTERNAL_HOOKS);
        // Slots 5 and 6, counted from SSL_read's slot 0.
        let bytes = Fixture::thin().elf();
        let elf = object::File::parse(&*bytes).unwrap();
        let ssl_read = find_symbols(&elf).defined["SSL_read"];
        assert_eq!(placed[0].1, ssl_read + 5 * SLOT);
        assert_eq!(placed[1].1, ssl_read + 6 * SLOT);
        // Through a file, and with the old placement forced.
        let dir = scratch_dir("thin");
        let path = dir.join("libssl.so.3");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            names(target(&inspect(path.to_str().unwrap()))),
            OPENSSL_INTERNAL_HOOKS
        );
        assert_eq!(
            names(target(&inspect_exported(path.to_str().unwrap()))),
            OPENSSL_SYMBOLS
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_wrapper_per_family_is_enough() {
        let f = Fixture::thin_with(|f| f.with_ex = false);
        assert_eq!(placed_names(&f.elf()), OPENSSL_INTERNAL_HOOKS);
    }

    #[test]
    fn unfollowable_wrappers_fall_back_to_exported_symbols() {
        let endbr64 = &[0xf3, 0x0f, 0x1e, 0xfa];
        // REX.W+B push r13: the kernel emulates only the 0x41 prefix.
        let push_r13_rex_w = &[0x49, 0x55];
        let cases = [
            (
                "wrappers without a call",
                Fixture::thin_with(|f| f.read_callee = None),
            ),
            (
                "a target starting with `sub`",
                Fixture::thin_with(|f| f.read_first = SUB_RSP),
            ),
            (
                "a target starting with endbr64",
                Fixture::thin_with(|f| f.write_first = endbr64),
            ),
            (
                "a target starting with `49 55`",
                Fixture::thin_with(|f| f.read_first = push_r13_rex_w),
            ),
            (
                "wrappers starting with `push` (inlined, as in Node)",
                Fixture::thin_with(|f| f.prologue = PUSH_RBP),
            ),
            (
                "read and write calling one function",
                Fixture::thin_with(|f| f.write_callee = Some(5)),
            ),
            (
                "a target outside the executable sections",
                Fixture::thin_with(|f| f.read_callee = Some(1000)),
            ),
            (
                "a target starting with `ret`",
                Fixture::thin_with(|f| f.read_callee = Some(4)),
            ),
        ];
        for (what, fixture) in cases {
            assert_eq!(placed_names(&fixture.elf()), OPENSSL_SYMBOLS, "{what}");
        }
    }

    #[test]
    fn wrappers_of_one_family_calling_different_functions_fall_back() {
        let mut bytes = Fixture::thin().elf();
        let elf = object::File::parse(&*bytes).unwrap();
        let read_ex = find_symbols(&elf).defined["SSL_read_ex"] as usize;
        // SSL_read_ex's call (after the 4-byte prologue) to slot 6 instead of 5.
        let rel =
            i32::from_le_bytes(bytes[read_ex + 5..read_ex + 9].try_into().unwrap()) + SLOT as i32;
        bytes[read_ex + 5..read_ex + 9].copy_from_slice(&rel.to_le_bytes());
        assert_eq!(placed_names(&bytes), OPENSSL_SYMBOLS);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Garbage where the wrappers' and internal functions' code should
        /// be never panics, and whatever is hooked lies inside the file.
        #[test]
        fn garbage_code_never_panics(
            text in proptest::collection::vec(proptest::prelude::any::<u8>(), 7 * SLOT as usize),
            calls in proptest::collection::vec((0u64..4, 0u64..7 * SLOT), 0..4),
        ) {
            let mut text = text;
            // Plant well-formed calls often enough that targets get checked.
            for (slot, target) in calls {
                let at = (slot * SLOT) as usize + 4;
                let rel = target as i64 - (at as i64 + 5);
                text[at] = 0xe8;
                text[at + 1..at + 5].copy_from_slice(&(rel as i32).to_le_bytes());
            }
            let names = ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_do_handshake"];
            let symbols: Vec<(&str, u64)> = (0u64..).zip(names).map(|(slot, n)| (n, slot * SLOT)).collect();
            let bytes = elf_with_text(&text, &symbols);
            for (_, offset) in placed(&bytes) {
                proptest::prop_assert!(offset < bytes.len() as u64);
            }
        }
    }

    #[test]
    fn versioned_names_match() {
        assert_eq!(wanted_symbol(b"SSL_read@@OPENSSL_3.0.0"), Some("SSL_read"));
        assert_eq!(
            wanted_symbol(b"SSL_read_ex@OPENSSL_1_1_1"),
            Some("SSL_read_ex")
        );
        assert_eq!(
            wanted_symbol(b"gnutls_record_recv@GNUTLS_3_4"),
            Some("gnutls_record_recv")
        );
        assert_eq!(wanted_symbol(b"SSL_reader"), None);
        assert_eq!(wanted_symbol(b"memcpy"), None);
        assert_eq!(wanted_symbol(b""), None);
    }

    fn has_libssl(found: &[Arc<Inspection>]) -> bool {
        found.iter().any(|i| {
            matches!(&**i, Inspection::Tls(t) if t.kind == TlsLibraryKind::OpenSsl
                && t.display_path.ends_with("libssl.so.3")
                && t.attach_path.exists())
        })
    }

    #[test]
    fn scans_a_python_process_mapping_libssl() {
        let mut child = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import ssl,sys,time; print('ready', flush=True); time.sleep(5)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        let mut scanner = TlsLibraryScanner::new("/proc");
        let found = scanner.scan_process(child.id());
        let inspected = scanner.files_inspected();
        // A second scan reuses every cached inspection.
        let again = scanner.scan_process(child.id());
        let libssl_seen = found.as_ref().is_ok_and(|found| has_libssl(found));
        child.kill().unwrap();
        child.wait().unwrap();
        let found = found.unwrap();
        assert!(libssl_seen, "{found:?}");
        // Python's _ssl module imports SSL_read_ex & co.: a consumer, not reported.
        assert_eq!(found.len(), 1, "{found:?}");
        let t = found
            .iter()
            .find_map(|i| match &**i {
                Inspection::Tls(t) => Some(t),
                _ => None,
            })
            .unwrap();
        assert!(
            t.attach_path
                .starts_with(format!("/proc/{}/root/", child.id())),
            "{:?}",
            t.attach_path
        );
        assert_eq!(names(t), OPENSSL_INTERNAL_HOOKS);
        assert!(t.file.inode != 0 && t.file.dev != 0);
        let again = again.unwrap();
        assert_eq!(scanner.files_inspected(), inspected);
        assert!(found.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)));
    }

    #[test]
    fn scans_own_process_after_loading_libssl() {
        // Map libssl into this very process, as a program using it would.
        let handle =
            unsafe { libc::dlopen(c"libssl.so.3".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen libssl.so.3");
        let mut scanner = TlsLibraryScanner::new("/proc");
        let found = scanner
            .scan_process(std::process::id())
            .expect("own process scans");
        assert!(has_libssl(&found), "{found:?}");
        assert!(found.iter().all(|i| !matches!(**i, Inspection::NotTls)));
        assert!(
            scanner.files_inspected() >= 3,
            "the test binary, libc and libssl at least"
        );
    }

    #[test]
    fn file_id_matches_stat() {
        use std::os::unix::fs::MetadataExt;
        let mut scanner = TlsLibraryScanner::new("/proc");
        scanner.scan_process(std::process::id()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let meta = std::fs::metadata(&exe).unwrap();
        let id = FileId {
            dev: meta.dev(),
            inode: meta.ino(),
        };
        assert!(
            scanner.cache.contains_key(&id),
            "{id:?} not in {:?}",
            scanner.cache.keys()
        );
    }

    #[test]
    fn missing_pid_is_an_error() {
        let mut scanner = TlsLibraryScanner::new("/proc");
        let err = scanner.scan_process(u32::MAX - 1).unwrap_err();
        assert!(matches!(err, ScanError::ProcessGone { .. }), "{err}");
        let mut scanner = TlsLibraryScanner::new("/nonexistent-proc");
        assert!(scanner.scan_process(1).is_err());
        assert!(scanner.all_pids().is_empty());
    }

    #[test]
    fn all_pids_lists_self() {
        let scanner = TlsLibraryScanner::new("/proc");
        let pids = scanner.all_pids();
        assert!(pids.contains(&std::process::id()));
        assert!(pids.contains(&1));
    }
}
