//! The agent's checked-in table of Go struct offsets
//! (`agent/src/discovery/go_offsets_table.rs`) matches what every Go
//! toolchain's DWARF says now: `cargo xtask go-offsets --check` builds a small
//! program with each toolchain and fails with a diff on any difference.
//! No agent is started.

use periscope_tests::proc::run_capture;
use periscope_tests::{run_test, workspace_root};
use std::process::Command;
use std::time::Duration;

/// Cold Go build caches take about 30 s per toolchain, plus building xtask.
const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn go_offsets_table_matches_every_toolchain() {
    run_test(LIMIT, || {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "go-offsets",
                "--check",
            ])
            // The variables `cargo test` set for this test would describe the
            // wrong package to the nested build.
            .env_remove("CARGO_MANIFEST_DIR")
            .env_remove("CARGO_PKG_NAME")
            .env_remove("CARGO_CRATE_NAME");
        run_capture(
            "xtask go-offsets --check",
            &mut cmd,
            LIMIT - Duration::from_secs(10),
        )?
        .ok()?;
        Ok(())
    });
}
