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
