//! botocore decodes every modelled exception of the emulator into its typed error and pages
//! through its results (`tests/botocore_check.py`). botocore is installed into `target/` by pip
//! when the machine lacks it.

mod common;

use common::{emulator, python_packages};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `PYTHONPATH` under which `import botocore` works with a model that knows Deadline Cloud.
fn botocore_path() -> PathBuf {
    python_packages(
        "pydeps",
        &["botocore"],
        "import botocore.session as s; assert 'deadline' in s.get_session().get_available_services()",
    )
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
