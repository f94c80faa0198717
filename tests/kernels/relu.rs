//! `relu`, and the 1-D grid every element-wise kernel launches on.

use crate::common::*;
use senet_wgpu::ops::relu;
use senet_wgpu::reference;

#[test]
fn relu_forward_and_backward_match_reference() {
    let gpu = gpu();
    for (i, n) in [1usize, 7, 1000, 65_537].into_iter().enumerate() {
        let mut r = rng(400 + i as u64);
        let x = uniform(&mut r, n, -1.0, 1.0);
        let dy = uniform(&mut r, n, -1.0, 1.0);
        let tx = upload(&gpu, "x", &[n], &x);
        let ty = zeros(&gpu, "y", &[n]);
        run(&gpu, &relu::relu_forward(&gpu, &tx, &ty).unwrap());
        let y = reference::relu::relu_forward(&to_f64(&x));
        // Exact: max(x, 0) and a select involve no rounding.
        assert_close(&format!("relu_forward n={n}"), &read(&gpu, &ty), &y, 0.0, 0.0);
        let tdy = upload(&gpu, "dy", &[n], &dy);
        let tdx = zeros(&gpu, "dx", &[n]);
        run(&gpu, &relu::relu_backward(&gpu, &ty, &tdy, &tdx).unwrap());
        assert_close(
            &format!("relu_backward n={n}"),
            &read(&gpu, &tdx),
            &reference::relu::relu_backward(&y, &to_f64(&dy)),
            0.0,
            0.0,
        );
    }
}

/// Past 65,535 workgroups the 1-D grid wraps into y; every element must still be visited once.
#[test]
fn elementwise_grid_wraps_past_the_workgroup_limit() {
    let gpu = gpu();
    let groups = gpu.limits.max_compute_workgroups_per_dimension as usize + 3;
    let n = groups * 256;
    let grid = gpu.grid_1d(n, 256);
    assert!(grid[1] > 1, "expected a 2-D grid for {n} elements, got {grid:?}");
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 - 500.0).collect();
    let tx = upload(&gpu, "x", &[n], &x);
    let ty = zeros(&gpu, "y", &[n]);
    run(&gpu, &relu::relu_forward(&gpu, &tx, &ty).unwrap());
    let y = read(&gpu, &ty);
    let first_bad = y.iter().zip(&x).position(|(&a, &b)| a != b.max(0.0));
    assert_eq!(first_bad, None, "relu over {n} elements in grid {grid:?}");
}
