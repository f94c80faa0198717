// conv2d_params: the parameter block every conv2d kernel reads at binding 0, written once and
// appended by the host to conv2d.wgsl (Register), conv2d_tiled.wgsl (Workgroup) and
// conv2d_coop.wgsl (Coop); mirrors `ops::conv2d::Params`. No entry point of its own; not compiled
// alone.

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, has_bias: u32,
    splits: u32, split_len: u32, groups: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
