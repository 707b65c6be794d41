//! Debian packages the tests use, installed with apt-get when missing (the test command needs
//! nothing but the Rust toolchain, and root with apt, on a fresh machine).

use std::process::{Command, Stdio};

/// Installs `packages` with apt-get, after an update; what failed otherwise.
pub fn apt_install(packages: &[&str]) -> Result<(), String> {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["update", "-q"]) {
        return Err("apt-get update failed".into());
    }
    let mut install = vec!["install", "-y", "-q"];
    install.extend_from_slice(packages);
    if !apt(&install) {
        return Err(format!("apt-get install {} failed", packages.join(" ")));
    }
    Ok(())
}
