//! Where the Go uprobes find what they read inside Go structs: the goroutine
//! id in `runtime.g`, and the way from a `crypto/tls.Conn` to its socket
//! (`tls.Conn.conn` holds a `*net.TCPConn`, which embeds `net.conn` at offset
//! 0; `net.conn.fd` -> `net.netFD.pfd` -> `internal/poll.FD.Sysfd`).
//!
//! Go has no stable layout for these, so the offsets come from the binary's
//! own DWARF when it has some, else from a table generated from real builds
//! of each Go release (`cargo xtask go-offsets`, `go_offsets_table.rs`).
//!
//! xtask compiles this file too (`#[path]`), so that the generator reads DWARF
//! with exactly this code: it must depend on nothing else in the agent.

use gimli::{
    Abbreviation, AttributeValue, DebugAbbrev, DebugInfo, DebugInfoOffset, DebugStr, EntriesRaw,
    LittleEndian, UnitHeader,
};
use object::{CompressionFormat, Object, ObjectSection};
use std::borrow::Cow;
use std::io::Read;

#[path = "go_offsets_table.rs"]
mod table;

/// Byte offsets of the struct fields the Go uprobes read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoOffsets {
    /// `runtime.g.goid`
    pub g_goid: u32,
    /// `crypto/tls.Conn.conn`, a `net.Conn` interface (itab, data)
    pub tls_conn_conn: u32,
    /// `crypto/tls.Conn.vers`, a `uint16`
    pub tls_conn_vers: u32,
    /// `crypto/tls.Conn.isClient`
    pub tls_conn_is_client: u32,
    /// `net.conn.fd` (`*netFD`); `net.TCPConn` embeds `conn` at 0
    pub net_conn_fd: u32,
    /// `net.netFD.pfd`
    pub netfd_pfd: u32,
    /// `internal/poll.FD.Sysfd`
    pub pfd_sysfd: u32,
}

/// Where [`offsets_for`] found the offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetsSource {
    Dwarf,
    Table,
}

impl OffsetsSource {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetsSource::Dwarf => "dwarf",
            OffsetsSource::Table => "table",
        }
    }
}

/// One row of the generated table: offsets read from the DWARF of a build
/// with the Go release `built_with`, used for every release of `go_minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoOffsetsTableEntry {
    pub go_minor: &'static str,
    pub built_with: &'static str,
    pub offsets: GoOffsets,
}

/// A struct member the probes read, with the member types the probes can
/// handle: another type at the same name means the probes would misread it.
struct WantedMember {
    structure: &'static str,
    member: &'static str,
    types: &'static [&'static str],
}

/// In the order of [`GoOffsets`]' fields.
const WANTED: [WantedMember; 7] = [
    wanted("runtime.g", "goid", &["int64", "uint64"]),
    wanted("crypto/tls.Conn", "conn", &["net.Conn"]),
    wanted("crypto/tls.Conn", "vers", &["uint16"]),
    wanted("crypto/tls.Conn", "isClient", &["bool"]),
    wanted("net.conn", "fd", &["*net.netFD"]),
    wanted("net.netFD", "pfd", &["internal/poll.FD"]),
    wanted("internal/poll.FD", "Sysfd", &["int"]),
];

const fn wanted(
    structure: &'static str,
    member: &'static str,
    types: &'static [&'static str],
) -> WantedMember {
    WantedMember {
        structure,
        member,
        types,
    }
}

impl GoOffsets {
    fn from_wanted_order(o: [u32; WANTED.len()]) -> GoOffsets {
        GoOffsets {
            g_goid: o[0],
            tls_conn_conn: o[1],
            tls_conn_vers: o[2],
            tls_conn_is_client: o[3],
            net_conn_fd: o[4],
            netfd_pfd: o[5],
            pfd_sysfd: o[6],
        }
    }
}

/// The offsets for a Go binary: from its DWARF, else from the table by its Go
/// version (`go1.21.13`, as the binary's build info says); else why neither.
pub fn offsets_for(data: &[u8], go_version: &str) -> Result<(GoOffsets, OffsetsSource), String> {
    let dwarf_error = match from_dwarf(data) {
        Ok(offsets) => return Ok((offsets, OffsetsSource::Dwarf)),
        Err(e) => e,
    };
    match from_table(go_version) {
        Some(offsets) => Ok((offsets, OffsetsSource::Table)),
        None => Err(format!(
            "{go_version}: {dwarf_error}, and no offsets table entry for this Go version (the table has {})",
            table_versions()
        )),
    }
}

/// The offsets the table holds for this Go version's minor release. `None`
/// for versions without an entry, pre-releases (`go1.22rc1`) and anything
/// that is not a Go version: never a guess from a neighbouring version.
pub fn from_table(go_version: &str) -> Option<GoOffsets> {
    let minor = go_minor_version(go_version)?;
    table::GO_OFFSETS_TABLE
        .iter()
        .find(|entry| entry.go_minor == minor)
        .map(|entry| entry.offsets)
}

fn table_versions() -> String {
    let minors: Vec<&str> = table::GO_OFFSETS_TABLE.iter().map(|e| e.go_minor).collect();
    minors.join(", ")
}

/// `go1.21` from `go1.21`, `go1.21.13` or `go1.21.0 X:boringcrypto`; `None`
/// for pre-releases (`go1.21rc2`), `devel ...` and anything else.
pub fn go_minor_version(go_version: &str) -> Option<&str> {
    let version = go_version.split(' ').next()?;
    let numbers = version.strip_prefix("go")?;
    let mut parts = numbers.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    let patch = parts.next();
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let well_formed = all_digits(major)
        && all_digits(minor)
        && patch.is_none_or(all_digits)
        && parts.next().is_none();
    well_formed.then(|| &version[..2 + major.len() + 1 + minor.len()])
}

/// The offsets from the binary's DWARF (compressed or not). Reads only
/// `.debug_info`, `.debug_abbrev` and `.debug_str`, and stops once every
/// wanted struct has been seen.
pub fn from_dwarf(data: &[u8]) -> Result<GoOffsets, String> {
    let offsets = wanted_offsets(data, &WANTED)?;
    let mut o = [0u32; WANTED.len()];
    o.copy_from_slice(&offsets);
    Ok(GoOffsets::from_wanted_order(o))
}

/// The offsets of `wanted`'s members, in its order, from the binary's DWARF.
fn wanted_offsets(data: &[u8], wanted: &[WantedMember]) -> Result<Vec<u32>, String> {
    let file = object::File::parse(data).map_err(|e| format!("not an object file: {e}"))?;
    if !file.is_little_endian() {
        return Err("big-endian binaries are not supported".into());
    }
    let info = section_data(&file, ".debug_info")?
        .ok_or("no DWARF (no .debug_info section: built with -ldflags=-w, or stripped)")?;
    let abbrev = section_data(&file, ".debug_abbrev")?.ok_or("no .debug_abbrev section")?;
    let strings = section_data(&file, ".debug_str")?.unwrap_or_default();
    let dwarf = Sections {
        info: DebugInfo::new(&info, LittleEndian),
        abbrev: DebugAbbrev::new(&abbrev, LittleEndian),
        strings: DebugStr::new(&strings, LittleEndian),
    };
    let members = find_wanted_members(&dwarf, wanted)?;
    wanted
        .iter()
        .zip(&members)
        .map(|(w, member)| checked_member(&dwarf, w, member.as_ref()))
        .collect()
}

/// What grpc-go's probes read: golang.org/x/net's HTTP/2 frame and HPACK
/// field types, which grpc-go's transport uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcOffsets {
    /// `http2.MetaHeadersFrame.HeadersFrame` (`*http2.HeadersFrame`)
    pub meta_headers_frame: u32,
    /// `http2.MetaHeadersFrame.Fields` (`[]hpack.HeaderField`)
    pub meta_fields: u32,
    /// `http2.HeadersFrame.FrameHeader`
    pub headers_frame_header: u32,
    /// `http2.FrameHeader.StreamID`
    pub frame_header_stream_id: u32,
    /// `hpack.HeaderField.Name`, `.Value` and `.Sensitive`
    pub header_field_name: u32,
    pub header_field_value: u32,
    pub header_field_sensitive: u32,
}

impl GrpcOffsets {
    /// Bytes from one `hpack.HeaderField` to the next in a slice: its last
    /// member (a bool) rounded up to the struct's 8-byte alignment.
    pub fn header_field_size(&self) -> u32 {
        (self.header_field_sensitive + 1).next_multiple_of(8)
    }
}

/// In the order of [`GrpcOffsets`]' fields.
const GRPC_WANTED: [WantedMember; 7] = [
    wanted(
        "golang.org/x/net/http2.MetaHeadersFrame",
        "HeadersFrame",
        &["*golang.org/x/net/http2.HeadersFrame"],
    ),
    wanted(
        "golang.org/x/net/http2.MetaHeadersFrame",
        "Fields",
        &["[]golang.org/x/net/http2/hpack.HeaderField"],
    ),
    wanted(
        "golang.org/x/net/http2.HeadersFrame",
        "FrameHeader",
        &["golang.org/x/net/http2.FrameHeader"],
    ),
    wanted("golang.org/x/net/http2.FrameHeader", "StreamID", &["uint32"]),
    wanted("golang.org/x/net/http2/hpack.HeaderField", "Name", &["string"]),
    wanted("golang.org/x/net/http2/hpack.HeaderField", "Value", &["string"]),
    wanted("golang.org/x/net/http2/hpack.HeaderField", "Sensitive", &["bool"]),
];

/// Offsets for binaries without DWARF, by grpc-go minor version: read from
/// the DWARF of the test program built against that release (a test checks
/// them against a fresh build, `grpc_go_table_matches_the_dwarf`).
const GRPC_TABLE: &[(&str, GrpcOffsets)] = &[(
    "v1.33",
    GrpcOffsets {
        meta_headers_frame: 0,
        meta_fields: 8,
        headers_frame_header: 0,
        frame_header_stream_id: 8,
        header_field_name: 0,
        header_field_value: 16,
        header_field_sensitive: 32,
    },
)];

/// grpc-go's offsets from the binary's DWARF, else from [`GRPC_TABLE`] by
/// `grpc_version` (`v1.33.3`); else why neither.
pub fn grpc_offsets_for(data: &[u8], grpc_version: &str) -> Result<(GrpcOffsets, OffsetsSource), String> {
    let dwarf_error = match grpc_from_dwarf(data) {
        Ok(offsets) => return Ok((offsets, OffsetsSource::Dwarf)),
        Err(e) => e,
    };
    let minor = grpc_minor_version(grpc_version);
    match GRPC_TABLE.iter().find(|(v, _)| Some(*v) == minor) {
        Some((_, offsets)) => Ok((*offsets, OffsetsSource::Table)),
        None => {
            let known: Vec<&str> = GRPC_TABLE.iter().map(|(v, _)| *v).collect();
            Err(format!(
                "grpc-go {grpc_version}: {dwarf_error}, and no offsets table entry for it (the table has {})",
                known.join(", ")
            ))
        }
    }
}

pub fn grpc_from_dwarf(data: &[u8]) -> Result<GrpcOffsets, String> {
    let o = wanted_offsets(data, &GRPC_WANTED)?;
    let offsets = GrpcOffsets {
        meta_headers_frame: o[0],
        meta_fields: o[1],
        headers_frame_header: o[2],
        frame_header_stream_id: o[3],
        header_field_name: o[4],
        header_field_value: o[5],
        header_field_sensitive: o[6],
    };
    if offsets.header_field_name != 0 {
        return Err(format!(
            "hpack.HeaderField.Name at offset {}, not 0: the probes would misread it",
            offsets.header_field_name
        ));
    }
    Ok(offsets)
}

/// `v1.33` from `v1.33.3` or `v1.33.0-dev`; None for anything else.
pub fn grpc_minor_version(version: &str) -> Option<&str> {
    let rest = version.strip_prefix("v1.")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0).then(|| &version[..3 + digits])
}

/// Decompressed contents of a `.debug_*` section (SHF_COMPRESSED, or GNU's
/// `.zdebug_*`, which object looks up by itself only with its decompressors
/// compiled in), `None` if there is none.
fn section_data<'d>(file: &object::File<'d>, name: &str) -> Result<Option<Cow<'d, [u8]>>, String> {
    let gnu_name = name.replacen(".debug_", ".zdebug_", 1);
    let Some(section) = file
        .section_by_name(name)
        .or_else(|| file.section_by_name(&gnu_name))
    else {
        return Ok(None);
    };
    let compressed = section
        .compressed_data()
        .map_err(|e| format!("{name}: {e}"))?;
    match compressed.format {
        CompressionFormat::None => Ok(Some(Cow::Borrowed(compressed.data))),
        CompressionFormat::Zlib => inflate(compressed.data, compressed.uncompressed_size)
            .map(|d| Some(Cow::Owned(d)))
            .map_err(|e| format!("{name}: {e}")),
        other => Err(format!("{name}: {other:?} compression is not supported")),
    }
}

/// Larger than any real Go binary's debug info; a section header claiming
/// more is corrupt or hostile.
const MAX_DEBUG_SECTION: u64 = 1 << 30;

fn inflate(compressed: &[u8], size: u64) -> Result<Vec<u8>, String> {
    if size > MAX_DEBUG_SECTION {
        return Err(format!("claims {size} bytes uncompressed"));
    }
    let mut out = Vec::with_capacity(size as usize);
    flate2::read::ZlibDecoder::new(compressed)
        .take(size + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("zlib: {e}"))?;
    if out.len() as u64 != size {
        return Err(format!("inflates to {} bytes, not {size}", out.len()));
    }
    Ok(out)
}

type Slice<'a> = gimli::EndianSlice<'a, LittleEndian>;

struct Sections<'a> {
    info: DebugInfo<Slice<'a>>,
    abbrev: DebugAbbrev<Slice<'a>>,
    strings: DebugStr<Slice<'a>>,
}

/// A member as DWARF describes it.
struct Member {
    offset: Option<u64>,
    type_ref: Option<DebugInfoOffset>,
}

fn dwarf_error(e: gimli::Error) -> String {
    format!("bad DWARF: {e}")
}

/// The members of [`WANTED`], in its order, from the first top-level
/// `DW_TAG_structure_type` of each wanted name.
fn find_wanted_members(dwarf: &Sections, wanted: &[WantedMember]) -> Result<Vec<Option<Member>>, String> {
    let mut members: Vec<Option<Member>> = wanted.iter().map(|_| None).collect();
    let mut structs_left: Vec<&str> = wanted.iter().map(|w| w.structure).collect();
    structs_left.sort_unstable();
    structs_left.dedup();
    let mut units = dwarf.info.units();
    let mut abbrevs = AbbreviationsCache::default();
    while let Some(header) = units.next().map_err(dwarf_error)? {
        let abbreviations = abbrevs.get(&dwarf.abbrev, &header)?;
        let mut entries = header
            .entries_raw(abbreviations, None)
            .map_err(dwarf_error)?;
        scan_unit(
            dwarf,
            &header,
            &mut entries,
            wanted,
            &mut structs_left,
            &mut members,
        )?;
        if structs_left.is_empty() {
            break;
        }
    }
    Ok(members)
}

/// Go binaries share one abbreviation table among all their units: parse it once.
#[derive(Default)]
struct AbbreviationsCache {
    last: Option<(gimli::DebugAbbrevOffset, gimli::Abbreviations)>,
}

impl AbbreviationsCache {
    fn get(
        &mut self,
        debug_abbrev: &DebugAbbrev<Slice>,
        header: &UnitHeader<Slice>,
    ) -> Result<&gimli::Abbreviations, String> {
        let offset = header.debug_abbrev_offset();
        if self.last.as_ref().is_none_or(|(o, _)| *o != offset) {
            let parsed = header.abbreviations(debug_abbrev).map_err(dwarf_error)?;
            self.last = Some((offset, parsed));
        }
        match &self.last {
            Some((_, abbreviations)) => Ok(abbreviations),
            None => Err("no abbreviations".into()),
        }
    }
}

fn scan_unit<'a>(
    dwarf: &Sections<'a>,
    header: &UnitHeader<Slice<'a>>,
    entries: &mut EntriesRaw<Slice<'a>>,
    wanted: &[WantedMember],
    structs_left: &mut Vec<&str>,
    members: &mut [Option<Member>],
) -> Result<(), String> {
    while !entries.is_empty() {
        let depth = entries.next_depth();
        let Some(abbrev) = entries.read_abbreviation().map_err(dwarf_error)? else {
            continue;
        };
        if depth != 1 || abbrev.tag() != gimli::DW_TAG_structure_type {
            entries
                .skip_attributes(abbrev.attributes())
                .map_err(dwarf_error)?;
            continue;
        }
        let attrs = read_attributes(dwarf, header, entries, abbrev)?;
        let Some(name) = attrs.name else { continue };
        if let Some(i) = structs_left.iter().position(|s| s.as_bytes() == name) {
            let structure = structs_left.swap_remove(i);
            read_members(dwarf, header, entries, wanted, structure, members)?;
        }
    }
    Ok(())
}

/// Reads the children of the struct just read, keeping the wanted members.
fn read_members<'a>(
    dwarf: &Sections<'a>,
    header: &UnitHeader<Slice<'a>>,
    entries: &mut EntriesRaw<Slice<'a>>,
    wanted: &[WantedMember],
    structure: &str,
    members: &mut [Option<Member>],
) -> Result<(), String> {
    while entries.next_depth() > 1 && !entries.is_empty() {
        let depth = entries.next_depth();
        let Some(abbrev) = entries.read_abbreviation().map_err(dwarf_error)? else {
            continue;
        };
        if depth != 2 || abbrev.tag() != gimli::DW_TAG_member {
            entries
                .skip_attributes(abbrev.attributes())
                .map_err(dwarf_error)?;
            continue;
        }
        let attrs = read_attributes(dwarf, header, entries, abbrev)?;
        let Some(name) = attrs.name else { continue };
        let wanted_index = wanted
            .iter()
            .position(|w| w.structure == structure && w.member.as_bytes() == name);
        if let Some(i) = wanted_index {
            members[i] = Some(Member {
                offset: attrs.member_location,
                type_ref: attrs.type_ref,
            });
        }
    }
    Ok(())
}

/// The attributes of one entry that matter here.
#[derive(Default)]
struct Attributes<'a> {
    name: Option<&'a [u8]>,
    member_location: Option<u64>,
    type_ref: Option<DebugInfoOffset>,
}

fn read_attributes<'a>(
    dwarf: &Sections<'a>,
    header: &UnitHeader<Slice<'a>>,
    entries: &mut EntriesRaw<Slice<'a>>,
    abbrev: &Abbreviation,
) -> Result<Attributes<'a>, String> {
    let mut attrs = Attributes::default();
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec).map_err(dwarf_error)?;
        match attr.name() {
            gimli::DW_AT_name => attrs.name = string_value(dwarf, attr.value()),
            gimli::DW_AT_data_member_location => {
                attrs.member_location = member_location(attr.value())
            }
            gimli::DW_AT_type => attrs.type_ref = reference(header, attr.value()),
            _ => {}
        }
    }
    Ok(attrs)
}

fn string_value<'a>(dwarf: &Sections<'a>, value: AttributeValue<Slice<'a>>) -> Option<&'a [u8]> {
    match value {
        AttributeValue::String(s) => Some(s.slice()),
        AttributeValue::DebugStrRef(offset) => {
            dwarf.strings.get_str(offset).ok().map(|s| s.slice())
        }
        _ => None,
    }
}

/// A constant, or the `DW_OP_plus_uconst N` expression old Go linkers wrote.
fn member_location(value: AttributeValue<Slice>) -> Option<u64> {
    if let Some(n) = value.udata_value() {
        return Some(n);
    }
    let gimli::Expression(mut expr) = value.exprloc_value()?;
    use gimli::Reader;
    if expr.read_u8().ok()? != gimli::DW_OP_plus_uconst.0 {
        return None;
    }
    let n = expr.read_uleb128().ok()?;
    expr.is_empty().then_some(n)
}

fn reference(header: &UnitHeader<Slice>, value: AttributeValue<Slice>) -> Option<DebugInfoOffset> {
    match value {
        AttributeValue::UnitRef(offset) => offset.to_debug_info_offset(header),
        AttributeValue::DebugInfoRef(offset) => Some(offset),
        _ => None,
    }
}

/// The member's offset, once its type is one the probes can read.
fn checked_member(
    dwarf: &Sections,
    wanted: &WantedMember,
    member: Option<&Member>,
) -> Result<u32, String> {
    let field = format!("{}.{}", wanted.structure, wanted.member);
    let member = member.ok_or_else(|| format!("{field} is not in the DWARF"))?;
    let offset = member
        .offset
        .ok_or_else(|| format!("{field} has no constant DW_AT_data_member_location"))?;
    let type_name = member
        .type_ref
        .and_then(|r| type_name(dwarf, r))
        .ok_or_else(|| format!("{field}: its type has no name in the DWARF"))?;
    if !wanted.types.iter().any(|t| t.as_bytes() == type_name) {
        return Err(format!(
            "{field} is a {}, not {}: the probes would misread it",
            String::from_utf8_lossy(type_name),
            wanted.types.join(" or ")
        ));
    }
    u32::try_from(offset).map_err(|_| format!("{field} at offset {offset} does not fit in u32"))
}

/// The name of the entry at `offset`, looked up through the unit holding it.
fn type_name<'a>(dwarf: &Sections<'a>, offset: DebugInfoOffset) -> Option<&'a [u8]> {
    let mut units = dwarf.info.units();
    while let Ok(Some(header)) = units.next() {
        let Some(unit_offset) = offset.to_unit_offset(&header) else {
            continue;
        };
        let abbreviations = header.abbreviations(&dwarf.abbrev).ok()?;
        let mut entries = header.entries_raw(&abbreviations, Some(unit_offset)).ok()?;
        let abbrev = entries.read_abbreviation().ok()??;
        return read_attributes(dwarf, &header, &mut entries, abbrev)
            .ok()?
            .name;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use periscope_tests::go::{Dwarf, InstalledGo, build_offsets_probe, go_toolchains};

    fn toolchains() -> Vec<InstalledGo> {
        go_toolchains().unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn probe(go: &InstalledGo, dwarf: Dwarf) -> Vec<u8> {
        let path = build_offsets_probe(go, dwarf).unwrap_or_else(|e| panic!("{e:#}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    #[test]
    fn dwarf_agrees_with_the_table_for_every_toolchain() {
        for go in toolchains() {
            let from_dwarf = from_dwarf(&probe(&go, Dwarf::Keep))
                .unwrap_or_else(|e| panic!("{}: {e}", go.version));
            let from_table =
                from_table(&go.version).unwrap_or_else(|| panic!("{}: no table entry", go.version));
            assert_eq!(from_dwarf, from_table, "{}", go.version);
            assert_eq!(
                offsets_for(&probe(&go, Dwarf::Keep), &go.version),
                Ok((from_dwarf, OffsetsSource::Dwarf))
            );
        }
    }

    #[test]
    fn binaries_without_dwarf_get_the_table_offsets() {
        for go in toolchains() {
            let data = probe(&go, Dwarf::Strip);
            let err = from_dwarf(&data).expect_err("built with -ldflags=-w");
            assert!(err.contains("no DWARF"), "{}: {err}", go.version);
            let expected = from_table(&go.version).expect("table entry");
            assert_eq!(
                offsets_for(&data, &go.version),
                Ok((expected, OffsetsSource::Table)),
                "{}",
                go.version
            );
        }
    }

    #[test]
    fn uncompressed_and_gnu_compressed_dwarf_read_the_same() {
        let go = toolchains().pop().expect("toolchains");
        let compressed = from_dwarf(&probe(&go, Dwarf::Keep)).expect("compressed DWARF");
        for dwarf in [Dwarf::Uncompressed, Dwarf::GnuZdebug] {
            assert_eq!(
                from_dwarf(&probe(&go, dwarf)),
                Ok(compressed),
                "{} {dwarf:?}",
                go.version
            );
        }
    }

    #[test]
    fn unknown_versions_have_no_offsets_and_say_why() {
        assert_eq!(from_table("go1.16.15"), None);
        assert_eq!(from_table("go1.20.14"), None);
        let go = &toolchains()[0];
        let err =
            offsets_for(&probe(go, Dwarf::Strip), "go1.16.15").expect_err("no DWARF, no entry");
        assert!(
            err.starts_with("go1.16.15: no DWARF") && err.contains("no offsets table entry"),
            "{err}"
        );
    }

    #[test]
    fn table_is_keyed_by_minor_version() {
        let go1_21 = from_table("go1.21").expect("go1.21 entry");
        assert_eq!(from_table("go1.21.0"), Some(go1_21));
        assert_eq!(from_table("go1.21.13 X:boringcrypto"), Some(go1_21));
        for not_a_release in [
            "go1.21rc2",
            "devel go1.22-abcdef",
            "1.21.13",
            "go1.21.x",
            "go1.2.1.3",
            "",
        ] {
            assert_eq!(from_table(not_a_release), None, "{not_a_release:?}");
        }
    }

    #[test]
    fn minor_versions() {
        assert_eq!(go_minor_version("go1.19.8"), Some("go1.19"));
        assert_eq!(go_minor_version("go1.27"), Some("go1.27"));
        assert_eq!(
            go_minor_version("go1.21.0 X:nocoverageredesign"),
            Some("go1.21")
        );
        assert_eq!(go_minor_version("go1.22beta1"), None);
        assert_eq!(go_minor_version("go1."), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(from_dwarf(b"").is_err());
        assert!(from_dwarf(b"\x7fELF garbage").is_err());
        let mut truncated = probe(&toolchains()[0], Dwarf::Keep);
        truncated.truncate(truncated.len() / 2);
        assert!(from_dwarf(&truncated).is_err());
    }
}
