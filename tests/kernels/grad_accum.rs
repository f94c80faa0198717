//! Gradient accumulation (--grad-accum-steps).

use crate::common::*;
use crate::{accum_cases, aligned_flat};
use senet_wgpu::reference;

/// grad_accum over micro-batch counts 2, 3 and 5 against `reference::grad_accum`: the gradient
/// buffer after the last micro-batch equals the f64 sum of every micro-batch's gradients. The
/// GPU adds in f32 in PyTorch's order (((g1 + g2) + g3) …): at most 4 roundings of sums of
/// values in ±1, so atol 5 · 2^-24 · 5 = 1.5e-6 (rtol 0: a sum that cancels is held to the same
/// absolute bound). A micro-batch left out or added twice moves elements by up to 1.
#[test]
fn grad_accum_equals_the_reference() {
    use senet_wgpu::ops::grad_accum::{GradAccum, MicroBatch};
    let gpu = gpu();
    for sizes in accum_cases(&gpu) {
        let total: usize = sizes.iter().sum();
        for count in [2, 3, 5] {
            let what = format!("grad_accum of {count} over chunks {sizes:?}");
            let (flat, views) = aligned_flat(&gpu, "gradients", &sizes, &vec![0.0; total]);
            let acc = GradAccum::new(&gpu, &views.iter().collect::<Vec<_>>(), total).unwrap();
            let mut r = rng(900 + total as u64 + count as u64);
            let mut want_grad = vec![0.0f64; total];
            let mut want_accum = vec![0.0f64; total];
            for i in 0..count {
                let g = uniform(&mut r, total, -1.0, 1.0);
                flat.write(&gpu, &g).unwrap();
                let m = MicroBatch::of(i, count);
                run(&gpu, acc.dispatches(m));
                want_grad = to_f64(&g);
                match m {
                    MicroBatch::First => reference::grad_accum::grad_accum_store(&want_grad, &mut want_accum),
                    MicroBatch::Middle => reference::grad_accum::grad_accum_add(&want_grad, &mut want_accum),
                    MicroBatch::Last => reference::grad_accum::grad_accum_finish(&mut want_grad, &want_accum),
                    MicroBatch::Whole => unreachable!("count > 1"),
                }
            }
            assert_close(&format!("{what}: gradients"), &read(&gpu, &flat), &want_grad, 1.5e-6, 0.0);
        }
    }
}
