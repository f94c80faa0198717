//! The dropout op (src/ops/dropout/): its kernels against the f64 reference on awkward lengths in
//! f32 and f16, the statistics of its draw, and a whole training step of a network with a dropout
//! layer against the reference step.
//!
//! The mask is an integer hash both sides compute identically, so a kept element differs only by
//! the rounding of x / (1 - p): f32, |error| <= 1 ulp of the result (rtol 2.4e-7, taken as 1e-6);
//! f16, half an f16 ulp of the result (2^-11 relative, 4.9e-4) plus the f16 subnormal spacing. A
//! wrong mask or scale is an error of order |x|, orders of magnitude above either.

mod common;

use common::*;
use senet_wgpu::gpu::{Dtype, Precision, Tensor};
use senet_wgpu::model::plan::Network;
use senet_wgpu::model::{Dropout, Layer, ModelConfig, Node};
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::dropout::{self, DropoutConfig};
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;
use senet_wgpu::reference::model::StepOptions;

const LENGTHS: [usize; 4] = [1, 7, 1000, 4099];
const PS: [f64; 4] = [0.0, 0.2, 0.5, 0.9];

#[test]
fn dropout_forward_backward_and_eval_match_the_reference() {
    let gpu = gpu();
    let key = dropout::step_key(12345, 3);
    for (dtype, atol, rtol) in [(Dtype::F32, 0.0, 1e-6), (Dtype::F16, 3e-8, 4.9e-4)] {
        for (i, &len) in LENGTHS.iter().enumerate() {
            for &p in &PS {
                let what = format!("{dtype:?} len {len} p {p}");
                let cfg = DropoutConfig::new(p, &format!("layer{i}"));
                let (tx, x) = upload_as(&gpu, dtype, &[len], &uniform(&mut rng(i as u64), len, -2.0, 2.0));
                let (tdy, dy) = upload_as(&gpu, dtype, &[len], &uniform(&mut rng(100 + i as u64), len, -2.0, 2.0));
                let zeros = |label| Tensor::zeros_of(&gpu, label, &[len], dtype).expect("allocate");
                let (ty, teval, tdx) = (zeros("y"), zeros("eval"), zeros("dx"));
                let tkey = key_tensor(&gpu, key);
                run(&gpu, &dropout::dropout_forward(&gpu, &cfg, &tkey, &tx, &ty, true).unwrap());
                run(&gpu, &dropout::dropout_forward(&gpu, &cfg, &tkey, &tx, &teval, false).unwrap());
                run(&gpu, &dropout::dropout_backward(&gpu, &cfg, &tkey, &tdy, &tdx).unwrap());
                let want = dropout::reference::dropout_forward(&cfg, key, &to_f64(&x));
                assert_close(&format!("{what} forward"), &read_as(&gpu, &ty), &want, atol, rtol);
                let want = dropout::reference::dropout_backward(&cfg, key, &to_f64(&dy));
                assert_close(&format!("{what} backward"), &read_as(&gpu, &tdx), &want, atol, rtol);
                assert_eq!(read_as(&gpu, &teval), x, "{what}: evaluation is the identity");
            }
        }
    }
}

/// Over 2^16 draws the kept fraction is 1 - p within 5 standard deviations; another step, another
/// layer and another seed each draw another mask (two independent masks agree on a fraction
/// p² + (1-p)² of elements, far from all of them).
#[test]
fn the_draw_keeps_one_minus_p_and_differs_per_step_layer_and_seed() {
    let len = 1 << 16;
    for p in [0.1, 0.2, 0.5, 0.9] {
        let mask = |cfg: &DropoutConfig, key| -> Vec<bool> {
            (0..len).map(|i| dropout::reference::keep(cfg, key, i)).collect()
        };
        let cfg = DropoutConfig::new(p, "fc_dropout");
        let m = mask(&cfg, dropout::step_key(7, 1));
        let kept = m.iter().filter(|&&k| k).count() as f64 / len as f64;
        let sd = (p * (1.0 - p) / len as f64).sqrt();
        assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        let agree_independent = p * p + (1.0 - p) * (1.0 - p);
        for (what, other) in [
            ("step", mask(&cfg, dropout::step_key(7, 2))),
            ("layer", mask(&DropoutConfig::new(p, "other_dropout"), dropout::step_key(7, 1))),
            ("seed", mask(&cfg, dropout::step_key(8, 1))),
        ] {
            let agree = m.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / len as f64;
            assert!((agree - agree_independent).abs() < 0.01, "p {p}: another {what} agrees on {agree}");
        }
    }
}

#[test]
fn dropout_refuses_p_outside_0_to_1() {
    let gpu = gpu();
    let (x, y, key) = (zeros(&gpu, "x", &[4]), zeros(&gpu, "y", &[4]), key_tensor(&gpu, [0, 0]));
    for p in [1.0, -0.1, f64::NAN] {
        let e = dropout::dropout_forward(&gpu, &DropoutConfig::new(p, "d"), &key, &x, &y, true).unwrap_err();
        assert!(e.to_string().contains("p must be in [0, 1)"), "{e}");
    }
}

/// common::grouped_network with Dropout(0.5) between the pool and the classifier: two training
/// steps (two masks) against the reference steps with the same keys, then eval mode (no dropout).
/// Tolerances as tests/train_step.rs's whole steps.
#[test]
fn steps_of_a_network_with_dropout_equal_the_reference() {
    let gpu = gpu();
    let (n, [h, w], seed) = (3, [9, 7], 21);
    let mut graph = grouped_network(h, w);
    let fc = graph.nodes.pop().expect("the classifier");
    let drop = Node { name: "drop".into(), layer: Layer::Dropout(Dropout { p: 0.5 }), inputs: fc.inputs.clone() };
    graph.nodes.push(drop);
    graph.nodes.push(Node { inputs: vec![graph.nodes.len()], ..fc });
    let cfg = ModelConfig {
        model: "dropout".into(),
        width: 1.0,
        reduction: 16,
        in_channels: 3,
        num_classes: 5,
        input_hw: [h, w],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    };
    let opt = OptimizerConfig::sgd(0.1, 0.9);
    let mut net = Network::with_graph(gpu.clone(), cfg, graph, opt, seed, Precision::F32).unwrap();
    let plan = net.plan(n).unwrap();
    let labels = [1, 4, 2];
    for step in 1..=2u64 {
        let what = format!("step {step}");
        let x = uniform(&mut rng(40 + step), n * 3 * h * w, 0.0, 1.0);
        let (params, buffers) = reference_state(&net);
        let opts = StepOptions { step_key: dropout::step_key(seed, step), ..StepOptions::default() };
        let want =
            reference::model::train_step_with(&net.graph, &params, &buffers, n, &to_f64(&x), &labels, &opts).unwrap();
        plan.write_batch(&gpu, &x, &labels).unwrap();
        net.train_step(&plan);
        gpu.wait().unwrap();
        let res = read(&gpu, &plan.train_result);
        assert_close(&format!("{what} loss"), &[res[result::LOSS]], &[want.loss], 1e-5, 1e-4);
        assert_close(&format!("{what} logits"), &read(&gpu, plan.logits()), &want.logits, 1e-4, 1e-4);
        for p in &net.params {
            let name = &p.spec.name;
            assert_close(&format!("{what} grad {name}"), &read(&gpu, &p.grad), &want.grads[name], 2e-4, 1e-3);
        }
    }
    let x = uniform(&mut rng(50), n * 3 * h * w, 0.0, 1.0);
    let (params, buffers) = reference_state(&net);
    let want = reference::model::eval_forward(&net.graph, &params, &buffers, n, &to_f64(&x)).unwrap();
    plan.write_batch(&gpu, &x, &[0; 3]).unwrap();
    net.eval_batch(&plan);
    gpu.wait().unwrap();
    assert_close("eval logits", &read(&gpu, plan.logits()), &want, 1e-4, 1e-4);
}

/// The reference backward against central finite differences of L = Σ w·dropout(x) (the mask held
/// fixed by the key): the forward is linear in x, so the differences are exact up to f64 rounding
/// of x ± h (1e-9 absolute at h 1e-4).
#[test]
fn the_reference_gradient_matches_finite_differences() {
    let (len, key, h) = (257, dropout::step_key(3, 5), 1e-4);
    for p in PS {
        let cfg = DropoutConfig::new(p, "d");
        let x = to_f64(&uniform(&mut rng(7), len, -1.0, 1.0));
        let w = to_f64(&uniform(&mut rng(8), len, -1.0, 1.0));
        let loss = |x: &[f64]| -> f64 {
            dropout::reference::dropout_forward(&cfg, key, x).iter().zip(&w).map(|(y, w)| y * w).sum()
        };
        let numeric: Vec<f64> = (0..len)
            .map(|i| {
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += h;
                b[i] -= h;
                (loss(&a) - loss(&b)) / (2.0 * h)
            })
            .collect();
        let got = dropout::reference::dropout_backward(&cfg, key, &w);
        for (i, (g, n)) in got.iter().zip(&numeric).enumerate() {
            assert!((g - n).abs() < 1e-9, "p {p} element {i}: backward {g}, finite differences {n}");
        }
    }
}
