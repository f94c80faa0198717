//! Cross-entropy: hard labels, label smoothing, soft targets, f16 logits.

use crate::common::*;
use crate::{F16_ATOL, F16_RTOL, read_f16, uniform_f16, upload_f16};
use senet_wgpu::gpu::Tensor;
use senet_wgpu::ops::cross_entropy::{self, result};
use senet_wgpu::reference;

#[test]
fn cross_entropy_matches_reference_and_accumulates() {
    for (path, gpu) in gpus() {
        // (batch, classes, logit scale): batch 1; 3 classes; > 256 samples (strided reduction);
        // 1,000 classes; logits of +-60, where a naive exp overflows f32.
        for (i, (n, k, scale)) in
            [(1usize, 10usize, 3.0f32), (7, 3, 3.0), (300, 10, 3.0), (5, 1000, 3.0), (9, 10, 60.0), (64, 10, 0.0)]
                .into_iter()
                .enumerate()
        {
            let mut r = rng(900 + i as u64);
            // Scale 0: logits from {-1, -0.5, 0, 0.5, 1}, so the target often ties others and the
            // top-5 tie rule (lower index first) decides.
            let logits: Vec<f32> = if scale == 0.0 {
                uniform(&mut r, n * k, -1.25, 1.25).iter().map(|v| (v * 2.0).round() / 2.0).collect()
            } else {
                uniform(&mut r, n * k, -scale, scale)
            };
            let target: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k as u32)).collect();
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "target", &[n], &target).unwrap();
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let d = cross_entropy::cross_entropy_forward_backward(&gpu, &tl, &tt, &tdl, &per, &res, None).unwrap();
            // Twice: the batch fields are overwritten, the running sums accumulate.
            run(&gpu, &d);
            run(&gpu, &d);
            let want = reference::cross_entropy::cross_entropy_forward_backward(&to_f64(&logits), &target, k);
            let got = read(&gpu, &res);
            // Loss: log-sum-exp over <= 1,000 exps and a mean over <= 300 samples: ~1e-6 relative.
            assert_close(
                &format!("cross_entropy loss case {i} ({path})"),
                &[got[result::LOSS]],
                &[want.loss],
                1e-5,
                1e-5,
            );
            assert_eq!(got[result::CORRECT], want.correct as f32, "cross_entropy correct case {i} ({path})");
            assert_close(
                &format!("cross_entropy summed loss case {i} ({path})"),
                &[got[result::SUM_LOSS]],
                &[2.0 * want.loss * n as f64],
                1e-4,
                1e-5,
            );
            assert_eq!(
                got[result::SUM_CORRECT],
                2.0 * want.correct as f32,
                "cross_entropy summed correct case {i} ({path})"
            );
            assert_eq!(got[result::SUM_COUNT], 2.0 * n as f32, "cross_entropy summed count case {i} ({path})");
            // Counts are exact: integers far below 2^24.
            assert_eq!(
                got[result::SUM_CORRECT5],
                2.0 * want.correct5 as f32,
                "cross_entropy summed top-5 correct case {i} ({path})"
            );
            assert!(want.correct5 >= want.correct && (k > 5 || want.correct5 == n), "top-5 ⊇ top-1; all when k <= 5");
            // Gradient entries are at most 1/n: absolute 1e-7 is ~1 ulp of the largest.
            assert_close(
                &format!("cross_entropy dlogits case {i} ({path})"),
                &read(&gpu, &tdl),
                &want.dlogits,
                1e-7,
                1e-5,
            );
            let per = read(&gpu, &per);
            for s in 0..n {
                let row = &logits[s * k..][..k];
                let first_max = row.iter().enumerate().fold(0, |a, (j, &v)| if v > row[a] { j } else { a });
                assert_eq!(
                    per[cross_entropy::per_sample::LEN * s + cross_entropy::per_sample::PREDICTED],
                    first_max as f32,
                    "cross_entropy predicted class, case {i} ({path}) sample {s}"
                );
            }
        }
    }
}

/// Label smoothing (torch's `label_smoothing`) on the GPU against the reference, on both
/// reduction paths: batch 1, 3 classes, 300 samples, 1,000 classes.
#[test]
fn cross_entropy_label_smoothing_matches_reference() {
    for (path, gpu) in gpus() {
        for (i, (n, k, e)) in
            [(1usize, 10usize, 0.1f32), (7, 3, 0.3), (300, 10, 0.1), (5, 1000, 0.5)].into_iter().enumerate()
        {
            let mut r = rng(950 + i as u64);
            let logits = uniform(&mut r, n * k, -3.0, 3.0);
            let target: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k as u32)).collect();
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "target", &[n], &target).unwrap();
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let d = cross_entropy::cross_entropy_forward_backward_smoothed(&gpu, &tl, &tt, &tdl, &per, &res, e, None)
                .unwrap();
            run(&gpu, &d);
            let want = reference::cross_entropy::cross_entropy_forward_backward_smoothed(
                &to_f64(&logits),
                &target,
                k,
                f64::from(e),
            );
            // As the unsmoothed loss: log-sum-exp and sums over <= 1,000 terms in f32, ~1e-6 relative.
            assert_close(
                &format!("smoothed loss case {i} ({path})"),
                &[read(&gpu, &res)[result::LOSS]],
                &[want.loss],
                1e-5,
                1e-5,
            );
            // Entries are at most 1/n: absolute 1e-7 is ~1 ulp of the largest.
            assert_close(&format!("smoothed dlogits case {i} ({path})"), &read(&gpu, &tdl), &want.dlogits, 1e-7, 1e-5);
            assert_eq!(read(&gpu, &res)[result::CORRECT], want.correct as f32, "smoothing leaves the count");
        }
    }
}

/// Soft targets (timm's SoftTargetCrossEntropy, Mixup's loss) against
/// `reference::cross_entropy::cross_entropy_soft_forward_backward`: mixed smoothed one-hots as
/// timm's `mixup_target` makes them (λ·(1 − e + e/K at y, e/K elsewhere) + (1 − λ)·the same at
/// the flipped batch's label), arbitrary distributions, and rows that do not sum to 1 (the
/// gradient's softmax·Σt term); batch 1, 3 classes, > 256 samples,
/// 1,000 classes; a loss weight of 1/3 (a micro-batch of --grad-accum-steps 3) on one case.
/// Tolerances as the smoothed loss's (the same log-sum-exp and sums in f32). A gradient without
/// Σt, a target read from the wrong row, or the weight ignored are off by far more.
#[test]
fn cross_entropy_soft_targets_match_reference() {
    for (path, gpu) in gpus() {
        for (i, (n, k, mixed, weight)) in [
            (1usize, 10usize, true, 1.0f32),
            (7, 3, false, 1.0),
            (300, 10, true, 1.0 / 3.0),
            (5, 1000, true, 1.0),
            (9, 4, false, 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rng(970 + i as u64);
            let logits = uniform(&mut r, n * k, -3.0, 3.0);
            let targets: Vec<f32> = if mixed {
                let y: Vec<usize> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k)).collect();
                let lam = uniform(&mut r, 1, 0.0, 1.0)[0];
                let (e, kf) = (0.1f32, k as f32);
                let onehot = |c: usize, j: usize| if c == j { 1.0 - e + e / kf } else { e / kf };
                (0..n * k)
                    .map(|x| lam * onehot(y[x / k], x % k) + (1.0 - lam) * onehot(y[n - 1 - x / k], x % k))
                    .collect()
            } else {
                let raw = uniform(&mut r, n * k, 0.0, 1.0);
                // Weight 0.5 marks the case whose rows are left unnormalised.
                let norm = |row: &[f32]| if weight == 0.5 { 1.0 } else { row.iter().sum::<f32>() };
                raw.chunks(k).flat_map(|row| row.iter().map(|v| v / norm(row)).collect::<Vec<_>>()).collect()
            };
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = upload(&gpu, "soft targets", &[n, k], &targets);
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let (d, w) = cross_entropy::cross_entropy_soft_weighted(&gpu, &tl, &tt, &tdl, &per, &res, None).unwrap();
            w.set(&gpu, weight);
            run(&gpu, &d);
            let want =
                reference::cross_entropy::cross_entropy_soft_forward_backward(&to_f64(&logits), &to_f64(&targets), k);
            let what = format!("soft-target case {i} ({path})");
            let got = read(&gpu, &res);
            assert_close(&format!("{what}: loss"), &[got[result::LOSS]], &[want.loss], 1e-5, 1e-5);
            let dl: Vec<f64> = want.dlogits.iter().map(|g| g * f64::from(weight)).collect();
            assert_close(&format!("{what}: dlogits"), &read(&gpu, &tdl), &dl, 1e-7, 1e-5);
            assert_eq!(got[result::CORRECT], want.correct as f32, "{what}: correct (dominant class)");
            assert_eq!(got[result::SUM_CORRECT5], want.correct5 as f32, "{what}: top-5");
        }
    }
}

/// f16 logits: the loss and softmax in f32, the gradient times the loss scale (scaler state
/// [0]), rounded to f16. Scales 1 and 1024 (a power of two: scaling is exact before the rounding).
#[test]
fn f16_cross_entropy_scales_its_gradient() {
    use senet_wgpu::ops::grad_scaler::state;
    for (path, gpu) in gpus() {
        for (n, k, scale) in [(1usize, 3usize, 1.0f32), (37, 10, 1024.0), (300, 10, 65536.0)] {
            let mut r = rng(2000 + n as u64);
            let logits = uniform_f16(&mut r, n * k, -8.0, 8.0);
            let labels: Vec<u32> = (0..n).map(|i| (i * 7 % k) as u32).collect();
            let tl = upload_f16(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "labels", &[n], &labels).unwrap();
            let tdl = zeros_f16(&gpu, "dlogits", &[n, k]);
            let (per, res) =
                (zeros(&gpu, "per", &[n, cross_entropy::per_sample::LEN]), zeros(&gpu, "res", &[result::LEN]));
            let mut st = vec![0.0f32; state::LEN];
            st[state::SCALE] = scale;
            let tst = upload(&gpu, "scaler", &[state::LEN], &st);
            run(
                &gpu,
                &cross_entropy::cross_entropy_forward_backward(&gpu, &tl, &tt, &tdl, &per, &res, Some(&tst)).unwrap(),
            );
            let want = reference::cross_entropy::cross_entropy_forward_backward(&to_f64(&logits), &labels, k);
            let scaled: Vec<f64> = want.dlogits.iter().map(|g| g * f64::from(scale)).collect();
            let what = format!("f16 cross_entropy n={n} k={k} scale {scale} ({path})");
            // The softmax is f32 (exp within a few ulp): 1e-6 of the largest gradient, scale/n, then
            // the f16 rounding.
            let atol = 1e-6 * f64::from(scale) / n as f64 + F16_ATOL;
            assert_close(&format!("{what} dlogits"), &read_f16(&gpu, &tdl), &scaled, atol, F16_RTOL);
            let got = read(&gpu, &res);
            assert_close(&format!("{what} loss"), &got[result::LOSS..=result::LOSS], &[want.loss], 1e-5, 1e-5);
            assert_eq!(got[result::CORRECT] as usize, want.correct, "{what} correct");
        }
    }
}

/// `--fuse on` runs the rows and their reduce as one dispatch of one workgroup
/// (`cross_entropy_forward_backward_reduce`): every output bit for bit the two passes' of
/// `--fuse off` — labels (batch 1, a batch past the 256-invocation stride, smoothing), soft
/// targets, f16 logits with a loss scale — run twice, so the running sums accumulate alike.
#[test]
fn fused_cross_entropy_is_the_two_passes_bit_for_bit() {
    use senet_wgpu::ops::grad_scaler::state;
    let (fused, unfused) = (gpu(), gpu_unfused());
    assert!(fused.fuse && !unfused.fuse, "the test devices must differ in --fuse");
    // (batch, classes, smoothing, soft targets, f16 with this loss scale)
    let cases = [
        (1usize, 10usize, 0.0f32, false, None),
        (300, 10, 0.1, false, None),
        (5, 1000, 0.0, false, None),
        (37, 10, 0.0, true, None),
        (300, 10, 0.0, false, Some(1024.0f32)),
    ];
    for (i, (n, k, smoothing, soft, f16)) in cases.into_iter().enumerate() {
        let mut r = rng(3100 + i as u64);
        let logits = uniform(&mut r, n * k, -4.0, 4.0);
        let labels: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k as u32)).collect();
        let raw = uniform(&mut r, n * k, 0.0, 1.0);
        let targets: Vec<f32> =
            raw.chunks(k).flat_map(|row| row.iter().map(|v| v / row.iter().sum::<f32>()).collect::<Vec<_>>()).collect();
        let outputs = |gpu: &std::sync::Arc<senet_wgpu::gpu::Gpu>| {
            let tl = match f16 {
                Some(_) => upload_f16(gpu, "logits", &[n, k], &logits),
                None => upload(gpu, "logits", &[n, k], &logits),
            };
            let tdl = if f16.is_some() { zeros_f16(gpu, "dlogits", &[n, k]) } else { zeros(gpu, "dlogits", &[n, k]) };
            let per = zeros(gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(gpu, "result", &[result::LEN]);
            let mut st = vec![0.0f32; state::LEN];
            st[state::SCALE] = f16.unwrap_or(1.0);
            let tst = upload(gpu, "scaler", &[state::LEN], &st);
            let scaler = f16.map(|_| &tst);
            let d = if soft {
                let tt = upload(gpu, "soft targets", &[n, k], &targets);
                cross_entropy::cross_entropy_soft_weighted(gpu, &tl, &tt, &tdl, &per, &res, scaler).unwrap().0
            } else {
                let tt = Tensor::from_slice(gpu, "labels", &[n], &labels).unwrap();
                let (d, _) =
                    cross_entropy::cross_entropy_weighted(gpu, &tl, &tt, &tdl, &per, &res, smoothing, scaler).unwrap();
                d
            };
            run(gpu, &d);
            run(gpu, &d);
            let dl = if f16.is_some() { read_f16(gpu, &tdl) } else { read(gpu, &tdl) };
            (d.len(), dl, read(gpu, &per), read(gpu, &res))
        };
        let (a, b) = (outputs(&fused), outputs(&unfused));
        let what =
            format!("fused cross-entropy case {i} (n {n}, k {k}, smoothing {smoothing}, soft {soft}, f16 {f16:?})");
        assert_eq!((a.0, b.0), (1, 2), "{what}: dispatches fused / unfused");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(a.1.iter().zip(&b.1).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: dlogits differ");
        assert_eq!(bits(&a.2), bits(&b.2), "{what}: per-sample rows differ");
        assert_eq!(bits(&a.3), bits(&b.3), "{what}: results differ");
    }
}
