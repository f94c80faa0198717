// max_pool_window: max pooling's window arithmetic, appended by the host to pool.wgsl (the
// max_pool2d kernels) and to batch_norm.wgsl (the pool fused after a batch norm's ReLU, POOL), so
// both scan and gather the same way. No entry point of its own; not compiled alone. Each file
// declares the bindings `dout` and `argmax_in` and `fn pool_load(i: u32) -> f32`: the value max
// pooling sees at input element i (the stored value; or a batch norm and ReLU applied on load,
// from the per-channel `pool_affine` (mean, scale, shift) the kernel sets first).

// The geometry, fixed per pipeline: with input size, kernel, stride and padding constant, every
// division and remainder by them compiles to a multiply and shift. On lavapipe a runtime integer
// division is a per-lane software routine, and the backward gather does eight of them per element
// (3x faster this way). H, W: the input plane; OH, OW: the output's.
override H: u32 = 1u;
override W: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override OH: u32 = 1u;
override OW: u32 = 1u;

var<private> pool_affine: vec3<f32>;

// A window's maximum and its index iy * W + ix within the plane.
struct PoolMax {
    value: f32,
    index: u32,
}

// The maximum of output r (oy * OW + ox) of the plane starting at element `base`: padding counts as
// -inf; PyTorch's rule (v > best || isnan(v)): the first maximum in scan order wins, a NaN is
// taken and kept against numbers (v > NaN is false), a later NaN takes its place.
fn pool_window_max(base: u32, r: u32) -> PoolMax {
    let y0 = i32((r / OW) * SH) - i32(PH);
    let x0 = i32((r % OW) * SW) - i32(PW);
    var best = PoolMax(0.0, 0xffffffffu);
    for (var ky = 0u; ky < KH; ky++) {
        let iy = y0 + i32(ky);
        if (iy < 0 || iy >= i32(H)) {
            continue;
        }
        for (var kx = 0u; kx < KW; kx++) {
            let ix = x0 + i32(kx);
            if (ix < 0 || ix >= i32(W)) {
                continue;
            }
            let idx = u32(iy) * W + u32(ix);
            let v = pool_load(base + idx);
            if (best.index == 0xffffffffu || v > best.value || v != v) {
                best = PoolMax(v, idx);
            }
        }
    }
    return best;
}

// The gradient reaching input element idx (iy * W + ix) of plane `plane`: the sum of `dout` over
// the few windows that contain it and whose argmax is it — gathered per input element, so
// overlapping windows need no atomics and the sum order is fixed.
fn pool_gather(plane: u32, idx: u32) -> f32 {
    let iy = i32(idx / W) + i32(PH);
    let ix = i32(idx % W) + i32(PW);
    // Windows oy with oy*stride <= iy+pad < oy*stride + k.
    let oy_lo = max(0, (iy - i32(KH) + i32(SH)) / i32(SH));
    let oy_hi = min(i32(OH) - 1, iy / i32(SH));
    let ox_lo = max(0, (ix - i32(KW) + i32(SW)) / i32(SW));
    let ox_hi = min(i32(OW) - 1, ix / i32(SW));
    let obase = plane * OH * OW;
    var s = 0.0;
    for (var oy = oy_lo; oy <= oy_hi; oy++) {
        for (var ox = ox_lo; ox <= ox_hi; ox++) {
            let o = obase + u32(oy) * OW + u32(ox);
            if (argmax_in[o] == idx) {
                s += f32(dout[o]);
            }
        }
    }
    return s;
}
