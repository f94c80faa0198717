// conv2d_gemm: what the two workgroup-GEMM convolution kernels share, appended by the host to
// conv2d_tiled.wgsl (workgroup-memory tiles) and conv2d_coop.wgsl (cooperative matrices): the
// storage bindings (one layout, so the host builds both passes alike; the parameter block is
// conv2d_params.wgsl's, appended after this file), the MODE
// override and its GEMM dimensions, and the operand loads and the store:
//
//   MODE  GEMM                    rows    cols              reduction K
//   0     conv2d_forward          c_out   N*OH*OW pixels    c_in*kh*kw   A = weight,   B = im2col(inp)
//   1     conv2d_backward_input   c_in    N*H*W pixels      c_out*kh*kw  A = weight^T, B = gathered dout
//   2     conv2d_backward_weight  c_out   c_in*kh*kw        N*OH*OW      A = dout,     B = im2col(inp)^T
//
// With `groups` = g, c_in and c_out above are one group's (c_in/g, c_out/g): g independent GEMMs
// of that size, told apart by the workgroup's z (z = split * g + group; `enter_group` sets the
// group and returns the split), their channels offset by the group's first. A tile never
// straddles two groups.
//
// Loads return `act` (the tiled kernel widens them to f32 as it stages them; the coop kernel stages
// f16); the store narrows the forward's and input gradient's f32 sums to `act` once, and writes the
// weight gradient (or slice `split` of its partial buffer [splits, c_out, c_in*kh*kw]) in f32.
// No entry point of its own; not compiled alone.

// Params and binding 0 (p): conv2d_params.wgsl, appended by the host.
// The forward's and weight gradient's input; the input gradient's addend (conv2d_params.wgsl).
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read> weight: array<act>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
// The forward's output (MODE 0) or the input gradient (MODE 1).
@group(0) @binding(4) var<storage, read_write> out: array<act>;
@group(0) @binding(5) var<storage, read> dout: array<act>;
// The weight gradient or its split partials (MODE 2): f32 whatever `act` is, summed later.
@group(0) @binding(6) var<storage, read_write> wgrad: array<f32>;

// Which GEMM: 0 forward, 1 input gradient, 2 weight gradient (one source, three pipelines; the
// branches on it fold away when the pipeline is built); 3 (conv2d_tiled.wgsl only) a layer's input
// gradient and weight gradient in one dispatch, each workgroup running one of the two GEMMs.
override MODE: u32 = 0u;

const FWD: u32 = 0u;
const DGRAD: u32 = 1u;
const WGRAD: u32 = 2u;
const JOINT: u32 = 3u;

// In a MODE = JOINT pipeline, the GEMM this workgroup runs (DGRAD or WGRAD), set by the entry
// point before anything reads it; unread otherwise.
var<private> pass_mode: u32;

// The GEMM this workgroup runs: MODE, or in a joint pipeline its own (workgroup-uniform). In the
// other pipelines this folds to MODE when the pipeline is built.
fn mode() -> u32 {
    if (MODE == JOINT) {
        return pass_mode;
    }
    return MODE;
}

// The channel group this workgroup's GEMM belongs to, set by `enter_group`.
var<private> grp: u32;

// Split workgroup index z into the group (kept in `grp`) and the split, which it returns.
fn enter_group(z: u32) -> u32 {
    grp = z % p.groups;
    return z / p.groups;
}

// Input and output channels per group.
fn cin_g() -> u32 {
    return p.c_in / p.groups;
}

fn cout_g() -> u32 {
    return p.c_out / p.groups;
}

fn rows() -> u32 {
    if (mode() == DGRAD) {
        return cin_g();
    }
    return cout_g();
}

fn cols() -> u32 {
    if (mode() == FWD) {
        return p.n * p.oh * p.ow;
    }
    if (mode() == DGRAD) {
        return p.n * p.h * p.w;
    }
    return cin_g() * p.kh * p.kw;
}

fn k_total() -> u32 {
    if (mode() == FWD) {
        return cin_g() * p.kh * p.kw;
    }
    if (mode() == DGRAD) {
        return cout_g() * p.kh * p.kw;
    }
    return p.n * p.oh * p.ow;
}

// The K range [x, y) split `split` reduces: all of K, or the weight gradient's slice of it.
fn k_range(split: u32) -> vec2<u32> {
    if (mode() == WGRAD) {
        let first = split * p.split_len;
        return vec2<u32>(first, min(k_total(), first + p.split_len));
    }
    return vec2<u32>(0u, k_total());
}

// im2col: the input value under tap t = (ky, kx) of channel ci (of all c_in) for output pixel m,
// 0 in the padding.
fn im2col(ci: u32, t: u32, m: u32) -> act {
    let ohw = p.oh * p.ow;
    let nn = m / ohw;
    let r = m % ohw;
    let iy = i32((r / p.ow) * p.stride_h + (t / p.kw) * p.dil_h) - i32(p.pad_h);
    let ix = i32((r % p.ow) * p.stride_w + (t % p.kw) * p.dil_w) - i32(p.pad_w);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return act(0.0);
    }
    return inp[((nn * p.c_in + ci) * p.h + u32(iy)) * p.w + u32(ix)];
}

// A[r, k] of group grp; the caller has checked r < rows and k < k_total. The weight is
// [c_out, c_in/g, kh, kw]: a row of (c_in/g)*khw per output channel.
fn load_a(r: u32, k: u32) -> act {
    let khw = p.kh * p.kw;
    if (mode() == FWD) {
        return weight[(grp * cout_g() + r) * cin_g() * khw + k];
    }
    if (mode() == DGRAD) {
        // weight[co, ci = r, t] with k = (co, t), co within the group
        return weight[((grp * cout_g() + k / khw) * cin_g() + r) * khw + k % khw];
    }
    // dout[n, co = r, pixel] with k = m = (n, pixel)
    let ohw = p.oh * p.ow;
    return dout[((k / ohw) * p.c_out + grp * cout_g() + r) * ohw + k % ohw];
}

// B[k, c]; the caller has checked k < k_total and c < cols.
fn load_b(k: u32, c: u32) -> act {
    let khw = p.kh * p.kw;
    if (mode() == FWD) {
        return im2col(grp * cin_g() + k / khw, k % khw, c);
    }
    if (mode() == WGRAD) {
        return im2col(grp * cin_g() + c / khw, c % khw, k);
    }
    // Input gradient: dout[n, co, oy, ox] for input pixel c = (n, iy, ix) and k = (co, ky, kx),
    // where oy*stride + ky*dil = iy + pad (the transposed convolution, gathered).
    let hw = p.h * p.w;
    let nn = c / hw;
    let q = c % hw;
    let co = grp * cout_g() + k / khw;
    let t = k % khw;
    let ty = i32(q / p.w + p.pad_h) - i32((t / p.kw) * p.dil_h);
    let tx = i32(q % p.w + p.pad_w) - i32((t % p.kw) * p.dil_w);
    if (ty < 0 || tx < 0) {
        return act(0.0);
    }
    let oy = u32(ty) / p.stride_h;
    let ox = u32(tx) / p.stride_w;
    if (u32(ty) % p.stride_h != 0u || u32(tx) % p.stride_w != 0u || oy >= p.oh || ox >= p.ow) {
        return act(0.0);
    }
    return dout[((nn * p.c_out + co) * p.oh + oy) * p.ow + ox];
}

// The output plane a column's pixel lies in: the forward's OH*OW, the input gradient's H*W.
fn plane() -> u32 {
    if (mode() == FWD) {
        return p.oh * p.ow;
    }
    return p.h * p.w;
}

// Column c's element offset in the forward's output or the input gradient at channel 0: image
// c / plane, pixel c % plane. A row's channel adds channel * plane (`store_col`).
fn col_offset(c: u32) -> u32 {
    let hw = plane();
    var ch = p.c_out;
    if (mode() == DGRAD) {
        ch = p.c_in;
    }
    return (c / hw) * ch * hw + c % hw;
}

// Result (r, c) of group grp's GEMM, with col = col_offset(c) (unread by the weight gradient), so
// a caller storing a column's several rows decodes its pixel once.
fn store_col(r: u32, c: u32, col: u32, v: f32, split: u32) {
    if (mode() == FWD) {
        let co = grp * cout_g() + r;
        var b = 0.0;
        if (p.has_bias != 0u) {
            b = bias[co];
        }
        let o = col + co * plane();
        out[o] = epilogue(v + b, o);
    } else if (mode() == DGRAD) {
        let o = col + (grp * cin_g() + r) * plane();
        out[o] = epilogue(v, o);
    } else {
        // Slice `split` of the partial buffer (the weight gradient itself with one split).
        wgrad[(split * p.c_out + grp * cout_g() + r) * cols() + c] = v;
    }
}

// Result (r, c) of group grp's GEMM.
fn store(r: u32, c: u32, v: f32, split: u32) {
    store_col(r, c, col_offset(c), v, split);
}
