//! Real Go programs, built at test time by every toolchain the test rig
//! installs, in each shape the agent meets: with symbols, stripped
//! (`-s -w`), PIE, and a module-mode build. Builds are cached under
//! /tmp (keyed by toolchain, variant and source), the checks always run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use super::*;

const TOOLCHAINS: [&str; 4] = [
    "/usr/lib/go-1.19/bin/go",
    "/opt/periscope-go/go1.21.13/bin/go",
    "/opt/periscope-go/go1.24.11/bin/go",
    "/opt/periscope-go/go1.27.3/bin/go",
];

const CACHE_DIR: &str = "/tmp/periscope-go-binary-tests";

/// Uses crypto/tls's Conn methods as values so the linker keeps them.
const PROGRAM: &str = r#"package main

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
)

func main() {
	var c *tls.Conn
	read, write := (*tls.Conn).Read, (*tls.Conn).Write
	fmt.Println(c == nil, read != nil, write != nil)
	if len(os.Args) > 5 {
		_, _ = http.Get(os.Args[1])
	}
}
"#;

const GO_MOD: &str = "module example.com/demo\n\ngo 1.19\n";

const WANTED: [&str; 3] = [
    "crypto/tls.(*Conn).Read",
    "crypto/tls.(*Conn).Write",
    "runtime.newproc1",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Plain,
    Stripped,
    Pie,
    Module,
}

const VARIANTS: [Variant; 4] = [
    Variant::Plain,
    Variant::Stripped,
    Variant::Pie,
    Variant::Module,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Stripped => "stripped",
            Variant::Pie => "pie",
            Variant::Module => "module",
        }
    }

    fn build_args(self) -> &'static [&'static str] {
        match self {
            Variant::Plain | Variant::Module => &[],
            Variant::Stripped => &["-ldflags=-s -w"],
            Variant::Pie => &["-buildmode=pie"],
        }
    }
}

struct Build {
    /// `go version`'s version: `go1.21.13`.
    go_version: String,
    variant: Variant,
    path: PathBuf,
    data: Vec<u8>,
}

impl Build {
    fn label(&self) -> String {
        format!("{} {}", self.go_version, self.variant.name())
    }
}

fn go_tool(path: &str) -> &str {
    assert!(
        Path::new(path).exists(),
        "Go toolchain {path} is missing: run `cargo xtask setup --test-deps`"
    );
    path
}

fn toolchain_version(go: &str) -> String {
    let out = Command::new(go)
        .arg("version")
        .output()
        .expect("go version");
    assert!(out.status.success(), "{go} version failed");
    let text = String::from_utf8(out.stdout).unwrap();
    // "go version go1.21.13 linux/amd64"
    text.split_whitespace()
        .nth(2)
        .expect("go version output")
        .to_owned()
}

/// Every toolchain's every variant, built once per test process (in
/// parallel), from the cache when a previous run built the same thing.
fn builds() -> &'static [Build] {
    static BUILDS: OnceLock<Vec<Build>> = OnceLock::new();
    BUILDS.get_or_init(|| {
        let toolchains: Vec<(&str, String)> = TOOLCHAINS
            .iter()
            .map(|path| (go_tool(path), toolchain_version(go_tool(path))))
            .collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = toolchains
                .iter()
                .map(|(go, version)| {
                    scope.spawn(move || {
                        VARIANTS
                            .iter()
                            .map(|&variant| build(go, version, variant))
                            .collect::<Vec<Build>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("build thread"))
                .collect()
        })
    })
}

fn build(go: &str, version: &str, variant: Variant) -> Build {
    let key = source_key(variant);
    let dir = Path::new(CACHE_DIR).join(format!("{version}-{}-{key:016x}", variant.name()));
    let output = dir.join("demo");
    if !output.exists() {
        build_into(go, variant, &dir, &output);
    }
    let data = std::fs::read(&output).unwrap();
    Build {
        go_version: version.to_owned(),
        variant,
        path: output,
        data,
    }
}

fn source_key(variant: Variant) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (PROGRAM, GO_MOD, variant.build_args()).hash(&mut hasher);
    hasher.finish()
}

fn build_into(go: &str, variant: Variant, dir: &Path, output: &Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("main.go"), PROGRAM).unwrap();
    let module_mode = variant == Variant::Module;
    if module_mode {
        std::fs::write(src.join("go.mod"), GO_MOD).unwrap();
    }
    // Per process: two test runs may build the same variant at once.
    let partial = dir.join(format!("demo.partial.{}", std::process::id()));
    let mut command = Command::new(go);
    command
        .current_dir(&src)
        .arg("build")
        .args(variant.build_args())
        .arg("-o")
        .arg(&partial)
        .arg(if module_mode { "." } else { "main.go" })
        .env("GO111MODULE", if module_mode { "on" } else { "off" })
        .env("GOPATH", dir.join("gopath"))
        .env("GOCACHE", Path::new(CACHE_DIR).join("gocache"))
        .env("GOFLAGS", if module_mode { "-mod=mod" } else { "" })
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOENV", "off")
        .env("GOWORK", "off");
    let out = command.output().expect("run go build");
    assert!(
        out.status.success(),
        "{go} build ({}) failed: {}",
        variant.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, output).unwrap();
}

/// (virtual address, file offset, file size) of each PT_LOAD, from readelf.
fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = Command::new("readelf")
        .args(["-lW"])
        .arg(path)
        .output()
        .expect("readelf");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .filter(|line| line.trim_start().starts_with("LOAD"))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(fields[2]), hex(fields[1]), hex(fields[4]))
        })
        .collect()
}

/// Symbol addresses from binutils' nm.
fn nm_addresses(path: &Path) -> HashMap<String, u64> {
    let out = Command::new("nm").arg(path).output().expect("nm");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let _kind = fields.next()?;
            Some((fields.next()?.to_owned(), address))
        })
        .collect()
}

fn file_offset_by_readelf(loads: &[(u64, u64, u64)], address: u64) -> u64 {
    loads
        .iter()
        .find(|&&(vaddr, _, size)| vaddr <= address && address < vaddr + size)
        .map(|&(vaddr, offset, _)| offset + (address - vaddr))
        .expect("address inside a PT_LOAD")
}

/// The checks every found function passes, whatever the variant.
fn check_function(build: &Build, function: &GoFunction) {
    let label = format!("{} {}", build.label(), function.name);
    assert!(!function.return_offsets.is_empty(), "{label}: no returns");
    for &ret in &function.return_offsets {
        assert!(ret > function.entry_offset, "{label}: return before entry");
        assert_eq!(
            build.data[ret as usize], 0xc3,
            "{label}: return at {ret:#x}"
        );
    }
    assert!(function.return_offsets.windows(2).all(|w| w[0] < w[1]));
    // Go functions open with the goroutine stack check
    // (`cmp (0x10)(%r14),%rsp`, after a `lea` for big frames) or, before
    // the register ABI (Go < 1.17), a load of g from TLS.
    let start = &build.data[function.entry_offset as usize..][..16];
    let stack_check = [0x49, 0x3b, 0x66, 0x10];
    let big_frame_check = [0x4d, 0x3b, 0x66, 0x10];
    assert!(
        start.starts_with(&stack_check)
            || (start.starts_with(&[0x4c, 0x8d, 0x64, 0x24]) && start[5..9] == big_frame_check)
            || (start.starts_with(&[0x4c, 0x8d, 0xa4, 0x24]) && start[8..12] == big_frame_check),
        "{label}: entry bytes {start:02x?} are no Go function prologue"
    );
}

#[test]
fn build_info_matches_the_toolchain() {
    for build in builds() {
        let label = build.label();
        let info = inspect(&build.data)
            .unwrap()
            .unwrap_or_else(|| panic!("{label}: not Go"));
        assert_eq!(info.go_version, build.go_version, "{label}");
        assert_eq!(info.stripped, build.variant == Variant::Stripped, "{label}");
        assert_eq!(info.pie, build.variant == Variant::Pie, "{label}");
        if build.variant == Variant::Module {
            assert_eq!(
                info.main_module.as_deref(),
                Some("example.com/demo"),
                "{label}"
            );
            assert_eq!(
                info.modules.first().map(|m| m.0.as_str()),
                Some("example.com/demo"),
                "{label}"
            );
        } else {
            assert_eq!(info.main_module, None, "{label}");
            assert!(info.modules.is_empty(), "{label}: {:?}", info.modules);
        }
    }
}

#[test]
fn functions_are_found_in_every_variant() {
    for build in builds() {
        let found = find_functions(&build.data, &WANTED).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, WANTED, "{}", build.label());
        for function in &found {
            check_function(build, function);
        }
    }
}

#[test]
fn symbol_table_and_function_table_agree() {
    for build in builds().iter().filter(|b| b.variant != Variant::Stripped) {
        let from_symbols =
            find_functions_from(&build.data, &WANTED, Lookup::SymbolTableFirst).unwrap();
        let from_table =
            find_functions_from(&build.data, &WANTED, Lookup::FunctionTableOnly).unwrap();
        assert_eq!(from_symbols, from_table, "{}", build.label());
    }
}

#[test]
fn entries_match_binutils() {
    for build in builds().iter().filter(|b| b.variant != Variant::Stripped) {
        let loads = readelf_loads(&build.path);
        let nm = nm_addresses(&build.path);
        for function in find_functions(&build.data, &WANTED).unwrap() {
            let address = nm[&function.name];
            assert_eq!(
                function.entry_offset,
                file_offset_by_readelf(&loads, address),
                "{} {}",
                build.label(),
                function.name
            );
        }
    }
}

/// `-s -w` drops symbols, not code: the stripped build's functions start
/// the same and return at the same places as the unstripped build's.
#[test]
fn stripped_builds_find_the_same_code() {
    let builds = builds();
    for stripped in builds.iter().filter(|b| b.variant == Variant::Stripped) {
        let plain = builds
            .iter()
            .find(|b| b.variant == Variant::Plain && b.go_version == stripped.go_version)
            .unwrap();
        let with_symbols = by_name_owned(find_functions(&plain.data, &WANTED).unwrap());
        for function in find_functions(&stripped.data, &WANTED).unwrap() {
            let reference = &with_symbols[&function.name];
            // Only the start: RIP-relative references to data differ, as
            // the data moved.
            let start =
                |build: &Build, f: &GoFunction| build.data[f.entry_offset as usize..][..8].to_vec();
            assert_eq!(
                start(stripped, &function),
                start(plain, reference),
                "{} {}",
                stripped.label(),
                function.name
            );
            let relative = |f: &GoFunction| -> Vec<u64> {
                f.return_offsets
                    .iter()
                    .map(|r| r - f.entry_offset)
                    .collect()
            };
            assert_eq!(relative(&function), relative(reference));
        }
    }
}

fn by_name_owned(functions: Vec<GoFunction>) -> HashMap<String, GoFunction> {
    functions.into_iter().map(|f| (f.name.clone(), f)).collect()
}

/// Like `sstrip`: no section headers, only segments.
fn without_section_headers(data: &[u8]) -> Vec<u8> {
    let mut copy = data.to_vec();
    copy[0x28..0x30].fill(0); // e_shoff
    copy[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    copy
}

#[test]
fn files_without_section_headers_still_work() {
    for build in builds()
        .iter()
        .filter(|b| b.variant == Variant::Plain || b.variant == Variant::Pie)
    {
        let label = build.label();
        let bare = without_section_headers(&build.data);
        let info = inspect(&bare)
            .unwrap()
            .unwrap_or_else(|| panic!("{label}: not Go"));
        assert_eq!(info.go_version, build.go_version, "{label}");
        assert!(info.stripped, "{label}");
        let expected = find_functions(&build.data, &WANTED).unwrap();
        match find_functions(&bare, &WANTED) {
            Ok(found) => assert_eq!(found, expected, "{label}"),
            Err(e) => panic!("{label}: {e}"),
        }
    }
}

/// Rewrites a Go 1.18+ build info record into the pre-1.18 form (pointers
/// to Go string headers), reusing the inline strings' bytes.
fn with_pointer_build_info(data: &[u8]) -> Vec<u8> {
    let image = Image::parse(data).unwrap().unwrap();
    let (address, _) = image.section(".go.buildinfo").unwrap();
    let offset = image.offset_of(address).unwrap() as usize;
    let mut copy = data.to_vec();
    let varint = |at: usize| buildinfo_varint(&data[at..]);
    let (version_len, used) = varint(offset + 32);
    let version_at = offset + 32 + used;
    let (modinfo_len, used) = varint(version_at + version_len as usize);
    let modinfo_at = version_at + version_len as usize + used;
    let headers_at = (modinfo_at + modinfo_len as usize + 7) & !7;
    let address_of = |file_offset: usize| address + (file_offset - offset) as u64;
    let mut put = |at: usize, value: u64| copy[at..at + 8].copy_from_slice(&value.to_le_bytes());
    put(headers_at, address_of(version_at));
    put(headers_at + 8, version_len);
    put(headers_at + 16, address_of(modinfo_at));
    put(headers_at + 24, modinfo_len);
    put(offset + 16, address_of(headers_at));
    put(offset + 24, address_of(headers_at + 16));
    copy[offset + 15] = 0; // flags: little-endian, pointers
    copy
}

fn buildinfo_varint(bytes: &[u8]) -> (u64, usize) {
    let mut value = 0;
    for (i, &b) in bytes.iter().enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("bad varint")
}

#[test]
fn pre_go118_build_info_is_read() {
    for build in builds()
        .iter()
        .filter(|b| b.variant == Variant::Module || b.variant == Variant::Plain)
    {
        let rewritten = with_pointer_build_info(&build.data);
        assert_ne!(rewritten, build.data);
        assert_eq!(
            inspect(&rewritten).unwrap(),
            inspect(&build.data).unwrap(),
            "{}",
            build.label()
        );
    }
}

#[test]
fn non_go_files_are_not_go() {
    assert_eq!(inspect(b"#!/bin/sh\necho hi\n").unwrap(), None);
    assert_eq!(inspect(b"").unwrap(), None);
    let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(inspect(&own).unwrap(), None);
    assert!(find_functions(&own, &WANTED).is_err());
    assert!(find_functions(b"not elf", &WANTED).is_err());
}

#[test]
fn truncated_and_damaged_go_files_never_panic() {
    let build = &builds()[0];
    for len in [
        0,
        4,
        16,
        64,
        100,
        4096,
        build.data.len() / 3,
        build.data.len() / 2,
        build.data.len() - 1,
    ] {
        let _ = inspect(&build.data[..len]);
        let _ = find_functions(&build.data[..len], &WANTED);
    }
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let bare = without_section_headers(&build.data);
    for _ in 0..20 {
        let mut copy = bare.clone();
        for _ in 0..64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (state >> 20) as usize % copy.len();
            copy[at] = (state >> 8) as u8;
        }
        let _ = inspect(&copy);
        let _ = find_functions(&copy, &WANTED);
    }
}

#[test]
fn lookups_are_fast() {
    for build in builds() {
        let started = Instant::now();
        let _ = inspect(&build.data).unwrap();
        let found = find_functions(&build.data, &WANTED).unwrap();
        let from_table =
            find_functions_from(&build.data, &WANTED, Lookup::FunctionTableOnly).unwrap();
        let elapsed = started.elapsed();
        eprintln!("{}: {} bytes, {elapsed:?}", build.label(), build.data.len());
        assert_eq!(found.len() + from_table.len(), 2 * WANTED.len());
        assert!(elapsed.as_millis() < 1000, "{}: {elapsed:?}", build.label());
    }
}

/// The toolchains' own compilers: the biggest Go programs at hand (16 to
/// 28 MB, with symbols).
#[test]
fn big_binaries_are_fast() {
    let names = ["runtime.newproc1", "cmd/compile/internal/ssa.Compile"];
    for go in TOOLCHAINS.map(go_tool) {
        let out = Command::new(go)
            .args(["env", "GOTOOLDIR"])
            .output()
            .expect("go env");
        let tool_dir = String::from_utf8(out.stdout).unwrap();
        let compile = Path::new(tool_dir.trim()).join("compile");
        let data = std::fs::read(&compile).unwrap();
        let started = Instant::now();
        let info = inspect(&data)
            .unwrap()
            .expect("the compiler is a Go binary");
        let found = find_functions(&data, &names).unwrap();
        let elapsed = started.elapsed();
        eprintln!(
            "{} ({}): {} bytes, {elapsed:?}",
            compile.display(),
            info.go_version,
            data.len()
        );
        assert_eq!(found.len(), names.len(), "{}", compile.display());
        let from_table = find_functions_from(&data, &names, Lookup::FunctionTableOnly).unwrap();
        assert_eq!(found, from_table, "{}", compile.display());
        assert!(
            elapsed.as_millis() < 1000,
            "{}: {elapsed:?}",
            compile.display()
        );
    }
}

/// Debian's `hey` (an HTTP load generator): a stripped Go binary built
/// outside this test.
#[test]
fn hey_from_debian() {
    let path = Path::new("/usr/bin/hey");
    let data = std::fs::read(path).expect("/usr/bin/hey is missing: run `cargo xtask setup --test-deps` (apt hey)");
    let info = inspect(&data).unwrap().expect("hey is a Go binary");
    assert!(info.go_version.starts_with("go1."), "{}", info.go_version);
    let name = "net/http.(*Transport).roundTrip";
    let found = find_functions(&data, &[name]).unwrap();
    assert_eq!(found.len(), 1, "{name}");
    for &ret in &found[0].return_offsets {
        assert_eq!(data[ret as usize], 0xc3);
    }
    assert!(!found[0].return_offsets.is_empty());
}
