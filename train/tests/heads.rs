//! Sequence heads on tiny random models: losses and gradients against PyTorch, every
//! trainable tensor gets a gradient on every family and base type, gradient
//! checkpointing changes nothing, a regression head learns, a resumed run reproduces
//! the uninterrupted one, and a saved model loads back to the same outputs.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use pipe_train::heads::{
    self, Head, HeadConfig, HeadKind, HeadObserver, HeadStep, HeadTrainSettings, Objective,
    Padding, Pooling, SavedHead, SeqModel, Unit,
};
use pipe_train::linear::BaseQuant;
use pipe_train::loader;
use pipe_train::lora::{self, LoraConfig, Targets};
use pipe_train::optim::{AdamWConfig, Decay};
use pipe_train::trainer::Goal;
use pipe_train::Rng;
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/heads/losses.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

#[test]
fn mse_loss_and_gradient_match_pytorch() {
    let f = &fixture()["mse"];
    let scores = rows(&f["scores"]);
    let targets = rows(&f["targets"]);
    let (n, d) = (scores.len(), scores[0].len());
    let flat: Vec<f32> = scores.iter().flatten().map(|&x| x as f32).collect();
    let s = Var::from_vec(flat, (n, d), &Device::Cpu).unwrap();
    let units: Vec<Unit> = targets
        .iter()
        .map(|t| Unit {
            seqs: vec![vec![1]],
            target: t.iter().map(|&x| x as f32).collect(),
            margin: 0.0,
        })
        .collect();
    let refs: Vec<&Unit> = units.iter().collect();
    let loss =
        (heads::units_loss(Objective::Mse, s.as_tensor(), &refs, 0.0).unwrap() / n as f64).unwrap();
    close(
        loss.to_scalar::<f32>().unwrap() as f64,
        f["loss"].as_f64().unwrap(),
        "mse loss",
    );
    let g = loss.backward().unwrap();
    let got = g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    for (gr, wr) in got.iter().zip(rows(&f["grad"])) {
        for (a, b) in gr.iter().zip(wr) {
            close(*a as f64, b, "mse gradient");
        }
    }
}

#[test]
fn listwise_loss_and_gradient_match_pytorch_ties_included() {
    let f = &fixture()["listwise"];
    let groups = f["groups"].as_array().unwrap();
    let mut flat = Vec::new();
    let mut units = Vec::new();
    for g in groups {
        let s: Vec<f64> = serde_json::from_value(g["scores"].clone()).unwrap();
        let t: Vec<f64> = serde_json::from_value(g["targets"].clone()).unwrap();
        flat.extend(s.iter().map(|&x| x as f32));
        units.push(Unit {
            seqs: vec![vec![1]; s.len()],
            target: t.iter().map(|&x| x as f32).collect(),
            margin: 0.0,
        });
    }
    heads::check_units(Objective::Listwise, 1, &units).unwrap();
    let n = flat.len();
    let s = Var::from_vec(flat, (n, 1), &Device::Cpu).unwrap();
    let refs: Vec<&Unit> = units.iter().collect();
    let loss = (heads::units_loss(Objective::Listwise, s.as_tensor(), &refs, 0.0).unwrap()
        / units.len() as f64)
        .unwrap();
    close(
        loss.to_scalar::<f32>().unwrap() as f64,
        f["loss"].as_f64().unwrap(),
        "listwise loss",
    );
    let g = loss.backward().unwrap();
    let got: Vec<f32> = g
        .get(s.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f64> = f["grads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| serde_json::from_value::<Vec<f64>>(r.clone()).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(want) {
        close(*a as f64, b, "listwise gradient");
    }
    // The tied group's targets are what `listwise_targets` makes of tied rewards.
    assert_eq!(
        heads::listwise_targets(&[2.0, 1.0, 2.0], None).unwrap(),
        vec![0.5, 0.0, 0.5]
    );
}

fn lora_cfg(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        target_modules: Targets::Keyword("all-linear".into()),
        use_rslora: false,
    }
}

fn settings(objective: Objective, steps: u64, save_every: u64) -> HeadTrainSettings {
    HeadTrainSettings {
        objective,
        center: 0.0,
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        head_lr: None,
        warmup_steps: 2,
        decay: Decay::Cosine,
        batch_size: 2,
        grad_accum: 2,
        steps,
        max_grad_norm: Some(1.0),
        eval_every: 2,
        save_every,
        seed: 3,
        gradient_checkpointing: false,
        keep_best: ("eval_loss".into(), Goal::Min),
    }
}

/// Regression units whose two targets are functions of the text: its length and
/// whether it holds a digit 7.
fn regression_units(tok: &pipe_train::tokenizer::TextTokenizer, n: usize) -> Vec<Unit> {
    (0..n)
        .map(|i| {
            let text = format!("item {} {}", i * 7 % 13, "ab".repeat(i % 4));
            let ids = tok.encode(&text).unwrap();
            Unit {
                target: vec![(i % 4) as f32, if text.contains('7') { 1.0 } else { -1.0 }],
                seqs: vec![ids],
                margin: 0.0,
            }
        })
        .collect()
}

fn group_units(tok: &pipe_train::tokenizer::TextTokenizer, n: usize) -> Vec<Unit> {
    (0..n)
        .map(|i| {
            let cands: Vec<String> = (0..3).map(|k| format!("q{i} answer {k}")).collect();
            let rewards: Vec<f64> = (0..3).map(|k| ((i + k) % 3) as f64).collect();
            Unit {
                seqs: cands.iter().map(|c| tok.encode(c).unwrap()).collect(),
                target: heads::listwise_targets(&rewards, None).unwrap(),
                margin: 0.0,
            }
        })
        .collect()
}

const FAMILIES: [&str; 7] = [
    "tiny:llama",
    "tiny:qwen2",
    "tiny:mistral",
    "tiny:qwen3",
    "tiny:gemma",
    "tiny:gemma2",
    "tiny:phi3",
];

#[test]
fn every_trainable_tensor_of_a_head_model_gets_a_nonzero_gradient() {
    for arch in FAMILIES {
        let cases = [
            (
                BaseQuant::None,
                DType::F32,
                HeadKind::Linear,
                Objective::Mse,
            ),
            (
                BaseQuant::Int8,
                DType::F32,
                HeadKind::Mlp,
                Objective::Listwise,
            ),
            (
                BaseQuant::Nf4,
                DType::F32,
                HeadKind::Linear,
                Objective::Pairwise,
            ),
            (BaseQuant::None, DType::BF16, HeadKind::Mlp, Objective::Mse),
            (
                BaseQuant::Nf4,
                DType::BF16,
                HeadKind::Linear,
                Objective::Listwise,
            ),
        ];
        for (base, dtype, kind, objective) in cases {
            let what = format!("{arch} ({base:?}, {dtype:?}, {kind:?}, {objective:?})");
            let mut m = loader::load(&format!("{arch}:2"), dtype, &Device::Cpu).unwrap();
            m.model.quantize_base(base, true).unwrap();
            let adapter = lora::attach(&mut m.model, &lora_cfg(0.1), &mut Rng::new(1)).unwrap();
            let outputs = if objective == Objective::Mse { 2 } else { 1 };
            let head = Head::new(
                HeadConfig {
                    pooling: Pooling::Last,
                    kind,
                    hidden: m.model.config().hidden_size,
                    outputs,
                    dropout: 0.1,
                    out_bias: HeadConfig::out_bias_for(objective),
                },
                &mut Rng::new(2),
                &Device::Cpu,
            )
            .unwrap();
            let units = match objective {
                Objective::Mse => regression_units(&m.tokenizer, 6),
                Objective::Listwise => group_units(&m.tokenizer, 4),
                Objective::Pairwise => group_units(&m.tokenizer, 4)
                    .into_iter()
                    .map(|u| Unit {
                        seqs: u.seqs[..2].to_vec(),
                        target: vec![],
                        margin: 0.1,
                    })
                    .collect(),
            };
            let model = SeqModel {
                decoder: &m.model,
                head: &head,
                pad_id: 256,
                padding: Padding::Right,
            };
            // One step first: at init LoRA's B is zero, so A's gradient is zero by
            // construction.
            let mut s = settings(objective, 1, 0);
            s.warmup_steps = 0;
            heads::train(&model, Some(&adapter), &units, &[], &s, None, &mut ()).unwrap();
            let seqs: Vec<&[u32]> = units
                .iter()
                .flat_map(|u| u.seqs.iter().map(Vec::as_slice))
                .collect();
            let scores = model.scores(&seqs).unwrap();
            let refs: Vec<&Unit> = units.iter().collect();
            let loss = heads::units_loss(objective, &scores, &refs, 0.0).unwrap();
            let g = loss.backward().unwrap();
            for (name, var) in adapter.vars.iter().chain(head.vars.iter()) {
                let t = g
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                assert_eq!(t.dtype(), DType::F32, "{what}: {name}");
                let norm = t
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{what}: gradient of {name} is {norm}"
                );
            }
        }
    }
}

struct StopAt(u64, std::cell::Cell<u64>);

impl HeadObserver for StopAt {
    fn on_step(&mut self, m: &HeadStep, _total: u64) {
        self.1.set(m.step);
    }
    fn cancelled(&self) -> bool {
        self.1.get() >= self.0
    }
    fn evaluate(
        &mut self,
        _step: u64,
        preds: &[Vec<Vec<f32>>],
    ) -> std::collections::BTreeMap<String, f64> {
        let mean = preds.iter().map(|p| p[0][0] as f64).sum::<f64>() / preds.len().max(1) as f64;
        [("mean_first_output".to_string(), mean)].into()
    }
}

fn run_regression(
    steps: u64,
    save_every: u64,
    checkpointing: bool,
    ckpt: Option<&std::path::Path>,
    obs: &mut dyn HeadObserver,
    kind: HeadKind,
) -> pipe_train::Result<heads::HeadReport> {
    let mut m = loader::load("tiny:llama:3", DType::F32, &Device::Cpu).unwrap();
    let adapter = lora::attach(&mut m.model, &lora_cfg(0.2), &mut Rng::new(1)).unwrap();
    let head = Head::new(
        HeadConfig {
            pooling: Pooling::Mean,
            kind,
            hidden: m.model.config().hidden_size,
            outputs: 2,
            dropout: 0.2,
            out_bias: true,
        },
        &mut Rng::new(2),
        &Device::Cpu,
    )
    .unwrap();
    let units = regression_units(&m.tokenizer, 11);
    let model = SeqModel {
        decoder: &m.model,
        head: &head,
        pad_id: 256,
        padding: Padding::Left,
    };
    let mut s = settings(Objective::Mse, steps, save_every);
    s.gradient_checkpointing = checkpointing;
    heads::train(&model, Some(&adapter), &units, &units[..4], &s, ckpt, obs)
}

fn losses(r: &heads::HeadReport) -> Vec<(u64, Option<f64>, Option<f64>)> {
    r.history
        .iter()
        .map(|h| (h.step, h.loss, h.eval_loss))
        .collect()
}

#[test]
fn resumed_head_training_reproduces_the_uninterrupted_losses_exactly() {
    for kind in [HeadKind::Linear, HeadKind::Mlp] {
        let full = run_regression(7, 2, false, None, &mut (), kind).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = run_regression(
            7,
            2,
            false,
            Some(dir.path()),
            &mut StopAt(5, Default::default()),
            kind,
        )
        .err()
        .unwrap();
        assert!(matches!(err, pipe_train::Error::Cancelled));
        let resumed = run_regression(7, 2, false, Some(dir.path()), &mut (), kind).unwrap();
        assert_eq!(resumed.resumed_from, 4, "{kind:?}");
        let (a, b) = (losses(&full), losses(&resumed));
        assert_eq!(a, b, "{kind:?}");
        assert_eq!(full.best, resumed.best);
    }
}

#[test]
fn gradient_checkpointing_changes_no_loss() {
    let plain = run_regression(4, 0, false, None, &mut (), HeadKind::Mlp).unwrap();
    let ckpt = run_regression(4, 0, true, None, &mut (), HeadKind::Mlp).unwrap();
    let (a, b) = (losses(&plain), losses(&ckpt));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        let d = (x.1.unwrap_or(0.0) - y.1.unwrap_or(0.0)).abs();
        assert!(d < 1e-5, "{x:?} vs {y:?}");
    }
}

#[test]
fn a_regression_head_learns_and_reloads_to_the_same_outputs() {
    let mut m = loader::load("tiny:qwen2:2", DType::F32, &Device::Cpu).unwrap();
    let adapter = lora::attach(&mut m.model, &lora_cfg(0.0), &mut Rng::new(1)).unwrap();
    let head = Head::new(
        HeadConfig {
            pooling: Pooling::Last,
            kind: HeadKind::Linear,
            hidden: m.model.config().hidden_size,
            outputs: 2,
            dropout: 0.0,
            out_bias: false,
        },
        &mut Rng::new(2),
        &Device::Cpu,
    )
    .unwrap();
    let units = regression_units(&m.tokenizer, 16);
    let model = SeqModel {
        decoder: &m.model,
        head: &head,
        pad_id: 256,
        padding: Padding::Right,
    };
    let mut s = settings(Objective::Mse, 60, 0);
    s.optimizer.lr = 2e-2;
    s.eval_every = 20;
    let r = heads::train(&model, Some(&adapter), &units, &units, &s, None, &mut ()).unwrap();
    let first = r.history[0].eval_loss.unwrap();
    let (best, _) = r.best.unwrap();
    assert!(best < first * 0.5, "eval loss {first} → {best}");
    // Save the kept model, load it onto a fresh base, compare outputs.
    let dir = tempfile::tempdir().unwrap();
    let meta = SavedHead {
        head: head.config.clone(),
        objective: Objective::Mse,
        outputs: vec!["length".into(), "seven".into()],
        standardize: vec![],
        pad_id: 256,
        base_model: "tiny:qwen2:2".into(),
        lora: true,
    };
    heads::save(dir.path(), Some(&adapter), &head, &r.best_tensors, &meta).unwrap();
    // Saving set the model to the kept step; its outputs are what must come back.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let saved: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        saved[heads::SCORE_KEY].dims(),
        &[2, m.model.config().hidden_size]
    );
    let seqs: Vec<&[u32]> = units.iter().map(|u| u.seqs[0].as_slice()).collect();
    let want = model.predict(&seqs, 5).unwrap();
    let mut fresh = loader::load("tiny:qwen2:2", DType::F32, &Device::Cpu).unwrap();
    let (h2, _a2, meta2) = heads::load(&mut fresh.model, dir.path()).unwrap();
    assert_eq!(meta2, meta);
    let again = SeqModel {
        decoder: &fresh.model,
        head: &h2,
        pad_id: 256,
        padding: Padding::Left,
    }
    .predict(&seqs, 3)
    .unwrap();
    for (a, b) in want.iter().flatten().zip(again.iter().flatten()) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}
