//! The Linux capabilities the agent runs with, and what each one is for: a
//! container given fewer starts anyway, with what works, and says which
//! features are unavailable and why.

/// (bit, name, what it is needed for), as the DaemonSet grants them.
pub const NEEDED: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "loading the kernel programs and maps"),
    (38, "CAP_PERFMON", "attaching tracepoints and uprobes (perf_event_open)"),
    (21, "CAP_SYS_ADMIN", "uprobes, on kernels that require it for perf_event_open (this one does)"),
    (19, "CAP_SYS_PTRACE", "reading other processes' /proc entries (executable, environment, root)"),
    (2, "CAP_DAC_READ_SEARCH", "opening other processes' executables and libraries to find their functions"),
];

/// The effective set (`CapEff` of /proc/self/status); None if unreadable.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The needed capabilities missing from `effective`: (name, what for).
pub fn missing(effective: u64) -> Vec<(&'static str, &'static str)> {
    NEEDED
        .iter()
        .filter(|(bit, _, _)| effective & (1u64 << bit) == 0)
        .map(|&(_, name, what)| (name, what))
        .collect()
}

/// Whether an attach error is the kernel refusing permission (EACCES or
/// EPERM from perf_event_open), anywhere in its chain.
pub fn is_permission_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied || io.raw_os_error() == Some(1))
    }) || {
        let text = format!("{e:#}");
        text.contains("Permission denied") || text.contains("Operation not permitted")
    }
}

/// Why uprobes are unavailable, after the kernel refused one.
pub fn uprobes_refused_reason() -> String {
    let missing_admin = effective().is_some_and(|eff| eff & (1 << 21) == 0);
    if missing_admin {
        "the kernel refused uprobes (perf_event_open: permission denied): this kernel requires CAP_SYS_ADMIN for them, \
         which the agent does not have; TLS plaintext (OpenSSL, GnuTLS, Go) and getaddrinfo are not seen"
            .to_string()
    } else {
        "the kernel refused uprobes (perf_event_open: permission denied): TLS plaintext (OpenSSL, GnuTLS, Go) and \
         getaddrinfo are not seen"
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_and_what_is_missing() {
        let status = "Name:\tperiscope\nCapInh:\t0000000000000000\nCapEff:\t000000c000080004\n";
        let eff = parse_cap_eff(status).unwrap();
        // BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH (and bit 21 clear).
        assert_eq!(missing(eff), vec![("CAP_SYS_ADMIN", NEEDED[2].2)]);
        assert!(missing(u64::MAX).is_empty());
        assert_eq!(missing(0).len(), NEEDED.len());
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn permission_errors_are_recognised_through_the_chain() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(io).context("attaching ssl_rw_ret");
        assert!(is_permission_error(&e));
        let eperm = anyhow::Error::new(std::io::Error::from_raw_os_error(1));
        assert!(is_permission_error(&eperm));
        assert!(!is_permission_error(&anyhow::anyhow!("program missing")));
    }
}
