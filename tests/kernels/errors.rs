//! Mistakes and failures surface as errors, not panics: wgpu validation, a lost device, a
//! tensor of the wrong element type.

use crate::common::*;
use crate::gpu_f16;
use senet_wgpu::ops::relu;

/// A mistake that wgpu catches (here: buffers that do not match the kernel's bindings) is an
/// error with the kernel's name, not a panic, and does not poison the device for later work.
#[test]
fn gpu_validation_errors_are_errors_not_panics() {
    let gpu = gpu();
    let t = zeros(&gpu, "t", &[4]);
    let p = gpu.uniform("p", &[4u32, 0, 0, 0]);
    let err = gpu
        .dispatch(
            "relu",
            "relu_forward",
            &[("WG", 256.0)],
            &[senet_wgpu::gpu::Bind::Uniform(0, &p), senet_wgpu::gpu::Bind::Tensor(1, &t)],
            [1, 1, 1],
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("relu::relu_forward"), "{err:#}");
    let err = gpu.pipeline("relu", senet_wgpu::gpu::Precision::F32, "no_such_entry", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("no_such_entry"), "{err:#}");
    gpu.check().expect("scoped errors do not leak into the device's error list");
}

/// A lost device (here destroyed on purpose, as a driver reset would) surfaces as an error at the
/// next wait or read-back — the run can end with a message — instead of a panic or a hang.
#[test]
fn a_lost_device_is_an_error_not_a_panic() {
    let gpu = senet_wgpu::gpu::Gpu::new(&Default::default()).expect("GPU test cannot run");
    let x = upload(&gpu, "x", &[4], &[1.0, -1.0, 2.0, -2.0]);
    let y = zeros(&gpu, "y", &[4]);
    let d = relu::relu_forward(&gpu, &x, &y).unwrap();
    gpu.device.destroy();
    gpu.run(&d.iter().collect::<Vec<_>>());
    let err = match gpu.wait().and_then(|_| y.read::<f32>(&gpu).map(|_| ())) {
        Err(e) => format!("{e:#}"),
        Ok(()) => panic!("work on a destroyed device reported success"),
    };
    assert!(!err.is_empty(), "{err}");
    eprintln!("lost device reported as: {err}");
}

/// An f16 buffer bound where a kernel's variant reads f32 (or the reverse) is a plan-time error
/// naming the binding and the tensor, not a silent reinterpretation of its bytes.
#[test]
fn binding_an_f16_tensor_to_an_f32_kernel_is_an_error() {
    let gpu = gpu_f16();
    let (x, y) = (upload(&gpu, "x32", &[8], &[1.0; 8]), zeros_f16(&gpu, "y16", &[8]));
    // relu's variant is chosen by its input: f32 here, so the f16 output does not fit.
    let err = relu::relu_forward(&gpu, &x, &y).unwrap_err().to_string();
    assert!(err.contains("relu_forward") && err.contains("y16") && err.contains("f16"), "{err}");
}
