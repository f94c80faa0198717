//! Every WGSL file parses and validates under naga, with no GPU involved, and every file in
//! shaders/ and src/ops/*/ is registered (so none is shipped unchecked or forgotten).

use naga::valid::Capabilities;
use senet_wgpu::gpu::{
    CONV_GEMM_PART, CONV_OWN_PART, CONV_PARAMS_PART, COOP_SHADERS, LANE_SHADERS, POOL_WINDOW_PART, PRELUDE_SUBGROUP,
    PRELUDE_WORKGROUP, Precision, SE_WEIGHT_GRAD_PART, SHADERS, coop_prelude, shader_source,
};
use senet_wgpu::ops::batch_norm::SE_WGRAD_STORAGE_BUFFERS;

/// Parse and validate a file as the device compiles it: with a reduction prelude appended and
/// `act` defined. The workgroup prelude must need no capability at all, the subgroup one only
/// SUBGROUP; the f16 variant SHADER_FLOAT16 besides.
fn validate(name: &str, src: &str, subgroups: bool, precision: Precision) -> naga::Module {
    let src = shader_source(src, subgroups, precision);
    let prelude = if subgroups { PRELUDE_SUBGROUP.0 } else { PRELUDE_WORKGROUP.0 };
    let what = format!("{name}.wgsl + {prelude}.wgsl ({})", precision.name());
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{what} does not parse:\n{}", e.emit_to_string(&src)));
    let mut caps = if subgroups { Capabilities::SUBGROUP } else { Capabilities::empty() };
    if precision == Precision::F16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    if let Err(e) = validator.validate(&module) {
        panic!("{what} does not validate:\n{}", e.emit_to_string(&src));
    }
    module
}

/// Element widths of a module's storage arrays.
fn storage_widths(module: &naga::Module) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, var) in module.global_variables.iter() {
        if !matches!(var.space, naga::AddressSpace::Storage { .. }) {
            continue;
        }
        if let naga::TypeInner::Array { base, .. } = module.types[var.ty].inner
            && let naga::TypeInner::Scalar(s) | naga::TypeInner::Vector { scalar: s, .. } = module.types[base].inner
        {
            out.push(s.width);
        }
    }
    out
}

/// Every entry point a GL adapter may run (the workgroup-tree variant: GL has no subgroups)
/// binds at most 16 storage buffers, GL's limit (`max_storage_buffers_per_shader_stage`); the ones
/// that bind more, the batch-norm backward summing an SE block's weight gradients (one-pass and
/// sliced), bind exactly what the plan checks the adapter for (`batch_norm::SE_WGRAD_STORAGE_BUFFERS`).
#[test]
fn every_entry_point_fits_a_gl_adapters_storage_buffers() {
    const GL_LIMIT: usize = 16;
    for (name, src) in SHADERS {
        for precision in [Precision::F32, Precision::F16] {
            let module = validate(name, src, false, precision);
            let caps = Capabilities::all();
            let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for (i, ep) in module.entry_points.iter().enumerate() {
                let uses = info.get_entry_point(i);
                let count = module
                    .global_variables
                    .iter()
                    .filter(|(h, v)| matches!(v.space, naga::AddressSpace::Storage { .. }) && !uses[*h].is_empty())
                    .count();
                if ["batch_norm_backward_se_wgrad", "batch_norm_backward_slices_input_se_wgrad"]
                    .contains(&ep.name.as_str())
                {
                    assert_eq!(count, SE_WGRAD_STORAGE_BUFFERS as usize, "{name}::{}: storage buffers", ep.name);
                } else {
                    assert!(
                        count <= GL_LIMIT,
                        "{name}::{} ({}) binds {count} storage buffers, more than GL's {GL_LIMIT}",
                        ep.name,
                        precision.name()
                    );
                }
            }
        }
    }
}

/// Files whose kernels move activations (and so have an f16 variant with f16 bindings); the
/// optimizer and the benchmark kernels work on f32 only.
const ACTIVATION_FILES: &[&str] = &[
    "conv2d",
    "conv2d_tiled",
    "batch_norm",
    "bn_fold",
    "relu",
    "pool",
    "se_block",
    "linear",
    "cross_entropy",
    "add",
    "cast",
    "dropout",
];

#[test]
fn every_kernel_has_an_f16_variant_and_its_f32_variant_is_all_f32() {
    for (name, src) in SHADERS {
        let f32_widths = storage_widths(&validate(name, src, false, Precision::F32));
        assert!(f32_widths.iter().all(|&w| w == 4), "{name}: the f32 variant has a storage array of another width");
        let f16_widths = storage_widths(&validate(name, src, false, Precision::F16));
        assert_eq!(
            f16_widths.contains(&2),
            ACTIVATION_FILES.contains(name),
            "{name}: its f16 variant should {}bind f16 activations",
            if ACTIVATION_FILES.contains(name) { "" } else { "not " }
        );
    }
}

/// The passes an entry point may name. `gemm`, `gemm_tiled` and `gemm_coop` serve several passes,
/// chosen by their MODE override; `partial` and `reduce` are the two stages of a split reduction;
/// `step` an optimizer's (and the model EMA's update); `scale` an in-place multiplication by a
/// factor a reduction found (gradient clipping); `store`, `add` and `finish` the three stages of
/// gradient accumulation (first, middle and last micro-batch).
const PASSES: &[&str] = &[
    "forward",
    "forward_train",
    "forward_eval",
    "forward_backward",
    // the loss against soft (mixed) targets
    "soft_forward_backward",
    "backward",
    "backward_input",
    "backward_weight",
    "backward_weight_reduce",
    "backward_bias",
    // a batch norm's backward that also sums the SE block after it's weight gradients
    "backward_se_wgrad",
    // the split SE block (--se-split): reductions spread over channels, the FCs, elementwise passes
    "forward_squeeze",
    "forward_excite",
    "forward_scale",
    "backward_ds",
    "backward_fc",
    "backward_dx",
    // --bn-split's sliced batch norm: a workgroup per channel and slice, two dispatches each way
    "forward_slices",
    "forward_slices_apply",
    "backward_slices",
    "backward_slices_input",
    "backward_slices_input_se_wgrad",
    // --sync-bn's split batch norm: each pass in two halves around the ranks' exchange
    "forward_stats",
    "forward_apply",
    "backward_sums",
    "partial",
    "reduce",
    "scale",
    "gemm",
    "gemm_tiled",
    "gemm_coop",
    "step",
    "fma",
    "copy",
    "store",
    "add",
    "finish",
];

/// The ops a file implements: its own name, unless it holds several (as torch.nn and
/// torch.optim name them).
fn ops_of(file: &str) -> Vec<&str> {
    match file {
        "pool" => vec!["max_pool2d", "global_avg_pool"],
        "optimizer" => vec!["adam", "sgd"],
        "conv2d_tiled" | "conv2d_coop" | "conv2d_lanes" => vec!["conv2d"],
        other => vec![other],
    }
}

/// What a pass may run fused in, named after it: epilogues (`add_forward_relu`,
/// `se_block_backward_input_add_relu`: `ops::layer::Epilogue`), the op's own reduce
/// (`cross_entropy_forward_backward_reduce`) and the global average pool before it
/// (`linear_forward_pooled`).
const FUSED: &[&str] = &["relu", "add_relu", "reduce", "pooled"];

fn is_pass(pass: &str) -> bool {
    PASSES.contains(&pass)
        || FUSED
            .iter()
            .any(|e| pass.strip_suffix(e).and_then(|p| p.strip_suffix('_')).is_some_and(|p| PASSES.contains(&p)))
}

fn is_op_pass(file: &str, entry: &str) -> bool {
    ops_of(file).iter().any(|op| entry.strip_prefix(op).and_then(|r| r.strip_prefix('_')).is_some_and(is_pass))
}

#[test]
fn entry_point_names_are_checked() {
    // The rule above must be able to fail.
    assert!(is_op_pass("cross_entropy", "cross_entropy_forward_backward"));
    assert!(is_op_pass("optimizer", "adam_step"));
    assert!(!is_op_pass("optimizer", "optimizer_adam"), "no pass");
    assert!(!is_op_pass("relu", "relu_fwd"), "not a pass");
    assert!(!is_op_pass("relu", "add_forward"), "another file's op");
    assert!(is_op_pass("se_block", "se_block_backward_input_add_relu"), "a pass with an epilogue");
    assert!(!is_op_pass("add", "add_relu"), "an epilogue is no pass");
    assert!(!is_op_pass("add", "add_forward_gelu"), "not an epilogue");
    assert!(is_op_pass("linear", "linear_forward_pooled"), "a pass with the pool before it");
    assert!(is_op_pass("cross_entropy", "cross_entropy_forward_backward_reduce"), "a pass with its reduce");
    assert!(!is_op_pass("linear", "linear_pooled"), "a fused neighbour is no pass");
}

#[test]
fn every_shader_parses_and_validates() {
    for (name, src) in SHADERS {
        for precision in [Precision::F32, Precision::F16] {
            validate(name, src, true, precision);
        }
        let module = validate(name, src, false, Precision::F32);
        assert!(!module.entry_points.is_empty(), "{name}.wgsl has no entry point");
        // Binding 0 is the op's uniform parameter block, and the only uniform.
        for (_, var) in module.global_variables.iter() {
            let Some(b) = &var.binding else { continue };
            let uniform = var.space == naga::AddressSpace::Uniform;
            assert_eq!(
                uniform,
                b.binding == 0,
                "{name}: {:?} at binding {}: binding 0 must be the uniform and the only one",
                var.name,
                b.binding
            );
        }
        for ep in &module.entry_points {
            assert_eq!(ep.stage, naga::ShaderStage::Compute, "{name}::{} is not a compute shader", ep.name);
            assert!(
                is_op_pass(name, &ep.name),
                "{name}::{} is not named <op>_<pass> (ops of this file: {:?}; passes: {PASSES:?})",
                ep.name,
                ops_of(name)
            );
        }
    }
}

/// The subgroup-broadcast kernels, as the device compiles them: with the subgroup prelude only
/// (the host builds them only where subgroups are on), f32 and f16, f16 with f16 bindings; and
/// without the SUBGROUP capability they must be refused, which is why they are a list apart.
#[test]
fn every_lane_shader_validates_with_subgroups_only() {
    for (name, src) in LANE_SHADERS {
        let module = validate(name, src, true, Precision::F32);
        assert!(storage_widths(&module).iter().all(|&w| w == 4), "{name}: f32 variant");
        assert!(storage_widths(&validate(name, src, true, Precision::F16)).contains(&2), "{name}: f16 variant");
        for ep in &module.entry_points {
            assert!(is_op_pass(name, &ep.name), "{name}::{} is not named <op>_<pass>", ep.name);
        }
        let without = shader_source(src, false, Precision::F32);
        let parsed = naga::front::wgsl::parse_str(&without).expect("parses without subgroups");
        let refused = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), Capabilities::empty())
            .validate(&parsed)
            .is_err();
        assert!(refused, "{name}.wgsl validates without the SUBGROUP capability: it needs no list of its own");
    }
}

/// The cooperative-matrix kernels, as the device compiles them: f16, with the coop prelude of each
/// tile size wgpu admits (8 and 16), validated with the COOPERATIVE_MATRIX capability.
#[test]
fn every_coop_shader_validates_at_both_tile_sizes() {
    for (name, src) in COOP_SHADERS {
        for t in [8, 16] {
            for subgroups in [true, false] {
                let src = shader_source(src, subgroups, Precision::F16) + &coop_prelude(t);
                let what = format!("{name}.wgsl at {t}x{t}x{t}");
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{what} does not parse:\n{}", e.emit_to_string(&src)));
                let mut caps = Capabilities::SHADER_FLOAT16 | Capabilities::COOPERATIVE_MATRIX;
                if subgroups {
                    caps |= Capabilities::SUBGROUP;
                }
                let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
                if let Err(e) = validator.validate(&module) {
                    panic!("{what} does not validate:\n{}", e.emit_to_string(&src));
                }
                for ep in &module.entry_points {
                    assert!(is_op_pass(name, &ep.name), "{name}::{} is not named <op>_<pass>", ep.name);
                }
            }
        }
    }
}

#[test]
fn every_shader_file_is_registered() {
    // The shared files in shaders/, each op's in its folder src/ops/<op>/.
    let root = env!("CARGO_MANIFEST_DIR");
    let ops = std::fs::read_dir(format!("{root}/src/ops")).expect("src/ops/ is readable");
    let dirs = ops.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir());
    let mut files: Vec<String> = std::iter::once(std::path::PathBuf::from(format!("{root}/shaders")))
        .chain(dirs)
        .flat_map(|d| std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{} is readable: {e}", d.display())))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut registered: Vec<String> = SHADERS
        .iter()
        .chain(COOP_SHADERS)
        .chain(LANE_SHADERS)
        .chain([
            &PRELUDE_WORKGROUP,
            &PRELUDE_SUBGROUP,
            &CONV_GEMM_PART,
            &CONV_PARAMS_PART,
            &CONV_OWN_PART,
            &POOL_WINDOW_PART,
            &SE_WEIGHT_GRAD_PART,
        ])
        .map(|(n, _)| format!("{n}.wgsl"))
        .collect();
    registered.sort();
    assert_eq!(files, registered, "the .wgsl files (shaders/, src/ops/*/) and gpu::SHADERS disagree");
}

#[test]
fn a_broken_shader_fails_validation() {
    // The check above must be able to fail: a type error is caught without a GPU.
    let src = "@compute @workgroup_size(1) fn f() { let x: u32 = 1.5; }";
    let parsed = naga::front::wgsl::parse_str(src);
    let failed = match parsed {
        Err(_) => true,
        Ok(m) => naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
            .validate(&m)
            .is_err(),
    };
    assert!(failed, "naga accepted a shader that assigns a float to a u32");
}
