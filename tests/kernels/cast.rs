//! `cast`: f32 to f16 (an f16 plan casts its input batch), rounded as torch's `.half()`.

use crate::common::*;
use crate::{gpu_f16, read_f16};
use senet_wgpu::reference;

/// The cast rounds to nearest even as `half` (PyTorch's .half()) does — ties, the largest finite
/// value, overflow to ±inf, subnormals, signed zero — bit for bit, on an odd count (the last
/// word half padding) and past one workgroup.
#[test]
fn cast_rounds_to_nearest_even_like_torch_half() {
    let gpu = gpu_f16();
    let mut r = rng(1500);
    let mut x = uniform(&mut r, 1001, -4.0, 4.0);
    let special = [
        65504.0f32,
        65519.0,
        65520.0,
        -70000.0,
        1e-7,
        -3e-8,
        6.1e-5,
        0.0,
        -0.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        2049.0,
        2051.0,
    ];
    x[..special.len()].copy_from_slice(&special);
    let tx = upload(&gpu, "x", &[x.len()], &x);
    let ty = zeros_f16(&gpu, "y", &[x.len()]);
    run(&gpu, &senet_wgpu::ops::cast::cast_forward(&gpu, &tx, &ty).unwrap());
    let got: Vec<u16> = ty.read::<half::f16>(&gpu).unwrap().iter().map(|h| h.to_bits()).collect();
    let want: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "cast of {:e}: gpu {:#06x} reference {:#06x}", x[i], g, w);
    }
    // The oracle of the same name, widened: equal values (±inf included, so compared with ==).
    let r64 = reference::cast::cast_forward(&to_f64(&x));
    for (i, (g, w)) in read_f16(&gpu, &ty).iter().zip(&r64).enumerate() {
        assert!(f64::from(*g) == *w, "cast_forward of {:e}: gpu {g:e} reference {w:e}", x[i]);
    }
}
