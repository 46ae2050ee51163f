//! The return instructions of a Go function, where return probes go: a
//! uretprobe rewrites the return address on the stack, which Go's stack
//! copying (goroutine stacks move as they grow) does not tolerate, so Go
//! functions are probed at each `RET` instead.
//!
//! The body is decoded linearly from its entry to its end: Go's compiler
//! puts no data inside functions on x86-64, and the padding after a body
//! (`int3`) decodes as instructions too. Anything that does not decode
//! makes the whole function an error: a probe placed inside an
//! instruction would corrupt the traced program.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic};

use super::image::Image;

/// Where a function returns and what it calls directly, as file offsets.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CodeSites {
    /// Every `RET`.
    pub returns: Vec<u64>,
    /// Every `call rel32`: (the call instruction, its target).
    pub calls: Vec<(u64, u64)>,
}

/// The [`CodeSites`] of the function at virtual addresses `[entry, end)`.
pub(super) fn code_sites(image: &Image<'_>, entry: u64, end: u64) -> Result<CodeSites, String> {
    let len = end
        .checked_sub(entry)
        .filter(|&len| len > 0)
        .ok_or_else(|| format!("empty function at {entry:#x}"))?;
    let body = image
        .bytes_at(entry, len)
        .ok_or_else(|| format!("function {entry:#x}..{end:#x} is not all in one loaded segment"))?;
    let entry_offset = image
        .offset_of(entry)
        .ok_or_else(|| format!("{entry:#x} is not in the file"))?;
    let sites = positions(body)?;
    Ok(CodeSites {
        returns: sites.returns.into_iter().map(|at| entry_offset + at).collect(),
        calls: sites
            .calls
            .into_iter()
            .map(|(at, target)| (entry_offset + at, entry_offset.wrapping_add(target)))
            .collect(),
    })
}

/// Positions of the return instructions in the x86-64 machine code `body`,
/// from its start.
#[cfg(test)]
fn return_positions(body: &[u8]) -> Result<Vec<u64>, String> {
    positions(body).map(|s| s.returns)
}

/// [`CodeSites`] relative to the start of `body` (a call's target may be
/// before it: a wrapped negative).
fn positions(body: &[u8]) -> Result<CodeSites, String> {
    let mut decoder = Decoder::with_ip(64, body, 0, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut sites = CodeSites::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            return Err(format!(
                "undecodable instruction at +{:#x}",
                instruction.ip()
            ));
        }
        if is_return(&instruction) {
            sites.returns.push(instruction.ip());
        } else if instruction.code() == Code::Call_rel32_64 {
            sites.calls.push((instruction.ip(), instruction.near_branch_target()));
        }
    }
    Ok(sites)
}

/// Near returns (`ret`, `ret imm16`, with any prefix); far returns and
/// `iret` are never in Go code.
fn is_return(instruction: &Instruction) -> bool {
    instruction.mnemonic() == Mnemonic::Ret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_return_and_only_returns() {
        let body = [
            0x48, 0x83, 0xec, 0x18, // sub $0x18,%rsp
            0xb8, 0xc3, 0x00, 0x00, 0x00, // mov $0xc3,%eax (a 0xc3 byte that is no ret)
            0x74, 0x01, // je +1
            0xc3, // ret
            0x48, 0x83, 0xc4, 0x18, // add $0x18,%rsp
            0xc3, // ret
            0xcc, 0xcc, 0xcc, // int3 padding
        ];
        assert_eq!(return_positions(&body).unwrap(), [11, 16]);
    }

    #[test]
    fn finds_direct_calls_forwards_and_backwards() {
        let body = [
            0xe8, 0x10, 0x00, 0x00, 0x00, // call +0x10 (to 0x15)
            0xe8, 0xf6, 0xff, 0xff, 0xff, // call -0xa (to 0x0)
            0xff, 0xd0, // call *%rax: not direct
            0xc3,
        ];
        let sites = positions(&body).unwrap();
        assert_eq!(sites.calls, [(0, 0x15), (5, 0)]);
        assert_eq!(sites.returns, [12]);
    }

    #[test]
    fn truncated_or_invalid_code_is_an_error() {
        assert!(return_positions(&[0x48, 0x83]).is_err());
        assert!(return_positions(&[0x0f, 0x0b, 0x06]).is_err()); // ud2, then push %es (invalid in 64-bit)
        assert_eq!(return_positions(&[]).unwrap(), Vec::<u64>::new());
    }
}
