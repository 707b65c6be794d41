//! botocore decodes every modelled exception of the emulator into its typed error and pages
//! through its results (`tests/botocore_check.py`). botocore is installed into `target/` by pip
//! when the machine lacks it.

mod common;

use common::{botocore_path, emulator, python_check};
use std::time::Duration;

#[tokio::test]
async fn botocore_decodes_every_exception_and_pages() {
    let path = tokio::task::spawn_blocking(botocore_path).await.expect("joins");
    let emu = emulator(Duration::from_secs(2), Duration::from_secs(600)).await;
    python_check("botocore_check.py", &[&emu.endpoint_url()], &path).await;
}
