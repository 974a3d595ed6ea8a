//! The Bradley–Terry loss and its gradient against PyTorch reference values
//! (`fixtures/reward/bradley_terry.json`, from scripts/reference/make_reward_fixtures.py).

use candle_core::{DType, Device, Tensor, Var};
use pipe_train::reward::bradley_terry;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn bradley_terry_matches_pytorch_values_and_gradients() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/reward/bradley_terry.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let (c, r, m) = (
        floats(&fx["chosen"]),
        floats(&fx["rejected"]),
        floats(&fx["margins"]),
    );
    let n = c.len();
    for dtype in [DType::F64, DType::F32] {
        for case in fx["cases"].as_array().unwrap() {
            let chosen = Var::from_tensor(
                &Tensor::from_vec(c.clone(), n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let rejected = Var::from_tensor(
                &Tensor::from_vec(r.clone(), n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let margin = Tensor::from_vec(m.clone(), n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let use_margin = case["margin"].as_bool().unwrap();
            let center = case["center"].as_f64().unwrap();
            let loss =
                bradley_terry(&chosen, &rejected, use_margin.then_some(&margin), center).unwrap();
            assert_eq!(loss.dtype(), dtype);
            let got = loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = case["loss"].as_f64().unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{dtype:?} {case}: loss {got} vs {want}"
            );
            let grads = loss.backward().unwrap();
            for (var, key) in [(&chosen, "grad_chosen"), (&rejected, "grad_rejected")] {
                let g: Vec<f64> = grads
                    .get(var)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, (a, b)) in g.iter().zip(floats(&case[key])).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1e-3),
                        "{dtype:?} margin={use_margin} center={center} {key}[{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn head_learns_to_rank_separable_pairs_from_a_zero_start() {
    use pipe_train::reward::{train_head, FeaturePair, HeadSettings};
    use pipe_train::Rng;
    let mut rng = Rng::new(3);
    let dim = 16;
    let dir: Vec<f32> = (0..dim)
        .map(|i| if i % 2 == 0 { 1.0 } else { -0.5 })
        .collect();
    let mut sample = |sign: f32| -> Vec<f32> {
        dir.iter()
            .map(|d| sign * 0.3 * d + rng.normal() as f32)
            .collect()
    };
    let pairs: Vec<FeaturePair> = (0..200)
        .map(|_| FeaturePair {
            chosen: sample(1.0),
            rejected: sample(-1.0),
            margin: 0.0,
        })
        .collect();
    let acc = |w: &[f32]| {
        let r = |x: &[f32]| x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>();
        pairs
            .iter()
            .filter(|p| r(&p.chosen) > r(&p.rejected))
            .count() as f64
            / pairs.len() as f64
    };
    let mut seen = Vec::new();
    let settings = HeadSettings {
        lr: 0.05,
        weight_decay: 0.0,
        epochs: 5,
        batch_size: 16,
        eval_every: 10,
        center: 0.0,
        seed: 1,
    };
    let (w, losses) = train_head(&pairs, &settings, |step, w| {
        if step == 0 {
            assert!(w.iter().all(|x| *x == 0.0), "the head starts at zero");
        }
        let a = acc(w);
        seen.push(a);
        a
    })
    .unwrap();
    assert!(
        (losses[0].1 - std::f64::consts::LN_2).abs() < 1e-6,
        "first loss is ln 2 at a zero head"
    );
    assert!(losses.last().unwrap().1 < 0.45, "{losses:?}");
    assert!(acc(&w) > 0.9, "accuracy {}", acc(&w));
    assert_eq!(
        acc(&w),
        seen.iter().cloned().fold(0.0, f64::max),
        "the best evaluated head is returned"
    );
}
