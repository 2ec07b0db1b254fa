//! The deploy files as their engines read them: the systemd units pass
//! `systemd-analyze verify` (Debian's systemd; scripts/test.sh installs it
//! when missing) with ExecStart pointed at the binaries this build made, and
//! a unit with a bad key does not.

use std::process::Command;

use rlhf_tests::*;

/// `systemd-analyze verify` of `unit` (a file name in `dir`): its output.
fn verify(dir: &std::path::Path, unit: &str) -> String {
    let out = Command::new("systemd-analyze")
        .args(["verify", &format!("./{unit}")])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_systemd_units_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = bin("rlhf-worker").parent().unwrap().to_path_buf();
    let src = workspace_root().join("deploy/systemd");
    for (file, unit) in
        [("rlhf-coordinator.service", "rlhf-coordinator.service"), ("rlhf-worker@.service", "rlhf-worker@0.service")]
    {
        let text =
            std::fs::read_to_string(src.join(file)).unwrap().replace("/usr/local/bin", &bin_dir.display().to_string());
        std::fs::write(tmp.path().join(unit), &text).unwrap();
        let out = verify(tmp.path(), unit);
        assert!(out.trim().is_empty(), "{file}: {out}");
        // The check can fail: the same unit with an unknown key is reported.
        std::fs::write(tmp.path().join("bogus.service"), text.replace("[Service]", "[Service]\nBogusKey=1")).unwrap();
        assert!(verify(tmp.path(), "bogus.service").contains("Unknown key 'BogusKey'"), "{file}");
    }
}
