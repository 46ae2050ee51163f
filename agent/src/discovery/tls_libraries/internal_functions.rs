//! OpenSSL's internal read and write functions, found by following its
//! exported wrappers' machine code.
//!
//! In OpenSSL 1.1.1 and 3.x, `SSL_read` and `SSL_read_ex` both call
//! `ssl_read_internal(SSL *, void *buf, size_t num, size_t *readbytes)`,
//! and `SSL_write`/`SSL_write_ex` call `ssl_write_internal`; neither is
//! exported. They take the `_ex` functions' arguments and return 1 on
//! success with the count in `*readbytes`/`*written`, so the `_ex` programs
//! hook them unchanged. Hooking them instead of the wrappers:
//! - costs less per call on x86: the kernel emulates a few instructions at a
//!   probe and single-steps every other one out of line, a debug trap that a
//!   hypervisor intercepts. Debian's wrappers start with `sub $N,%rsp`
//!   (single-stepped); the internal functions with `push` (emulated);
//! - halves the probes: one function serves both wrappers of a family;
//! - sees programs that read through OpenSSL's BIO layer (`BIO_f_ssl`, as
//!   in `openssl s_server -www`), which calls the internal functions directly.
//!
//! The functions are found by decoding each wrapper until its first direct
//! call and are accepted only under the checks of [`find`]; otherwise the
//! exported wrappers are hooked, as before.

use std::collections::HashMap;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};
use object::{Object, ObjectSection, SectionKind};

/// The hook names given to the two internal functions (OpenSSL's own names).
pub const READ_INTERNAL: &str = "ssl_read_internal";
pub const WRITE_INTERNAL: &str = "ssl_write_internal";

/// Each internal function and the exported wrappers that call it.
pub const FAMILIES: [(&str, [&str; 2]); 2] = [
    (READ_INTERNAL, ["SSL_read", "SSL_read_ex"]),
    (WRITE_INTERNAL, ["SSL_write", "SSL_write_ex"]),
];

/// A thin wrapper calls its internal function within a few instructions
/// (Debian's `SSL_read`: the 9th); a call found later is something else.
const MAX_WRAPPER_INSTRUCTIONS: usize = 16;
/// The longest x86 instruction.
const MAX_INSTRUCTION_LEN: usize = 15;

/// The internal functions' file offsets, `[read, write]` in [`FAMILIES`]
/// order, given the file's exported symbols (`defined`: name -> file
/// offset). Accepted only when, for each family:
/// - every wrapper the file defines starts with an instruction the kernel
///   single-steps (a wrapper that starts with an emulated one is not the
///   thin wrapper looked for: Node's OpenSSL inlines the internal function
///   into `SSL_read`, whose first call goes elsewhere), then reaches a direct
///   `call rel32` within [`MAX_WRAPPER_INSTRUCTIONS`] on its straight-line
///   path (conditional branches are stepped over, any other jump, return or
///   indirect call ends the search);
/// - all of the family's wrappers call the same target, which lies in an
///   executable section of the same file and starts with an instruction the
///   kernel emulates ([`kernel_emulates`]);
///
/// and the read and write targets differ (two wrappers of different
/// families that first call one shared helper are not calling their
/// internal functions).
pub fn find(
    elf: &object::File<'_>,
    data: &[u8],
    defined: &HashMap<&str, u64>,
) -> Result<[u64; 2], String> {
    if elf.architecture() != object::Architecture::X86_64 {
        return Err("not an x86-64 file".into());
    }
    let code = ExecSections::of(elf);
    let read = family_target(&code, data, &FAMILIES[0], defined)?;
    let write = family_target(&code, data, &FAMILIES[1], defined)?;
    if read == write {
        return Err(format!(
            "the read and write wrappers all call the same function (at {read:#x})"
        ));
    }
    Ok([read, write])
}

/// The one function a family's wrappers call, as a file offset.
fn family_target(
    code: &ExecSections,
    data: &[u8],
    (internal, wrappers): &(&str, [&str; 2]),
    defined: &HashMap<&str, u64>,
) -> Result<u64, String> {
    let mut target = None;
    for name in wrappers {
        let Some(&offset) = defined.get(name) else {
            continue;
        };
        let address = first_call(code, data, offset).map_err(|e| format!("{name}: {e}"))?;
        match target {
            Some(seen) if seen != address => {
                return Err(format!(
                    "{} call different functions ({seen:#x}, {address:#x})",
                    wrappers.join(" and ")
                ));
            }
            _ => target = Some(address),
        }
    }
    let address = target.ok_or_else(|| format!("none of {} is defined", wrappers.join(", ")))?;
    let offset = code.offset_of(address).ok_or_else(|| {
        format!(
            "{internal}: the call target {address:#x} is outside the file's executable sections"
        )
    })?;
    let (first, bytes) = decode_first(code, data, offset)
        .ok_or_else(|| format!("{internal}: no instruction at {offset:#x}"))?;
    if !kernel_emulates(bytes) {
        return Err(format!(
            "{internal} at {offset:#x} starts with `{first:?}`, which the kernel single-steps"
        ));
    }
    Ok(offset)
}

/// The address the wrapper at file offset `offset` first calls directly.
fn first_call(code: &ExecSections, data: &[u8], offset: u64) -> Result<u64, String> {
    let (address, bytes) = code
        .bytes_at(data, offset)
        .ok_or("not in an executable section")?;
    let window = &bytes[..bytes
        .len()
        .min(MAX_WRAPPER_INSTRUCTIONS * MAX_INSTRUCTION_LEN)];
    let mut decoder = Decoder::with_ip(64, window, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    for i in 0..MAX_WRAPPER_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return Err(format!(
                "undecodable instruction at {:#x}",
                instruction.ip()
            ));
        }
        if i == 0 && kernel_emulates(&window[..instruction.len()]) {
            return Err(format!(
                "starts with `{:?}`, already emulated: not a thin wrapper",
                instruction.code()
            ));
        }
        match instruction.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            FlowControl::Call if instruction.code() == Code::Call_rel32_64 => {
                return Ok(instruction.near_branch_target());
            }
            _ => {
                return Err(format!(
                    "`{:?}` at {:#x} before any direct call",
                    instruction.code(),
                    instruction.ip()
                ));
            }
        }
    }
    Err(format!(
        "no direct call in its first {MAX_WRAPPER_INSTRUCTIONS} instructions"
    ))
}

/// The instruction at file offset `offset` (its code and bytes), if it
/// decodes.
fn decode_first<'d>(code: &ExecSections, data: &'d [u8], offset: u64) -> Option<(Code, &'d [u8])> {
    let (address, bytes) = code.bytes_at(data, offset)?;
    let window = &bytes[..bytes.len().min(MAX_INSTRUCTION_LEN)];
    let instruction = Decoder::with_ip(64, window, address, DecoderOptions::NONE).decode();
    (!instruction.is_invalid()).then(|| (instruction.code(), &window[..instruction.len()]))
}

/// Whether a uprobe on the instruction `bytes` (exactly one) is emulated by
/// the x86 kernel rather than single-stepped: what arch/x86/kernel/uprobes.c
/// (`branch_setup_xol_ops`, `push_setup_xol_ops`) emulates at a function's
/// start, byte for byte: `push r64` (one byte, or two with exactly the REX.B
/// prefix 0x41), the one-byte `nop`, `jmp rel8`/`jmp rel32` and
/// `call rel32`. Any 0x66 prefix makes the kernel refuse the branches;
/// conditional jumps are emulated too but never start a function; the
/// multi-byte `nopl` (0f 1f) is single-stepped. Older kernels without
/// `push_setup_xol_ops` single-step `push` too: there the move saves only
/// the second wrapper's probe.
fn kernel_emulates(bytes: &[u8]) -> bool {
    matches!(
        *bytes,
        [0x50..=0x57]
            | [0x41, 0x50..=0x57]
            | [0x90]
            | [0xeb, _]
            | [0xe9, _, _, _, _]
            | [0xe8, _, _, _, _]
    )
}

/// A file's executable sections: where its code is, by address and by file
/// offset.
struct ExecSections {
    /// (address, file offset, size)
    ranges: Vec<(u64, u64, u64)>,
}

impl ExecSections {
    fn of(elf: &object::File<'_>) -> Self {
        let ranges = elf
            .sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .filter_map(|s| {
                let (offset, size) = s.file_range()?;
                Some((s.address(), offset, size))
            })
            .collect();
        ExecSections { ranges }
    }

    /// File offset of a code address.
    fn offset_of(&self, address: u64) -> Option<u64> {
        self.ranges.iter().find_map(|&(start, offset, size)| {
            let within = address.checked_sub(start).filter(|&w| w < size)?;
            offset.checked_add(within)
        })
    }

    /// The code address of file offset `offset`, and the bytes from there
    /// to the end of its section.
    fn bytes_at<'d>(&self, data: &'d [u8], offset: u64) -> Option<(u64, &'d [u8])> {
        self.ranges
            .iter()
            .find_map(|&(start, section_offset, size)| {
                let within = offset.checked_sub(section_offset).filter(|&w| w < size)?;
                let end = usize::try_from(section_offset.checked_add(size)?)
                    .ok()?
                    .min(data.len());
                let bytes = data.get(usize::try_from(offset).ok()?..end)?;
                Some((start.checked_add(within)?, bytes))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_emulates;

    #[test]
    fn emulated_first_instructions_match_the_kernel() {
        let emulated: &[&[u8]] = &[
            &[0x55],             // push %rbp
            &[0x53],             // push %rbx
            &[0x41, 0x57],       // push %r15
            &[0x90],             // nop
            &[0xeb, 0x10],       // jmp rel8
            &[0xe9, 0, 1, 0, 0], // jmp rel32
            &[0xe8, 0, 1, 0, 0], // call rel32
        ];
        let stepped: &[&[u8]] = &[
            &[0x48, 0x83, 0xec, 0x18], // sub $0x18,%rsp
            &[0x49, 0x55],             // push %r13 with REX.W
            &[0x66, 0x90],             // xchg %ax,%ax
            &[0x0f, 0x1f, 0x40, 0x00], // nopl 0x0(%rax)
            &[0xf3, 0x0f, 0x1e, 0xfa], // endbr64
            &[0x66, 0xe9, 0, 1],       // jmp rel16
            &[0xff, 0x25, 0, 0, 0, 0], // jmp *(%rip): a PLT entry
            &[0x74, 0x02],             // je: emulated, but never a start
            &[0xc3],                   // ret
            &[],
        ];
        for bytes in emulated {
            assert!(kernel_emulates(bytes), "{bytes:02x?}");
        }
        for bytes in stepped {
            assert!(!kernel_emulates(bytes), "{bytes:02x?}");
        }
    }
}
