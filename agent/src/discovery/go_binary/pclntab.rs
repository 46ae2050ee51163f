//! Go's function table (`runtime.pclntab`, the `.gopclntab` section): the
//! runtime needs it for stack traces, so it survives `-ldflags=-s -w`,
//! which removes `.symtab`. Only the parts that name functions and give
//! their entries are read.
//!
//! Layout (`runtime/symtab.go` pcHeader, `debug/gosym`): magic (4 bytes),
//! two zero bytes, the instruction size quantum, the pointer size, then
//! pointer-sized words. The function table `functab` holds `nfunc` pairs
//! (entry, offset of the function's `_func` record) and one last entry,
//! the end of the last function; entries are sorted, so a function ends
//! where the next one starts. A `_func` record starts with the entry again
//! and the offset of the function's name in `funcnametab`.
//! - Go 1.18+ (magics 0xfffffff0 and, since 1.20, 0xfffffff1): words
//!   nfunc, nfiles, textStart, funcnametab, cutab, filetab, pctab,
//!   functab (offsets from the header); entries are 32-bit offsets from the
//!   start of the text (`runtime.text`).
//! - Go 1.16/1.17 (0xfffffffa): words nfunc, nfiles, funcnametab, cutab,
//!   filetab, pctab, functab; entries are addresses.
//! - Go 1.2-1.15 (0xfffffffb): nfunc, then functab right after it; entries
//!   are addresses; name and record offsets are from the header.

use std::collections::HashSet;

use super::image::Image;

const GO12_MAGIC: u32 = 0xffff_fffb;
const GO116_MAGIC: u32 = 0xffff_fffa;
const GO118_MAGIC: u32 = 0xffff_fff0;
const GO120_MAGIC: u32 = 0xffff_fff1;
/// More functions than any real program has: a bound on what a corrupt
/// header can make us read.
const MAX_FUNCTIONS: u64 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Go12,
    Go116,
    Go118,
}

/// A function found in the table: its name, entry address and end address
/// (exclusive).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Function {
    pub name: String,
    pub entry: u64,
    pub end: u64,
}

/// Where the text starts (`runtime.text`), which Go 1.18+ entries are
/// relative to.
#[derive(Clone, Copy, Default)]
pub(super) struct TextStart {
    /// `runtime.text` from `.symtab`.
    pub symbol: Option<u64>,
    /// The `.text` section's address: `runtime.text` when Go linked the
    /// file itself, but C start-up code may come first when an external
    /// linker did.
    pub section: Option<u64>,
    /// `text` of the runtime's module data (what the runtime itself
    /// uses), looked for only when section headers are missing.
    pub module_data: Option<u64>,
}

impl TextStart {
    /// The best of the symbol, the header's field and the section. The
    /// field is 0 since Go 1.26, and in PIE files it may be unrelocated (0).
    fn choose(self, header_field: u64) -> Result<u64, String> {
        self.symbol
            .or(self.module_data)
            .or((header_field != 0).then_some(header_field))
            .or(self.section)
            .ok_or_else(|| "the start of the text is unknown (no runtime.text, no .text)".into())
    }
}

/// A parsed function table.
pub(super) struct Pclntab<'d> {
    version: Version,
    pointer_size: usize,
    function_count: usize,
    /// Added to 32-bit entries (Go 1.18+); zero before.
    text_start: u64,
    /// The table from its header on: name and record offsets of Go 1.2
    /// are relative to it.
    table: &'d [u8],
    function_names: &'d [u8],
    /// `functab`, which is also where `_func` record offsets start
    /// (Go 1.16+).
    functab: &'d [u8],
}

impl<'d> Pclntab<'d> {
    /// Finds and parses the table of `image`: the `.gopclntab` section
    /// (`.data.rel.ro.gopclntab` in PIE files of Go 1.18-1.26), or, when
    /// section headers were removed, a header found by scanning the
    /// non-executable segments. `text_symbol` is `runtime.text` from
    /// `.symtab` when known: the start that Go 1.18+ entries are relative to.
    pub fn of(image: &Image<'d>, text_symbol: Option<u64>) -> Result<Self, String> {
        let text = TextStart {
            symbol: text_symbol,
            section: image.section(".text").map(|(address, _)| address),
            module_data: None,
        };
        for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
            if let Some((_, bytes)) = image.section(name) {
                return Pclntab::parse(bytes, text).map_err(|e| format!("{name}: {e}"));
            }
        }
        if image.has_section_headers() {
            return Err("no .gopclntab section".into());
        }
        scan_segments(image, text)
    }

    /// Parses a table that starts at `table[0]` and may run past its end
    /// (to the end of its section or segment).
    pub fn parse(table: &'d [u8], text: TextStart) -> Result<Self, String> {
        let header = table.get(..8).ok_or("truncated header")?;
        let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let version = match magic {
            GO12_MAGIC => Version::Go12,
            GO116_MAGIC => Version::Go116,
            GO118_MAGIC | GO120_MAGIC => Version::Go118,
            _ => return Err(format!("unknown magic {magic:#x}")),
        };
        let (quantum, pointer_size) = (header[6], header[7]);
        if header[4..6] != [0, 0]
            || ![1, 2, 4].contains(&quantum)
            || ![4, 8].contains(&pointer_size)
        {
            return Err("malformed header".into());
        }
        let pointer_size = usize::from(pointer_size);
        let word = |index: usize| read_uint(table, 8 + index * pointer_size, pointer_size);
        let from = |index: usize| -> Result<&'d [u8], String> {
            let offset = word(index).ok_or("truncated header")?;
            usize::try_from(offset)
                .ok()
                .and_then(|offset| table.get(offset..))
                .ok_or_else(|| format!("header offset {offset:#x} past the table"))
        };
        let function_count = word(0)
            .filter(|&n| n <= MAX_FUNCTIONS)
            .ok_or("implausible function count")?;
        let (text_start, function_names, functab) = match version {
            Version::Go118 => {
                let field = word(2).ok_or("truncated header")?;
                let text_start = text.choose(field)?;
                (text_start, from(3)?, from(7)?)
            }
            Version::Go116 => (0, from(2)?, from(6)?),
            Version::Go12 => {
                let functab = table.get(8 + pointer_size..).ok_or("truncated header")?;
                (0, table, functab)
            }
        };
        let pclntab = Pclntab {
            version,
            pointer_size,
            function_count: usize::try_from(function_count).map_err(|e| e.to_string())?,
            text_start,
            table,
            function_names,
            functab,
        };
        pclntab.check_functab()?;
        Ok(pclntab)
    }

    /// The functions named in `names`, in table order. A name the table
    /// lists twice is reported twice.
    pub fn functions_named(&self, names: &HashSet<&str>) -> Vec<Function> {
        (0..self.function_count)
            .filter_map(|index| {
                let name = self.name(index)?;
                let name = std::str::from_utf8(name)
                    .ok()
                    .filter(|n| names.contains(n))?;
                Some(Function {
                    name: name.to_owned(),
                    entry: self.entry(index)?,
                    end: self.entry(index + 1)?,
                })
            })
            .collect()
    }

    /// The end of the function that starts at `entry`, if one does.
    pub fn end_of(&self, entry: u64) -> Option<u64> {
        let (mut low, mut high) = (0, self.function_count);
        while low < high {
            let middle = low + (high - low) / 2;
            match self.entry(middle)?.cmp(&entry) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return self.entry(middle + 1),
            }
        }
        None
    }

    /// Checks the table is all there and its entries ascend, so that
    /// [`Pclntab::end_of`]'s search and every function's end are sound.
    fn check_functab(&self) -> Result<(), String> {
        let fields = self
            .function_count
            .checked_mul(2)
            .and_then(|n| n.checked_add(1));
        let size = fields.and_then(|n| n.checked_mul(self.field_size()));
        if size.is_none_or(|size| size > self.functab.len()) {
            return Err(format!(
                "function table of {} functions is truncated",
                self.function_count
            ));
        }
        let mut previous = 0;
        for index in 0..=self.function_count {
            let entry = self.entry(index).ok_or("unreadable function entry")?;
            if entry < previous {
                return Err(format!("function entries out of order at {index}"));
            }
            previous = entry;
        }
        Ok(())
    }

    /// Size of one `functab` field: 32-bit offsets since Go 1.18.
    fn field_size(&self) -> usize {
        match self.version {
            Version::Go118 => 4,
            Version::Go116 | Version::Go12 => self.pointer_size,
        }
    }

    fn field(&self, index: usize) -> Option<u64> {
        read_uint(
            self.functab,
            index.checked_mul(self.field_size())?,
            self.field_size(),
        )
    }

    /// Entry address of function `index` (`function_count`: the end of the
    /// last function).
    fn entry(&self, index: usize) -> Option<u64> {
        self.text_start
            .checked_add(self.field(index.checked_mul(2)?)?)
    }

    /// The name of function `index`, without its terminating NUL.
    fn name(&self, index: usize) -> Option<&'d [u8]> {
        let record_offset =
            usize::try_from(self.field(index.checked_mul(2)?.checked_add(1)?)?).ok()?;
        let (records, name_at) = match self.version {
            Version::Go118 => (self.functab, 4),
            Version::Go116 => (self.functab, self.pointer_size),
            Version::Go12 => (self.table, self.pointer_size),
        };
        let name_field = record_offset.checked_add(name_at)?;
        let name_offset = usize::try_from(read_uint(records, name_field, 4)?).ok()?;
        let name = self.function_names.get(name_offset..)?;
        let end = name.iter().position(|&b| b == 0)?;
        Some(&name[..end])
    }
}

/// A table found by its header in the non-executable segments: section
/// headers were removed (`sstrip`, some packers). Go's linker aligns the
/// header to at least 8 bytes.
fn scan_segments<'d>(image: &Image<'d>, text: TextStart) -> Result<Pclntab<'d>, String> {
    let mut last_error = String::from("no Go function table in the segments");
    for load in image.loads.iter().filter(|load| !load.executable()) {
        let Some(bytes) = image.load_bytes(load) else {
            continue;
        };
        let skip = usize::try_from(load.offset.wrapping_neg() % 8).unwrap_or(0);
        for at in (skip..bytes.len().saturating_sub(8)).step_by(8) {
            if !looks_like_header(&bytes[at..at + 8]) {
                continue;
            }
            let text = TextStart {
                module_data: text
                    .symbol
                    .is_none()
                    .then(|| module_data_text(image, load.address + at as u64, &bytes[at..]))
                    .flatten(),
                ..text
            };
            match Pclntab::parse(&bytes[at..], text) {
                Ok(table) if table.function_count > 0 => return Ok(table),
                Ok(_) => {}
                Err(e) => {
                    last_error =
                        format!("header at file offset {:#x}: {e}", load.offset + at as u64)
                }
            }
        }
    }
    Err(last_error)
}

/// Where the text starts, from the runtime's `moduledata` for the table at
/// `table_address` (`table`: its bytes): a record in a writable segment
/// whose first word points at the table, then `funcnametab` (a slice),
/// and so on (runtime/symtab.go, unchanged from Go 1.16 to 1.27); `text`
/// and `etext` are words 22 and 23, after `minpc` (the first function's
/// entry) and `maxpc`. Go 1.26+ no longer writes the start in the table's
/// header. Only for 64-bit Go 1.18+ tables.
fn module_data_text(image: &Image<'_>, table_address: u64, table: &[u8]) -> Option<u64> {
    const FUNCNAMETAB: usize = 1;
    const MINPC: usize = 20;
    const TEXT: usize = 22;
    const ETEXT: usize = 23;
    let names_address = table_address.checked_add(read_uint(table, 8 + 3 * 8, 8)?)?;
    let first_entry = u64::from(u32::try_from(read_uint(table, 8 + 7 * 8, 8)?).ok()?);
    let first_entry = read_uint(table, usize::try_from(first_entry).ok()?, 4)?;
    image
        .loads
        .iter()
        .filter(|load| load.writable())
        .filter_map(|load| Some((load.offset, image.load_bytes(load)?)))
        .find_map(|(offset, bytes)| {
            let skip = usize::try_from(offset.wrapping_neg() % 8).ok()?;
            (skip..bytes.len().saturating_sub(8 * (ETEXT + 1)))
                .step_by(8)
                .filter(|&at| read_uint(bytes, at, 8) == Some(table_address))
                .find_map(|at| {
                    let word = |index: usize| read_uint(bytes, at + 8 * index, 8);
                    let text = word(TEXT)?;
                    let plausible = word(FUNCNAMETAB)? == names_address
                        && text.checked_add(first_entry)? == word(MINPC)?
                        && text < word(ETEXT)?;
                    plausible.then_some(text)
                })
        })
}

fn looks_like_header(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [0xf0 | 0xf1 | 0xfa | 0xfb, 0xff, 0xff, 0xff, 0, 0, 1, 8]
    )
}

/// A little-endian unsigned integer of `size` bytes (at most 8) at `at`.
fn read_uint(bytes: &[u8], at: usize, size: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(size)?)?;
    let mut buf = [0u8; 8];
    buf.get_mut(..size)?.copy_from_slice(raw);
    Some(u64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(address: u64) -> TextStart {
        TextStart {
            symbol: None,
            section: Some(address),
            module_data: None,
        }
    }

    /// A Go 1.20-style table with the given (name, entry offset) functions
    /// and the end offset.
    fn table_go120(functions: &[(&str, u32)], end: u32) -> Vec<u8> {
        let header_len = 8 + 8 * 8;
        let mut names = Vec::new();
        let mut name_offsets = Vec::new();
        for (name, _) in functions {
            name_offsets.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let names_at = header_len;
        let functab_at = names_at + names.len();
        let records_at = (functions.len() * 2 + 1) * 4;
        let mut functab = Vec::new();
        let mut records = Vec::new();
        for (i, (_, entry)) in functions.iter().enumerate() {
            functab.extend_from_slice(&entry.to_le_bytes());
            functab.extend_from_slice(&((records_at + records.len()) as u32).to_le_bytes());
            records.extend_from_slice(&entry.to_le_bytes());
            records.extend_from_slice(&name_offsets[i].to_le_bytes());
        }
        functab.extend_from_slice(&end.to_le_bytes());
        let mut table = vec![0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        for word in [functions.len(), 0, 0, names_at, 0, 0, 0, functab_at] {
            table.extend_from_slice(&(word as u64).to_le_bytes());
        }
        table.extend_from_slice(&names);
        table.extend_from_slice(&functab);
        table.extend_from_slice(&records);
        table
    }

    #[test]
    fn finds_functions_and_their_ends() {
        let table = table_go120(&[("main.a", 0), ("main.b", 0x40), ("main.c", 0x90)], 0x100);
        let pclntab = Pclntab::parse(&table, hint(0x401000)).unwrap();
        let wanted = HashSet::from(["main.b", "main.c", "main.zz"]);
        let found = pclntab.functions_named(&wanted);
        assert_eq!(
            found,
            [
                Function {
                    name: "main.b".into(),
                    entry: 0x401040,
                    end: 0x401090
                },
                Function {
                    name: "main.c".into(),
                    entry: 0x401090,
                    end: 0x401100
                },
            ]
        );
        assert_eq!(pclntab.end_of(0x401000), Some(0x401040));
        assert_eq!(pclntab.end_of(0x401090), Some(0x401100));
        assert_eq!(pclntab.end_of(0x401041), None);
    }

    /// A Go 1.16 table: 8-byte functab fields holding addresses, `_func`
    /// records starting with the entry address.
    fn table_go116(functions: &[(&str, u64)], end: u64) -> Vec<u8> {
        let header_len = 8 + 7 * 8;
        let names: Vec<u8> = functions
            .iter()
            .flat_map(|(name, _)| name.bytes().chain([0]))
            .collect();
        let functab_at = header_len + names.len();
        let records_at = (functions.len() * 2 + 1) * 8;
        let mut functab = Vec::new();
        let mut records = Vec::new();
        let mut name_offset = 0u32;
        for (name, entry) in functions {
            functab.extend_from_slice(&entry.to_le_bytes());
            functab.extend_from_slice(&((records_at + records.len()) as u64).to_le_bytes());
            records.extend_from_slice(&entry.to_le_bytes());
            records.extend_from_slice(&name_offset.to_le_bytes());
            name_offset += name.len() as u32 + 1;
        }
        functab.extend_from_slice(&end.to_le_bytes());
        let mut table = vec![0xfa, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        for word in [functions.len(), 0, header_len, 0, 0, 0, functab_at] {
            table.extend_from_slice(&(word as u64).to_le_bytes());
        }
        table.extend_from_slice(&names);
        table.extend_from_slice(&functab);
        table.extend_from_slice(&records);
        table
    }

    /// A Go 1.2 table: functab right after the count; record and name
    /// offsets from the start of the table.
    fn table_go12(functions: &[(&str, u64)], end: u64) -> Vec<u8> {
        let functab_len = (functions.len() * 2 + 1) * 8;
        let records_at = 16 + functab_len + 4;
        let names_at = records_at + functions.len() * 12;
        let mut table = vec![0xfb, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        table.extend_from_slice(&(functions.len() as u64).to_le_bytes());
        let mut records = Vec::new();
        let mut names = Vec::new();
        for (i, (name, entry)) in functions.iter().enumerate() {
            table.extend_from_slice(&entry.to_le_bytes());
            table.extend_from_slice(&((records_at + i * 12) as u64).to_le_bytes());
            records.extend_from_slice(&entry.to_le_bytes());
            records.extend_from_slice(&((names_at + names.len()) as u32).to_le_bytes());
            names.extend(name.bytes().chain([0]));
        }
        table.extend_from_slice(&end.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes()); // file table offset, unused
        table.extend_from_slice(&records);
        table.extend_from_slice(&names);
        table
    }

    #[test]
    fn older_layouts_give_addresses() {
        let functions = [("main.a", 0x401000), ("main.b", 0x401040)];
        for table in [
            table_go116(&functions, 0x401100),
            table_go12(&functions, 0x401100),
        ] {
            let pclntab = Pclntab::parse(&table, TextStart::default()).unwrap();
            let found = pclntab.functions_named(&HashSet::from(["main.a", "main.b"]));
            assert_eq!(
                found,
                [
                    Function {
                        name: "main.a".into(),
                        entry: 0x401000,
                        end: 0x401040
                    },
                    Function {
                        name: "main.b".into(),
                        entry: 0x401040,
                        end: 0x401100
                    },
                ]
            );
        }
    }

    #[test]
    fn text_start_comes_from_the_hint_or_the_header() {
        let mut table = table_go120(&[("main.a", 0x10)], 0x20);
        assert!(Pclntab::parse(&table, TextStart::default()).is_err());
        table[24..32].copy_from_slice(&0x500000u64.to_le_bytes());
        let pclntab = Pclntab::parse(&table, TextStart::default()).unwrap();
        assert_eq!(pclntab.end_of(0x500010), Some(0x500020));
    }

    #[test]
    fn unordered_or_truncated_tables_are_errors() {
        let table = table_go120(&[("main.a", 0x40), ("main.b", 0x10)], 0x100);
        assert!(Pclntab::parse(&table, hint(0)).is_err());
        let table = table_go120(&[("main.a", 0), ("main.b", 0x10)], 0x100);
        for len in 0..table.len() - 16 {
            // Any prefix parses to an error or to a table whose lookups
            // stay in bounds.
            if let Ok(t) = Pclntab::parse(&table[..len], hint(0)) {
                let _ = t.functions_named(&HashSet::from(["main.a"]));
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut table = table_go120(&[("main.a", 0), ("main.b", 0x10)], 0x100);
            for _ in 0..4 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (state >> 33) as usize % table.len();
                table[at] = (state >> 17) as u8;
            }
            if let Ok(t) = Pclntab::parse(&table, hint(0x1000)) {
                let _ = t.functions_named(&HashSet::from(["main.a", "main.b"]));
                let _ = t.end_of(0x1010);
            }
        }
    }
}
