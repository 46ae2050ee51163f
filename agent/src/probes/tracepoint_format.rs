//! Field offsets of classic tracepoints, read from their format files in
//! tracefs rather than assumed.

use anyhow::{Context, Result, anyhow};
use periscope_ebpf::MmapTracepointOffsets;

pub const TRACEFS: &str = "/sys/kernel/tracing";

pub fn mmap_offsets(category: &str, name: &str) -> Result<MmapTracepointOffsets> {
    let path = format!("{TRACEFS}/events/{category}/{name}/format");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (is tracefs mounted at {TRACEFS}?)"))?;
    Ok(MmapTracepointOffsets {
        prot: field_offset(&text, "prot").ok_or_else(|| anyhow!("no 'prot' field in {path}"))?,
        fd: field_offset(&text, "fd").ok_or_else(|| anyhow!("no 'fd' field in {path}"))?,
    })
}

/// The offset of field `name` in a tracepoint format description.
pub fn field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let field = decl.trim().rsplit(' ').next()?.trim_start_matches('*');
        if field != name {
            return None;
        }
        rest.trim().strip_prefix("offset:")?.split(';').next()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: sys_enter_mmap\nID: 101\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:unsigned long prot;\toffset:32;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned long fd;\toffset:48;\tsize:8;\tsigned:0;\n";

    #[test]
    fn parses_offsets() {
        assert_eq!(field_offset(FORMAT, "prot"), Some(32));
        assert_eq!(field_offset(FORMAT, "fd"), Some(48));
        assert_eq!(field_offset(FORMAT, "addr"), None);
    }

    #[test]
    fn running_kernel_mmap_format() {
        let off = mmap_offsets("syscalls", "sys_enter_mmap").expect("tracefs mounted (cargo xtask sets it up)");
        assert!(off.prot > 8 && off.fd > off.prot);
    }
}
