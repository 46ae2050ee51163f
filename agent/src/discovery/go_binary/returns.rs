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

/// File offsets of every `RET` in the function at virtual addresses
/// `[entry, end)`.
pub(super) fn return_offsets(image: &Image<'_>, entry: u64, end: u64) -> Result<Vec<u64>, String> {
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
    let returns = return_positions(body)?;
    Ok(returns.into_iter().map(|at| entry_offset + at).collect())
}

/// Positions (from the start of `body`) of the return instructions in
/// the x86-64 machine code `body`.
fn return_positions(body: &[u8]) -> Result<Vec<u64>, String> {
    let mut decoder = Decoder::with_ip(64, body, 0, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut returns = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            return Err(format!(
                "undecodable instruction at +{:#x}",
                instruction.ip()
            ));
        }
        if is_return(&instruction) {
            returns.push(instruction.ip());
        }
    }
    Ok(returns)
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
    fn truncated_or_invalid_code_is_an_error() {
        assert!(return_positions(&[0x48, 0x83]).is_err());
        assert!(return_positions(&[0x0f, 0x0b, 0x06]).is_err()); // ud2, then push %es (invalid in 64-bit)
        assert_eq!(return_positions(&[]).unwrap(), Vec::<u64>::new());
    }
}
