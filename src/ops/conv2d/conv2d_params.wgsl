// conv2d_params: the parameter block every conv2d kernel reads at binding 0, written once and
// appended by the host to conv2d.wgsl (Register), conv2d_tiled.wgsl (Workgroup) and
// conv2d_coop.wgsl (Coop); mirrors `ops::conv2d::Params`. No entry point of its own; not compiled
// alone.
//
// `relu` (the forward only): the output passes a ReLU before it is stored — an evaluation pass's
// convolution with a batch norm and its ReLU folded in (ops/bn_fold). MODE and FWD are each
// family's own.

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, has_bias: u32,
    splits: u32, split_len: u32, groups: u32, relu: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// The forward's epilogue on a finished output value (bias included): the fused ReLU, if any.
fn epilogue(v: f32) -> f32 {
    if (MODE == FWD && p.relu != 0u) {
        return max(v, 0.0);
    }
    return v;
}
