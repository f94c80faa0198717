//! Every WGSL file parses and validates under naga, with no GPU involved, and every file in
//! shaders/ is registered (so none is shipped unchecked or forgotten).

use naga::valid::Capabilities;
use senet_wgpu::gpu::{PRELUDE_SUBGROUP, PRELUDE_WORKGROUP, SHADERS, shader_source};

/// Parse and validate a file as the device compiles it: with a reduction prelude appended. The
/// workgroup prelude must need no capability at all; the subgroup one only SUBGROUP.
fn validate(name: &str, src: &str, subgroups: bool) -> naga::Module {
    let src = shader_source(src, subgroups);
    let prelude = if subgroups { PRELUDE_SUBGROUP.0 } else { PRELUDE_WORKGROUP.0 };
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl + {prelude}.wgsl does not parse:\n{}", e.emit_to_string(&src)));
    let caps = if subgroups { Capabilities::SUBGROUP } else { Capabilities::empty() };
    let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    if let Err(e) = validator.validate(&module) {
        panic!("shaders/{name}.wgsl + {prelude}.wgsl does not validate:\n{}", e.emit_to_string(&src));
    }
    module
}

#[test]
fn every_shader_parses_and_validates() {
    for (name, src) in SHADERS {
        validate(name, src, true);
        let module = validate(name, src, false);
        assert!(!module.entry_points.is_empty(), "shaders/{name}.wgsl has no entry point");
        // Entry points are named <op>_<pass>; every one begins with an op of its family's file.
        for ep in &module.entry_points {
            assert_eq!(ep.stage, naga::ShaderStage::Compute, "{name}::{} is not a compute shader", ep.name);
        }
    }
}

#[test]
fn every_shader_file_is_registered() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("shaders/ is readable")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut registered: Vec<String> =
        SHADERS.iter().chain([&PRELUDE_WORKGROUP, &PRELUDE_SUBGROUP]).map(|(n, _)| format!("{n}.wgsl")).collect();
    registered.sort();
    assert_eq!(files, registered, "shaders/ and gpu::SHADERS disagree");
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
