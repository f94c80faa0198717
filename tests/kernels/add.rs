//! `add` (residual connections).

use crate::common::*;
use senet_wgpu::ops::add;
use senet_wgpu::reference;

/// out = a + b and da = db = dout, exactly (one f32 addition, one copy), on sizes from one element
/// to past one workgroup row of the 1-D grid.
#[test]
fn add_forward_and_backward_match_reference() {
    let gpu = gpu();
    for (i, shape) in [vec![1usize], vec![2, 3, 5, 7], vec![3, 17, 33, 31]].into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut r = rng(450 + i as u64);
        let (a, b, dy) = (uniform(&mut r, n, -1.0, 1.0), uniform(&mut r, n, -1.0, 1.0), uniform(&mut r, n, -1.0, 1.0));
        let (ta, tb, tdy) =
            (upload(&gpu, "a", &shape, &a), upload(&gpu, "b", &shape, &b), upload(&gpu, "dy", &shape, &dy));
        let (out, da, db) = (zeros(&gpu, "out", &shape), zeros(&gpu, "da", &shape), zeros(&gpu, "db", &shape));
        run(&gpu, &add::add_forward(&gpu, &ta, &tb, &out).unwrap());
        run(&gpu, &add::add_backward(&gpu, &tdy, &da, &db).unwrap());
        // The f32 sum rounds once, the reference's f64 sum of the same values is exact: within
        // half an ulp, |err| <= 2^-24 |sum| (rtol 6e-8). The gradients are copies: exact.
        let want = reference::add::add_forward(&to_f64(&a), &to_f64(&b));
        assert_close(&format!("add_forward case {i}"), &read(&gpu, &out), &want, 0.0, 6e-8);
        let (want_a, want_b) = reference::add::add_backward(&to_f64(&dy));
        assert_close(&format!("add_backward da case {i}"), &read(&gpu, &da), &want_a, 0.0, 0.0);
        assert_close(&format!("add_backward db case {i}"), &read(&gpu, &db), &want_b, 0.0, 0.0);
    }
    let (a, b) = (zeros(&gpu, "a", &[2, 3]), zeros(&gpu, "b", &[3, 2]));
    let err = add::add_forward(&gpu, &a, &b, &a).unwrap_err().to_string();
    assert!(err.contains("add") && err.contains("second operand"), "{err}");
}
