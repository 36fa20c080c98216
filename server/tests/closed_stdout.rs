//! A closed standard output (`cohort-server runs | head`) ends the CLI quietly, as it ends a
//! Unix tool: status 141, no panic message. It used to panic with "failed printing to stdout:
//! Broken pipe".

use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    // The pipe's reading end is closed before the program starts: its first write fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-server"))
        .args(["init", "--name", "pipe", "--san", "localhost", "--state"])
        .arg(dir.path().join("state"))
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(dir.path().join("state/ca.pem").exists(), "the work was done; only its report went nowhere");
}
