//! The `senet` binary: adapter listing, and the clear failure when there is no adapter.

use std::process::Command;

fn senet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_senet"))
}

/// `o` is a refusal of bad input: exit code 2 and every text of `expect` in stderr (which is
/// returned for further checks). `what` names the case in a failure.
fn refused(o: &std::process::Output, what: &str, expect: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{what}: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "{what}: expected {e:?} in {stderr}");
    }
    stderr
}

/// Every file under `dir` (recursively), by path relative to it, with its bytes.
fn files(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    out
}

/// `dir` holds exactly the files of `before`, byte for byte: what a refusal must leave.
#[track_caller]
fn unchanged(dir: &std::path::Path, before: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>, what: &str) {
    let after = files(dir);
    let names = |m: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&after), names(before), "{what}: the files of {} changed", dir.display());
    for (name, bytes) in before {
        assert!(after[name] == *bytes, "{what}: {} was rewritten in {}", name.display(), dir.display());
    }
}

/// A real run in `dir` (the sample, width 1/16, one epoch of 64 images: config.json, metrics.csv,
/// metrics.png, last/best/resume checkpoints), and its files: the folder a refusal must not touch.
fn populated_run(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let o = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--batch-size", "32"])
        .args(["--limit-train", "64", "--limit-test", "32", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = files(dir);
    assert!(before.len() >= 4, "a run folder: {:?}", before.keys().collect::<Vec<_>>());
    before
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

/// On a headless server (no XDG_RUNTIME_DIR, no Wayland or X display) the commands that open the
/// GPU print nothing on stderr that is not theirs: Mesa's device-select Vulkan layer, asked for the
/// compositor's GPU, made libwayland print "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment." twice per Vulkan instance before anything else. Success writes no stderr at all.
#[test]
fn a_headless_machine_gets_no_stderr_noise() {
    let headless = |args: &[&str]| {
        let mut cmd = senet();
        cmd.args(args);
        for var in ["XDG_RUNTIME_DIR", "WAYLAND_DISPLAY", "WAYLAND_SOCKET", "DISPLAY", "NODEVICE_SELECT"] {
            cmd.env_remove(var);
        }
        cmd.env_remove("MESA_VK_DEVICE_SELECT").env_remove("DRI_PRIME");
        let out = cmd.output().expect("run senet");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "senet {args:?}: {stderr}");
        assert!(!stderr.contains("XDG_RUNTIME_DIR"), "senet {args:?} printed the Wayland noise:\n{stderr}");
        assert_eq!(stderr, "", "senet {args:?} wrote to stderr");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(headless(&["devices"]).contains("selected: "));
    let plan = headless(&["plan", "--width", "0.0625", "--batch-size", "2", "--tune", "off"]);
    assert!(plan.contains("conv2d"), "{plan}");
}

/// `senet devices` says per adapter which kernel paths run and why the others do not; forcing a
/// path the adapter cannot run is an error naming the missing feature (exit 2), not a silent
/// fallback.
#[test]
fn devices_prints_each_path_and_refuses_a_forced_one_it_lacks() {
    let run = |args: &[&str]| {
        let out = senet().args(args).env_remove("SENET_COOP").env_remove("SENET_SUBGROUPS").output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["devices"]);
    assert_eq!(code, Some(0), "{stderr}");
    for row in [
        "largest buffer: ",
        "largest workgroup: ",
        "f16 (--precision f16)",
        "subgroup reductions",
        "cooperative matrices",
        "timestamp queries",
    ] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
    // lavapipe: f16 and subgroups (of 8 lanes on a 256-bit LLVM) run; Mesa 22 lists no cooperative matrix.
    assert!(stdout.contains("  f16 (--precision f16)  on\n"), "{stdout}");
    assert!(stdout.contains("  subgroup reductions    on, size "), "{stdout}");
    let (_, stdout, _) = run(&["devices", "--f16", "off"]);
    assert!(stdout.contains("f16 (--precision f16)  off: turned off (--f16 off)"), "{stdout}");
    assert!(stdout.contains("cooperative matrices   off: needs f16 shaders, which are off"), "{stdout}");
    let (code, stdout, stderr) = run(&["devices", "--coop", "on", "--f16", "off"]);
    assert_eq!(code, Some(2), "forcing a path the adapter lacks: {stdout}\n{stderr}");
    assert!(stderr.contains("cooperative matrices were forced on (--coop on)"), "{stderr}");
    assert!(stdout.contains("  error: cooperative matrices were forced on"), "each adapter says it too:\n{stdout}");
}

#[test]
fn an_unknown_backend_is_rejected_with_the_valid_ones() {
    let out = senet().args(["devices", "--backend", "opengles3000"]).output().expect("run senet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("vulkan, metal, dx12, gl"), "stderr: {stderr}");
}

/// Reductions run on subgroups where the adapter has them (lavapipe does), `--subgroups off`
/// turns them off, and a bad SENET_SUBGROUPS value is an error that names it.
#[test]
fn subgroups_are_used_by_default_and_can_be_turned_off() {
    let selected = |args: &[&str], env: Option<&str>| {
        let mut cmd = senet();
        cmd.args(args).env_remove("SENET_SUBGROUPS");
        if let Some(v) = env {
            cmd.env("SENET_SUBGROUPS", v);
        }
        let out = cmd.output().expect("run senet");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = selected(&["devices"], None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("reductions: subgroups (size"), "{stdout}");
    let (_, stdout, _) = selected(&["devices", "--subgroups", "off"], None);
    assert!(stdout.contains("reductions: workgroup trees"), "{stdout}");
    let (_, stdout, _) = selected(&["devices"], Some("off"));
    assert!(stdout.contains("reductions: workgroup trees"), "{stdout}");
    // The flag wins over the environment.
    let (_, stdout, _) = selected(&["devices", "--subgroups", "auto"], Some("off"));
    assert!(stdout.contains("reductions: subgroups (size"), "{stdout}");
    let (code, _, stderr) = selected(&["devices"], Some("sometimes"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("'sometimes'") && stderr.contains("--subgroups"), "{stderr}");
    assert!(stderr.contains("auto, on, off"), "{stderr}");
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
    // predict: top-5 classes with probabilities for an image file.
    let img = dir.path().join("shoe.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 3) % 256) as u8])).save(&img).unwrap();
    let pred = senet().args(["predict", "--checkpoint"]).arg(out.join("last.safetensors")).arg(&img).output().unwrap();
    assert!(pred.status.success(), "predict failed: {}", String::from_utf8_lossy(&pred.stderr));
    let text = String::from_utf8_lossy(&pred.stdout);
    let probs: Vec<f64> = text.lines().skip(1).map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    assert_eq!(probs.len(), 5, "{text}");
    assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-4, "{text}");
    assert!(
        text.contains("Ankle boot") || text.contains("Sneaker") || text.contains("T-shirt/top"),
        "class names: {text}"
    );

    // excitations: per class and channel of the one SE block (features.16, 64 channels at this
    // width), a ranking sorted by mean excitation, and a plot.
    let exc = dir.path().join("exc");
    let o = senet()
        .args(["excitations", "--dataset", "sample", "--limit-test", "70", "--checkpoint"])
        .arg(out.join("last.safetensors"))
        .arg("--out")
        .arg(&exc)
        .output()
        .unwrap();
    assert!(o.status.success(), "excitations failed: {}", String::from_utf8_lossy(&o.stderr));
    let rows = std::fs::read_to_string(exc.join("excitations.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 10 * 64, "header + 10 classes x 64 channels");
    let ranking = std::fs::read_to_string(exc.join("ranking.csv")).unwrap();
    let means: Vec<f64> = ranking.lines().skip(1).map(|l| l.split(',').nth(3).unwrap().parse().unwrap()).collect();
    assert_eq!(means.len(), 64);
    assert!(means.windows(2).all(|w| w[0] >= w[1]), "ranking sorted by mean excitation");
    assert!(means.iter().all(|&m| m > 0.0 && m < 1.0), "sigmoid excitations lie in (0, 1)");
    assert!(exc.join("excitations_features_16.png").is_file());

    // The last epoch's test accuracy in metrics.csv is what eval measures on the last checkpoint.
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    let acc: f64 = last[4].parse().unwrap();
    assert!((v["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "eval {} vs training's {acc}", v["accuracy"]);
}

/// An image folder written by `make-sample --format png`, trained on by an ImageNet-style ResNet at
/// a larger size (`--image-size`), and evaluated: eval resizes the folder to the size the run
/// was trained at without being told.
#[test]
fn se_resnet18_trains_on_an_image_folder_at_a_larger_size() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("pngs");
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fashion-mnist-sample");
    let o = senet()
        .args(["make-sample", "--from", sample, "--format", "png", "--train", "40", "--test", "20", "--out"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(o.status.success(), "make-sample failed: {}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("run");
    let o = senet()
        .args([
            "train",
            "--dataset",
            "folder",
            "--image-size",
            "40",
            "--model",
            "se-resnet18",
            "--width",
            "0.125",
            "--reduction",
            "4",
            // A bare state dict holds no normalisation: compared below with the run's own.
            "--no-normalize",
        ])
        .args(["--epochs", "1", "--batch-size", "20", "--data-dir"])
        .arg(&folder)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["input_hw"], serde_json::json!([40, 40]));
    let eval = senet()
        .args(["eval", "--dataset", "folder", "--json", "--data-dir"])
        .arg(&folder)
        .arg("--checkpoint")
        .arg(out.join("last.safetensors"))
        .output()
        .unwrap();
    assert!(eval.status.success(), "eval failed: {}", String::from_utf8_lossy(&eval.stderr));
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(v["total"], 20);

    // predict on the bare state dict (no config.json beside it) at --image-size 40 with timm's
    // crop_pct gives what it gives with the run's config.json: a model trained on a folder is
    // asked as its evaluation split was read (Resize(40 / 0.875) + CenterCrop(40)).
    let bare = dir.path().join("bare.safetensors");
    std::fs::copy(out.join("last.safetensors"), &bare).unwrap();
    let img = std::fs::read_dir(folder.join("test/Trouser")).unwrap().next().unwrap().unwrap().path();
    let predict = |ckpt: &std::path::Path, extra: &[&str]| {
        let o = senet().args(["predict", "--checkpoint"]).arg(ckpt).args(extra).arg(&img).output().unwrap();
        assert!(o.status.success(), "predict failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().skip(1).map(str::to_owned).collect::<Vec<_>>()
    };
    let with_config = predict(&out.join("last.safetensors"), &[]);
    let bare_40 = predict(&bare, &["--image-size", "40", "--crop-pct", "0.875"]);
    // The bare file names classes by index, the run by name: compare the probabilities.
    let probs =
        |lines: &[String]| lines.iter().map(|l| l.split_whitespace().next().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(probs(&bare_40), probs(&with_config));
}

#[test]
fn nonsense_arguments_are_rejected_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let before = populated_run(&run);
    for (flag, value, expect) in [
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--lr", "-1", "--lr must be a positive number"),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--width", "0.001", "rounds the first layer"),
        ("--reduction", "100000", "--reduction 100000 must be between 1"),
        ("--image-size", "0", "from 1 to 4096 pixels"),
        ("--image-size", "64x", "from 1 to 4096 pixels"),
        ("--image-size", "64", "--image-size resizes image folders"),
        ("--grad-accum-steps", "0", "--grad-accum-steps must be at least 1"),
        ("--model-ema-decay", "1.5", "--model-ema-decay must be in [0, 1)"),
        ("--best-on", "ema", "--best-on ema needs --model-ema"),
        ("--mixup", "-1", "--mixup must be a finite number >= 0"),
        ("--mixup-prob", "1.5", "--mixup-prob must be a probability in [0, 1]"),
        ("--mixup-mode", "elem", "--mixup-mode elem says how Mixup/CutMix draw, but neither is on"),
        ("--mixup-off-epoch", "2", "--mixup-off-epoch 2 stops Mixup/CutMix, but neither is on"),
    ] {
        let out = senet()
            .args(["train", "--dataset", "sample", &format!("{flag}={value}"), "--out"])
            .arg(&run)
            .output()
            .unwrap();
        refused(&out, &format!("{flag} {value}"), &[expect]);
        unchanged(&run, &before, &format!("{flag} {value}"));
    }
}

/// The ResNeXts' and SENet-154's flags: what does not apply or cannot build is refused before any
/// data is read, naming the flag; `--help` lists the names.
#[test]
fn resnext_and_senet154_flags_are_checked_up_front() {
    for (args, expect) in [
        (&["--model", "resnext50-32x4d", "--se-placement", "pre"][..], "resnext50-32x4d has no SE blocks"),
        (&["--model", "senet154", "--width", "0.3"], "--width 0.3 gives senet154 19 groups"),
        (&["--model", "resnext101-32x4d", "--width", "0.02"], "the smallest width is 0.03125"),
        (&["--model", "se-resnext50-32x4d", "--reduction", "0"], "--reduction 0 must be between 1"),
        (&["--model", "resnext50-32x0d"], "--model \"resnext50-32x0d\": expected one of"),
    ] {
        let o = senet()
            .args(["train", "--dataset", "folder", "--data-dir", "/nonexistent/senet"])
            .args(args)
            .output()
            .unwrap();
        let stderr = refused(&o, &format!("{args:?}"), &[expect]);
        assert!(!stderr.contains("nonexistent"), "the model is checked before the data: {stderr}");
    }
    let help = senet().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("se-resnext50-32x4d") && help.contains("senet154"), "{help}");
}

/// Trains `args` for 2 epochs into `dir`/a and for 1 into `dir`/b, then resumes b to 2 epochs:
/// both last.safetensors must be equal byte for byte (`what` names the run in a failure). Returns
/// run a's stdout and the resume's.
fn resume_matches_uninterrupted(dir: &std::path::Path, args: &[&str], what: &str) -> (String, String) {
    let train = |out: &std::path::Path, epochs: &str| {
        let o =
            senet().arg("train").args(args).args(["--epochs", epochs, "--out"]).arg(out).output().expect("run train");
        assert!(o.status.success(), "{what}: train --epochs {epochs} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    let log = train(&a, "2");
    train(&b, "1");
    let out = senet().args(["train", "--epochs", "2", "--resume"]).arg(&b).output().expect("resume");
    assert!(out.status.success(), "{what}: resume failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert!(
        read(a.join("last.safetensors")) == read(b.join("last.safetensors")),
        "{what}: resumed weights differ from the uninterrupted run's"
    );
    (log, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A run interrupted after epoch 1 and resumed ends with the same weights, bit for bit, as the
/// same run uninterrupted: every reduction runs in a fixed order, the loader's shuffle and
/// augmentation are seeded per epoch, and the resume file holds the optimizer's moments and step.
#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--dataset", "sample", "--width", "0.0625", "--batch-size", "64", "--augment", "--limit-train", "150"];
    let args = [&args[..], &["--limit-test", "40", "--seed", "5"]].concat();
    let (_, resumed) = resume_matches_uninterrupted(dir.path(), &args, "f32");
    assert!(resumed.contains("resuming"), "{resumed}");
    let csv = std::fs::read_to_string(dir.path().join("b").join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "one header and two epochs after resuming:\n{csv}");
}

/// `--grad-accum-steps 3 --model-ema --model-ema-warmup` on the sample: 5 batches an epoch, so
/// groups of 3 and 2 (the short last group of timm's train.py); resumed after epoch 1 it ends bit
/// for bit as the uninterrupted run, the model and the EMA (restored from resume.safetensors) alike.
/// metrics.csv gains the EMA's columns; best.safetensors is chosen on (and holds) the EMA's.
#[test]
fn grad_accum_and_model_ema_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--dataset", "sample", "--width", "0.0625", "--batch-size", "30", "--limit-train", "150"];
    let recipe = ["--grad-accum-steps", "3", "--model-ema", "--model-ema-decay", "0.99", "--model-ema-warmup"];
    let args =
        [&args[..], &recipe, &["--limit-test", "40", "--seed", "6", "--optimizer", "sgd", "--lr", "0.05"]].concat();
    resume_matches_uninterrupted(dir.path(), &args, "grad-accum + model-ema");
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert!(read(a.join("ema.safetensors")) == read(b.join("ema.safetensors")), "the resumed EMA differs");
    assert!(read(a.join("ema.safetensors")) != read(a.join("last.safetensors")), "the EMA is not the model");
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}"));
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let acc = |r: &Vec<&str>| -> f64 { r[col("ema_test_acc")].parse().unwrap() };
    let top = rows.iter().map(acc).fold(f64::NEG_INFINITY, f64::max);
    // best.safetensors is written at the first epoch reaching the best EMA accuracy.
    let ema_epoch = rows.iter().position(|r| acc(r) == top).unwrap();
    assert!(!rows[ema_epoch][col("ema_test_loss")].is_empty(), "{csv}");
    // That epoch's EMA is the last save's EMA when it is the last epoch.
    if ema_epoch + 1 == rows.len() {
        assert!(read(a.join("best.safetensors")) == read(a.join("ema.safetensors")), "best holds the EMA");
    }
}

/// `--mixup 0.8 --cutmix 1.0 --smoothing 0.1` (timm's flags) on the sample: the draws are a
/// function of (seed, epoch, step), so a run resumed after epoch 1 ends bit for bit as the
/// uninterrupted one; config.json keeps the settings.
#[test]
fn mixup_runs_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--dataset", "sample", "--width", "0.0625", "--batch-size", "25", "--limit-train", "100"];
    let mix = ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--limit-test", "40", "--seed", "8"];
    resume_matches_uninterrupted(dir.path(), &[&args[..], &mix].concat(), "mixup");
    let config = std::fs::read_to_string(dir.path().join("a").join("config.json")).unwrap();
    assert!(config.contains("\"cutmix\": 1.0") && config.contains("\"mixup_mode\": \"batch\""), "{config}");
}

/// `--mixup-mode elem` with `--mixup-off-epoch 1` and `--mixup-mode pair` (timm's flags): a run
/// resumed after epoch 1 ends bit for bit as the uninterrupted one (the per-image draws are a
/// function of seed, epoch and step; the resumed run reads the mode and the off epoch from
/// config.json, and its epoch 2 is unmixed); the banner says so; pair mode refuses an odd
/// --batch-size as timm asserts.
#[test]
fn mixup_modes_and_off_epoch_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--dataset", "sample", "--width", "0.0625", "--batch-size", "24", "--limit-train", "100"];
    let base = [&args[..], &["--mixup", "0.8", "--cutmix", "1.0", "--limit-test", "40", "--seed", "8"]].concat();
    let elem = [&base[..], &["--mixup-mode", "elem", "--mixup-off-epoch", "1"]].concat();
    let (log, _) = resume_matches_uninterrupted(&dir.path().join("elem"), &elem, "elem");
    assert!(log.contains("Mixup/CutMix (timm's, elem mode, off after epoch 1)"), "{log}");
    let config = std::fs::read_to_string(dir.path().join("elem/a/config.json")).unwrap();
    assert!(config.contains("\"mixup_mode\": \"elem\"") && config.contains("\"mixup_off_epoch\": 1"), "{config}");
    let pair = [&base[..], &["--mixup-mode", "pair"]].concat();
    resume_matches_uninterrupted(&dir.path().join("pair"), &pair, "pair");
    let read = |p: &str| std::fs::read(dir.path().join(p).join("a/last.safetensors")).unwrap();
    assert!(read("elem") != read("pair"), "the modes trained alike");
    let o = senet()
        .args(["train", "--dataset", "sample", "--mixup", "0.8", "--mixup-mode", "pair", "--batch-size", "25"])
        .output()
        .unwrap();
    refused(&o, "pair, odd batch", &["--mixup-mode pair", "--batch-size must be even", "got 25"]);
}

/// `--precision f16` (AMP): a short run on the sample logs its loss scale, evaluates its checkpoint
/// in f16 (the training log's test accuracy, exactly) and in f32 (within 3 of 70 images: the same
/// weights, activations rounded differently), and resumes bitwise exactly (the loss scaler's state
/// travels in resume.safetensors). An adapter without f16 shaders (`--f16 off` makes lavapipe
/// one) refuses it with exit 2, naming the adapter and the way out, before writing anything.
#[test]
fn f16_trains_evaluates_in_either_precision_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--dataset", "sample", "--width", "0.0625", "--batch-size", "50", "--precision", "f16"];
    let args = [&args[..], &["--limit-train", "120", "--limit-test", "70", "--seed", "3", "--log-every", "1"]].concat();
    let (log, _) = resume_matches_uninterrupted(dir.path(), &args, "f16");
    assert!(log.contains("loss scale 65536 (0 skipped)"), "the progress lines show the loss scale:\n{log}");
    let a = dir.path().join("a");

    let eval = |precision: &str| -> f64 {
        let o = senet()
            .args(["eval", "--dataset", "sample", "--limit-test", "70", "--json", "--precision", precision])
            .arg("--checkpoint")
            .arg(a.join("last.safetensors"))
            .output()
            .expect("run senet eval");
        assert!(o.status.success(), "eval --precision {precision}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("eval --json prints JSON");
        v["accuracy"].as_f64().unwrap()
    };
    let (acc16, acc32) = (eval("f16"), eval("f32"));
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    let logged: f64 = csv.lines().last().unwrap().split(',').nth(4).unwrap().parse().unwrap();
    assert!((acc16 - logged).abs() < 1e-9, "eval in f16 {acc16} vs the run's own test accuracy {logged}");
    assert!((acc16 - acc32).abs() <= 3.0 / 70.0 + 1e-9, "f16 {acc16} vs f32 {acc32}");

    let c = dir.path().join("c");
    let before = populated_run(&c);
    let o = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--precision", "f16", "--out"])
        .arg(&c)
        .args(["--f16", "off"])
        .output()
        .unwrap();
    refused(&o, "f16 on an adapter without it", &["llvmpipe", "no f16", "--precision f32"]);
    unchanged(&c, &before, "f16 on an adapter without it");
}

/// Ctrl-C (SIGINT) part-way through an epoch: the step finishes, the run is saved, the exit code
/// is 130 with the resume command; resuming from the middle of the epoch ends bitwise equal to
/// the uninterrupted run.
#[test]
fn sigint_saves_and_resumes_mid_epoch_exactly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &std::path::Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> =
            ["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "16"]
                .iter()
                .chain(&[
                    "--limit-train",
                    "400",
                    "--limit-test",
                    "40",
                    "--epochs",
                    "1",
                    "--log-every",
                    "1",
                    "--augment",
                    "--out",
                ])
                .map(|s| s.into())
                .collect();
        v.push(out.as_os_str().to_owned());
        v
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let whole = senet().args(args(&a)).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    let mut child = senet()
        .args(args(&b))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("step 3/25") {
            break;
        }
    }
    // Keep reading, as a terminal would, so the child never writes into a closed pipe.
    let drain = std::thread::spawn(move || lines.count());
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("senet train --resume"), "stderr: {stderr}");
    let stopped_at: usize =
        stderr.split("after step ").nth(1).and_then(|s| s.split(';').next()).and_then(|s| s.parse().ok()).unwrap();
    assert!((3..25).contains(&stopped_at), "stopped mid-epoch, at step {stopped_at}");

    let resumed = senet().args(["train", "--resume"]).arg(&b).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains(&format!("and {stopped_at} steps of the next")));
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert!(
        read(a.join("last.safetensors")) == read(b.join("last.safetensors")),
        "weights differ after a mid-epoch resume"
    );
    let line = |p: std::path::PathBuf| {
        std::fs::read_to_string(p).unwrap().lines().nth(1).unwrap().split(',').take(5).collect::<Vec<_>>().join(",")
    };
    assert_eq!(line(a.join("metrics.csv")), line(b.join("metrics.csv")), "the epoch's metrics match too");
}

/// A diverging run stops with the step and the first non-finite layer, and writes no checkpoint.
#[test]
fn divergence_is_reported_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let before = populated_run(dir.path());
    let out = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "16", "--limit-train", "64"])
        .args([
            "--limit-test",
            "16",
            "--epochs",
            "1",
            "--log-every",
            "1",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("diverged at epoch 1 step") && stderr.contains("first non-finite value in"), "{stderr}");
    // A new run in the folder starts its own config.json and metrics.csv; the checkpoints of the
    // run that was there stay byte for byte (the error says they were not overwritten).
    let after = files(dir.path());
    for name in ["last.safetensors", "best.safetensors", "resume.safetensors"] {
        let name = std::path::Path::new(name);
        assert!(before.contains_key(name), "the populated run has {}", name.display());
        assert!(after.get(name) == before.get(name), "{} was overwritten by a diverged run", name.display());
    }
}

/// Bad data is refused before the run folder is created: no partial output behind an error.
#[test]
fn bad_data_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::create_dir_all(data.join("test")).unwrap();
    let out = dir.path().join("run");
    let train = |out: &std::path::Path| {
        senet().args(["train", "--dataset", "folder", "--data-dir"]).arg(&data).arg("--out").arg(out).output().unwrap()
    };
    let stderr = refused(&train(&out), "an empty image folder", &["no class folders", "train"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "a failed start must not leave a run folder");
    // Nor touch a run folder that is there.
    let before = populated_run(&out);
    refused(&train(&out), "an empty image folder into a run folder", &["no class folders", "train"]);
    unchanged(&out, &before, "an empty image folder into a run folder");
}

/// `--recipe paper` fills in the paper's CIFAR recipe; flags given explicitly keep their values.
#[test]
fn the_paper_recipe_is_a_preset_of_flags() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &std::path::Path, extra: &[&str]| -> serde_json::Value {
        let o = senet()
            .args([
                "train",
                "--dataset",
                "sample",
                "--model",
                "se-resnet8",
                "--width",
                "0.5",
                "--reduction",
                "4",
                "--recipe",
                "paper",
            ])
            .args(["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        v["train"].clone()
    };
    let t = run(&dir.path().join("a"), &[]);
    assert_eq!(
        (t["optimizer"].as_str(), t["lr"].as_f64(), t["momentum"].as_f64()),
        (Some("sgd"), Some(0.1), Some(0.9))
    );
    assert_eq!((t["weight_decay"].as_f64(), t["schedule"].as_str()), (Some(1e-4), Some("step")));
    assert_eq!((t["augment"].as_bool(), t["normalize"].as_bool()), (Some(true), Some(true)));
    let t = run(&dir.path().join("b"), &["--lr", "0.05", "--weight-decay", "5e-4"]);
    assert_eq!((t["lr"].as_f64(), t["weight_decay"].as_f64()), (Some(0.05), Some(5e-4)));
}

/// `train --profile` prints the per-kernel table once, for a real step: the run ends with the same
/// weights as without it.
#[test]
fn profile_prints_the_kernel_table_without_changing_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &std::path::Path, extra: &[&str]| {
        let o = senet()
            .args(["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "32", "--epochs", "2"])
            .args(["--limit-train", "96", "--limit-test", "32", "--seed", "3", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train(&a, &[]);
    let out = train(&b, &["--profile"]);
    assert_eq!(out.matches("per-kernel profile of epoch 2, step 1").count(), 1, "{out}");
    for k in ["conv2d_forward", "conv2d_backward_weight", "se_block_forward", "adam_step", "%ceil"] {
        assert!(out.contains(k), "the profile lacks {k}:\n{out}");
    }
    assert!(std::fs::read(a.join("last.safetensors")).unwrap() == std::fs::read(b.join("last.safetensors")).unwrap());
}

#[test]
fn plan_prints_one_step_in_order() {
    let out = senet().args(["plan", "--width", "0.25", "--batch-size", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (lines, totals) = plan_table(&text);
    assert!(lines[0].contains("layer") && lines[0].contains("kernel"), "{text}");
    assert!(lines[1].contains("features.0") && lines[1].contains("Forward") && lines[1].contains("conv2d_forward"));
    assert!(lines.iter().any(|l| l.contains("Loss") && l.contains("cross_entropy")), "{text}");
    let last = lines.last().unwrap();
    assert!(last.contains("Optimizer") && last.contains("adam_step"), "{text}");
    // Below the table: the training step's and the evaluation pass's totals.
    assert!(totals[0].starts_with("train step") && totals[1].starts_with("eval pass"), "{text}");
    assert!(totals[0].contains(&format!("{} dispatches", lines.len() - 1)), "{text}");
    let json = senet().args(["plan", "--width", "0.25", "--batch-size", "2", "--json"]).output().unwrap();
    let json = String::from_utf8_lossy(&json.stdout);
    let last: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    assert_eq!(last["totals"]["train"]["dispatches"].as_u64(), Some(lines.len() as u64 - 1), "{json}");
    assert!(last["totals"]["eval"]["bytes_per_image"].as_f64().is_some_and(|b| b > 0.0), "{json}");
    let eval = senet().args(["plan", "--width", "0.25", "--batch-size", "2", "--eval"]).output().unwrap();
    let eval = String::from_utf8_lossy(&eval.stdout);
    assert!(
        !eval.contains("Backward")
            && !eval.contains("adam_step")
            && eval.contains("bn_fold_forward")
            && eval.contains("max_pool2d_forward")
            && !eval.contains("batch_norm"),
        "{eval}"
    );
    // An f16 step: the weights' cast, then the input's, ...; the loss scaler just before the optimizer.
    let out = senet().args(["plan", "--width", "0.25", "--batch-size", "2", "--precision", "f16"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (lines, _) = plan_table(&text);
    assert!(lines[1].contains("all parameters") && lines[1].contains("cast_forward"), "{text}");
    assert!(lines[2].contains("input") && lines[2].contains("cast_forward"), "{text}");
    let n = lines.len();
    assert!(lines[n - 3].contains("grad_scaler_reduce") && lines[n - 2].contains("grad_scaler_step"), "{text}");
    assert!(lines[n - 1].contains("adam_step"), "{text}");
}

/// `senet plan`'s table (header and one line per dispatch) and the two totals lines below it.
fn plan_table(text: &str) -> (Vec<&str>, Vec<&str>) {
    let mut lines: Vec<&str> = text.lines().collect();
    let totals = lines.split_off(lines.len().saturating_sub(2));
    (lines, totals)
}

/// A failure in the data-loading thread (injected by --fail-loader-at, a panic as a bug would
/// be) ends `train` and `eval` with that error and exit code 1, a runtime failure; the epoch it
/// cut short is not recorded as finished.
#[test]
fn a_data_loader_failure_ends_the_run_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &std::path::Path, fail: Option<&str>| {
        let mut cmd = senet();
        cmd.args(["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "32", "--epochs", "1"])
            .args(["--limit-train", "96", "--limit-test", "32", "--out"])
            .arg(out);
        if let Some(k) = fail {
            cmd.args(["--fail-loader-at", k]);
        }
        cmd.output().unwrap()
    };
    let good = dir.path().join("good");
    let o = train(&good, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let bad = dir.path().join("bad");
    let o = train(&bad, Some("1"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: the data loader failed") && stderr.contains("injected"), "{stderr}");
    let csv = std::fs::read_to_string(bad.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1, "no epoch finished:\n{csv}");

    let o = senet()
        .args(["eval", "--dataset", "sample", "--limit-test", "64", "--batch-size", "16", "--checkpoint"])
        .arg(good.join("last.safetensors"))
        .args(["--fail-loader-at", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the data loader failed") && o.stdout.is_empty(), "{stderr}");
}

/// A second Ctrl-C while the run is finishing its step aborts at once with 130, saving nothing.
/// The steps are slow (width 1, batch 96, about seconds each on lavapipe), so both signals land
/// inside the second step.
#[test]
fn a_second_sigint_aborts_at_once() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = senet()
        .args(["train", "--dataset", "sample", "--batch-size", "96", "--limit-train", "960", "--limit-test", "16"])
        .args(["--epochs", "1", "--log-every", "1", "--out"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("step 1/10") {
            break;
        }
    }
    let drain = std::thread::spawn(move || lines.count());
    let int = || std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(int().success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(int().success());
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("aborting now, without saving"), "stderr: {stderr}");
    assert!(!dir.path().join("resume.safetensors").exists(), "nothing saved after the second signal");
}

/// `--val-split`: a seeded part of the training set is held out, evaluated each epoch beside the
/// test set (table and metrics.csv), and best.safetensors is chosen on it; without a split the log
/// says best is chosen on test. Bad values are refused naming the flag.
#[test]
fn a_validation_split_chooses_the_best_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &std::path::Path, extra: &[&str]| {
        senet()
            .args(["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "50"])
            .args(["--limit-train", "200", "--limit-test", "100", "--seed", "4", "--lr", "0.01", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let run = dir.path().join("val");
    let o = train(&run, &["--epochs", "3", "--val-split", "0.25"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("chosen on validation accuracy (50 images held out"), "{stdout}");
    assert!(stdout.contains("150 train / 100 test images"), "{stdout}");
    assert!(stdout.contains("val_acc"), "{stdout}");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    // Columns a run without them leaves empty (the EMA's) read as NaN.
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| if v.is_empty() { f64::NAN } else { v.parse().unwrap() }).collect())
        .collect();
    assert_eq!(rows.len(), 3, "{csv}");
    let (val, test) = (col("val_acc"), col("test_acc"));
    let first_max = |c: usize| (0..3).fold(0, |b, e| if rows[e][c] > rows[b][c] { e } else { b });
    let best = first_max(val);
    assert!(
        stdout.contains(&format!("best validation accuracy {:.4} at epoch {}", rows[best][val], best + 1)),
        "{stdout}\n{csv}"
    );
    // best.safetensors is the last epoch's weights exactly when validation peaked there.
    let same =
        std::fs::read(run.join("best.safetensors")).unwrap() == std::fs::read(run.join("last.safetensors")).unwrap();
    assert_eq!(same, best == 2, "best.safetensors follows validation accuracy:\n{csv}");
    // This seed's run peaks on validation and on test at different epochs, so the check above
    // tells the two choices apart.
    assert_ne!(best == 2, first_max(test) == 2, "pick a seed where validation and test disagree:\n{csv}");

    let o = train(&dir.path().join("noval"), &["--epochs", "1"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("chosen on test accuracy (no --val-split)"));
    let before = files(&run);
    for (v, expect) in
        [("1.5", "expected a number of images"), ("0", "expected a number"), ("200", "leaves none to train on")]
    {
        let o = train(&run, &["--epochs", "1", "--val-split", v]);
        refused(&o, &format!("--val-split {v}"), &[expect, "--val-split"]);
        unchanged(&run, &before, &format!("--val-split {v}"));
    }
}

/// Top-5 accuracy beside top-1 (metrics.csv, eval's text and JSON — the same figure both ways) and
/// the learning rate in the progress lines and metrics.csv, here under the step schedule.
#[test]
fn top5_accuracy_and_the_learning_rate_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--batch-size", "50", "--epochs", "4"])
        .args(["--limit-train", "100", "--limit-test", "60", "--optimizer", "sgd", "--lr", "0.1"])
        .args(["--schedule", "step", "--log-every", "1", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("epoch 1 step 2/2 loss") && stdout.contains("lr 1.000e-1"), "{stdout}");
    assert!(stdout.contains("epoch 4 step 1/2") && stdout.contains("lr 1.000e-3"), "{stdout}");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let num = |r: &[&str], c: &str| -> f64 { r[col(c)].parse().unwrap() };
    let lrs: Vec<f64> = rows.iter().map(|r| num(r, "lr")).collect();
    let want = [0.1, 0.1, 0.01, 0.001];
    assert!(lrs.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "lr per epoch {lrs:?}\n{csv}");
    for r in &rows {
        let (top1, top5) = (num(r, "test_acc"), num(r, "test_top5_acc"));
        assert!(top5 >= top1 && top5 <= 1.0, "{csv}");
        assert!(r[col("val_top5_acc")].is_empty(), "no validation split: empty field");
    }
    let last = rows.last().unwrap();
    let eval = |json: bool| {
        let mut cmd = senet();
        cmd.args(["eval", "--dataset", "sample", "--limit-test", "60", "--checkpoint"])
            .arg(run.join("last.safetensors"));
        if json {
            cmd.arg("--json");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let v: serde_json::Value = serde_json::from_str(&eval(true)).unwrap();
    let top5 = v["top5_accuracy"].as_f64().unwrap();
    assert!((top5 - num(last, "test_top5_acc")).abs() < 1e-9, "eval and training agree: {top5} vs\n{csv}");
    assert!(top5 > v["accuracy"].as_f64().unwrap() && top5 < 1.0, "a figure between top-1 and 1: {v}");
    assert!(eval(false).contains(&format!("top-5 accuracy {top5:.4}")));
}

/// One vocabulary, no flag ignored: an unknown --model is refused before any data is read, with
/// the valid names; eval/predict flags that contradict the run's config.json and --resume flags
/// that differ from the run's own are errors naming both values.
#[test]
fn contradicting_flags_are_errors_naming_both_values() {
    let o = senet()
        .args(["train", "--model", "resnet21", "--dataset", "folder", "--data-dir", "/nonexistent/senet"])
        .output()
        .unwrap();
    let stderr = refused(&o, "an unknown model", &["--model \"resnet21\": expected one of senet", "152"]);
    assert!(!stderr.contains("nonexistent"), "the model is checked before the data: {stderr}");
    let help = senet().args(["train", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("[se-]resnet18/34/50/101/152"));

    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--batch-size", "32"])
        .args(["--limit-train", "64", "--limit-test", "32", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = run.join("last.safetensors");
    let before = files(&run);
    let fails = |args: &[&str], expect: &[&str]| {
        refused(&senet().args(args).output().unwrap(), &format!("{args:?}"), expect);
        unchanged(&run, &before, &format!("{args:?}"));
    };
    let c = ckpt.to_str().unwrap();
    fails(
        &["eval", "--dataset", "sample", "--limit-test", "8", "--width", "0.5", "--checkpoint", c],
        &["--width 0.5 contradicts", "config.json", "width 0.0625"],
    );
    fails(
        &["eval", "--dataset", "sample", "--reduction", "4", "--checkpoint", c],
        &["--reduction 4 contradicts", "16"],
    );
    let img = dir.path().join("x.png");
    image::GrayImage::new(28, 28).save(&img).unwrap();
    let i = img.to_str().unwrap();
    fails(&["predict", "--image-size", "32", "--checkpoint", c, i], &["--image-size 32x32 contradicts", "28x28"]);
    // The same values as the run's are no contradiction.
    let o =
        senet().args(["predict", "--image-size", "28", "--width", "0.0625", "--checkpoint", c, i]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let r = run.to_str().unwrap();
    fails(
        &["train", "--resume", r, "--epochs", "2", "--lr", "0.5", "--batch-size", "32", "--seed", "4"],
        &["--lr 0.5 (the run has 0.001)", "--seed 4 (the run has 0)", "--init"],
    );
    assert!(
        !String::from_utf8_lossy(&senet().args(["train", "--resume", r, "--lr", "0.5"]).output().unwrap().stderr)
            .contains("--batch-size")
    );
}

/// The usual recipe knobs reach the run: --betas, --eps and --nesterov into the optimizer (whose
/// kernels are tested against the reference with these settings in tests/kernels/optimizer.rs), --mean/--std
/// as the normalisation, --no-augment/--no-normalize switching off pieces of --recipe paper.
#[test]
fn recipe_knobs_reach_the_optimizer_and_the_preprocessing() {
    use senet_wgpu::ops::optimizer::OptimizerConfig;
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> (serde_json::Value, OptimizerConfig) {
        let out = dir.path().join(name);
        let o = senet()
            .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--batch-size", "32"])
            .args(["--limit-train", "32", "--limit-test", "16", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let args: senet_wgpu::args::TrainArgs = serde_json::from_value(v["train"].clone()).unwrap();
        (v, args.optimizer_config())
    };
    let (_, opt) = run("adam", &["--optimizer", "adamw", "--betas", "0.8,0.99", "--eps", "1e-6"]);
    assert!(
        matches!(opt, OptimizerConfig::Adam { beta1: 0.8, beta2: 0.99, eps: 1e-6, decoupled: true, .. }),
        "{opt:?}"
    );
    let (_, opt) = run("sgd", &["--optimizer", "sgd", "--nesterov"]);
    assert!(matches!(opt, OptimizerConfig::Sgd { nesterov: true, .. }), "{opt:?}");
    // --label-smoothing reaches the training loss: the first epoch's train loss moves, with the
    // same seed and batches (test loss is plain cross-entropy either way).
    let train_loss = |name: &str| -> f64 {
        let csv = std::fs::read_to_string(dir.path().join(name).join("metrics.csv")).unwrap();
        csv.lines().nth(1).unwrap().split(',').nth(1).unwrap().parse().unwrap()
    };
    let (v, _) = run("smooth", &["--label-smoothing", "0.5"]);
    assert_eq!(v["train"]["label_smoothing"].as_f64(), Some(0.5));
    run("plain", &[]);
    assert!(
        (train_loss("smooth") - train_loss("plain")).abs() > 1e-3,
        "{} vs {}",
        train_loss("smooth"),
        train_loss("plain")
    );
    let (v, _) = run("norm", &["--mean", "0.25", "--std", "0.5"]);
    assert_eq!(v["model"]["normalize"], serde_json::json!([[0.25, 0.5]]));
    let (v, _) = run("paper", &["--recipe", "paper", "--no-augment"]);
    assert_eq!((v["train"]["augment"].as_bool(), v["train"]["normalize"].as_bool()), (Some(false), Some(true)));
    let (v, _) = run("paper2", &["--recipe", "paper", "--no-normalize"]);
    assert_eq!((v["train"]["augment"].as_bool(), v["model"]["normalize"].is_null()), (Some(true), true));
    for (extra, expect) in [
        (&["--nesterov"][..], "--nesterov needs --optimizer sgd"),
        (&["--betas", "0.9"][..], "expected two numbers B1,B2"),
        (&["--betas", "1.5,0.9"][..], "--betas must be two numbers in [0, 1)"),
        (&["--mean", "0.5,0.5", "--std", "1,1"][..], "--mean and --std give 2 channels; the images have 1"),
        (&["--mean", "0.5"][..], "--std"),
    ] {
        let out = dir.path().join("sgd");
        let before = files(&out);
        let o = senet()
            .args(["train", "--dataset", "sample", "--epochs", "1", "--limit-train", "8", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        refused(&o, &format!("{extra:?}"), &[expect]);
        unchanged(&out, &before, &format!("{extra:?}"));
    }
}

/// predict --topk K, on a folder (its image files, sorted; other files skipped), and --json with
/// the same figures as the text.
#[test]
fn predict_takes_topk_folders_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--batch-size", "32"])
        .args(["--limit-train", "64", "--limit-test", "32", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for (k, name) in ["b.png", "a.png"].iter().enumerate() {
        image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * (k as u32 + 3) + y) % 256) as u8]))
            .save(imgs.join(name))
            .unwrap();
    }
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let predict = |extra: &[&str]| {
        let o =
            senet().args(["predict", "--checkpoint"]).arg(run.join("last.safetensors")).args(extra).arg(&imgs).output();
        let o = o.unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let text = predict(&["--topk", "3"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * 4, "two images, a name and 3 classes each:\n{text}");
    assert!(lines[0].ends_with("a.png") && lines[4].ends_with("b.png"), "sorted by name:\n{text}");
    let json = predict(&["--topk", "3", "--json"]);
    let objs: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objs.len(), 2);
    for (k, o) in objs.iter().enumerate() {
        let top = o["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        for (j, t) in top.iter().enumerate() {
            let line = lines[4 * k + 1 + j];
            assert!(line.contains(t["class"].as_str().unwrap()), "{line} vs {t}");
            assert!(line.trim_start().starts_with(&format!("{:.4}", t["probability"].as_f64().unwrap())));
        }
    }
    let all = predict(&["--topk", "10", "--json"]);
    let v: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    let sum: f64 = v["top"].as_array().unwrap().iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4, "all 10 classes sum to 1: {sum}");
    let before = files(&run);
    let o =
        senet().args(["predict", "--topk", "11", "--checkpoint"]).arg(run.join("last.safetensors")).arg(&imgs).output();
    refused(&o.unwrap(), "--topk 11", &["--topk 11: expected 1 to the model's 10 classes"]);
    unchanged(&run, &before, "--topk 11");
}

/// A tiny training run: sample, width 1/16, batch 16, the first `limit` images, one progress
/// line per step (stdout is a pipe: plain lines, no bar).
fn tiny_train(out: &std::path::Path, limit: &str, extra: &[&str]) -> std::process::Output {
    senet()
        .args(["train", "--dataset", "sample", "--width", "0.0625", "--epochs", "1", "--batch-size", "16"])
        .args(["--limit-train", limit, "--limit-test", "32", "--log-every", "1", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// --clip-grad-norm: recorded in config.json, the last step's total norm in the progress line
/// (with "(clipped)" when it was above MAX), the run changed by it (SGD is linear in the
/// gradient, so a MAX far below the norm slows it); --resume with another MAX is refused; a MAX
/// that is not a finite number above 0 is a usage error (exit 2) naming the flag.
#[test]
fn clip_grad_norm_is_recorded_shown_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let sgd = ["--optimizer", "sgd", "--lr", "0.2"];
    let clipped = dir.path().join("clipped");
    let o = tiny_train(&clipped, "64", &[&sgd[..], &["--clip-grad-norm", "0.01"]].concat());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(clipped.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["train"]["clip_grad_norm"].as_f64(), Some(0.01));
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("epoch 1 step")).collect();
    assert_eq!(steps.len(), 4, "{stdout}");
    for l in &steps {
        let norm: f64 =
            l.split("grad norm ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
        assert!(norm > 0.01 && norm.is_finite() && l.contains("(clipped)"), "{l}");
    }
    let plain = dir.path().join("plain");
    let o = tiny_train(&plain, "64", &sgd);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("grad norm"), "no norm shown without clipping");
    let train_loss = |run: &std::path::Path| -> f64 {
        let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
        csv.lines().nth(1).unwrap().split(',').nth(1).unwrap().parse().unwrap()
    };
    assert!((train_loss(&clipped) - train_loss(&plain)).abs() > 1e-3, "clipping changed nothing");
    let before = files(&clipped);
    let o = senet().args(["train", "--resume"]).arg(&clipped).args(["--clip-grad-norm", "2.5"]).output().unwrap();
    refused(&o, "--resume with another --clip-grad-norm", &["--clip-grad-norm 2.5 (the run has 0.01)"]);
    unchanged(&clipped, &before, "--resume with another --clip-grad-norm");
    for bad in ["0", "-1", "nan", "inf", "1e39", "abc"] {
        let o = tiny_train(&dir.path().join("never"), "16", &[&format!("--clip-grad-norm={bad}")]);
        let stderr = refused(&o, bad, &["--clip-grad-norm"]);
        assert!(!stderr.contains("panicked"), "{bad}: {stderr}");
        assert!(!dir.path().join("never").exists(), "{bad}: nothing written");
        let o = tiny_train(&clipped, "16", &[&format!("--clip-grad-norm={bad}")]);
        refused(&o, bad, &["--clip-grad-norm"]);
        unchanged(&clipped, &before, &format!("--clip-grad-norm={bad} into a run folder"));
    }
}

/// The whole run's ETA in the progress line: none for the first steps (the first is start-up and
/// not timed; then MIN_TIMED_STEPS = 5 steps are timed), then on every line.
#[test]
fn the_progress_line_shows_the_run_eta_once_steps_are_timed() {
    let dir = tempfile::tempdir().unwrap();
    let o = tiny_train(&dir.path().join("run"), "160", &[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("epoch 1 step")).collect();
    assert_eq!(steps.len(), 10, "{stdout}");
    for (k, l) in steps.iter().enumerate() {
        assert_eq!(l.contains("run ETA "), k + 1 >= 6, "step {}: {l}", k + 1);
    }
}

/// On a terminal (a pseudo-terminal from `script`), `train` draws its epoch bar and a bar for the
/// test pass, and `eval` a bar for its pass, each with an ETA, on stderr; through pipes none of
/// them is drawn and `eval --json` prints the JSON alone.
#[test]
fn evaluation_shows_a_bar_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_senet");
    let in_terminal = |args: &str| {
        let o = Command::new("script")
            .args(["-qec", &format!("{bin} {args}"), "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .expect("script (util-linux) runs a command on a pseudo-terminal");
        assert!(o.status.success(), "{args}: {}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let text = in_terminal(&format!(
        "train --dataset sample --width 0.0625 --epochs 1 --batch-size 16 --limit-train 64 --limit-test 64 --out {}",
        run.display()
    ));
    assert!(text.contains("epoch 1/1 [") && text.contains("epoch 1/1 test ["), "{text}");
    let ckpt = run.join("last.safetensors");
    let eval_args = format!("eval --dataset sample --limit-test 64 --batch-size 16 --checkpoint {}", ckpt.display());
    let text = in_terminal(&eval_args);
    assert!(text.contains("eval [") && text.contains("ETA"), "{text}");
    let o = senet().args(eval_args.split(' ')).arg("--json").output().unwrap();
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("eval [") && !stderr.contains("ETA"), "{stderr}");
    serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("stdout is the JSON object alone");
}
