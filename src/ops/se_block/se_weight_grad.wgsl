
// se_weight_grad: an SE block's weight gradients summed over the batch, shared by se_block.wgsl
// (se_block_backward_weight, a dispatch of its own) and batch_norm.wgsl (SE_WGRAD: the batch norm
// before a block whose backward deferred its input gradient sums them in its own backward), so
// the two are the same arithmetic bit for bit. The module declares `saved_in` ([n][z (c) | h (cr)
// | s (c)]), `dsaved_in` ([n][da2 (c) | da1 (cr)]) and the gradients `dw1` [cr, c], `db1` [cr],
// `dw2` [c, cr], `db2` [c].
//
// One call: channel k and block jb of 4 hidden units, first the fc1 blocks, then the fc2 ones.
//   fc1: dw1[j0..j0+4, k] = sum_n da1[n, j0..j0+4] * z[n, k]      (dw1 is [Cr, C])
//   fc2: dw2[k, j0..j0+4] = sum_n da2[n, k] * h[n, j0..j0+4]      (dw2 is [C, Cr])
// Per sample one load that differs between calls (z or da2 at k) and 4 that all calls for the
// block share feed 4 FMAs; the sums run over n in order (deterministic). The bias gradients ride
// along: db2[k] in the first fc2 block, db1 in the fc1 blocks of k = 0.
fn se_weight_grad_block(k: u32, jb: u32, n: u32, c: u32, cr: u32, has_bias: bool) {
    let ss = 2u * c + cr;   // saved stride per sample: z | h | s
    let ds = c + cr;        // dsaved stride per sample: da2 | da1
    let jblocks = (cr + 3u) / 4u;
    let fc1 = jb < jblocks;
    let j0 = select(jb - jblocks, jb, fc1) * 4u;
    if (k >= c || j0 >= cr) {
        return;
    }
    // Hidden units past the end read the last one; their sums are never written.
    var jj: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        jj[i] = min(j0 + i, cr - 1u);
    }
    // fc1 reads da1 (shared) and z (own); fc2 reads h (shared) and da2 (own).
    var acc = vec4<f32>(0.0);
    var own_sum = 0.0;
    var shared_sum = vec4<f32>(0.0);
    for (var s = 0u; s < n; s++) {
        var v: vec4<f32>;
        var own: f32;
        if (fc1) {
            let b = s * ds + c;
            v = vec4<f32>(dsaved_in[b + jj[0]], dsaved_in[b + jj[1]], dsaved_in[b + jj[2]], dsaved_in[b + jj[3]]);
            own = saved_in[s * ss + k];
        } else {
            let b = s * ss + c;
            v = vec4<f32>(saved_in[b + jj[0]], saved_in[b + jj[1]], saved_in[b + jj[2]], saved_in[b + jj[3]]);
            own = dsaved_in[s * ds + k];
        }
        acc += own * v;
        own_sum += own;
        shared_sum += v;
    }
    for (var i = 0u; i < 4u; i++) {
        let j = j0 + i;
        if (j < cr) {
            if (fc1) {
                dw1[j * c + k] = acc[i];
            } else {
                dw2[k * cr + j] = acc[i];
            }
        }
    }
    if (has_bias) {
        if (fc1 && k == 0u) {
            for (var i = 0u; i < 4u; i++) {
                if (j0 + i < cr) {
                    db1[j0 + i] = shared_sum[i];
                }
            }
        }
        if (!fc1 && j0 == 0u) {
            db2[k] = own_sum;
        }
    }
}
