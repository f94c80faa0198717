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

/// `senet train` on the bundled sample (cut down) writes the run folder, and `senet eval` reads it.
#[test]
fn train_then_eval_on_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let status = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "2", "--batch-size", "50"])
        .args(["--limit-train", "120", "--limit-test", "70", "--out"])
        .arg(&out)
        .output()
        .expect("run senet train");
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "train failed: {}\n{stdout}", String::from_utf8_lossy(&status.stderr));
    for f in ["config.json", "metrics.csv", "best.safetensors", "last.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing from the run folder");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header and one line per epoch:\n{csv}");
    let eval = senet()
        .args(["eval", "--dataset", "sample", "--limit-test", "70", "--json", "--checkpoint"])
        .arg(out.join("last.safetensors"))
        .output()
        .expect("run senet eval");
    assert!(eval.status.success(), "eval failed: {}", String::from_utf8_lossy(&eval.stderr));
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("eval --json prints JSON");
    assert_eq!(v["total"], 70);
    for key in ["accuracy", "loss", "correct", "per_class_accuracy", "confusion"] {
        assert!(v.get(key).is_some(), "eval JSON lacks {key}: {v}");
    }
    // The last epoch's test accuracy in metrics.csv is what eval measures on the last checkpoint.
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    let acc: f64 = last[4].parse().unwrap();
    assert!((v["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "eval {} vs training's {acc}", v["accuracy"]);
}

#[test]
fn nonsense_arguments_are_rejected_up_front() {
    for (flag, value, expect) in [
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--lr", "-1", "--lr must be a positive number"),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--width", "0.001", "rounds the first layer"),
        ("--reduction", "100000", "--reduction 100000 must be between 1"),
    ] {
        let out = senet()
            .args(["train", "--dataset", "sample", &format!("{flag}={value}"), "--out"])
            .arg(std::env::temp_dir().join("senet-never"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(expect), "{flag} {value}: {stderr}");
    }
}
