//! An ELF file as the loader maps it: its PT_LOAD segments, by virtual
//! address and by file offset. Addresses are translated through segments,
//! never sections, so files whose section headers were removed work too.

use object::{Object, ObjectSection, ObjectSegment, SegmentFlags};

const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// One PT_LOAD segment's file-backed part.
#[derive(Clone, Copy, Debug)]
pub(super) struct Load {
    pub address: u64,
    pub offset: u64,
    /// p_filesz: the bytes the file holds (the rest of p_memsz is zeroes).
    pub file_size: u64,
    pub flags: u32,
}

impl Load {
    pub fn executable(&self) -> bool {
        self.flags & PF_X != 0
    }

    pub fn writable(&self) -> bool {
        self.flags & PF_W != 0
    }

    fn offset_of(&self, address: u64) -> Option<u64> {
        let within = address
            .checked_sub(self.address)
            .filter(|&w| w < self.file_size)?;
        self.offset.checked_add(within)
    }
}

/// A parsed ELF file and its bytes.
pub(super) struct Image<'d> {
    pub data: &'d [u8],
    pub elf: object::File<'d>,
    pub loads: Vec<Load>,
}

impl<'d> Image<'d> {
    /// `Ok(None)` when `data` is not an ELF file at all.
    pub fn parse(data: &'d [u8]) -> Result<Option<Self>, String> {
        if !data.starts_with(b"\x7fELF") {
            return Ok(None);
        }
        let elf = object::File::parse(data).map_err(|e| format!("malformed ELF: {e}"))?;
        let loads = elf
            .segments()
            .map(|segment| {
                let (offset, file_size) = segment.file_range();
                let flags = match segment.flags() {
                    SegmentFlags::Elf { p_flags } => p_flags,
                    _ => 0,
                };
                Load {
                    address: segment.address(),
                    offset,
                    file_size,
                    flags,
                }
            })
            .collect();
        Ok(Some(Image { data, elf, loads }))
    }

    /// The file offset that holds virtual address `address`.
    pub fn offset_of(&self, address: u64) -> Option<u64> {
        self.loads.iter().find_map(|load| load.offset_of(address))
    }

    /// The bytes from virtual address `address` to the end of the file-backed
    /// part of its segment.
    pub fn bytes_from(&self, address: u64) -> Option<&'d [u8]> {
        let load = self
            .loads
            .iter()
            .find(|load| load.offset_of(address).is_some())?;
        let start = load.offset_of(address)?;
        let end = load.offset.checked_add(load.file_size)?;
        self.file_range(start, end)
    }

    /// `len` bytes at virtual address `address`, all inside one segment.
    pub fn bytes_at(&self, address: u64, len: u64) -> Option<&'d [u8]> {
        self.bytes_from(address)?.get(..usize::try_from(len).ok()?)
    }

    /// The file bytes of a load segment.
    pub fn load_bytes(&self, load: &Load) -> Option<&'d [u8]> {
        self.file_range(load.offset, load.offset.checked_add(load.file_size)?)
    }

    /// A named section's virtual address and file bytes (None when the file
    /// has no such section, or it has no file data).
    pub fn section(&self, name: &str) -> Option<(u64, &'d [u8])> {
        let section = self.elf.section_by_name(name)?;
        let (offset, size) = section.file_range()?;
        let bytes = self.file_range(offset, offset.checked_add(size)?)?;
        Some((section.address(), bytes))
    }

    pub fn has_section_headers(&self) -> bool {
        self.elf.sections().next().is_some()
    }

    fn file_range(&self, start: u64, end: u64) -> Option<&'d [u8]> {
        let start = usize::try_from(start).ok()?;
        let end = usize::try_from(end).ok()?.min(self.data.len());
        self.data.get(start..end)
    }
}
