//! The `senet` binary: adapter listing, and the clear failure when there is no adapter.

use std::process::Command;

fn senet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_senet"))
}

/// With the Vulkan loader pointed at no driver, there is no adapter: exit code 2 and the message
/// that says what to install — never a panic.
#[test]
fn no_adapter_is_a_clear_error_with_exit_code_2() {
    let out = senet()
        .arg("devices")
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .output()
        .expect("run senet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("no Vulkan/Metal/DX12 adapter found"), "stderr: {stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

#[test]
fn devices_lists_the_adapter_it_selects() {
    let out = senet().arg("devices").output().expect("run senet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "senet devices failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("storage buffers/stage"), "{stdout}");
    assert!(stdout.contains("selected: "), "{stdout}");
}

#[test]
fn an_unknown_backend_is_rejected_with_the_valid_ones() {
    let out = senet().args(["devices", "--backend", "opengles3000"]).output().expect("run senet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("vulkan, metal, dx12, gl"), "stderr: {stderr}");
}
