//! Data-parallel training over MPI: two ranks on lavapipe, launched by the test with
//! `mpirun --oversubscribe --allow-run-as-root -np 2` on the built binary. Compiled only with
//! `--features mpi`; there a missing `mpirun` fails every test with what to install.
//!
//! One 2-rank training run is shared by the first three tests (a run costs seconds of lavapipe):
//! (a) both ranks end with bit-identical weights; (b) they equal ONE process replicating DDP
//! step by step through the library (each half batch forward/backward with its own batch-norm
//! statistics, the two gradients averaged, one optimizer step); (c) the sharded test-set pass
//! gives the accuracy of a single-process `senet eval` of the same checkpoint.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use clap::Parser;
use senet_wgpu::args::TrainArgs;
use senet_wgpu::checkpoint::{self, Value};
use senet_wgpu::data::loader::{self, Preprocess};
use senet_wgpu::dist;
use senet_wgpu::hparams::lr_at;
use senet_wgpu::model::plan::Network;

/// The settings of the shared run: the sample, 128 training images (64 per rank), batch 16 per
/// rank, 2 epochs = 8 optimizer steps; SGD with momentum and weight decay so the optimizer state
/// is exercised; tuning off so both sides run the same kernels.
const TRAIN: &[&str] = &[
    "train",
    "--dataset",
    "sample",
    "--limit-train",
    "128",
    "--limit-test",
    "90",
    "--width",
    "0.0625",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--momentum",
    "0.9",
    "--weight-decay",
    "5e-4",
    "--seed",
    "3",
    "--log-every",
    "1",
    // Clipping after the all-reduce (DDP's order): the replica below clips the averaged gradients.
    "--clip-grad-norm",
    "1",
];
const RANKS: usize = 2;
const BATCH: usize = 16;

fn senet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_senet"));
    c.args(["--tune", "off"]);
    c
}

/// `mpirun … -np N`, as root too, or a failure saying what to install: with the `mpi` feature on,
/// these tests never pass by skipping. Tuning is off through SENET_TUNE (OpenMPI takes a `--tune`
/// anywhere on its command line for its own option).
fn mpirun(np: usize) -> Command {
    let found = Command::new("mpirun").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "the mpi feature is on but `mpirun` cannot be run ({}); install OpenMPI (Debian: apt-get install \
         openmpi-bin libopenmpi-dev) or test without --features mpi",
        found.err().map_or("it failed".to_string(), |e| e.to_string())
    );
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--allow-run-as-root", "-np", &np.to_string()]);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    // One lavapipe thread per rank: the ranks share this machine's cores.
    c.env("LP_NUM_THREADS", "1").env("SENET_TUNE", "off");
    c.args(["-x", "LP_NUM_THREADS", "-x", "SENET_TUNE"]);
    c
}

/// `mpirun -np 2 senet train <TRAIN> --epochs <epochs> --out <out>`.
fn train_2_ranks(out: &Path, epochs: usize) -> Command {
    let mut c = mpirun(RANKS);
    let e = TRAIN.iter().position(|a| *a == "--epochs").expect("TRAIN sets --epochs");
    let epochs = epochs.to_string();
    let args = TRAIN.iter().enumerate().map(|(k, a)| if k == e + 1 { epochs.as_str() } else { a });
    c.arg(env!("CARGO_BIN_EXE_senet")).args(args).arg("--out").arg(out);
    c
}

/// The pid of rank `rank` among the processes `mpirun` (pid `launcher`) started on this machine.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The parent pid is the 2nd field after the parenthesised command name.
        let ppid = stat.rsplit(')').next().and_then(|s| s.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn kill(signal: &str, pid: u32) {
    let k = Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
    assert!(k.success(), "kill {signal} {pid} failed");
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The shared 2-rank run: its folder and output (a failed run fails every test that uses it).
fn shared_run() -> (&'static Path, &'static Output) {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf, Output)> = OnceLock::new();
    let (_, out, o) = RUN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("run");
        let o = train_2_ranks(&out, 2).output().expect("run mpirun");
        (dir, out, o)
    });
    assert!(o.status.success(), "2-rank training failed:\n{}", text(o));
    (out, o)
}

#[test]
fn ranks_hold_bit_identical_weights_after_training() {
    let (_, o) = shared_run();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let sums: Vec<&str> = (0..RANKS)
        .map(|r| {
            let tag = format!("rank {r} of {RANKS}: final weights checksum ");
            let line =
                stderr.lines().find(|l| l.starts_with(&tag)).unwrap_or_else(|| panic!("no line {tag:?}:\n{}", text(o)));
            &line[tag.len()..]
        })
        .collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "per-rank weight checksums differ: {sums:?}\n{}", text(o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for e in 1..=2 {
        assert!(
            stdout.contains(&format!("epoch {e}: weights identical on all {RANKS} ranks")),
            "epoch {e}'s cross-rank check is missing:\n{}",
            text(o)
        );
    }
    // Rank 0 alone prints the table: one header.
    assert_eq!(stdout.matches("train_loss").count(), 1, "only rank 0 prints:\n{stdout}");
    assert!(stdout.contains("padded from 128 to 128 images, 64 per rank"), "the sampler is stated:\n{stdout}");
}

/// One process doing what DDP does, through the library: per step, each rank's half batch runs
/// forward and backward on its own (its own batch statistics), the two gradients are averaged on
/// the host, and one optimizer step follows (clipping, as `apply_update` runs it, the averaged gradients).
fn train_args() -> TrainArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }
    Cli::try_parse_from(TRAIN).expect("the test's flags parse").train
}

/// The shared run's network, freshly initialised, and its training set.
fn ddp_network_and_data() -> (Network, senet_wgpu::data::Dataset) {
    let args = train_args();
    let mut train_set = args.data.load(None).expect("the sample loads").train;
    train_set.truncate(args.limit_train.expect("--limit-train"));
    let [c, h, w] = train_set.shape;
    let config = args.net.config(c, [h, w], train_set.classes.len(), train_set.classes.clone());
    let mut net = Network::new(common::gpu(), config, args.optimizer_config(), args.seed).expect("network");
    net.set_clip_grad_norm(args.clip_grad_norm).expect("clipping");
    (net, train_set)
}

fn ddp_network() -> Network {
    ddp_network_and_data().0
}

fn ddp_reference() -> Network {
    let args = train_args();
    let (mut net, train_set) = ddp_network_and_data();
    let gpu = net.gpu.clone();
    let plan = net.plan(BATCH).expect("plan");
    let pre = Preprocess::default();
    let steps = train_set.len() / RANKS / BATCH;
    let mut rng = common::rng(0); // no augmentation: never drawn from
    for epoch in 1..=args.epochs() {
        let order = loader::epoch_order(train_set.len(), true, args.seed, epoch);
        let shards: Vec<Vec<usize>> = (0..RANKS).map(|r| dist::shard(&order, r, RANKS)).collect();
        for step in 0..steps {
            let global = (epoch - 1) * steps + step;
            net.set_lr(lr_at(args.lr, args.schedule, args.warmup_epochs, global, steps, steps * args.epochs()));
            net.begin_step();
            let mut sum: Option<Vec<f32>> = None;
            for shard in &shards {
                let b = loader::make_batch(&train_set, &shard[step * BATCH..][..BATCH], &pre, &mut rng);
                plan.write_batch(&gpu, &b.images, &b.labels).expect("batch");
                net.gradient_pass(&plan);
                let g = net.flat.grads.read::<f32>(&gpu).expect("gradients");
                sum = Some(match sum {
                    None => g,
                    Some(s) => s.iter().zip(&g).map(|(a, b)| a + b).collect(),
                });
            }
            let avg: Vec<f32> = sum.expect("two ranks").iter().map(|g| g / RANKS as f32).collect();
            net.flat.grads.write(&gpu, &avg).expect("write gradients");
            net.apply_update();
        }
    }
    gpu.wait().expect("GPU");
    net
}

/// Tolerance: 0 — bit for bit. With two ranks the all-reduce adds two f32 values (commutative,
/// so the order MPI picks cannot matter) and /2 is exact; both sides run the same kernels on the
/// same half batches. With more ranks the reduction order of the MPI library would make it
/// ~N ulp of the gradients.
#[test]
fn two_ranks_equal_one_process_replicating_ddp() {
    let (out, o) = shared_run();
    // The run clipped (--clip-grad-norm 1): per rank before the all-reduce would differ from the replica.
    assert!(String::from_utf8_lossy(&o.stdout).contains("(clipped)"), "no step was clipped:\n{}", text(o));
    let sd = checkpoint::load(&out.join("last.safetensors")).expect("rank 0's checkpoint");
    let net = ddp_reference();
    let mut largest = 0.0f32;
    for p in &net.params {
        let want = p.value.read::<f32>(&net.gpu).expect("read");
        let got = match sd.get(&p.spec.name).map(|e| &e.value) {
            Some(Value::F32(v)) => v,
            _ => panic!("{} missing from last.safetensors", p.spec.name),
        };
        assert_eq!(got.len(), want.len(), "{}", p.spec.name);
        for (g, w) in got.iter().zip(&want) {
            largest = largest.max((g - w).abs());
        }
    }
    eprintln!("largest |2 ranks - DDP reference| over all parameters: {largest:e}");
    assert_eq!(largest, 0.0, "2 ranks differ from the single-process DDP replica by up to {largest:e}\n{}", text(o));
}

/// The test-set pass split over the ranks counts every image once, in the batch it would be in
/// alone: the same accuracy, exactly, as `senet eval` in one process on the same checkpoint (whose
/// running statistics are rank 0's, as the sharded pass used). The loss is a sum of f32 in
/// another order: relative 1e-5.
#[test]
fn sharded_eval_equals_single_process_eval() {
    let (out, o) = shared_run();
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv");
    let last = csv.lines().last().expect("a line per epoch");
    // The first columns (epoch, train loss, train acc, test loss, test acc); later ones may be empty.
    let f: Vec<f64> = last.split(',').take(5).map(|x| x.parse().expect("a number")).collect();
    let (test_loss, test_acc) = (f[3], f[4]);
    let eval = senet()
        .args(["eval", "--dataset", "sample", "--limit-test", "90", "--batch-size", &BATCH.to_string(), "--json"])
        .arg("--checkpoint")
        .arg(out.join("last.safetensors"))
        .output()
        .expect("run senet eval");
    assert!(eval.status.success(), "eval failed:\n{}", text(&eval));
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("JSON");
    assert_eq!(v["total"], 90);
    let acc = v["accuracy"].as_f64().expect("accuracy");
    assert_eq!(test_acc, acc, "sharded accuracy {test_acc} vs one process {acc}\n{}", text(o));
    let loss = v["loss"].as_f64().expect("loss");
    assert!((test_loss - loss).abs() <= 1e-5 * loss.abs(), "sharded loss {test_loss} vs one process {loss}");
}

fn run_folder_is_empty(out: &Path) {
    assert!(!out.join("metrics.csv").exists() && !out.join("config.json").exists(), "nothing may be written");
}

#[test]
fn more_ranks_than_images_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = mpirun(RANKS)
        .arg(env!("CARGO_BIN_EXE_senet"))
        .args(["train", "--dataset", "sample", "--limit-train", "1", "--width", "0.0625"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run mpirun");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(stderr.matches("2 ranks but only 1 training images").count(), 1, "said once, by rank 0:\n{}", text(&o));
    run_folder_is_empty(&out);
}

#[test]
fn different_flags_on_two_ranks_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let rank = |lr: &str| {
        let mut v: Vec<String> = vec![env!("CARGO_BIN_EXE_senet").into()];
        v.extend(
            ["train", "--dataset", "sample", "--limit-train", "8", "--width", "0.0625", "--lr", lr].map(String::from),
        );
        v.push("--out".into());
        v.push(out.display().to_string());
        v
    };
    // MPMD: rank 0 and rank 1 started with different --lr.
    let o = mpirun(1).args(rank("0.01")).args([":", "-np", "1"]).args(rank("0.02")).output().expect("run mpirun");
    assert!(!o.status.success(), "must fail:\n{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("First difference from rank 0's: rank 1: flags.lr is 0.02 there, 0.01 on rank 0"),
        "{}",
        text(&o)
    );
    run_folder_is_empty(&out);
}

/// TRAIN with some values replaced (`(flag, value)`).
fn train_flags(replace: &[(&str, &str)]) -> Vec<String> {
    let mut args: Vec<String> = TRAIN.iter().map(|a| a.to_string()).collect();
    for (flag, value) in replace {
        let k = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("TRAIN sets {flag}"));
        args[k + 1] = value.to_string();
    }
    args
}

/// `senet train <TRAIN, values replaced> <extra…> --out <out>` as one process.
fn train_one_process(out: &Path, replace: &[(&str, &str)], extra: &[&str]) -> Output {
    senet().args(train_flags(replace)).args(extra).arg("--out").arg(out).output().expect("run senet")
}

/// Every tensor of a checkpoint as f32 (parameters and batch-norm running statistics).
fn state(path: &Path) -> Vec<(String, Vec<f32>)> {
    let sd = checkpoint::load(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut v: Vec<(String, Vec<f32>)> = sd
        .into_iter()
        .filter_map(|(k, e)| match e.value {
            Value::F32(v) => Some((k, v)),
            _ => None, // num_batches_tracked (i64): compared by the loop counting steps
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// SyncBatchNorm's promise: `--sync-bn` with 2 ranks × batch 16 trains the model that ONE process
/// trains with batch 32 over the same data order (step s of both sees images 32s..32s+32 of the
/// epoch's shuffle — rank r every other one from r, DistributedSampler's share), parameters and
/// batch-norm running statistics alike: 96 images, 2 epochs = 6 steps of SGD with momentum.
///
/// Tolerance: |2 ranks − 1 process| <= 2e-6 + 1e-5·|value|. The two compute the same sums in other
/// orders — batch statistics as per-rank Welford trees merged on the host instead of one tree
/// over 32 images, the loss as two means of 16 averaged instead of one of 32, the BN gradient sums
/// and parameter gradients per half then added — so they differ by f32 rounding, ~1e-7 per step.
/// Measured: 2.8e-7 at most (the same 6 steps of one process with workgroup-tree instead of
/// subgroup reductions: 1.2e-7). Per-rank statistics are ~1e-2 away. Not the shared run's 128
/// images: in its 4th step this model meets a discrete flip (a near-tie) where one process with
/// subgroup reductions parts from one with workgroup trees by 1e-3 to 1e-2 by step 8 — and
/// the 2 ranks follow the workgroup-tree run to 1e-7 — so no f32 tolerance is honest there.
#[test]
fn sync_bn_two_ranks_equal_one_process_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (two, one) = (dir.path().join("two ranks"), dir.path().join("one process"));
    let o = mpirun(RANKS)
        .arg(env!("CARGO_BIN_EXE_senet"))
        .args(train_flags(&[("--limit-train", "96")]))
        .arg("--sync-bn")
        .arg("--out")
        .arg(&two)
        .output()
        .expect("run mpirun");
    assert!(o.status.success(), "2-rank --sync-bn training failed:\n{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("batch norm with the statistics of all ranks' batches together (--sync-bn"),
        "{}",
        text(&o)
    );
    assert!(stdout.contains("| sync-bn "), "the progress line shows the exchanges' cost:\n{}", text(&o));
    let batch = (RANKS * BATCH).to_string();
    let single = train_one_process(&one, &[("--limit-train", "96"), ("--batch-size", &batch)], &[]);
    assert!(single.status.success(), "one-process training failed:\n{}", text(&single));

    let (got, want) = (state(&two.join("last.safetensors")), state(&one.join("last.safetensors")));
    assert_eq!(
        got.iter().map(|t| &t.0).collect::<Vec<_>>(),
        want.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "the same tensors"
    );
    assert!(got.iter().any(|t| t.0.ends_with(".running_var")), "the running statistics are compared too");
    let (atol, rtol) = (2e-6f32, 1e-5f32);
    let mut worst = (0.0f32, String::new());
    let mut bad = Vec::new();
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len(), "{name}");
        for (k, (a, b)) in g.iter().zip(w).enumerate() {
            let d = (a - b).abs();
            if d > worst.0 {
                worst = (d, format!("{name}[{k}]"));
            }
            if d.is_nan() || d > atol + rtol * b.abs() {
                bad.push(format!("{name}[{k}]: 2 ranks {a:e}, one process {b:e}"));
            }
        }
    }
    eprintln!("largest |2 ranks --sync-bn - 1 process batch 32|: {:e} at {}", worst.0, worst.1);
    assert!(
        bad.is_empty(),
        "{} values differ beyond tolerance, first: {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        text(&o)
    );
}

/// TRAIN's flags with `extra` added, parsed as `senet train` parses them.
fn train_args_with(extra: &[&str]) -> TrainArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }
    Cli::try_parse_from(TRAIN.iter().chain(extra)).expect("the test's flags parse").train
}

/// One process replicating `mpirun -np 2 senet train <TRAIN> --grad-accum-steps 2 --model-ema
/// --model-ema-warmup` through the library: one network per rank (the same initialisation, tuning
/// off as the run's), each with its accumulator and EMA. Per optimizer step every rank runs its two
/// micro-batches of 16 (its DistributedSampler share of the epoch's order: the same global
/// micro-batches as the 2-rank run) forward and backward with the loss divided by 2, adding into its
/// accumulator; the two ranks' summed gradients are averaged on the host as the all-reduce does
/// ((a + b) / 2 in f32) and written back to both, and both apply the same update (clipping, SGD, the
/// EMA). Returns rank 0's network: its parameters, batch-norm buffers and EMA are what rank 0 saves.
fn ddp_accum_ema_reference(extra: &[&str]) -> Network {
    let args = train_args_with(extra);
    let mut train_set = args.data.load(None).expect("the sample loads").train;
    train_set.truncate(args.limit_train.expect("--limit-train"));
    let [c, h, w] = train_set.shape;
    let config = args.net.config(c, [h, w], train_set.classes.len(), train_set.classes.clone());
    let mut nets: Vec<Network> = (0..RANKS)
        .map(|_| {
            let mut net =
                Network::new(common::gpu(), config.clone(), args.optimizer_config(), args.seed).expect("network");
            net.set_clip_grad_norm(args.clip_grad_norm).expect("clipping");
            net.set_grad_accum_steps(args.grad_accum_steps).expect("accumulator");
            net.set_model_ema(args.model_ema_config()).expect("EMA");
            net
        })
        .collect();
    let gpu = nets[0].gpu.clone();
    let plans: Vec<_> = nets.iter().map(|n| n.plan(BATCH).expect("plan")).collect();
    let (pre, mut rng) = (Preprocess::default(), common::rng(0)); // no augmentation: never drawn from
    let steps = train_set.len() / RANKS / BATCH;
    let accum = args.grad_accum_steps;
    let updates = steps.div_ceil(accum);
    for epoch in 1..=args.epochs() {
        let order = loader::epoch_order(train_set.len(), true, args.seed, epoch);
        let shards: Vec<Vec<usize>> = (0..RANKS).map(|r| dist::shard(&order, r, RANKS)).collect();
        for step in 0..steps {
            let (index, count) = senet_wgpu::ops::grad_accum::group_of(step, accum, steps);
            let global = (epoch - 1) * updates + step / accum;
            for ((net, plan), shard) in nets.iter_mut().zip(&plans).zip(&shards) {
                net.set_lr(lr_at(args.lr, args.schedule, args.warmup_epochs, global, updates, updates * args.epochs()));
                let b = loader::make_batch(&train_set, &shard[step * BATCH..][..BATCH], &pre, &mut rng);
                plan.write_batch(&gpu, &b.images, &b.labels).expect("batch");
                let m = net.begin_micro_batch(plan, index, count);
                net.gradient_pass(plan);
                net.accumulate(m);
            }
            if index + 1 < count {
                continue;
            }
            let grads: Vec<Vec<f32>> =
                nets.iter().map(|n| n.flat.grads.read::<f32>(&gpu).expect("gradients")).collect();
            let avg: Vec<f32> = grads[0].iter().zip(&grads[1]).map(|(a, b)| (a + b) / RANKS as f32).collect();
            for net in &nets {
                net.flat.grads.write(&gpu, &avg).expect("write gradients");
                net.apply_update();
            }
        }
    }
    gpu.wait().expect("GPU");
    nets.swap_remove(0)
}

/// Every tensor of a state dict as f32, by name.
fn tensors(sd: &checkpoint::StateDict) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = sd
        .iter()
        .filter_map(|(k, e)| match &e.value {
            Value::F32(v) => Some((k.clone(), v.clone())),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `--grad-accum-steps 2` and `--model-ema --model-ema-warmup` under `mpirun -np 2` (128 images,
/// batch 16 per rank, 2 epochs: 4 micro-batches per rank per epoch, 2 optimizer steps, the
/// gradients all-reduced once per step) against one process replicating it with the same global
/// micro-batches ([`ddp_accum_ema_reference`]): rank 0's last.safetensors (parameters and running
/// statistics) and ema.safetensors (the EMA of the parameters and of rank 0's running statistics,
/// as timm's EMA under DDP) equal the replica's.
///
/// Tolerance: 0, bit for bit. Each rank adds its two micro-batches' gradients on the GPU in the
/// same kernels as the replica; the all-reduce of two f32 values is one commutative addition and
/// / 2 is exact; the update and the EMA run the same kernels from the same bits. (With more ranks
/// the MPI library's summation order would make it ~N ulp.) Not against a plain one-process
/// `senet train --grad-accum-steps 4 --batch-size 16`: that process normalises contiguous runs of
/// its epoch order in each micro-batch where the ranks normalise every other image (their shards),
/// so batch norm sees other batches: measured once, its weights part from the 2 ranks' by up to
/// 2.5e-2 and its running variances by up to 0.24 after these 4 steps, not by rounding.
#[test]
fn grad_accum_and_model_ema_under_2_ranks_equal_one_process_replicating_them() {
    let extra = ["--grad-accum-steps", "2", "--model-ema", "--model-ema-warmup"];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = mpirun(RANKS)
        .arg(env!("CARGO_BIN_EXE_senet"))
        .args(TRAIN)
        .args(extra)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run mpirun");
    assert!(o.status.success(), "2-rank --grad-accum-steps 2 --model-ema training failed:\n{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("gradients accumulated over 2 batches per optimizer step"), "{}", text(&o));
    assert!(stdout.contains("effective batch 64, 2 optimizer steps per epoch"), "{}", text(&o));
    let net = ddp_accum_ema_reference(&extra);
    let want = checkpoint::state_dict(&net).expect("the replica's state dict");
    let want_ema = checkpoint::ema_state_dict(&net).expect("the replica's EMA").expect("an EMA");
    for (file, want) in [("last.safetensors", &want), ("ema.safetensors", &want_ema)] {
        let got = tensors(&checkpoint::load(&out.join(file)).unwrap_or_else(|e| panic!("{file}: {e:#}")));
        let want = tensors(want);
        assert_eq!(
            got.iter().map(|t| &t.0).collect::<Vec<_>>(),
            want.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{file}: the same tensors"
        );
        assert!(got.iter().any(|t| t.0.ends_with(".running_var")), "{file}: the running statistics are compared");
        let mut largest = (0.0f32, String::new());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert_eq!(g.len(), w.len(), "{file}: {name}");
            for (a, b) in g.iter().zip(w) {
                let d = (a - b).abs();
                if d > largest.0 || d.is_nan() {
                    largest = (d, name.clone());
                }
            }
        }
        eprintln!("{file}: largest |2 ranks - replica| {:e} ({})", largest.0, largest.1);
        assert_eq!(
            largest.0,
            0.0,
            "{file}: 2 ranks differ from the replica by {:e} in {}\n{}",
            largest.0,
            largest.1,
            text(&o)
        );
    }
    let (last, ema) = (tensors(&want), tensors(&want_ema));
    assert!(last != ema, "the EMA is not the model");
}

/// `--sync-bn` on one process (no mpirun) is documented as changing nothing, as PyTorch's
/// SyncBatchNorm outside a group of several processes: it says so, and trains bit for bit what
/// the run without it trains.
#[test]
fn sync_bn_on_one_process_is_plain_batch_norm() {
    let dir = tempfile::tempdir().unwrap();
    let (with, without) = (dir.path().join("with"), dir.path().join("without"));
    let quick = [("--limit-train", "32"), ("--epochs", "1")];
    let o = train_one_process(&with, &quick, &["--sync-bn"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("--sync-bn on one process: batch norm as without it"),
        "{}",
        text(&o)
    );
    let p = train_one_process(&without, &quick, &[]);
    assert!(p.status.success(), "{}", text(&p));
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(read(with.join("last.safetensors")) == read(without.join("last.safetensors")), "the same weights");
}

/// A signal that reaches one rank (SIGTERM to rank 1 alone, mid-epoch) stops every rank after the
/// same step: rank 0 saves once, every rank exits 130 and one line says how to resume. Resuming
/// with one process is refused (the run needs its 2 ranks); resuming under 2 ranks ends bit for
/// bit where the uninterrupted shared run ended, with the same metrics.
#[test]
fn a_signal_to_one_rank_saves_once_and_resume_under_2_ranks_continues_exactly() {
    use std::io::{BufRead, BufReader};
    let (whole, _) = shared_run();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = train_2_ranks(&out, 2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mpirun");
    // Rank 0's adapter line comes after every rank installed its signal handler (before their
    // first collective). Stop rank 0 there, so no step can pass until rank 1 has the signal.
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("a line");
        seen += &line;
        seen += "\n";
        if line.starts_with("rank 0 of 2 (pid") {
            break;
        }
    }
    let rank0 = rank_pid(child.id(), 0).unwrap_or_else(|| panic!("rank 0's process:\n{seen}"));
    kill("-STOP", rank0);
    let rank1 = rank_pid(child.id(), 1).expect("rank 1's process among mpirun's children");
    kill("-TERM", rank1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    kill("-CONT", rank0);
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let o = child.wait_with_output().expect("mpirun ends");
    let stderr = seen + &drain.join().expect("stderr");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let all = format!("exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", o.status.code());
    assert_eq!(o.status.code(), Some(130), "{all}");
    assert_eq!(stderr.matches("senet train --resume").count(), 1, "rank 0 alone says how to resume:\n{all}");
    assert!(stderr.contains("interrupted in epoch 1 after step 1;"), "stopped after the first step:\n{all}");

    let one = Command::new(env!("CARGO_BIN_EXE_senet"))
        .args(["--tune", "off", "train", "--resume"])
        .arg(&out)
        .output()
        .expect("run senet");
    assert_eq!(one.status.code(), Some(2), "{}", text(&one));
    assert!(
        String::from_utf8_lossy(&one.stderr).contains("was trained by 2 rank(s) and this job has 1"),
        "{}",
        text(&one)
    );

    let resumed = mpirun(RANKS)
        .arg(env!("CARGO_BIN_EXE_senet"))
        .args(["train", "--resume"])
        .arg(&out)
        .output()
        .expect("run mpirun");
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(
        String::from_utf8_lossy(&resumed.stdout).contains("after epoch 0 and 1 steps of the next"),
        "resumed mid-epoch 1:\n{}",
        text(&resumed)
    );
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        read(whole.join("last.safetensors")) == read(out.join("last.safetensors")),
        "resumed weights differ from the uninterrupted run's\n{}",
        text(&resumed)
    );
    // The same metrics, but for the timing columns (seconds, img/s).
    let metrics = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .expect("metrics.csv")
            .lines()
            .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(metrics(whole), metrics(&out));
}

/// A rank that dies (SIGKILL to rank 1 after the first epoch was saved) ends the whole job with a
/// message naming it, and rank 0's last complete checkpoint loads.
#[test]
fn a_killed_rank_ends_the_job_naming_it_and_the_checkpoint_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = train_2_ranks(&out, 200)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mpirun");
    let csv = out.join("metrics.csv");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&csv).map_or(true, |t| t.lines().count() < 2) {
        if let Ok(Some(status)) = child.try_wait() {
            let o = child.wait_with_output().expect("output");
            panic!("the run ended before its first epoch ({status}):\n{}", text(&o));
        }
        assert!(t0.elapsed().as_secs() < 600, "no epoch finished in 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rank1 = rank_pid(child.id(), 1).expect("rank 1's process among mpirun's children");
    kill("-KILL", rank1);
    let o = child.wait_with_output().expect("mpirun ends");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the job must fail:\n{stderr}");
    assert!(stderr.contains("rank 1") && stderr.contains(&rank1.to_string()), "the dead rank is named:\n{stderr}");
    let sd = checkpoint::load(&out.join("last.safetensors")).expect("last.safetensors is intact");
    assert!(sd.contains_key("features.0.weight"), "a state dict by PyTorch names");
    let resume = out.join("resume.safetensors");
    let mut net = ddp_network();
    checkpoint::load_resume(&resume, &mut net).expect("resume.safetensors is intact");
}

/// `mpirun -np 2 senet bench`: one report from rank 0 with each rank's images/s and all-reduce
/// share, the total, and the efficiency against rank 0 alone measured in the same run.
#[test]
fn bench_under_2_ranks_reports_scaling_and_the_all_reduce_share() {
    let o = mpirun(RANKS)
        .arg(env!("CARGO_BIN_EXE_senet"))
        .args(["bench", "--width", "0.0625", "--batch-size", "4", "--steps", "2", "--json"])
        .output()
        .expect("run mpirun");
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "rank 0 alone prints the report:\n{}", text(&o));
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(v["ranks"], 2);
    let rates: Vec<f64> =
        v["per_rank_images_per_s"].as_array().expect("per rank").iter().filter_map(|x| x.as_f64()).collect();
    assert_eq!(rates.len(), 2);
    assert!(rates.iter().all(|r| r.is_finite() && *r > 0.0), "{rates:?}");
    let (total, alone) = (v["total_images_per_s"].as_f64().unwrap(), v["alone_images_per_s"].as_f64().unwrap());
    assert!((total - rates.iter().sum::<f64>()).abs() <= 1e-3 * total, "total is the sum: {v}");
    assert!(alone > 0.0 && (v["efficiency"].as_f64().unwrap() - total / (2.0 * alone)).abs() < 1e-9, "{v}");
    for share in v["allreduce_share"].as_array().expect("shares") {
        let s = share.as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&s), "an all-reduce share is a fraction of the step: {v}");
    }
    assert_eq!(v["gradient_floats"].as_u64(), Some(26138), "SENet width 1/16 on 3x32x32: the flat gradient buffer");
}
