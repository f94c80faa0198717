//! cross_entropy oracle: softmax cross-entropy, mean over the batch (torch.nn.CrossEntropyLoss).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// Loss, gradient and correct count.
pub struct CrossEntropy {
    pub loss: f64,
    pub dlogits: Vec<f64>,
    pub correct: usize,
    /// Samples whose target ranks in the top 5 (fewer than 5 logits greater, or equal at a lower
    /// index — argmax's tie rule), as `logits.topk(5)` contains the target when there are no ties.
    pub correct5: usize,
}

/// loss = mean_n (logsumexp(l_n) - l_n[t_n]); dlogits = (softmax(l_n) - onehot(t_n)) / N;
/// correct counts argmax (first maximum) == target.
pub fn cross_entropy_forward_backward(logits: &[f64], target: &[u32], classes: usize) -> CrossEntropy {
    cross_entropy_forward_backward_smoothed(logits, target, classes, 0.0)
}

/// With label smoothing `e` (torch's `label_smoothing`): the target distribution is
/// q = (1 − e)·onehot(t) + e/K, loss = −Σ_k q_k log softmax_k, dlogits = (softmax − q) / N.
pub fn cross_entropy_forward_backward_smoothed(logits: &[f64], target: &[u32], classes: usize, e: f64) -> CrossEntropy {
    let n = target.len();
    let mut r = CrossEntropy { loss: 0.0, dlogits: vec![0.0; logits.len()], correct: 0, correct5: 0 };
    for (i, &t) in target.iter().enumerate() {
        let row = &logits[i * classes..][..classes];
        let (arg, mx) =
            row.iter().enumerate().fold((0, f64::NEG_INFINITY), |(a, m), (k, &v)| if v > m { (k, v) } else { (a, m) });
        let sum: f64 = row.iter().map(|&v| (v - mx).exp()).sum();
        let lse = mx + sum.ln();
        let q = |k: usize| if k == t as usize { 1.0 - e } else { 0.0 } + e / classes as f64;
        r.loss += (0..classes).map(|k| q(k) * (lse - row[k])).sum::<f64>() / n as f64;
        for k in 0..classes {
            let sm = (row[k] - mx).exp() / sum;
            r.dlogits[i * classes + k] = (sm - q(k)) / n as f64;
        }
        r.correct += usize::from(arg == t as usize);
        let lt = row[t as usize];
        let above = row.iter().enumerate().filter(|&(k, &v)| v > lt || (v == lt && k < t as usize)).count();
        r.correct5 += usize::from(above < 5);
    }
    r
}

/// Soft targets (timm's `SoftTargetCrossEntropy`, the loss under Mixup/CutMix): each row of
/// `targets` [N, K] a distribution, loss = mean_n Σ_k −t_k log softmax_k,
/// dlogits = (softmax · Σ_k t_k − t) / N (Σ_k t_k = 1 for mixed one-hot targets). correct and
/// correct5 count the target's dominant class (its first maximum) as the label.
pub fn cross_entropy_soft_forward_backward(logits: &[f64], targets: &[f64], classes: usize) -> CrossEntropy {
    let n = targets.len() / classes;
    let mut r = CrossEntropy { loss: 0.0, dlogits: vec![0.0; logits.len()], correct: 0, correct5: 0 };
    let first_max = |row: &[f64]| {
        row.iter().enumerate().fold((0, f64::NEG_INFINITY), |(a, m), (k, &v)| if v > m { (k, v) } else { (a, m) })
    };
    for i in 0..n {
        let row = &logits[i * classes..][..classes];
        let t = &targets[i * classes..][..classes];
        let (arg, mx) = first_max(row);
        let sum: f64 = row.iter().map(|&v| (v - mx).exp()).sum();
        let lse = mx + sum.ln();
        let tsum: f64 = t.iter().sum();
        r.loss += (0..classes).map(|k| t[k] * (lse - row[k])).sum::<f64>() / n as f64;
        for k in 0..classes {
            let sm = (row[k] - mx).exp() / sum;
            r.dlogits[i * classes + k] = (sm * tsum - t[k]) / n as f64;
        }
        let label = first_max(t).0;
        r.correct += usize::from(arg == label);
        let lt = row[label];
        let above = row.iter().enumerate().filter(|&(k, &v)| v > lt || (v == lt && k < label)).count();
        r.correct5 += usize::from(above < 5);
    }
    r
}
