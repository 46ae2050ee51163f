//! Periscope's kernel programs. Built for `bpfel-unknown-none` by the agent's
//! build script; on the host this is an empty binary so the workspace builds.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod kernel;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
