//! `senet`: the command-line interface. Parses arguments and calls the library; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use senet_wgpu::args::{self, InputArgs, ModelArgs, TrainArgs};
use senet_wgpu::eval::{self, EvalArgs};
use senet_wgpu::gpu::{self, Gpu, GpuOptions, NoAdapterError};
use senet_wgpu::{exit, hparams, train};

#[derive(Parser)]
#[command(name = "senet", version, about = "Train Squeeze-and-Excitation networks on any GPU through wgpu")]
struct Cli {
    /// Backends to search: vulkan, metal, dx12, gl, or a comma list (default: all; GL is probed only
    /// when no other backend has an adapter).
    #[arg(long, global = true, env = "WGPU_BACKEND")]
    backend: Option<String>,
    /// Use the first adapter whose name contains this text.
    #[arg(long, global = true, env = "WGPU_ADAPTER_NAME")]
    adapter: Option<String>,
    /// Conv kernel tuning when a plan is built: off (built-in choice), quick (time a few tile
    /// shapes per layer on GPUs), full (every shape, any adapter); remembered in the cache file
    /// [default: quick].
    #[arg(long, global = true, value_enum, env = "SENET_TUNE")]
    tune: Option<senet_wgpu::gpu::tune::TuneMode>,
    /// The tuning cache file [default: ~/.cache/senet-wgpu/tune-v1.json, or the platform's cache
    /// directory].
    #[arg(long, global = true, env = "SENET_TUNE_CACHE")]
    tune_cache: Option<PathBuf>,
    /// Reductions (batch norm, SE squeeze, loss, bias gradients) on subgroups: on, off, or auto
    /// = where the adapter has them.
    #[arg(long, global = true, value_enum, env = "SENET_SUBGROUPS", default_value_t)]
    subgroups: gpu::Switch,
    /// f16 shaders (--precision f16): auto = where the adapter has them, off = behave as an adapter
    /// without them, on = an error on an adapter without them.
    #[arg(long, global = true, value_enum, default_value_t)]
    f16: gpu::Switch,
    /// Cooperative-matrix GEMMs in f16 plans: auto = where the adapter lists them and its driver is
    /// known to run them on matrix hardware (see `senet devices`), on = wherever listed, off = never.
    #[arg(long, global = true, value_enum, env = "SENET_COOP", default_value_t)]
    coop: gpu::Switch,
    /// Pin the convolutions' register blocks to M,N,CI,CO for every layer, bypassing the tuner
    /// (for measuring one shape: M pixels x N channels per GEMM thread, CI x CO per weight-gradient
    /// thread; e.g. 16,16,8,16).
    #[arg(long, global = true, env = "SENET_CONV_TILES", value_parser = parse_conv_tiles)]
    conv_tiles: Option<[usize; 4]>,
    /// Print every tuning candidate's time as it is measured.
    #[arg(long, global = true, env = "SENET_TUNE_VERBOSE")]
    tune_verbose: bool,
    /// Keep the driver's compiled pipelines on disk beside the tuning cache, so the next start
    /// compiles nothing it compiled before: auto = where the adapter has a pipeline cache (Vulkan),
    /// on = an error where it has none, off = never.
    #[arg(long, global = true, value_enum, env = "SENET_PIPELINE_CACHE", default_value_t)]
    pipeline_cache: gpu::Switch,
    /// Fused epilogues in the step plans: on = a residual addition runs with the ReLU after it, an
    /// SE block's gate with the addition and ReLU after it, a batch norm with its ReLU and max pool,
    /// in one pass each, and more (docs/cli.md); off = only the batch norm's ReLU is fused. Changes
    /// dispatches, never checkpoints.
    #[arg(long, global = true, value_enum, env = "SENET_FUSE", default_value_t)]
    fuse: gpu::Fuse,
    /// The register convolution kernels load each weight once per subgroup and broadcast it to the
    /// subgroup's lanes: auto = on CPU adapters (lavapipe) with subgroups of 8 to 64 lanes, on =
    /// wherever the subgroups allow (an error elsewhere), off = every lane loads its own. Changes
    /// speed, not values (for finite inputs).
    #[arg(long, global = true, value_enum, env = "SENET_CONV_LANES", default_value_t)]
    conv_lanes: gpu::Switch,
    /// 1x1 convolutions with stride 1 and no padding (H*W a multiple of 4) run the register GEMM
    /// without window arithmetic, loading four pixels at once: on (default) or off (the general
    /// kernel, for comparing). Changes speed, not values.
    #[arg(long, global = true, value_enum, env = "SENET_CONV_1X1", default_value_t)]
    conv_1x1: gpu::ConvForm,
    /// Convolutions 3 wide with padding 1 and stride 1 run the register kernels a kernel row at a
    /// time: the forward and input gradient (W a multiple of 4) load four pixels and their two
    /// neighbours once for the row's three taps, the weight gradient each input value once for
    /// them: on (default) or off (the general kernels, for comparing). The forward and input
    /// gradient sum the same products in another order; the weight gradient's values are the same.
    #[arg(long, global = true, value_enum, env = "SENET_CONV_3X3", default_value_t)]
    conv_3x3: gpu::ConvForm,
    /// With --fuse on, a convolution (register kernels, workgroup tiles) whose output a batch norm
    /// alone reads writes that batch norm's statistics per block of pixels as it stores the
    /// output, and the batch norm merges the blocks instead of reading its input for them: on
    /// (default) or off (for comparing). The same statistics, summed in another order.
    #[arg(long, global = true, value_enum, env = "SENET_BN_STATS", default_value_t)]
    bn_stats: gpu::ConvForm,
    /// With --fuse on, in training, a batch norm and its ReLU whose output a convolution on the
    /// workgroup tiles alone reads are applied by that convolution as its forward and weight
    /// gradient load their input, and the batch norm writes no output: on (default) or off (for
    /// comparing). The same values (bit for bit where the driver rounds the batch norm's
    /// multiply-add alike in both kernels, as lavapipe does).
    #[arg(long, global = true, value_enum, env = "SENET_BN_APPLY", default_value_t)]
    bn_apply: gpu::ConvForm,
    /// With --fuse on, a convolution's input and weight gradients run as one dispatch where one
    /// kernel runs both (the register kernels, or the workgroup tiles when both gradients chose
    /// the same tile shape or the tuner measured one dispatch faster): auto and on = on every
    /// adapter, off = never (for comparing). Changes dispatches and speed, not values.
    #[arg(long, global = true, value_enum, env = "SENET_JOINT_BACKWARD", default_value_t)]
    joint_backward: gpu::Switch,
    /// SE blocks (mean squeeze) as a reduction spread over channels, a pass per sample for the
    /// FCs and an elementwise pass, each way, instead of one workgroup per sample: auto = on GPU
    /// adapters, on = on any adapter, off = never. Changes dispatches and speed, not values.
    #[arg(long, global = true, value_enum, env = "SENET_SE_SPLIT", default_value_t)]
    se_split: gpu::Switch,
    /// A training batch norm's statistics and gradient sums spread over slices of each channel, a
    /// workgroup per channel and slice, two dispatches each way, instead of one workgroup per
    /// channel: on = on any adapter; auto (for now: not yet measured on a GPU) and off = never.
    /// Changes dispatches, speed and the order of the sums.
    #[arg(long, global = true, value_enum, env = "SENET_BN_SPLIT", default_value_t)]
    bn_split: gpu::Switch,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the base SENet and evaluate it after every epoch.
    Train(Box<TrainArgs>),
    /// Test loss, accuracy, per-class accuracy and confusion matrix of a checkpoint.
    Eval(EvalArgs),
    /// Mean SE excitation per channel per class over the test set (CSV, PNG) and a channel ranking.
    Excitations(senet_wgpu::excitations::ExcitationArgs),
    /// The top classes with probabilities for each image (or each image in a folder).
    Predict {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Model width when there is no config.json beside the checkpoint.
        #[arg(long)]
        width: Option<f64>,
        /// SE reduction when there is no config.json beside the checkpoint.
        #[arg(long)]
        reduction: Option<usize>,
        /// Input size (`32` or `HxW`) when there is no config.json beside the checkpoint
        /// [default: 32]; images are resized to it.
        #[arg(long, value_parser = args::parse_image_size)]
        image_size: Option<[usize; 2]>,
        /// Resize each image to size / crop_pct and crop the centre, as timm evaluates [default: the
        /// run's own crop_pct for a model trained on an image folder, else the whole image resized].
        #[arg(long)]
        crop_pct: Option<f64>,
        /// How many classes to print per image, most probable first.
        #[arg(long, default_value_t = hparams::PREDICT_TOP_K)]
        topk: usize,
        /// Print one JSON object per image: {"image", "top": [{"class", "index", "probability"}]}.
        #[arg(long)]
        json: bool,
        /// Image files, or folders whose image files (by extension, sorted by name) are each read.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Write a checkpoint's eval-mode network as an ONNX model (input `input`, output `logits`).
    Export(senet_wgpu::onnx::ExportArgs),
    /// Measure the device's ceilings, a model's train step and eval, and each kernel's share.
    Bench(senet_wgpu::bench::BenchArgs),
    /// Print one training step's dispatches in order: layer, pass, kernel, workgroups, work.
    Plan {
        #[command(flatten)]
        args: senet_wgpu::bench::PlanArgs,
        /// Print JSON lines, one per dispatch.
        #[arg(long)]
        json: bool,
    },
    /// Layer table of a model: output shapes, parameters, multiply-adds, SE overhead.
    Summary {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: InputArgs,
        #[arg(long)]
        json: bool,
    },
    /// List every adapter with its backend, type, driver and the limits that matter,
    /// and say which one `senet` would use.
    Devices,
    /// Write a Fashion-MNIST subset as gzipped IDX files (how assets/fashion-mnist-sample is made)
    /// or as an image folder of PNGs (OUT/train/<class>/, OUT/test/<class>/, for --dataset folder).
    MakeSample {
        #[arg(long, default_value = senet_wgpu::data::FASHION_MNIST_DIR)]
        from: PathBuf,
        #[arg(long, default_value_t = 4000)]
        train: usize,
        #[arg(long, default_value_t = 1000)]
        test: usize,
        #[arg(long, default_value = "assets/fashion-mnist-sample")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "idx")]
        format: SampleFormat,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SampleFormat {
    /// Gzipped IDX files, as Fashion-MNIST ships.
    Idx,
    /// One PNG per image in class folders.
    Png,
}

/// The platform's cache directory: `$XDG_CACHE_HOME` or `~/.cache` (Linux and the BSDs),
/// `~/Library/Caches` (macOS), `%LOCALAPPDATA%` (Windows).
fn platform_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if cfg!(windows) {
        env("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|h| h.join("Library").join("Caches"))
    } else {
        env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))
    }
}

/// What an MPI launcher (mpirun, Hydra, PMIx) says in this process's environment.
fn mpi_launch() -> senet_wgpu::dist::Launch {
    senet_wgpu::dist::Launch::from_vars(|k| std::env::var(k).ok())
}

/// `--conv-tiles`: four numbers naming a register-block shape the kernels implement.
fn parse_conv_tiles(s: &str) -> anyhow::Result<[usize; 4]> {
    let t = senet_wgpu::ops::conv2d::RegisterTiles::parse(s)?;
    Ok([t.gemm_m, t.gemm_n, t.wgrad_ci, t.wgrad_n])
}

impl Cli {
    /// The device options the global flags ask for (the tuning cache defaults to the platform's
    /// cache directory; compiled pipelines are kept beside it).
    fn gpu_options(&self) -> GpuOptions {
        let tune_cache = self.tune_cache.clone().or_else(|| platform_cache_dir().map(|d| gpu::tune::cache_path_in(&d)));
        GpuOptions {
            backend: self.backend.clone(),
            adapter_name: self.adapter.clone(),
            adapter_index: None,
            tune: self.tune,
            pipeline_cache: self.pipeline_cache,
            pipeline_cache_dir: tune_cache.as_deref().and_then(std::path::Path::parent).map(PathBuf::from),
            tune_cache,
            subgroups: Some(self.subgroups),
            f16: self.f16,
            coop: self.coop,
            conv_tiles: self.conv_tiles,
            tune_verbose: self.tune_verbose,
            fuse: self.fuse,
            conv_lanes: self.conv_lanes,
            conv_1x1: self.conv_1x1,
            conv_3x3: self.conv_3x3,
            bn_stats: self.bn_stats,
            bn_apply: self.bn_apply,
            joint_backward: self.joint_backward,
            se_split: self.se_split,
            bn_split: self.bn_split,
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let mut opts = cli.gpu_options();
    match cli.command {
        Command::Train(args) => train_command(*args, matches.subcommand_matches("train"), &mut opts),
        Command::Eval(args) => eval_command(&opts, &args),
        Command::Excitations(args) => excitations_command(&opts, &args),
        Command::Predict { checkpoint, width, reduction, image_size, crop_pct, topk, json, images } => {
            let popts = eval::PredictOptions { k: topk, width, reduction, image_size, crop_pct };
            predict_command(&opts, &checkpoint, &images, &popts, json)
        }
        Command::Export(args) => export_command(&args),
        Command::Plan { args, json } => plan_command(&opts, &args, json),
        Command::Bench(args) if args.data_only => bench_data_command(&args),
        Command::Bench(args) => bench_command(&args, &mut opts),
        Command::Summary { model, input, json } => summary_command(&model, &input, json),
        Command::Devices => devices_command(&mut opts),
        Command::MakeSample { from, train, test, out, format } => make_sample_command(&from, train, test, &out, format),
    }
}

/// `senet eval`: the report as text or one JSON object.
fn eval_command(opts: &GpuOptions, args: &EvalArgs) -> anyhow::Result<()> {
    let report = eval::eval(Gpu::new(opts)?, args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", eval::format_report(&report));
    }
    Ok(())
}

/// `senet excitations`: the CSV and PNG files (in `--out`, else `excitations/` beside the
/// checkpoint), and the report as JSON with `--json`.
fn excitations_command(opts: &GpuOptions, args: &senet_wgpu::excitations::ExcitationArgs) -> anyhow::Result<()> {
    let report = senet_wgpu::excitations::excitations(Gpu::new(opts)?, &args.eval)?;
    let dir = args.out.clone().unwrap_or_else(|| {
        args.eval.checkpoint.parent().map(|p| p.join("excitations")).unwrap_or_else(|| PathBuf::from("excitations"))
    });
    for p in senet_wgpu::excitations::write_outputs(&report, &dir)? {
        println!("wrote {}", p.display());
    }
    if args.eval.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// `senet export`: the ONNX file, and one line saying what it holds.
fn export_command(args: &senet_wgpu::onnx::ExportArgs) -> anyhow::Result<()> {
    let r = senet_wgpu::onnx::export(args)?;
    println!(
        "wrote {} ({} bytes, opset {}, {} nodes, {} initializers): {} {}x{}x{} -> {} classes",
        r.out.display(),
        r.bytes,
        r.opset,
        r.nodes,
        r.initializers,
        r.config.model,
        r.config.in_channels,
        r.config.input_hw[0],
        r.config.input_hw[1],
        r.config.num_classes
    );
    Ok(())
}

/// `senet plan`: one training step's dispatches as a table, or as JSON lines ending in the totals.
fn plan_command(opts: &GpuOptions, args: &senet_wgpu::bench::PlanArgs, json: bool) -> anyhow::Result<()> {
    let listing = senet_wgpu::bench::plan_rows(Gpu::new(opts)?, args)?;
    if json {
        for r in &listing.rows {
            println!("{}", serde_json::to_string(r)?);
        }
        // The last line: {"totals": {"batch_size", "train": {...}, "eval": {...}}}.
        println!("{}", serde_json::json!({ "totals": listing.totals }));
    } else {
        print!("{}", senet_wgpu::bench::format_plan(&listing.rows));
        print!("{}", senet_wgpu::bench::format_plan_totals(&listing.totals));
    }
    Ok(())
}

/// `senet bench --data-only`: the input pipeline alone, no device.
fn bench_data_command(args: &senet_wgpu::bench::BenchArgs) -> anyhow::Result<()> {
    let report = senet_wgpu::bench::bench_data(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", senet_wgpu::bench::format_data_report(&report));
    }
    Ok(())
}

/// `senet summary`: the layer table, or one JSON object.
fn summary_command(model: &ModelArgs, input: &InputArgs, json: bool) -> anyhow::Result<()> {
    let s = senet_wgpu::summary::summary(&input.config(model)?)?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", senet_wgpu::summary::format_summary(&s));
    }
    Ok(())
}

/// `senet make-sample`: a Fashion-MNIST subset as IDX files or an image folder.
fn make_sample_command(
    from: &std::path::Path,
    train: usize,
    test: usize,
    out: &std::path::Path,
    format: SampleFormat,
) -> anyhow::Result<()> {
    let names = senet_wgpu::data::FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    let src = senet_wgpu::data::idx::load_split("fashion-mnist", from, names)?;
    match format {
        SampleFormat::Idx => senet_wgpu::data::idx::write_subset(&src, train, test, out)?,
        SampleFormat::Png => senet_wgpu::data::folder::write_subset(&src, train, test, out)?,
    }
    println!("wrote {train} training and {test} test images to {}", out.display());
    Ok(())
}

/// `senet train`: the recipe and `--init` fill what the command line left at its defaults, the
/// flags are checked, then one process or one MPI rank trains.
fn train_command(mut args: TrainArgs, sub: Option<&clap::ArgMatches>, opts: &mut GpuOptions) -> anyhow::Result<()> {
    // --recipe fills in what the command line leaves at its default.
    args.apply_recipe(|id| {
        sub.and_then(|m| m.value_source(id)).is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
    });
    // --init: the model flags left at their defaults take the checkpoint's model.
    let line = train::model_from_init(&mut args, |id| {
        sub.and_then(|m| m.value_source(id)).is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
    })?;
    if let Some(line) = line {
        println!("{line}");
    }
    args.validate()?;
    let given: Vec<&str> = sub
        .map(|m| {
            m.ids()
                .map(|id| id.as_str())
                .filter(|id| m.value_source(id).is_some_and(|s| s == clap::parser::ValueSource::CommandLine))
                .collect()
        })
        .unwrap_or_default();
    senet_wgpu::run::resume_conflicts(&args, &given)?;
    // Under mpirun: join the job; each rank opens the adapter its local rank picks
    // (unless --adapter names one). Errors on one rank alone end every rank.
    let dist = senet_wgpu::dist::Dist::init(&mpi_launch())?;
    if dist.size > 1 {
        opts.adapter_index = Some(dist.local_rank);
    }
    let trained = Gpu::new(opts).and_then(|gpu| train::train_dist(gpu, &args, &dist));
    trained.map_err(|e| {
        let code = i32::from(exit::code(&e));
        dist.end_on_error(e, code)
    })?;
    Ok(())
}

/// `senet predict`: the top classes of each image, as text or JSON lines.
fn predict_command(
    opts: &GpuOptions,
    checkpoint: &std::path::Path,
    images: &[PathBuf],
    popts: &eval::PredictOptions,
    json: bool,
) -> anyhow::Result<()> {
    let images = eval::expand_image_folders(images)?;
    let results = eval::predict(Gpu::new(opts)?, checkpoint, &images, popts)?;
    for (path, top) in images.iter().zip(results) {
        if json {
            let top: Vec<_> = top
                .iter()
                .map(|(class, index, p)| serde_json::json!({"class": class, "index": index, "probability": p}))
                .collect();
            println!("{}", serde_json::json!({"image": path, "top": top}));
            continue;
        }
        println!("{}", path.display());
        for (class, _, p) in top {
            println!("  {p:>7.4}  {class}");
        }
    }
    Ok(())
}

/// `senet bench` (not `--data-only`): one device, or under `mpirun` the data-parallel step.
fn bench_command(args: &senet_wgpu::bench::BenchArgs, opts: &mut GpuOptions) -> anyhow::Result<()> {
    // `mpirun -np N senet bench`: rank 0 alone, then all ranks data-parallel.
    let dist = senet_wgpu::dist::Dist::init(&mpi_launch())?;
    if dist.size > 1 {
        opts.adapter_index = Some(dist.local_rank);
        let report = Gpu::new(opts)
            .and_then(|gpu| senet_wgpu::bench::bench_data_parallel(gpu, args, &dist))
            .map_err(|e| dist.end_on_error(e, 2))?;
        if dist.is_root() {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", senet_wgpu::bench::format_data_parallel(&report));
            }
        }
        return Ok(());
    }
    let report = senet_wgpu::bench::bench(Gpu::new(opts)?, args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", senet_wgpu::bench::format_report(&report));
    }
    Ok(())
}

/// `senet devices`: every adapter, and the one `senet` would use (per local rank under `mpirun`).
fn devices_command(opts: &mut GpuOptions) -> anyhow::Result<()> {
    let adapters = gpu::list_adapters(opts)?;
    if adapters.is_empty() {
        return Err(NoAdapterError { detail: String::new() }.into());
    }
    for a in &adapters {
        println!("{a}\n");
    }
    if opts.backend.is_none() && !adapters.iter().any(|a| a.info.backend == wgpu::Backend::Gl) {
        println!("(GL is probed only when no other backend has an adapter: --backend gl lists it)\n");
    }
    // Under mpirun each rank prints the adapter it would train on (its local rank modulo
    // the adapters of the best kind, unless --adapter names one).
    let launch = mpi_launch();
    if let Some((size, _)) = launch.size.filter(|&(n, _)| n > 1) {
        let local = launch.local_rank;
        opts.adapter_index = Some(local);
        println!("selected for local rank {local} (of {size} ranks): {}", Gpu::new(opts)?.describe());
    } else {
        println!("selected: {}", Gpu::new(opts)?.describe());
    }
    Ok(())
}

/// On a headless Linux machine (no XDG_RUNTIME_DIR), Mesa's implicit Vulkan layer
/// VK_LAYER_MESA_device_select asks the Wayland compositor for the default GPU whenever an instance
/// enables VK_KHR_wayland_surface (wgpu always does), and libwayland prints "error: XDG_RUNTIME_DIR
/// is invalid or not set in the environment." on stderr, twice per instance, although nothing
/// failed. There is no compositor to ask there: turn the layer off through its own switch
/// (NODEVICE_SELECT=1) unless the user set it or asked it for a device (MESA_VK_DEVICE_SELECT,
/// DRI_PRIME). We rank adapters ourselves, so only the layer's reordering is lost.
fn quiet_headless_vulkan_layers() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    // libwayland's test: an absolute XDG_RUNTIME_DIR, unless WAYLAND_DISPLAY is an absolute path or
    // WAYLAND_SOCKET hands over a connection.
    let runtime_dir_ok = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| d.to_string_lossy().starts_with('/'));
    let wayland_direct = set("WAYLAND_SOCKET")
        || std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| d.to_string_lossy().starts_with('/'));
    if runtime_dir_ok || wayland_direct || set("NODEVICE_SELECT") || set("MESA_VK_DEVICE_SELECT") || set("DRI_PRIME") {
        return;
    }
    // SAFETY: called first thing in main, before any thread exists.
    unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`senet train | head`) instead of panicking on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    quiet_headless_vulkan_layers();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        // 130 interrupted (rank 0 says where the run was saved), 1 a runtime failure, 2 bad input
        // (a missing adapter is the user's to fix too): the table in `senet_wgpu::exit` and docs/cli.md.
        Err(e) => {
            let (text, code) = exit::report(&e);
            if let Some(text) = text {
                eprintln!("{text}");
            }
            ExitCode::from(code)
        }
    }
}
