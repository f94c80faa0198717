//! Gradient clipping (--clip-grad-norm).

use crate::common::*;
use senet_wgpu::reference;

/// One clip_grad_norm case: the flat gradient buffer cut into chunks of these sizes (as a buffer
/// past one binding is), values uniform in ±`magnitude` (0: all zero), clipped to `max_norm`;
/// `loss_scale` > 1: the gradients are an f16 plan's, multiplied by the loss scale, and the
/// scaler's inverse scale unscales them for the norm.
struct ClipCase {
    what: &'static str,
    chunks: &'static [usize],
    magnitude: f32,
    max_norm: f64,
    loss_scale: f32,
    /// Whether the norm is above max_norm (checked against the reference, so a case cannot
    /// silently stop testing what it says).
    clips: bool,
}

/// clip_grad_norm's tolerance. The norm: each chain of f32 additions of positive squares is at
/// most 256 long (a lane's share of a chunk of up to 2^24 elements) plus 8 tree levels, then the
/// same for the partials: relative error <= 2 * 264 * 2^-24 = 3.1e-5 of the sum of squares, half
/// that after the square root (1.6e-5), plus the squares' own rounding: rtol 2e-5 on the norm.
/// The clipped gradients are g * coef, coef as exact as the norm: rtol 2e-5 + one rounding
/// (6e-8), and atol 0 (a zero gradient stays exactly zero). A norm below max_norm leaves coef at
/// exactly 1 and the gradients bit for bit. An indexing bug (a chunk or a workgroup's share left
/// out, counted twice) moves the norm by far more: a share is at least 1/4,096 of it here.
const CLIP_RTOL: f64 = 2e-5;

fn clip_cases() -> Vec<ClipCase> {
    let case = |what, chunks, magnitude, max_norm, loss_scale, clips| ClipCase {
        what,
        chunks,
        magnitude,
        max_norm,
        loss_scale,
        clips,
    };
    vec![
        case("1 element above max", &[1], 30.0, 0.5, 1.0, true),
        case("1 element, zero gradient", &[1], 0.0, 1.0, 1.0, false),
        case("257 elements below max", &[257], 1e-2, 1.0, 1.0, false),
        case("zero gradients in 3,000", &[3000], 0.0, 0.5, 1.0, false),
        // more than 256 workgroups x 256 values: the partial sums stride round their chunk
        case("70,001 elements above max", &[70_001], 1.0, 5.0, 1.0, true),
        // a chunk that ends off a workgroup, then one of one element: the partial slots of each
        case("chunks of 320, 1,333 and 1", &[320, 1333, 1], 1.0, 2.0, 1.0, true),
        // an f16 plan's: gradients x 2^16; clipped on their unscaled norm, still scaled after
        case("loss-scaled by 2^16, above max", &[64, 4097], 1e-3, 0.01, 65536.0, true),
        case("loss-scaled by 2^10, below max", &[5000], 1e-3, 1.0, 1024.0, false),
    ]
}

/// The gradients' total 2-norm and every clipped gradient on the GPU against the reference
/// (`reference::clip_grad_norm`, torch's clip_grad_norm_ in f64), on both reduction paths.
#[test]
fn clip_grad_norm_equals_the_reference() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    use senet_wgpu::ops::grad_scaler::state;
    for (path, gpu) in gpus() {
        // Chunks start at multiples of the adapter's offset alignment, as the flat buffers' do.
        let align = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        for (k, c) in clip_cases().iter().enumerate() {
            let what = format!("clip_grad_norm {} ({path})", c.what);
            let mut starts = Vec::new();
            let mut end = 0usize;
            for &len in c.chunks {
                let start = end.next_multiple_of(align);
                starts.push(start);
                end = start + len;
            }
            let mut r = rng(2200 + k as u64);
            let mut g = vec![0.0f32; end];
            for (&s, &len) in starts.iter().zip(c.chunks) {
                for v in &mut g[s..s + len] {
                    *v = rand::Rng::random_range(&mut r, -1.0..1.0f32) * c.magnitude * c.loss_scale;
                }
            }
            let grads = upload(&gpu, "grads", &[end], &g);
            let views: Vec<_> = starts
                .iter()
                .zip(c.chunks)
                .map(|(&s, &len)| grads.view(&gpu, &format!("grads {s}.."), s, &[len]).unwrap())
                .collect();
            let mut scaler_state = vec![0.0f32; state::LEN];
            (scaler_state[state::SCALE], scaler_state[state::INV_SCALE]) = (c.loss_scale, 1.0 / c.loss_scale);
            let scaler = upload(&gpu, "scaler", &[state::LEN], &scaler_state);
            let scaled = (c.loss_scale != 1.0).then_some(&scaler);
            let clip = ClipGradNorm::new(&gpu, c.max_norm, &views.iter().collect::<Vec<_>>(), scaled).unwrap();
            run(&gpu, &clip.dispatches);

            // The reference clips the unscaled gradients; the GPU's stay scaled (the optimizer
            // unscales them), so its result is compared after dividing by the scale.
            let inv = 1.0 / f64::from(c.loss_scale);
            let mut want: Vec<Vec<f64>> = starts
                .iter()
                .zip(c.chunks)
                .map(|(&s, &len)| g[s..s + len].iter().map(|&v| f64::from(v) * inv).collect())
                .collect();
            let mut slices: Vec<&mut [f64]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
            let norm = reference::clip_grad_norm::clip_grad_norm(&mut slices, c.max_norm);
            let coef = reference::clip_grad_norm::clip_coef(norm, c.max_norm);
            assert_eq!(norm > c.max_norm, c.clips, "{what}: norm {norm} against max_norm {}", c.max_norm);
            let got_state = clip.read(&gpu).unwrap();
            let err = assert_close(&format!("{what} total norm"), &[got_state.total_norm], &[norm], 0.0, CLIP_RTOL);
            eprintln!("{what}: total norm {norm:.6e}, relative error {:.2e}", err / norm.max(1e-300));
            assert_close(&format!("{what} coefficient"), &[got_state.coef], &[coef], 0.0, CLIP_RTOL);
            let after = read(&gpu, &grads);
            if coef == 1.0 {
                assert_eq!(got_state.coef, 1.0, "{what}: below max_norm the coefficient is exactly 1");
                assert_eq!(after, g, "{what}: below max_norm the gradients are untouched");
            } else {
                assert!(coef < 0.999, "{what}: the case must clip for real (coefficient {coef})");
            }
            for ((&s, &len), w) in starts.iter().zip(c.chunks).zip(&want) {
                let got: Vec<f32> = after[s..s + len].iter().map(|&v| (f64::from(v) * inv) as f32).collect();
                assert_close(&format!("{what} gradients {s}.."), &got, w, 0.0, CLIP_RTOL + 6e-8);
            }
            // The gaps between chunks (zeros in the flat buffers) are neither counted nor written.
            let mut gaps = vec![true; end];
            for (&s, &len) in starts.iter().zip(c.chunks) {
                gaps[s..s + len].iter_mut().for_each(|x| *x = false);
            }
            assert!(after.iter().zip(&gaps).all(|(&v, &gap)| !gap || v == 0.0), "{what}: a gap was written");
        }
    }
}

/// Past 65,535 workgroups of the scale kernel (2^24 + 257 gradients: the grid folds into two
/// dimensions) and 256 values per lane in the partial sums. One reduction path: the other is
/// covered above, and this case moves 64 MiB each way.
#[test]
fn clip_grad_norm_past_65535_workgroups() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    let gpu = gpu();
    let n = (1usize << 24) + 257;
    assert!(n.div_ceil(256) > 65_535);
    let mut r = rng(2300);
    let g = uniform(&mut r, n, -1.0, 1.0);
    let grads = upload(&gpu, "grads", &[n], &g);
    let clip = ClipGradNorm::new(&gpu, 100.0, &[&grads], None).unwrap();
    run(&gpu, &clip.dispatches);
    let mut want = to_f64(&g);
    let norm = reference::clip_grad_norm::clip_grad_norm(&mut [want.as_mut_slice()], 100.0);
    let st = clip.read(&gpu).unwrap();
    let err = assert_close("clip_grad_norm 2^24 + 257 total norm", &[st.total_norm], &[norm], 0.0, CLIP_RTOL);
    eprintln!("clip_grad_norm 2^24 + 257: total norm {norm:.6e}, relative error {:.2e}", err / norm);
    assert!(st.coef < 0.1, "the case clips: norm {norm}");
    assert_close("clip_grad_norm 2^24 + 257 gradients", &read(&gpu, &grads), &want, 0.0, CLIP_RTOL + 6e-8);
}

/// max_norm must be finite, above 0 and an f32: else a host error naming it.
#[test]
fn clip_grad_norm_refuses_a_bad_max_norm() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    let gpu = gpu();
    let grads = zeros(&gpu, "grads", &[4]);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e39] {
        let e = ClipGradNorm::new(&gpu, bad, &[&grads], None).err().expect("refused");
        assert!(format!("{e:#}").contains("max_norm must be a finite number above 0"), "{bad}: {e:#}");
    }
}
