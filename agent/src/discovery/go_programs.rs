//! Go programs: which executables are Go, which of their functions the Go
//! uprobes go on (entries and `RET` sites), and the struct offsets those
//! programs read. Each executable file is inspected once; every process
//! running it then gets its offsets.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use periscope_ebpf::GoProcess;

use super::go_binary::{self, GoBinary};
use super::go_offsets::{self, OffsetsSource};
use super::tls_libraries::FileId;

/// How a Go function is hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoHookKind {
    /// A program at the entry only.
    Entry(&'static str),
    /// A program at the entry and one at every `RET`.
    EntryAndReturns(&'static str, &'static str),
    /// A program at the entry, and one on the function's only call to
    /// `runtime.memmove` (the copy of the result), or else at every `RET`:
    /// (entry, copy, return).
    EntryAndCopy(&'static str, &'static str, &'static str),
}

/// The Go functions hooked, and how. Read and Write are required; the rest
/// add handshake timing and client-call parents where the binary has them.
pub const GO_FUNCTIONS: &[(&str, GoHookKind)] = &[
    (
        "crypto/tls.(*Conn).Write",
        GoHookKind::Entry("go_tls_write"),
    ),
    (
        "crypto/tls.(*Conn).Read",
        GoHookKind::EntryAndCopy("go_tls_read", "go_tls_read_copy", "go_tls_read_ret"),
    ),
    (
        "crypto/tls.(*Conn).clientHandshake",
        GoHookKind::EntryAndReturns("go_tls_handshake", "go_tls_handshake_ret"),
    ),
    (
        "crypto/tls.(*Conn).serverHandshake",
        GoHookKind::EntryAndReturns("go_tls_handshake", "go_tls_handshake_ret"),
    ),
    (
        "net/http.(*Transport).roundTrip",
        GoHookKind::Entry("go_http_round_trip"),
    ),
    (
        "net/http.(*Request).write",
        GoHookKind::Entry("go_http1_write_request"),
    ),
    // Which goroutine a plain socket's read or write belongs to.
    ("syscall.read", GoHookKind::Entry("go_syscall_read")),
    ("syscall.write", GoHookKind::Entry("go_syscall_write")),
    // The goroutine that writes an HTTP/2 request (Go 1.27 moved the code
    // into its own package; both take the *Request second).
    (
        "net/http.(*http2clientStream).doRequest",
        GoHookKind::Entry("go_http2_write_request"),
    ),
    (
        "net/http/internal/http2.(*clientStream).doRequest",
        GoHookKind::Entry("go_http2_write_request"),
    ),
];

const REQUIRED: &[&str] = &["crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"];

/// grpc-go's transport functions whose header blocks the grpc probes read
/// (see `agent-ebpf/src/kernel/go_grpc.rs`).
pub const GRPC_FUNCTIONS: &[(&str, GoHookKind)] = &[
    (
        "google.golang.org/grpc/internal/transport.(*loopyWriter).writeHeader",
        GoHookKind::Entry("go_grpc_write_header"),
    ),
    (
        "google.golang.org/grpc/internal/transport.(*http2Server).operateHeaders",
        GoHookKind::Entry("go_grpc_server_headers"),
    ),
    (
        "google.golang.org/grpc/internal/transport.(*http2Client).operateHeaders",
        GoHookKind::Entry("go_grpc_client_headers"),
    ),
];

/// The grpc-go release whose server `operateHeaders` takes a context first.
const GRPC_CONTEXT_FIRST_MINOR: u32 = 60;

/// What the grpc probes do in a Go program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrpcSupport {
    /// The program does not link grpc-go's transport.
    Absent,
    Hooked {
        version: String,
        offsets_source: OffsetsSource,
    },
    /// grpc-go is there but not hooked, and why: its calls are still read
    /// from the bytes, where HPACK allows.
    NotVisible { version: String, reason: String },
}

/// Looked up, not hooked: where [`GoHookKind::EntryAndCopy`]'s copies go.
const MEMMOVE: &str = "runtime.memmove";

/// The oldest Go whose functions take their arguments in registers (amd64).
const MIN_REGISTER_ABI_MINOR: u32 = 17;

/// A uprobe site in a Go executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoHook {
    pub function: &'static str,
    pub program: &'static str,
    /// File offset of the instruction the program goes on.
    pub offset: u64,
}

/// A Go executable whose crypto/tls can be hooked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoTarget {
    pub file: FileId,
    pub attach_path: PathBuf,
    pub display_path: String,
    pub go_version: String,
    pub offsets: GoProcess,
    pub offsets_source: OffsetsSource,
    pub hooks: Vec<GoHook>,
    /// Functions found, for status.
    pub functions: Vec<&'static str>,
    pub grpc: GrpcSupport,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GoInspection {
    NotGo,
    Go(Arc<GoTarget>),
    /// A Go program without crypto/tls: nothing to hook, but its goroutines
    /// move between threads all the same.
    GoWithoutTls,
    /// A Go program whose TLS cannot be seen, and why.
    NotVisible {
        display_path: String,
        go_version: String,
        reason: String,
    },
}

/// Finds Go executables among processes; each file is inspected once.
pub struct GoScanner {
    proc_root: PathBuf,
    cache: HashMap<FileId, GoInspection>,
}

impl GoScanner {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
        }
    }

    /// What `pid` runs, and whether this is the first time the file is seen.
    pub fn scan_process(&mut self, pid: u32) -> Option<(GoInspection, bool)> {
        let pid_dir = self.proc_root.join(pid.to_string());
        let exe_link = pid_dir.join("exe");
        let meta = std::fs::metadata(&exe_link).ok()?;
        let file = FileId {
            dev: meta.dev(),
            inode: meta.ino(),
        };
        if let Some(cached) = self.cache.get(&file) {
            return Some((cached.clone(), false));
        }
        let display = std::fs::read_link(&exe_link).ok()?;
        let display_path = display.to_string_lossy().into_owned();
        let inspection = if display_path.ends_with(" (deleted)") {
            GoInspection::NotGo
        } else {
            let relative = display.strip_prefix("/").unwrap_or(&display);
            inspect_file(&pid_dir.join("root").join(relative), &display_path, file)
        };
        self.cache.insert(file, inspection.clone());
        Some((inspection, true))
    }
}

/// Inspects one executable: `attach_path` is opened, `display_path` is what
/// reports show.
pub fn inspect_file(attach_path: &Path, display_path: &str, file: FileId) -> GoInspection {
    let data = match File::open(attach_path) {
        // SAFETY: read-only private map, dropped after parsing; executables
        // are replaced by rename, not rewritten in place.
        Ok(f) => match unsafe { memmap2::Mmap::map(&f) } {
            Ok(map) => map,
            Err(_) => return GoInspection::NotGo,
        },
        Err(_) => return GoInspection::NotGo,
    };
    let binary = match go_binary::inspect(&data) {
        Ok(Some(binary)) => binary,
        Ok(None) => return GoInspection::NotGo,
        Err(e) => {
            return GoInspection::NotVisible {
                display_path: display_path.into(),
                go_version: "unknown".into(),
                reason: format!("unreadable Go executable: {e}"),
            };
        }
    };
    match go_target(&data, &binary, attach_path, display_path, file) {
        Ok(Some(target)) => GoInspection::Go(Arc::new(target)),
        Ok(None) => GoInspection::GoWithoutTls,
        Err(reason) => GoInspection::NotVisible {
            display_path: display_path.into(),
            go_version: binary.go_version.clone(),
            reason,
        },
    }
}

/// Where a function's entry probe goes: on the conditional jump of Go's
/// stack check (`cmp rsp, [r14+16]; jbe morestack`, or with `lea r12, ...`
/// first for a large frame) when the function starts with one. The kernel
/// emulates a conditional jump but single-steps a `cmp` with a memory
/// operand, a trap that costs tens of microseconds on a virtual machine;
/// the arguments are still untouched there. Else the entry itself.
fn entry_probe_offset(data: &[u8], entry: u64) -> u64 {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, Register};
    let Some(code) = usize::try_from(entry).ok().and_then(|at| data.get(at..)) else {
        return entry;
    };
    let code = &code[..code.len().min(32)];
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    for _ in 0..3 {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        match insn.mnemonic() {
            Mnemonic::Cmp => continue,
            Mnemonic::Lea if matches!(insn.op0_register(), Register::R12 | Register::R13) => {
                continue;
            }
            _ if insn.flow_control() == FlowControl::ConditionalBranch => return entry + insn.ip(),
            _ => break,
        }
    }
    entry
}

/// `go1.21.13` -> 21.
pub fn go_minor(version: &str) -> Option<u32> {
    let rest = version.strip_prefix("go1.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Ok(None): a Go program without crypto/tls (nothing to hook).
fn go_target(
    data: &[u8],
    binary: &GoBinary,
    attach_path: &Path,
    display_path: &str,
    file: FileId,
) -> Result<Option<GoTarget>, String> {
    let names: Vec<&str> = GO_FUNCTIONS
        .iter()
        .chain(GRPC_FUNCTIONS)
        .map(|(name, _)| *name)
        .chain([MEMMOVE])
        .collect();
    let found = go_binary::find_functions(data, &names)?;
    let memmove = found
        .iter()
        .find(|f| f.name == MEMMOVE)
        .map(|f| f.entry_offset);
    let has = |name: &str| found.iter().any(|f| f.name == name);
    if !REQUIRED.iter().any(|name| has(name)) {
        return Ok(None);
    }
    if let Some(missing) = REQUIRED.iter().find(|name| !has(name)) {
        return Err(format!("{missing} not found"));
    }
    match go_minor(&binary.go_version) {
        Some(minor) if minor >= MIN_REGISTER_ABI_MINOR => {}
        Some(_) => {
            return Err(format!(
                "{}: Go before 1.17 passes arguments on the stack, which the Go uprobes do not read",
                binary.go_version
            ));
        }
        None => return Err(format!("unknown Go version {:?}", binary.go_version)),
    }
    let (offsets, offsets_source) = go_offsets::offsets_for(data, &binary.go_version)?;
    let mut kernel_offsets = GoProcess {
        g_goid: offsets.g_goid,
        tls_conn_conn: offsets.tls_conn_conn,
        net_conn_fd: offsets.net_conn_fd,
        netfd_pfd: offsets.netfd_pfd,
        pfd_sysfd: offsets.pfd_sysfd,
        ..Default::default()
    };
    let has_grpc = GRPC_FUNCTIONS.iter().any(|(name, _)| has(name));
    let grpc = if has_grpc {
        grpc_support(data, binary, &mut kernel_offsets)
    } else {
        GrpcSupport::Absent
    };
    let hooked_functions: Vec<(&str, GoHookKind)> = match grpc {
        GrpcSupport::Hooked { .. } => GO_FUNCTIONS.iter().chain(GRPC_FUNCTIONS).copied().collect(),
        _ => GO_FUNCTIONS.to_vec(),
    };
    let mut hooks = Vec::new();
    let mut functions = Vec::new();
    for function in &found {
        let Some(&(name, kind)) = hooked_functions.iter().find(|(n, _)| *n == function.name) else {
            continue;
        };
        let entry_offset = entry_probe_offset(data, function.entry_offset);
        let at = |program, offset| GoHook {
            function: name,
            program,
            offset,
        };
        let returns = |program| {
            function
                .return_offsets
                .iter()
                .map(move |&offset| at(program, offset))
        };
        match kind {
            GoHookKind::Entry(program) => hooks.push(at(program, entry_offset)),
            GoHookKind::EntryAndReturns(entry, ret) => {
                if function.return_offsets.is_empty() {
                    return Err(format!("{name}: no RET instruction found"));
                }
                hooks.push(at(entry, entry_offset));
                hooks.extend(returns(ret));
            }
            GoHookKind::EntryAndCopy(entry, copy, ret) => {
                hooks.push(at(entry, entry_offset));
                let copies: Vec<u64> = function
                    .call_offsets
                    .iter()
                    .filter(|(_, to)| Some(*to) == memmove)
                    .map(|(at, _)| *at)
                    .collect();
                match copies[..] {
                    // A direct call is emulated by the kernel; a RET is
                    // single-stepped, which costs far more.
                    [copy_at] => hooks.push(at(copy, copy_at)),
                    _ if function.return_offsets.is_empty() => {
                        return Err(format!(
                            "{name}: no single copy and no RET instruction found"
                        ));
                    }
                    _ => hooks.extend(returns(ret)),
                }
            }
        }
        functions.push(name);
    }
    Ok(Some(GoTarget {
        file,
        attach_path: attach_path.to_path_buf(),
        display_path: display_path.to_string(),
        go_version: binary.go_version.clone(),
        offsets: kernel_offsets,
        offsets_source,
        hooks,
        functions,
        grpc,
    }))
}

/// Whether grpc-go's probes can read this program, filling their offsets
/// into `kernel` when they can. Its version gates the argument layout; a
/// version that cannot be read is said, never guessed.
fn grpc_support(data: &[u8], binary: &GoBinary, kernel: &mut GoProcess) -> GrpcSupport {
    let Some(version) = grpc_version(data, binary) else {
        return GrpcSupport::NotVisible {
            version: "unknown".into(),
            reason: "grpc-go's version is neither in the build info nor in its user agent".into(),
        };
    };
    let not_visible = |reason: String| GrpcSupport::NotVisible {
        version: version.clone(),
        reason,
    };
    let Some(minor) = grpc_minor(&version) else {
        return not_visible(format!("unreadable grpc-go version {version:?}"));
    };
    let (offsets, offsets_source) = match go_offsets::grpc_offsets_for(data, &version) {
        Ok(found) => found,
        Err(reason) => return not_visible(reason),
    };
    kernel.grpc_server_frame_arg = if minor < GRPC_CONTEXT_FIRST_MINOR {
        periscope_ebpf::grpc_frame_arg::RBX
    } else {
        periscope_ebpf::grpc_frame_arg::RDI
    };
    kernel.meta_headers_frame = offsets.meta_headers_frame;
    kernel.meta_fields = offsets.meta_fields;
    kernel.headers_stream_id = offsets.headers_frame_header + offsets.frame_header_stream_id;
    kernel.header_field_value = offsets.header_field_value;
    kernel.header_field_size = offsets.header_field_size();
    GrpcSupport::Hooked {
        version,
        offsets_source,
    }
}

/// grpc-go's version (`v1.33.3`): from the build info's modules, else (a
/// GOPATH build has none) from its user agent `grpc-go/1.33.3`, which the
/// client transport carries.
pub fn grpc_version(data: &[u8], binary: &GoBinary) -> Option<String> {
    if let Some((_, version)) = binary
        .modules
        .iter()
        .find(|(path, _)| path == "google.golang.org/grpc")
    {
        return Some(version.clone());
    }
    const USER_AGENT: &[u8] = b"grpc-go/1.";
    let at = memchr::memmem::find(data, USER_AGENT)? + USER_AGENT.len() - 2;
    let rest = &data[at..];
    let n = rest
        .iter()
        .take(24)
        .take_while(|b| b.is_ascii_digit() || **b == b'.')
        .count();
    let version = std::str::from_utf8(&rest[..n]).ok()?.trim_end_matches('.');
    Some(format!("v{version}"))
}

/// `v1.33.3` -> 33.
fn grpc_minor(version: &str) -> Option<u32> {
    let rest = version.strip_prefix("v1.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_probes_go_on_the_stack_checks_jump() {
        // go1.27 crypto/tls.(*Conn).Read: cmp rsp,[r14+0x10]; jbe ...; push rbp
        let small = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x51, 0x03, 0x00, 0x00, 0x55,
        ];
        assert_eq!(entry_probe_offset(&small, 0), 4);
        // go1.19 (*Conn).Write: lea r12,[rsp-0x68]; cmp r12,[r14+0x10]; jbe ...
        let mut large = vec![0u8; 16];
        large.extend([
            0x4c, 0x8d, 0x64, 0x24, 0x98, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x64, 0x07, 0x00,
            0x00,
        ]);
        assert_eq!(entry_probe_offset(&large, 16), 16 + 9);
        // No stack check (a NOSPLIT function): the entry.
        let leaf = [0x48, 0x89, 0xc3, 0xc3];
        assert_eq!(entry_probe_offset(&leaf, 0), 0);
        assert_eq!(entry_probe_offset(&leaf, 100), 100);
    }

    #[test]
    fn grpc_versions_from_modules_else_the_user_agent() {
        let mut binary = GoBinary {
            go_version: "go1.24.11".into(),
            modules: vec![
                ("example.com/app".into(), "(devel)".into()),
                ("google.golang.org/grpc".into(), "v1.60.1".into()),
            ],
            main_module: Some("example.com/app".into()),
            stripped: true,
            pie: false,
        };
        let data = b"...\x00grpc-go/1.33.3\x00...";
        assert_eq!(grpc_version(data, &binary).as_deref(), Some("v1.60.1"));
        binary.modules.clear();
        assert_eq!(grpc_version(data, &binary).as_deref(), Some("v1.33.3"));
        assert_eq!(grpc_version(b"grpc-go/1.", &binary).as_deref(), Some("v1"));
        assert_eq!(grpc_version(b"no user agent", &binary), None);
        assert_eq!(grpc_minor("v1.33.3"), Some(33));
        assert_eq!(grpc_minor("v1.60.0-dev"), Some(60));
        assert_eq!(grpc_minor("v1"), None);
        assert_eq!(grpc_minor("(devel)"), None);
    }

    /// grpc-go 1.33 from Debian, built in GOPATH mode (no module versions):
    /// its version comes from the user agent, its offsets from the DWARF or,
    /// stripped, from the table, which must say what the DWARF says.
    #[test]
    fn grpc_go_is_hooked_with_or_without_dwarf() {
        use periscope_tests::go::{Variant, build_grpcgo_as, toolchain};
        let go = toolchain("go1.19").unwrap_or_else(|e| panic!("{e:#}"));
        let mut from_dwarf = None;
        for (variant, source) in [
            (Variant::Symbols, OffsetsSource::Dwarf),
            (Variant::Stripped, OffsetsSource::Table),
        ] {
            let path = build_grpcgo_as(&go, variant).unwrap_or_else(|e| panic!("{e:#}"));
            let data = std::fs::read(&path).expect("built");
            let GoInspection::Go(target) =
                inspect_file(&path, "grpcgo", FileId { dev: 1, inode: 1 })
            else {
                panic!("{variant:?}: not hooked");
            };
            assert_eq!(
                target.grpc,
                GrpcSupport::Hooked {
                    version: "v1.33.3".into(),
                    offsets_source: source
                },
                "{variant:?}"
            );
            for (function, _) in GRPC_FUNCTIONS {
                assert!(target.functions.contains(function), "{variant:?}: {function}");
            }
            let o = target.offsets;
            assert_eq!(o.grpc_server_frame_arg, periscope_ebpf::grpc_frame_arg::RBX);
            assert_eq!((o.header_field_value, o.header_field_size), (16, 40));
            match variant {
                Variant::Symbols => {
                    from_dwarf = Some(go_offsets::grpc_from_dwarf(&data).expect("DWARF"))
                }
                _ => assert_eq!(
                    go_offsets::grpc_offsets_for(&data, "v1.33.3"),
                    Ok((from_dwarf.expect("symbols first"), OffsetsSource::Table)),
                    "the table entry for grpc-go 1.33 differs from its DWARF"
                ),
            }
            // An unknown release without DWARF is reported, not probed.
            if variant == Variant::Stripped {
                let err = go_offsets::grpc_offsets_for(&data, "v1.61.0").expect_err("no entry");
                assert!(err.contains("no offsets table entry"), "{err}");
            }
        }
    }

    #[test]
    fn go_minor_versions() {
        assert_eq!(go_minor("go1.21.13"), Some(21));
        assert_eq!(go_minor("go1.19"), Some(19));
        assert_eq!(go_minor("go1.27rc1"), Some(27));
        assert_eq!(go_minor("devel +abc"), None);
    }
}
