//! Kernel struct field offsets, read from the running kernel's BTF so the
//! programs never depend on one kernel's layout.

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use periscope_ebpf::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn from_running_kernel() -> Result<KernelOffsets> {
    let btf = Btf::from_file(VMLINUX_BTF)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("reading kernel BTF from {VMLINUX_BTF} (CONFIG_DEBUG_INFO_BTF is required)"))?;
    from_btf(&btf)
}

pub fn from_btf(btf: &Btf) -> Result<KernelOffsets> {
    let sock_common = |field: &str| field_offset(btf, "sock_common", field);
    Ok(with_packing(KernelOffsets {
        skc_daddr: sock_common("skc_daddr")?,
        skc_rcv_saddr: sock_common("skc_rcv_saddr")?,
        skc_dport: sock_common("skc_dport")?,
        skc_num: sock_common("skc_num")?,
        skc_family: sock_common("skc_family")?,
        skc_v6_daddr: sock_common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sock_common("skc_v6_rcv_saddr")?,
        // struct sock starts with its sock_common, so these offsets are valid
        // from a `struct sock *` as well.
        sk_protocol: field_offset(btf, "sock", "sk_protocol")?,
        pt_regs_di: field_offset(btf, "pt_regs", "di")?,
        pt_regs_si: field_offset(btf, "pt_regs", "si")?,
        pt_regs_dx: field_offset(btf, "pt_regs", "dx")?,
        pt_regs_orig_ax: field_offset(btf, "pt_regs", "orig_ax")?,
        binprm_file: field_offset(btf, "linux_binprm", "file")?,
        binprm_filename: field_offset(btf, "linux_binprm", "filename")?,
        file_dentry: field_offset(btf, "file", "f_path")? + field_offset(btf, "path", "dentry")?,
        dentry_name: field_offset(btf, "dentry", "d_name")? + field_offset(btf, "qstr", "name")?,
        task_mm: field_offset(btf, "task_struct", "mm")?,
        mm_env_start: field_offset(btf, "mm_struct", "env_start")?,
        mm_env_end: field_offset(btf, "mm_struct", "env_end")?,
        task_files: field_offset(btf, "task_struct", "files")?,
        files_fdt: field_offset(btf, "files_struct", "fdt")?,
        fdtable_fd: field_offset(btf, "fdtable", "fd")?,
        fdtable_max_fds: field_offset(btf, "fdtable", "max_fds")?,
        file_private_data: field_offset(btf, "file", "private_data")?,
        socket_sk: field_offset(btf, "socket", "sk")?,
        mm_exe_file: field_offset(btf, "mm_struct", "exe_file")?,
        file_inode: field_offset(btf, "file", "f_inode")?,
        inode_ino: field_offset(btf, "inode", "i_ino")?,
        inode_sb: field_offset(btf, "inode", "i_sb")?,
        sb_dev: field_offset(btf, "super_block", "s_dev")?,
        task_tgid: field_offset(btf, "task_struct", "tgid")?,
        sk_err: field_offset(btf, "sock", "sk_err")?,
        sock_common_packed: 0,
        pt_regs_packed: 0,
    }))
}

/// Marks the layouts the programs can read with one copy.
fn with_packing(mut off: KernelOffsets) -> KernelOffsets {
    let d = off.skc_daddr;
    off.sock_common_packed =
        (off.skc_rcv_saddr == d + 4 && off.skc_dport == d + 12 && off.skc_num == d + 14 && off.skc_family == d + 16)
            as u32;
    let x = off.pt_regs_dx;
    off.pt_regs_packed = (off.pt_regs_si == x + 8 && off.pt_regs_di == x + 16 && off.pt_regs_orig_ax == x + 24) as u32;
    off
}

/// Byte offset of `field` in struct `name`, looking through anonymous
/// struct/union members. Bitfields are refused: the programs read whole bytes.
pub fn field_offset(btf: &Btf, name: &str, field: &str) -> Result<u32> {
    let types = btf.resolve_types_by_name(name).map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("struct {name} not in kernel BTF"))?;
    for ty in types {
        if let Type::Struct(s) = ty
            && let Some(bits) = find_member(btf, &s, field, 0)? {
                if bits % 8 != 0 {
                    bail!("{name}.{field} is not byte aligned");
                }
                return Ok(bits / 8);
            }
    }
    bail!("field {name}.{field} not found in kernel BTF")
}

fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str, base_bits: u32) -> Result<Option<u32>> {
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let offset = base_bits + member.bit_offset();
        if member_name == field {
            if member.bitfield_size().is_some_and(|size| size != 0) {
                bail!("{field} is a bitfield");
            }
            return Ok(Some(offset));
        }
        if member_name.is_empty() {
            let mut ty = btf.resolve_chained_type(member).map_err(|e| anyhow!("{e}"))?;
            // Skip qualifiers and typedefs down to the anonymous aggregate.
            loop {
                match ty {
                    Type::Const(_) | Type::Volatile(_) | Type::Typedef(_) => {
                        let inner = ty.as_btf_type().ok_or_else(|| anyhow!("bad BTF chain"))?;
                        ty = btf.resolve_chained_type(inner).map_err(|e| anyhow!("{e}"))?;
                    }
                    _ => break,
                }
            }
            match ty {
                Type::Struct(inner) | Type::Union(inner) => {
                    if let Some(found) = find_member(btf, &inner, field, offset)? {
                        return Ok(Some(found));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the real kernel's BTF; every machine this runs on has it
    /// (the agent cannot work without it either).
    #[test]
    fn offsets_of_running_kernel_are_consistent() {
        let off = from_running_kernel().expect("kernel BTF");
        // struct sock_common begins with the address pair, then hash, then ports.
        assert_eq!(off.skc_daddr, 0);
        assert_eq!(off.skc_rcv_saddr, 4);
        assert_eq!(off.skc_dport + 2, off.skc_num);
        assert!(off.skc_family > off.skc_num);
        assert!(off.sk_protocol > off.skc_v6_rcv_saddr);
        // x86_64 pt_regs: orig_ax follows di (ABI order of struct pt_regs).
        assert_eq!(off.pt_regs_orig_ax, off.pt_regs_di + 8);
        // This kernel's layouts are the packed ones the programs read in one copy.
        assert_eq!(off.sock_common_packed, 1);
        assert_eq!(off.pt_regs_packed, 1);
        let mut moved = off;
        moved.skc_family += 2;
        assert_eq!(with_packing(moved).sock_common_packed, 0);
        let mut moved = off;
        moved.pt_regs_si += 8;
        assert_eq!(with_packing(moved).pt_regs_packed, 0);
    }
}
