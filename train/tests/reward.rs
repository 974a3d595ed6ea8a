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
