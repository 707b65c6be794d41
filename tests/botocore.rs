//! botocore decodes every modelled exception of the emulator into its typed error and pages
//! through its results (`tests/botocore_check.py`). botocore is installed into `target/` by pip
//! when the machine lacks it.

mod common;

use common::emulator;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A `PYTHONPATH` under which `import botocore` works with a model that knows Deadline Cloud.
fn botocore_path() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("pydeps");
    let probe = |path: &Path| {
        Command::new("python3")
            .args(["-c", "import botocore.session as s; assert 'deadline' in s.get_session().get_available_services()"])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !probe(&target) {
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&target)
            .arg("botocore")
            .status()
            .expect("python3 -m pip runs");
        assert!(installed.success(), "pip could not install botocore into {}", target.display());
        assert!(probe(&target), "botocore installed but cannot be imported");
    }
    target
}

#[tokio::test]
async fn botocore_decodes_every_exception_and_pages() {
    let path = tokio::task::spawn_blocking(botocore_path).await.expect("joins");
    let emu = emulator(Duration::from_secs(2), Duration::from_secs(600)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("botocore_check.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script).arg(emu.endpoint_url()).env("PYTHONPATH", path).env_remove("AWS_PROFILE");
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("finishes in time")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "botocore check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
