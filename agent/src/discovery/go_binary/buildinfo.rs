//! The Go toolchain version and module list the linker records in every Go
//! executable since Go 1.13 (`go version -m` prints them).
//!
//! The record is a 32-byte header starting with [`MAGIC`], 16-byte aligned,
//! in the `.go.buildinfo` section (at the start of the first writable
//! segment). Before Go 1.18 the header holds two pointers to Go string
//! headers (version, module info); since 1.18 (flags bit 1) both strings
//! follow the header inline, each prefixed with its length as a varint.

use super::image::Image;

const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
const ALIGN: usize = 16;
const POINTER_SIZE_AT: usize = 14;
const FLAGS_AT: usize = 15;
const FLAG_BIG_ENDIAN: u8 = 1;
const FLAG_INLINE_STRINGS: u8 = 2;
/// The module info is framed by two 16-byte sentinels
/// (cmd/go/internal/modload's infoStart/infoEnd).
const MODINFO_SENTINEL_LEN: usize = 16;

#[derive(Debug, Default, PartialEq)]
pub(super) struct BuildInfo {
    pub go_version: String,
    /// The main module's path (`mod` line); None in GOPATH mode.
    pub main_module: Option<String>,
    /// Every module linked in: the main module first, then the
    /// dependencies, each with the version actually built (a replacement's
    /// version when it has one).
    pub modules: Vec<(String, String)>,
}

/// The build info of `image`, `Ok(None)` when it has none (not a Go
/// executable, or one older than Go 1.13).
pub(super) fn read(image: &Image<'_>) -> Result<Option<BuildInfo>, String> {
    let Some(record) = locate(image) else {
        return Ok(None);
    };
    let header = record
        .get(..HEADER_LEN)
        .ok_or("truncated Go build info header")?;
    let flags = header[FLAGS_AT];
    let (version, modinfo) = if flags & FLAG_INLINE_STRINGS != 0 {
        inline_strings(&record[HEADER_LEN..])?
    } else {
        pointed_strings(image, header)?
    };
    if version.is_empty() {
        return Err("Go build info without a toolchain version".into());
    }
    let (main_module, modules) = parse_modinfo(&lossy(strip_sentinels(&modinfo)));
    Ok(Some(BuildInfo {
        go_version: version,
        main_module,
        modules,
    }))
}

/// The bytes from the build info header to the end of its segment.
fn locate<'d>(image: &Image<'d>) -> Option<&'d [u8]> {
    if let Some((address, _)) = image.section(".go.buildinfo") {
        let record = image.bytes_from(address)?;
        return record.starts_with(MAGIC).then_some(record);
    }
    // Section headers removed: search the writable segments, as the loader
    // sees them. Segment offsets and addresses agree modulo the page size,
    // so 16-byte alignment in the file is alignment in memory.
    image
        .loads
        .iter()
        .filter(|load| load.writable())
        .filter_map(|load| Some((load.offset, image.load_bytes(load)?)))
        .find_map(|(offset, bytes)| {
            let skip = usize::try_from(offset.wrapping_neg() % ALIGN as u64).ok()?;
            (skip..bytes.len())
                .step_by(ALIGN)
                .find(|&at| bytes[at..].starts_with(MAGIC))
                .map(|at| &bytes[at..])
        })
}

/// Go 1.18+: version and module info inline after the header.
fn inline_strings(after_header: &[u8]) -> Result<(String, Vec<u8>), String> {
    let (version, rest) = varint_string(after_header).ok_or("truncated Go version string")?;
    let (modinfo, _) = varint_string(rest).ok_or("truncated Go module info")?;
    Ok((lossy(version), modinfo.to_vec()))
}

fn varint_string(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, used) = uvarint(bytes)?;
    let rest = &bytes[used..];
    let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
    Some(rest.split_at(len))
}

/// An unsigned LEB128 varint (Go's `binary.Uvarint`) and its length.
fn uvarint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Before Go 1.18: the header points at two Go string headers
/// `{data *byte, len int}`, read through the segments.
fn pointed_strings(image: &Image<'_>, header: &[u8]) -> Result<(String, Vec<u8>), String> {
    let word = Word::new(
        header[POINTER_SIZE_AT],
        header[FLAGS_AT] & FLAG_BIG_ENDIAN != 0,
    )?;
    let at = |index: usize| word.read(header, HEADER_LEN / 2 + index * word.size);
    let version = go_string(image, word, at(0)).ok_or("unreadable Go version string")?;
    // A missing module info is not an error: GOPATH builds have none.
    let modinfo = go_string(image, word, at(1)).unwrap_or_default();
    Ok((lossy(version), modinfo.to_vec()))
}

fn go_string<'d>(image: &Image<'d>, word: Word, header_address: Option<u64>) -> Option<&'d [u8]> {
    let header = image.bytes_at(header_address?, 2 * word.size as u64)?;
    let data = word.read(header, 0)?;
    let len = word.read(header, word.size)?;
    image.bytes_at(data, len)
}

/// A target pointer: its size and byte order.
#[derive(Clone, Copy)]
struct Word {
    size: usize,
    big_endian: bool,
}

impl Word {
    fn new(size: u8, big_endian: bool) -> Result<Self, String> {
        match size {
            4 | 8 => Ok(Word {
                size: usize::from(size),
                big_endian,
            }),
            _ => Err(format!("Go build info with pointer size {size}")),
        }
    }

    fn read(self, bytes: &[u8], at: usize) -> Option<u64> {
        let raw = bytes.get(at..at.checked_add(self.size)?)?;
        let mut buf = [0u8; 8];
        if self.big_endian {
            buf[8 - self.size..].copy_from_slice(raw);
            Some(u64::from_be_bytes(buf))
        } else {
            buf[..self.size].copy_from_slice(raw);
            Some(u64::from_le_bytes(buf))
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The module info without its framing sentinels (which are not UTF-8);
/// empty when it has none (as `debug/buildinfo` does).
fn strip_sentinels(modinfo: &[u8]) -> &[u8] {
    let len = modinfo.len();
    if len <= 2 * MODINFO_SENTINEL_LEN || modinfo[len - MODINFO_SENTINEL_LEN - 1] != b'\n' {
        return &[];
    }
    &modinfo[MODINFO_SENTINEL_LEN..len - MODINFO_SENTINEL_LEN]
}

/// The main module and every module from `runtime/debug.BuildInfo`'s text
/// form: `mod`/`dep` lines (path, version, sum) and `=>` replacement lines
/// that apply to the line before. Other lines (`path`, `build`) and
/// malformed lines are skipped.
fn parse_modinfo(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut main_module = None;
    let mut modules: Vec<(String, String)> = Vec::new();
    let mut replaceable = false;
    for line in text.lines() {
        let (kind, rest) = line.split_once('\t').unwrap_or((line, ""));
        let mut fields = rest.split('\t');
        let path = fields.next().unwrap_or_default();
        let version = fields.next().unwrap_or_default();
        match kind {
            "mod" | "dep" if !path.is_empty() => {
                if kind == "mod" {
                    main_module = Some(path.to_owned());
                }
                modules.push((path.to_owned(), version.to_owned()));
                replaceable = true;
            }
            "=>" => {
                // The code built is the replacement's, but functions keep
                // the original import path; a directory replacement has no
                // version, so the original one stays.
                if let Some(last) = modules
                    .last_mut()
                    .filter(|_| replaceable && !version.is_empty())
                {
                    last.1 = version.to_owned();
                }
                replaceable = false;
            }
            _ => replaceable = false,
        }
    }
    (main_module, modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_lines_become_modules() {
        let text = "path\texample.com/demo/cmd\n\
                    mod\texample.com/demo\t(devel)\t\n\
                    dep\tgolang.org/x/net\tv0.1.0\th1:abc=\n\
                    dep\tgoogle.golang.org/grpc\tv1.50.0\th1:def=\n\
                    =>\tgithub.com/fork/grpc\tv1.50.1\th1:ghi=\n\
                    dep\texample.com/local\tv0.0.0\t\n\
                    =>\t../local\t\t\n\
                    build\t-compiler=gc\n\
                    build\tCGO_ENABLED=1\n";
        let (main, modules) = parse_modinfo(text);
        assert_eq!(main.as_deref(), Some("example.com/demo"));
        let expected = [
            ("example.com/demo", "(devel)"),
            ("golang.org/x/net", "v0.1.0"),
            ("google.golang.org/grpc", "v1.50.1"),
            ("example.com/local", "v0.0.0"),
        ];
        let got: Vec<(&str, &str)> = modules
            .iter()
            .map(|(p, v)| (p.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn malformed_modinfo_is_skipped_not_fatal() {
        let (main, modules) = parse_modinfo("=>\tx\tv1\t\nmod\nmod\t\ndep\n\t\t\n\u{0}garbage");
        assert_eq!(main, None);
        assert!(modules.is_empty());
    }

    #[test]
    fn sentinels_are_stripped_only_when_framed() {
        let sentinel = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6";
        let framed = [&sentinel[..], b"path\tx\n", &sentinel[..]].concat();
        assert_eq!(strip_sentinels(&framed), b"path\tx\n");
        assert_eq!(strip_sentinels(b"path\tx\n"), b"");
        assert_eq!(strip_sentinels(b""), b"");
    }

    #[test]
    fn varints_decode_like_go() {
        assert_eq!(uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(uvarint(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(uvarint(&[0x80]), None);
        assert_eq!(uvarint(&[]), None);
        assert_eq!(uvarint(&[0xff; 12]), None);
        assert_eq!(varint_string(&[3, b'a', b'b']), None);
        assert_eq!(
            varint_string(&[2, b'a', b'b', b'c']),
            Some((&b"ab"[..], &b"c"[..]))
        );
    }

    #[test]
    fn pointer_words_read_both_byte_orders() {
        let le = Word::new(4, false).unwrap();
        let be = Word::new(8, true).unwrap();
        assert_eq!(le.read(&[1, 0, 0, 0], 0), Some(1));
        assert_eq!(be.read(&[0, 0, 0, 0, 0, 0, 1, 2], 0), Some(0x102));
        assert_eq!(be.read(&[0; 7], 0), None);
        assert_eq!(le.read(&[0; 4], usize::MAX), None);
        assert!(Word::new(3, false).is_err());
    }
}
