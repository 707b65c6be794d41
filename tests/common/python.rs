//! Python tools from PyPI (botocore, grpcio, prometheus-client, kubernetes-validate), installed
//! into `target/` on first use: outputs are checked by parsers nobody here wrote.

/// A `PYTHONPATH` under `target/` where `probe` (Python code) runs, installing `packages`
/// there with pip first when it does not.
pub fn python_packages(dir: &str, packages: &[&str], probe: &str) -> std::path::PathBuf {
    // Tests of one binary run as threads: one installs while the others wait for it, so no
    // two pips write into one directory.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(dir);
    let works = |path: &std::path::Path| {
        std::process::Command::new("python3")
            .args(["-c", probe])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(&target) {
        let installed = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&target)
            .args(packages)
            .status()
            .expect("python3 -m pip runs");
        assert!(installed.success(), "pip could not install {packages:?} into {}", target.display());
        assert!(works(&target), "{packages:?} installed but the probe still fails");
    }
    target
}

/// A `PYTHONPATH` under which `import botocore` works with a model that knows Deadline Cloud.
pub fn botocore_path() -> std::path::PathBuf {
    python_packages(
        "pydeps",
        &["botocore"],
        "import botocore.session as s; assert 'deadline' in s.get_session().get_available_services()",
    )
}

/// Runs `tests/{script}` with `args` under `pythonpath` (within two minutes) and requires it to
/// succeed, showing its output when it does not.
pub async fn python_check(script: &str, args: &[&str], pythonpath: &std::path::Path) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(path).args(args).env("PYTHONPATH", pythonpath).env_remove("AWS_PROFILE");
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
        .await
        .expect("finishes in time")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
