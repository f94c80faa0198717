//! timm's RandAugment ops and RandomErasing against timm's own output (goldens written by
//! `scripts/augment_golden.py` with timm 1.0 and Pillow 13): each op at fixed magnitudes and
//! signs; whole RandAugment and RandomErasing calls replaying the draws timm made; the config
//! grammar and its refusals; the statistics of our own draws.

use std::collections::{HashMap, VecDeque};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use senet_wgpu::data::augment::{
    self, AutoAugment, Draws, EraseMode, Interpolation, Op, RandAugment, RandomErasing, TrivialAugmentWide, WideOp,
};
use senet_wgpu::data::transforms::Rgb;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/augment");
/// torchvision's TrivialAugmentWide on PIL images (`scripts/trivial_augment_golden.py`).
const WIDE_GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/trivial_augment");
/// timm's fill for ImageNet's mean: round(255 · (0.485, 0.456, 0.406)).
const FILL: [u8; 3] = [124, 116, 104];

struct Golden {
    cases: Vec<serde_json::Value>,
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

fn golden_in(dir: &str) -> Golden {
    let bytes = std::fs::read(format!("{dir}/golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let cases = serde_json::from_str(meta.get("cases").unwrap()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st.tensors().into_iter().map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec()))).collect();
    Golden { cases, tensors, meta }
}

fn golden() -> Golden {
    golden_in(GOLDEN)
}

fn png_in(dir: &str, name: &str) -> Rgb {
    let img = image::open(format!("{dir}/{name}")).unwrap().to_rgb8();
    Rgb { width: img.width() as usize, height: img.height() as usize, pixels: img.into_raw() }
}

fn png(name: &str) -> Rgb {
    png_in(GOLDEN, name)
}

/// The draws timm made, replayed in order; a draw of another kind than recorded, or one too
/// many, is a divergence from timm's draw sequence and fails the test.
struct Replay {
    log: VecDeque<(String, f64)>,
}

impl Replay {
    fn new(case: &serde_json::Value) -> Replay {
        let log = case["draws"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d[0].as_str().unwrap().to_string(), d[1].as_f64().unwrap()))
            .collect();
        Replay { log }
    }
    fn next(&mut self, kind: &str) -> f64 {
        let (k, v) = self.log.pop_front().unwrap_or_else(|| panic!("a {kind} draw timm did not make"));
        assert_eq!(k, kind, "timm drew {k} here, we drew {kind}");
        v
    }
}

impl Draws for Replay {
    fn index(&mut self, _n: usize) -> usize {
        self.next("index") as usize
    }
    fn random(&mut self) -> f64 {
        self.next("random")
    }
    fn gauss(&mut self, _mu: f64, _sigma: f64) -> f64 {
        self.next("gauss")
    }
    fn uniform(&mut self, _a: f64, _b: f64) -> f64 {
        self.next("uniform")
    }
    fn randint(&mut self, _a: usize, _b: usize) -> usize {
        self.next("randint") as usize
    }
    fn normal(&mut self) -> f32 {
        0.0
    }
}

/// Draws that must not happen (ops at a fixed sign are given their sign by `Fixed`).
struct Fixed(f64);

impl Draws for Fixed {
    fn index(&mut self, _: usize) -> usize {
        unreachable!()
    }
    fn random(&mut self) -> f64 {
        self.0
    }
    fn gauss(&mut self, _: f64, _: f64) -> f64 {
        unreachable!()
    }
    fn uniform(&mut self, _: f64, _: f64) -> f64 {
        unreachable!()
    }
    fn randint(&mut self, _: usize, _: usize) -> usize {
        unreachable!()
    }
    fn normal(&mut self) -> f32 {
        unreachable!()
    }
}

/// Largest difference and count of differing values.
fn diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y));
    (d.clone().max().unwrap_or(0), d.filter(|&v| v > 0).count())
}

/// Each op at magnitudes 0, 4.3, 9 and 10 and both signs is timm's output (through PIL) exactly:
/// tolerance 0 for every op. The LUT ops (AutoContrast, Equalize, Invert, Posterize, Solarize,
/// SolarizeAdd) are integer arithmetic; the blends (Color, Contrast, Brightness, Sharpness) are
/// Blend.c's C-float `a + α(b − a)` truncated, and Filter.c's C-float 3×3 SMOOTH, done in f32 in
/// the same order; the geometric ops are Geometry.c's f64 affine map and bilinear filter (truncated),
/// in the same order, and Rotate's matrix is rounded to 15 decimals as Python's round(x, 15). On
/// other Pillow builds (FMA contraction of the C sums) the geometric ops could differ by one level
/// where a value lands within ~1e-13 of an integer; none of these cases does. The magnitude → argument
/// mapping is checked against timm's argument too.
#[test]
fn ops_are_timms_through_pil() {
    let g = golden();
    let imgs: HashMap<&str, Rgb> = [("a.png", png("a.png")), ("b.png", png("b.png"))].into_iter().collect();
    let mut failed = Vec::new();
    let mut n = 0;
    for case in g.cases.iter().filter(|c| c["kind"] == "op") {
        let name = case["name"].as_str().unwrap();
        let op = Op::from_name(case["op"].as_str().unwrap()).unwrap();
        let sign = case["sign"].as_i64().unwrap();
        // `_randomly_negate` negates when random() > 0.5.
        let arg = op.level_arg(case["magnitude"].as_f64().unwrap(), &mut Fixed(if sign < 0 { 0.9 } else { 0.1 }));
        let want_arg = case["arg"].as_array().unwrap().first().map(|v| v.as_f64().unwrap());
        // serde_json's float parsing may land one ulp off the JSON's shortest repr: 1e-12 relative.
        let close = match (arg, want_arg) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            (a, b) => a == b,
        };
        if !close {
            failed.push(format!("{name}: argument {arg:?}, timm's {want_arg:?}"));
            continue;
        }
        let img = &imgs[case["image"].as_str().unwrap()];
        let out = op.apply(img, arg, FILL);
        let (shape, want) = &g.tensors[name];
        assert_eq!(shape, &vec![out.height, out.width, 3], "{name}");
        let (max, count) = diff(&out.pixels, want);
        if max > 0 {
            failed.push(format!("{name}: {count} values differ, by up to {max}"));
        }
        n += 1;
    }
    assert!(n >= 140, "only {n} op cases in the golden file");
    assert!(failed.is_empty(), "{} of {n} op cases differ from timm:\n{}", failed.len(), failed.join("\n"));
}

/// Whole RandAugment calls (six configs, six images each: mstd noise, uniform magnitudes
/// (mstd above 100), inc1, p = 1, mmax, up to six layers) replaying timm's draws: the same draws asked for
/// in the same order, and the same pixels (tolerance 0, as the ops).
#[test]
fn rand_augment_replays_timms_draws_to_its_pixels() {
    let g = golden();
    let imgs: HashMap<&str, Rgb> = [("a.png", png("a.png")), ("b.png", png("b.png"))].into_iter().collect();
    let mut n = 0;
    for case in g.cases.iter().filter(|c| c["kind"] == "rand") {
        let name = case["name"].as_str().unwrap();
        let ra = RandAugment::parse(case["config"].as_str().unwrap(), FILL).unwrap();
        let mut draws = Replay::new(case);
        let out = ra.apply(imgs[case["image"].as_str().unwrap()].clone(), &mut draws);
        assert!(draws.log.is_empty(), "{name}: timm made {} more draws: {:?}", draws.log.len(), draws.log);
        let (max, count) = diff(&out.pixels, &g.tensors[name].1);
        assert_eq!(max, 0, "{name}: {count} values differ from timm, by up to {max}");
        n += 1;
    }
    assert_eq!(n, 36);
}

/// RandomErasing's boxes replaying timm's draws (probability, count, area and aspect tries,
/// top, left): each box painted with its number as timm's were, exactly.
#[test]
fn random_erasing_boxes_are_timms_for_the_same_draws() {
    let g = golden();
    let mut n = 0;
    for case in g.cases.iter().filter(|c| c["kind"] == "erase") {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (case["h"].as_u64().unwrap() as usize, case["w"].as_u64().unwrap() as usize);
        let re = RandomErasing {
            prob: case["prob"].as_f64().unwrap(),
            mode: EraseMode::Const,
            max_count: case["count"].as_u64().unwrap() as usize,
        };
        let mut draws = Replay::new(case);
        let mut mask = vec![0u8; h * w];
        for (k, r) in re.boxes(h, w, &mut draws).iter().enumerate() {
            for y in r.y0..r.y0 + r.h {
                mask[y * w + r.x0..][..r.w].fill(k as u8 + 1);
            }
        }
        assert!(draws.log.is_empty(), "{name}: timm made {} more draws", draws.log.len());
        assert_eq!(mask, g.tensors[name].1, "{name}: boxes differ from timm's");
        n += 1;
    }
    assert_eq!(n, 20);
}

/// The config grammar: timm's defaults and keys, and refusals that name the bad part and what
/// was expected.
#[test]
fn config_strings_parse_as_timm_and_bad_ones_say_why() {
    let ra = RandAugment::parse("rand-m9-mstd0.5", FILL).unwrap();
    assert_eq!((ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_std, ra.magnitude_max), (9.0, 2, 0.5, 0.5, None));
    assert_eq!(ra.ops, augment::RAND_TRANSFORMS.to_vec());
    let ra = RandAugment::parse("rand-inc1-n3-mmax15-p1.0-mstd101", FILL).unwrap();
    assert_eq!((ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_max), (10.0, 3, 1.0, Some(15.0)));
    assert!(ra.magnitude_std.is_infinite());
    assert_eq!(ra.ops, augment::RAND_INCREASING_TRANSFORMS.to_vec());
    for (bad, says) in [
        ("rand-m9-x3", "unknown key \"x\""),
        ("rand-m9.5", "m (the magnitude) takes a whole number, got \"9.5\""),
        ("rand-mstd", "section \"mstd\" has no number"),
        ("rand-p1.5", "must be in [0, 1]"),
        ("rand-inc2", "inc takes 0 or 1"),
        ("rand-tweights", "not implemented"),
        ("trivialaugment-m9", "spelt `trivialaugment`"),
        ("ta_wide", "spelt `trivialaugment`"),
        ("v0", "AutoAugment policy \"v0\" is not implemented"),
        ("augmix-m5", "AugMix"),
        ("randm9", "not a policy"),
    ] {
        let e = RandAugment::parse(bad, FILL).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    assert_eq!(augment::fill_of_mean([0.485, 0.456, 0.406]), FILL);
    // `--aa trivialaugment`: torchvision's defaults whatever RandAugment's fill.
    let ta = AutoAugment::parse("trivialaugment", FILL).unwrap();
    assert_eq!(
        ta,
        AutoAugment::TrivialWide(TrivialAugmentWide { interpolation: Interpolation::Nearest, fill: [0; 3] })
    );
    assert!(matches!(AutoAugment::parse("rand-m9", FILL).unwrap(), AutoAugment::Rand(_)));
    for bad in ["TrivialAugment", "trivial", "trivialaugmentwide"] {
        let e = AutoAugment::parse(bad, FILL).unwrap_err();
        assert!(e.contains("spelt `trivialaugment`"), "{bad}: {e}");
    }
}

/// Our own draws (ChaCha8 per sample): over many images each of the 15 ops is chosen about
/// equally often and applied with probability p; erasing happens with probability `reprob`, its
/// boxes cover 2 %–33 % of the image (divided by the count), and its pixel noise is N(0, 1).
/// Bounds are 6 standard errors of each estimate.
#[test]
fn our_draws_have_timms_distributions() {
    let ra = RandAugment::parse("rand-m9-mstd0.5", FILL).unwrap();
    let (mut picks, mut applied, trials) = (vec![0usize; 15], 0usize, 20_000usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..trials {
        for _ in 0..ra.num_layers {
            picks[rng.index(15)] += 1;
            applied += usize::from(Draws::random(&mut rng) <= ra.prob);
        }
    }
    let per = (trials * 2) as f64 / 15.0;
    for (k, &c) in picks.iter().enumerate() {
        assert!((c as f64 - per).abs() < 6.0 * per.sqrt(), "op {k} chosen {c} times, expected ~{per}");
    }
    let p = applied as f64 / (trials * 2) as f64;
    assert!((p - 0.5).abs() < 6.0 * (0.25 / (trials * 2) as f64).sqrt(), "ops applied with p {p}");

    let re = RandomErasing { prob: 0.25, mode: EraseMode::Pixel, max_count: 3 };
    let (h, w) = (40, 50);
    let (mut erased, mut sum, mut sq, mut vals) = (0usize, 0f64, 0f64, 0usize);
    let trials = 4000;
    for _ in 0..trials {
        let mut img = vec![f32::NAN; 3 * h * w];
        let boxes = re.boxes(h, w, &mut rng.clone());
        re.apply(&mut img, [3, h, w], &mut rng);
        erased += usize::from(!boxes.is_empty());
        for b in &boxes {
            let frac = (b.w * b.h) as f64 / (h * w) as f64 * boxes.len() as f64;
            assert!((0.012..=0.36).contains(&frac), "box {b:?} of {} covers {frac}", boxes.len());
        }
        for v in img.iter().filter(|v| !v.is_nan()) {
            sum += f64::from(*v);
            sq += f64::from(*v).powi(2);
            vals += 1;
        }
    }
    let p = erased as f64 / trials as f64;
    assert!((p - 0.25).abs() < 6.0 * (0.25 * 0.75 / trials as f64).sqrt(), "erased with p {p}");
    let mean = sum / vals as f64;
    let var = sq / vals as f64 - mean * mean;
    assert!(mean.abs() < 6.0 / (vals as f64).sqrt() && (var - 1.0).abs() < 0.02, "noise mean {mean} var {var}");
}

fn wide_images() -> HashMap<&'static str, Rgb> {
    ["a.png", "b.png", "c.png"].into_iter().map(|n| (n, png_in(WIDE_GOLDEN, n))).collect()
}

/// TrivialAugmentWide's magnitudes are torchvision's float32 values exactly (each op's 31 bins,
/// as `float(magnitudes[i].item())`): linspace computed as torch's CPU kernel does (one rounding
/// per value; torch's halves), posterize's 8 − round(i / 5) bits.
#[test]
fn trivial_augment_magnitudes_are_torchvisions() {
    let g = golden_in(WIDE_GOLDEN);
    let want: HashMap<String, Vec<f64>> = serde_json::from_str(&g.meta["magnitudes"]).unwrap();
    assert_eq!(want.len(), augment::WIDE_OPS.len());
    for op in augment::WIDE_OPS {
        let name = format!("{op:?}");
        let want = &want[&name];
        assert_eq!(op.has_bins(), !want.is_empty(), "{name}");
        // Every magnitude is a float32 value; serde_json may parse the JSON's shortest repr one f64 ulp
        // off, so both sides are compared as the float32 they are (exactly).
        let ours: Vec<f32> =
            if op.has_bins() { (0..augment::WIDE_BINS).map(|i| op.magnitude(i) as f32).collect() } else { vec![] };
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(ours, want, "{name}: our magnitudes, torchvision's");
    }
}

/// Each of the 14 ops at bins 0, 1, 5, 10, 15, 19, 20, 26 and 30, both signs of the signed ops, on
/// three images (one square), against torchvision's `_apply_op` on a PIL image with NEAREST and fill
/// 0: tolerance 0 everywhere. The LUT ops and enhancements are RandAugment's (the same Pillow code,
/// see `ops_are_timms_through_pil`); the geometric ops are Geometry.c's nearest-neighbour engines
/// (the scale/translate table stepped in f64, the 16.16 fixed-point walk) after torchvision's
/// inverse affine matrix in its order of f64 operations, and Pillow's transposes for 90° on the
/// square image. A Pillow build that contracted the matrix sums into FMAs could move a fixed-point
/// coordinate by one unit in 65536 and so, rarely, pick the neighbouring pixel; none of these cases does.
#[test]
fn trivial_augment_ops_are_torchvisions_through_pil() {
    let g = golden_in(WIDE_GOLDEN);
    let imgs = wide_images();
    let (mut n, mut failed) = (0, Vec::new());
    for case in g.cases.iter().filter(|c| c["kind"] == "op") {
        let name = case["name"].as_str().unwrap();
        let op = WideOp::from_name(case["op"].as_str().unwrap()).unwrap();
        let sign = case["sign"].as_f64().unwrap();
        let m = case["bin"].as_u64().map_or(0.0, |b| op.magnitude(b as usize)) * sign;
        assert_eq!(m as f32, case["magnitude"].as_f64().unwrap() as f32, "{name}: magnitude");
        let out = op.apply(&imgs[case["image"].as_str().unwrap()], m, [0; 3], Interpolation::Nearest);
        let (shape, want) = &g.tensors[name];
        assert_eq!(shape, &vec![out.height, out.width, 3], "{name}");
        let (max, count) = diff(&out.pixels, want);
        if max > 0 {
            failed.push(format!("{name}: {count} values differ, by up to {max}"));
        }
        n += 1;
    }
    assert!(n >= 300, "only {n} op cases in the golden file");
    assert!(failed.is_empty(), "{} of {n} op cases differ from torchvision:\n{}", failed.len(), failed.join("\n"));
}

/// Whole `TrivialAugmentWide()` calls (60, on the three images) replaying torchvision's
/// `torch.randint` draws: the same draws asked for in the same order (op, bin when the op has
/// magnitudes, sign when it is signed) and the same pixels (tolerance 0, as the ops).
#[test]
fn trivial_augment_replays_torchvisions_draws_to_its_pixels() {
    let g = golden_in(WIDE_GOLDEN);
    let imgs = wide_images();
    let ta = TrivialAugmentWide::default();
    let mut n = 0;
    for case in g.cases.iter().filter(|c| c["kind"] == "wide") {
        let name = case["name"].as_str().unwrap();
        let mut draws = Replay::new(case);
        let out = ta.apply(imgs[case["image"].as_str().unwrap()].clone(), &mut draws);
        assert!(draws.log.is_empty(), "{name}: torchvision made {} more draws: {:?}", draws.log.len(), draws.log);
        let (max, count) = diff(&out.pixels, &g.tensors[name].1);
        assert_eq!(max, 0, "{name}: {count} values differ from torchvision, by up to {max}");
        n += 1;
    }
    assert_eq!(n, 60);
}

/// Our own TrivialAugmentWide draws (ChaCha8): each of the 14 ops about equally often, each bin
/// of a binned op about equally often, each sign half the time (6 standard errors).
#[test]
fn trivial_augment_draws_are_uniform() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let trials = 31_000usize;
    let (mut ops, mut bins, mut neg) = (vec![0usize; 14], vec![0usize; 31], 0usize);
    for _ in 0..trials {
        ops[rng.index(14)] += 1;
        bins[rng.index(31)] += 1;
        neg += usize::from(rng.index(2) == 1);
    }
    for (counts, k) in [(&ops, 14.0), (&bins, 31.0)] {
        let per = trials as f64 / k;
        for (i, &c) in counts.iter().enumerate() {
            assert!((c as f64 - per).abs() < 6.0 * per.sqrt(), "value {i} of {k} drawn {c} times, expected ~{per}");
        }
    }
    let p = neg as f64 / trials as f64;
    assert!((p - 0.5).abs() < 6.0 * (0.25 / trials as f64).sqrt(), "negated with p {p}");
}
