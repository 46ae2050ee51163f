//! Builds the kernel programs (agent-ebpf) for the BPF target with the
//! nightly toolchain and bpf-linker; `cargo xtask build` installs both.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "periscope-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
}
