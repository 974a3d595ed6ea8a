//! Training-loop properties on tiny random models: step 0 equals the base model,
//! every trainable tensor gets a gradient, losses fall, and a resumed run
//! reproduces the uninterrupted one exactly.

use candle_core::{DType, Device, Tensor};
use pipe_train::data::{Example, Formatter, LossMask, Record};
use pipe_train::linear::BaseQuant;
use pipe_train::loader;
use pipe_train::lora::{self, LoraConfig, Targets};
use pipe_train::loss::causal_lm_loss;
use pipe_train::optim::{AdamWConfig, Decay};
use pipe_train::trainer::{train, Observer, StepMetrics, TrainSettings};
use pipe_train::{KeyMask, Rng};

fn all_linear(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        target_modules: Targets::Keyword("all-linear".into()),
        use_rslora: false,
    }
}

fn examples(tok: &pipe_train::tokenizer::TextTokenizer, n: usize) -> Vec<Example> {
    let f = Formatter {
        tokenizer: tok,
        chat: true,
        mask: LossMask::AnswerOnly,
        max_len: 64,
        label_tokens: &[],
    };
    (0..n)
        .map(|i| {
            let a = i % 7;
            let r = Record::Pair {
                prompt: format!("{a}+1="),
                response: format!("{}", a + 1),
            };
            f.example(&r).unwrap().unwrap()
        })
        .collect()
}

fn settings(steps: u64, save_every: u64) -> TrainSettings {
    TrainSettings {
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        warmup_steps: 2,
        decay: Decay::Cosine,
        batch_size: 2,
        grad_accum: 2,
        steps,
        max_grad_norm: Some(1.0),
        eval_every: 2,
        save_every,
        seed: 3,
        pad_id: 256,
        gradient_checkpointing: false,
        keep_best: Vec::new(),
    }
}

#[test]
fn step_zero_equals_base_model() {
    for (arch, base) in FAMILIES
        .iter()
        .flat_map(|a| BASES.iter().map(move |b| (*a, *b)))
    {
        let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        m.model.quantize_base(base, false).unwrap();
        let ids = Tensor::new(&[[5u32, 9, 200, 7, 3]], &Device::Cpu).unwrap();
        let keys = KeyMask::full(1, 5);
        let out: Vec<f32> = m
            .model
            .forward(&ids, &keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
        let with: Vec<f32> = m
            .model
            .forward(&ids, &keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, with, "{arch}: a fresh adapter changed the output");
    }
}

/// Every family's tiny preset.
const FAMILIES: [&str; 7] = [
    "tiny:llama",
    "tiny:qwen2",
    "tiny:mistral",
    "tiny:qwen3",
    "tiny:gemma",
    "tiny:gemma2",
    "tiny:phi3",
];

const BASES: [BaseQuant; 3] = [BaseQuant::None, BaseQuant::Int8, BaseQuant::Nf4];

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    for arch in FAMILIES {
        for base in BASES {
            every_trainable_tensor_gets_a_nonzero_gradient_on(
                &format!("{arch}:2"),
                base,
                DType::F32,
            );
        }
        // bf16 base weights and activations; LoRA weights and gradients stay f32.
        for base in [BaseQuant::None, BaseQuant::Nf4] {
            every_trainable_tensor_gets_a_nonzero_gradient_on(
                &format!("{arch}:2"),
                base,
                DType::BF16,
            );
        }
    }
}

fn every_trainable_tensor_gets_a_nonzero_gradient_on(arch: &str, base: BaseQuant, dtype: DType) {
    let mut m = loader::load(arch, dtype, &Device::Cpu).unwrap();
    m.model.quantize_base(base, true).unwrap();
    let arch = &format!("{arch} ({base:?} base, {dtype:?})");
    let adapter = lora::attach(&mut m.model, &all_linear(0.1), &mut Rng::new(1)).unwrap();
    let projections = if arch.starts_with("tiny:phi3") { 4 } else { 7 };
    assert_eq!(adapter.vars.len(), 2 * projections * 2, "{arch}");
    let data = examples(&m.tokenizer, 8);
    // One step first: at init B = 0, so A's gradient is zero by construction (as in PEFT).
    let mut s = settings(1, 0);
    s.warmup_steps = 0;
    train(&m.model, &adapter, &data, &[], &s, None, &mut ()).unwrap();
    let refs: Vec<&Example> = data.iter().collect();
    let b = pipe_train::data::collate(&refs, 256, &Device::Cpu).unwrap();
    let loss =
        causal_lm_loss(&m.model, &b.ids, &b.keys, &b.labels, Some(&mut Rng::new(5))).unwrap();
    let grads = loss.sum.backward().unwrap();
    for (name, var) in &adapter.vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
        assert_eq!(
            g.dtype(),
            DType::F32,
            "{arch}: gradient of {name} is not f32"
        );
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{arch}: gradient of {name} is {norm}"
        );
    }
}

#[test]
fn eval_loss_falls() {
    let mut m = loader::load("tiny:qwen2:4", DType::F32, &Device::Cpu).unwrap();
    let adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
    let data = examples(&m.tokenizer, 14);
    let mut s = settings(40, 0);
    s.optimizer.lr = 5e-2;
    s.eval_every = 10;
    let r = train(&m.model, &adapter, &data, &data[..7], &s, None, &mut ()).unwrap();
    let (first, best) = (r.initial_eval_loss.unwrap(), r.best_eval_loss.unwrap());
    // The tiny preset has σ = 0.02 weights and a frozen lm_head, which bounds how
    // sharp its predictions can get: the loss plateaus near 4.7 from 5.6.
    assert!(best < first - 0.5, "eval loss {first} → {best}");
    assert_eq!(r.history.len(), 40);
    assert!(r
        .history
        .iter()
        .all(|h| h.tokens_per_s > 0.0 && h.grad_norm.is_finite()));
}

struct StopAt(u64, std::cell::Cell<u64>);

impl Observer for StopAt {
    fn on_step(&mut self, m: &StepMetrics, _total: u64) {
        self.1.set(m.step);
    }
    fn cancelled(&self) -> bool {
        self.1.get() >= self.0
    }
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses_exactly() {
    let run = |ckpt: Option<&std::path::Path>, obs: &mut dyn Observer| {
        let mut m = loader::load("tiny:llama:9", DType::F32, &Device::Cpu).unwrap();
        let adapter = lora::attach(&mut m.model, &all_linear(0.2), &mut Rng::new(1)).unwrap();
        let data = examples(&m.tokenizer, 11);
        train(
            &m.model,
            &adapter,
            &data,
            &data[..4],
            &settings(7, 2),
            ckpt,
            obs,
        )
    };
    let full = run(None, &mut ()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = run(Some(dir.path()), &mut StopAt(5, Default::default()))
        .err()
        .unwrap();
    assert!(matches!(err, pipe_train::Error::Cancelled));
    let resumed = run(Some(dir.path()), &mut ()).unwrap();
    assert_eq!(resumed.resumed_from, 4);
    let losses = |r: &pipe_train::trainer::TrainReport| {
        r.history
            .iter()
            .map(|h| (h.step, h.loss, h.eval_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&full), losses(&resumed));
    assert_eq!(full.best_eval_loss, resumed.best_eval_loss);
}

/// A task score that rises and falls as training goes (the loss on one held-out
/// example, counted as a score to maximise), plus an interruption point.
struct Scored {
    probe: Vec<Example>,
    stop_at: u64,
    seen: std::cell::Cell<u64>,
    evaluated: Vec<u64>,
}

impl Observer for Scored {
    fn on_step(&mut self, m: &StepMetrics, _total: u64) {
        self.seen.set(m.step);
    }
    fn cancelled(&self) -> bool {
        self.stop_at > 0 && self.seen.get() >= self.stop_at
    }
    fn evaluate(
        &mut self,
        model: &pipe_train::model::Decoder,
        step: u64,
    ) -> pipe_train::Result<Option<pipe_train::trainer::TaskScores>> {
        self.evaluated.push(step);
        let l = pipe_train::trainer::evaluate(model, &self.probe, 1, 256)?;
        let mut t = pipe_train::trainer::TaskScores::default();
        t.metrics.insert("score".into(), l);
        t.samples.push(serde_json::json!({"step": step}));
        Ok(Some(t))
    }
}

#[test]
fn keep_best_keeps_each_metrics_best_adapter_and_resumes_with_it() {
    use pipe_train::trainer::Goal;
    let run = |ckpt: Option<&std::path::Path>, stop_at: u64| {
        let mut m = loader::load("tiny:llama:9", DType::F32, &Device::Cpu).unwrap();
        let adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
        let data = examples(&m.tokenizer, 11);
        let probe = {
            let f = Formatter {
                tokenizer: &m.tokenizer,
                chat: true,
                mask: LossMask::AnswerOnly,
                max_len: 64,
                label_tokens: &[],
            };
            vec![f
                .example(&Record::Pair {
                    prompt: "9+9=".into(),
                    response: "x".into(),
                })
                .unwrap()
                .unwrap()]
        };
        let mut s = settings(9, 2);
        s.eval_every = 1;
        s.optimizer.lr = 2e-2;
        s.keep_best = vec![("score".into(), Goal::Max), ("eval_loss".into(), Goal::Min)];
        let mut obs = Scored {
            probe: probe.clone(),
            stop_at,
            seen: Default::default(),
            evaluated: Vec::new(),
        };
        let r = train(&m.model, &adapter, &data, &data[..4], &s, ckpt, &mut obs);
        let check = r.as_ref().ok().map(|r| {
            // Restoring each kept adapter gives back its kept value.
            r.kept
                .iter()
                .map(|k| {
                    adapter
                        .restore(&k.adapter, std::path::Path::new("."))
                        .unwrap();
                    let v = if k.metric == "score" {
                        pipe_train::trainer::evaluate(&m.model, &probe, 1, 256).unwrap()
                    } else {
                        pipe_train::trainer::evaluate(&m.model, &data[..4], 2, 256).unwrap()
                    };
                    (k.metric.clone(), k.step, k.value, v)
                })
                .collect::<Vec<_>>()
        });
        (r, check, obs.evaluated)
    };
    let (full, check, evaluated) = run(None, 0);
    let full = full.unwrap();
    assert_eq!(evaluated, (0..=9).collect::<Vec<_>>());
    let check = check.unwrap();
    // The kept step is the argmax (argmin) over every evaluation, step 0 included.
    let scores: Vec<(u64, f64)> = std::iter::once((0, full.initial_task["score"]))
        .chain(full.history.iter().map(|h| (h.step, h.task["score"])))
        .collect();
    let best = scores
        .iter()
        .fold(scores[0], |b, &x| if x.1 > b.1 { x } else { b });
    assert!(
        scores.iter().any(|x| x.1 != scores[0].1),
        "the score never moved: {scores:?}"
    );
    assert_eq!((check[0].1, check[0].2), best, "{scores:?}");
    assert_eq!(check[1].1, full.best_step.unwrap());
    for (metric, _, value, again) in &check {
        assert!(
            (value - again).abs() < 1e-6,
            "{metric}: kept {value}, restored {again}"
        );
    }
    assert_eq!(
        full.history[3].samples,
        vec![serde_json::json!({"step": 4})]
    );
    // Interrupted after step 5 (checkpoint at 4), then resumed: the same bests.
    let dir = tempfile::tempdir().unwrap();
    let (err, _, _) = run(Some(dir.path()), 5);
    assert!(matches!(err.err().unwrap(), pipe_train::Error::Cancelled));
    let (resumed, check2, evaluated2) = run(Some(dir.path()), 0);
    let resumed = resumed.unwrap();
    assert_eq!(resumed.resumed_from, 4);
    assert_eq!(evaluated2, (5..=9).collect::<Vec<_>>());
    let kept = |c: &[(String, u64, f64, f64)]| {
        c.iter()
            .map(|k| (k.0.clone(), k.1, k.2))
            .collect::<Vec<_>>()
    };
    assert_eq!(kept(&check), kept(&check2.unwrap()));
    assert_eq!(full.initial_task, resumed.initial_task);
}

#[test]
fn cached_batched_generation_equals_uncached_greedy_decoding() {
    for arch in FAMILIES {
        cached_generation_equals_uncached_on(&format!("{arch}:1"));
    }
}

fn cached_generation_equals_uncached_on(arch: &str) {
    use pipe_train::generate::{generate, Sampling};
    let m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
    let prompts = vec![
        m.tokenizer.encode("hello there").unwrap(),
        m.tokenizer.encode("hi").unwrap(),
    ];
    let s = Sampling {
        max_new_tokens: 6,
        ..Default::default()
    };
    let mut rngs = vec![Rng::new(0), Rng::new(1)];
    let batched = generate(&m.model, &m.tokenizer, &prompts, &s, &[], &mut rngs).unwrap();
    for (p, g) in prompts.iter().zip(&batched) {
        // Reference: full forward over the growing sequence, no cache, no padding.
        let mut seq = p.clone();
        for _ in 0..6 {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = m.model.forward(&ids, &KeyMask::full(1, seq.len())).unwrap();
            let last: Vec<f32> = logits
                .squeeze(0)
                .unwrap()
                .get(seq.len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            seq.push(pipe_train::generate::pick(&last, &s, &mut Rng::new(0)));
        }
        assert_eq!(g.ids, seq[p.len()..].to_vec(), "{arch}");
    }
}

#[test]
fn merged_export_reloads_with_the_adapters_outputs() {
    for arch in FAMILIES {
        merged_export_reloads_on(&format!("{arch}:6"));
    }
}

fn merged_export_reloads_on(arch: &str) {
    let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
    let adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
    let data = examples(&m.tokenizer, 8);
    let mut s = settings(3, 0);
    s.warmup_steps = 0;
    train(&m.model, &adapter, &data, &[], &s, None, &mut ()).unwrap();
    let ids = Tensor::new(&[[257u32, 50, 60, 258, 70]], &Device::Cpu).unwrap();
    let keys = KeyMask::full(1, 5);
    let want: Vec<f32> = m
        .model
        .forward(&ids, &keys)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    pipe_train::export::save_hf_dir(&mut m.model, &m.tokenizer, dir.path()).unwrap();
    let back = loader::load(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        back.tokenizer.encode("<|im_start|>hé").unwrap(),
        m.tokenizer.encode("<|im_start|>hé").unwrap()
    );
    let got: Vec<f32> = back
        .model
        .forward(&ids, &keys)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "{arch}: merged model differs by {d}");
}

#[test]
fn new_special_tokens_train_save_and_reload() {
    for arch in ["tiny:qwen2:2", "tiny:llama:2"] {
        let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let ids = m.tokenizer.add_special_tokens(&["<cite>".into()]).unwrap();
        assert_eq!(ids, vec![259]);
        let mut adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
        lora::add_trainable_tokens(&mut m.model, &mut adapter, ids.clone()).unwrap();
        assert_eq!(m.model.config().vocab_size, 260);
        // The new row starts at the mean of the old ones, and so does an untied
        // model's output row (`resize_token_embeddings(mean_resizing=True)`).
        let at_mean = |w: &Tensor| {
            let mean = w.narrow(0, 0, 259).unwrap().mean_keepdim(0).unwrap();
            let row = w.narrow(0, 259, 1).unwrap();
            (mean - &row)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-6
        };
        assert!(at_mean(&m.model.embed_tokens), "{arch}: input row");
        let tied = m.model.config().tie_word_embeddings;
        assert_eq!(tied, arch.starts_with("tiny:qwen2"));
        if !tied {
            assert!(at_mean(&m.model.lm_head.weight), "{arch}: output row");
        }
        let f = Formatter {
            tokenizer: &m.tokenizer,
            chat: true,
            mask: LossMask::AnswerOnly,
            max_len: 64,
            label_tokens: &[],
        };
        let data: Vec<Example> = (0..6)
            .map(|i| {
                f.example(&Record::Pair {
                    prompt: format!("q{i}"),
                    response: format!("<cite>{i}"),
                })
                .unwrap()
                .unwrap()
            })
            .collect();
        assert!(data[0].ids.contains(&259));
        let before = adapter.vars.last().unwrap().1.as_tensor().copy().unwrap();
        let mut s = settings(4, 0);
        s.warmup_steps = 0;
        train(&m.model, &adapter, &data, &[], &s, None, &mut ()).unwrap();
        let after = adapter.vars.last().unwrap().1.as_tensor().copy().unwrap();
        let moved = (after - before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 1e-4, "{arch}: the new token's row did not train");

        let ids_t = Tensor::new(data[0].ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let keys = KeyMask::full(1, data[0].ids.len());
        let want: Vec<f32> = m
            .model
            .forward(&ids_t, &keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path(), arch).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["trainable_token_indices"]["embed_tokens"],
            serde_json::json!([259])
        );
        let mut fresh = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        lora::load(&mut fresh.model, dir.path()).unwrap();
        let got: Vec<f32> = fresh
            .model
            .forward(&ids_t, &keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(want.len(), got.len());
        let d = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{arch}: reloaded adapter differs by {d}");
    }
}

#[test]
fn rows_that_finish_leave_the_batch_without_changing_the_others() {
    use pipe_train::generate::{generate, Finish, Sampling};
    let m = loader::load("tiny:llama:2", DType::F32, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = ["a", "hello there", "one two three four", "xyz"]
        .iter()
        .map(|t| m.tokenizer.encode(t).unwrap())
        .collect();
    let s = Sampling {
        max_new_tokens: 10,
        ..Default::default()
    };
    let rngs = || -> Vec<Rng> { (0..4).map(Rng::new).collect() };
    let free = generate(&m.model, &m.tokenizer, &prompts, &s, &[], &mut rngs()).unwrap();
    // Make the third token of the first row an end of sequence: that row (at least)
    // stops early while the others go on with a smaller batch.
    let eos = [free[0].ids[2]];
    let batched = generate(&m.model, &m.tokenizer, &prompts, &s, &eos, &mut rngs()).unwrap();
    assert_eq!(batched[0].finish, Finish::Eos);
    assert_eq!(batched[0].ids, free[0].ids[..2].to_vec());
    assert!(
        batched.iter().any(|g| g.ids.len() > 2),
        "every row stopped early"
    );
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(
            &m.model,
            &m.tokenizer,
            std::slice::from_ref(p),
            &s,
            &eos,
            &mut [Rng::new(i as u64)],
        )
        .unwrap();
        assert_eq!(alone[0], batched[i], "row {i}");
    }
}

/// `max |got − want| / max |want|`, asserting the reference is not all zero.
fn relative_diff(got: &Tensor, want: &Tensor, what: &str) -> f32 {
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let scale = max_abs(want);
    assert!(scale > 0.0, "{what}: the reference is zero");
    max_abs(&(got - want).unwrap()) / scale
}

/// Gives every LoRA B a seeded random value (at init B is 0, so A has no gradient).
fn randomize_lora_b(adapters: &[&lora::Adapter], seed: u64) {
    let mut rng = Rng::new(seed);
    let first = adapters[0];
    for (i, (k, v)) in first.vars.iter().enumerate() {
        if k.contains("lora_B") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.1).collect();
            let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap();
            for a in adapters {
                assert_eq!(&a.vars[i].0, k);
                a.vars[i].1.set(&t).unwrap();
            }
        }
    }
}

/// QLoRA: LoRA gradients on an NF4 base equal those of the dense path run on the
/// dequantized weights (the same numbers up to the order of f32 additions).
#[test]
fn qlora_gradients_equal_the_dense_path_on_dequantized_weights() {
    for arch in ["tiny:llama:4", "tiny:gemma:4"] {
        let mut q = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        q.model.quantize_base(BaseQuant::Nf4, true).unwrap();
        let mut d = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let dense: Vec<_> = q
            .model
            .linears_mut()
            .into_iter()
            .map(|(_, l)| l.dense_weight(DType::F32).unwrap())
            .collect();
        for ((_, lin), w) in d.model.linears_mut().into_iter().zip(dense) {
            assert!(lin.packed.is_none());
            lin.weight = w;
        }
        let aq = lora::attach(&mut q.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
        let ad = lora::attach(&mut d.model, &all_linear(0.0), &mut Rng::new(1)).unwrap();
        // Non-zero B on both, so every A and B has a gradient.
        randomize_lora_b(&[&aq, &ad], 8);
        let data = examples(&q.tokenizer, 4);
        let refs: Vec<&Example> = data.iter().collect();
        let b = pipe_train::data::collate(&refs, 256, &Device::Cpu).unwrap();
        let lq = causal_lm_loss(&q.model, &b.ids, &b.keys, &b.labels, None).unwrap();
        let ld = causal_lm_loss(&d.model, &b.ids, &b.keys, &b.labels, None).unwrap();
        let (gq, gd) = (lq.sum.backward().unwrap(), ld.sum.backward().unwrap());
        let mut worst = 0f32;
        for ((name, vq), (_, vd)) in aq.vars.iter().zip(&ad.vars) {
            let (a, r) = (
                gq.get(vq.as_tensor()).unwrap(),
                gd.get(vd.as_tensor()).unwrap(),
            );
            worst = worst.max(relative_diff(a, r, &format!("{arch}: {name}")));
        }
        println!("{arch}: worst QLoRA gradient relative Δ vs dense-on-dequantized = {worst:.3e}");
        assert!(
            worst <= 1e-5,
            "{arch}: QLoRA gradients differ by {worst} relative"
        );
    }
}

/// Gradient checkpointing recomputes each layer in the backward pass: the gradients
/// (with LoRA dropout on, so the replayed masks matter) and a short training run's
/// losses are the same as without it.
#[test]
fn gradient_checkpointing_gives_the_same_gradients_and_losses() {
    use pipe_train::loss::loss_and_grads;
    for arch in [
        "tiny:llama:5",
        "tiny:gemma2:5",
        "tiny:phi3:5",
        "tiny:qwen2:5",
    ] {
        let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let mut adapter = lora::attach(&mut m.model, &all_linear(0.1), &mut Rng::new(1)).unwrap();
        if arch.starts_with("tiny:qwen2") {
            // Trained token rows on a tied model: gradients from the embedding and lm_head.
            lora::add_trainable_tokens(&mut m.model, &mut adapter, vec![50, 60, 257]).unwrap();
        }
        // Non-zero B so that every A has a gradient too.
        randomize_lora_b(&[&adapter], 4);
        let data = examples(&m.tokenizer, 4);
        let refs: Vec<&Example> = data.iter().collect();
        let b = pipe_train::data::collate(&refs, 256, &Device::Cpu).unwrap();
        let vars: Vec<&candle_core::Var> = adapter.vars.iter().map(|(_, v)| v).collect();
        let run = |checkpoint: bool| {
            let mut rng = Rng::new(9);
            let out =
                loss_and_grads(&m.model, &b, Some(&mut rng), 0.25, &vars, checkpoint).unwrap();
            (out, rng.state())
        };
        let ((l0, n0, g0), r0) = run(false);
        let ((l1, n1, g1), r1) = run(true);
        assert_eq!((n0, r0), (n1, r1), "{arch}: tokens and dropout stream");
        assert!(
            (l0 - l1).abs() <= 1e-6 * l0.abs(),
            "{arch}: loss {l0} vs {l1}"
        );
        let mut worst = 0f32;
        for (((name, _), a), c) in adapter.vars.iter().zip(&g0).zip(&g1) {
            let c = c
                .as_ref()
                .unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
            worst = worst.max(relative_diff(
                c,
                a.as_ref().unwrap(),
                &format!("{arch}: {name}"),
            ));
        }
        println!("{arch}: checkpointed vs plain, worst gradient relative Δ = {worst:.3e}");
        assert!(
            worst <= 1e-6,
            "{arch}: gradients differ by {worst} relative"
        );
    }
    // Three optimizer steps each way: the same losses.
    let losses = |checkpoint: bool| {
        let mut m = loader::load("tiny:qwen3:5", DType::F32, &Device::Cpu).unwrap();
        let adapter = lora::attach(&mut m.model, &all_linear(0.1), &mut Rng::new(1)).unwrap();
        let data = examples(&m.tokenizer, 8);
        let mut s = settings(3, 0);
        s.gradient_checkpointing = checkpoint;
        struct Losses(Vec<f64>);
        impl Observer for Losses {
            fn on_step(&mut self, m: &StepMetrics, _total: u64) {
                self.0.push(m.loss);
            }
        }
        let mut obs = Losses(Vec::new());
        train(&m.model, &adapter, &data, &[], &s, None, &mut obs).unwrap();
        obs.0
    };
    let (plain, ckpt) = (losses(false), losses(true));
    assert_eq!(plain.len(), 3);
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "losses {plain:?} vs {ckpt:?}"
        );
    }
}

/// Packing while loading (one tensor at a time) gives the same model as loading dense
/// and packing afterwards, for an HF folder and both quantized bases.
#[test]
fn packing_while_loading_equals_packing_after() {
    let mut m = loader::load("tiny:gemma:3", DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pipe_train::export::save_hf_dir(&mut m.model, &m.tokenizer, dir.path()).unwrap();
    let path = dir.path().to_str().unwrap();
    let ids = Tensor::new(&[[5u32, 9, 200, 7, 3]], &Device::Cpu).unwrap();
    let keys = KeyMask::full(1, 5);
    let logits = |m: &pipe_train::Decoder| -> Vec<f32> {
        m.forward(&ids, &keys)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for base in [BaseQuant::Int8, BaseQuant::Nf4] {
        let mut after = loader::load(path, DType::F32, &Device::Cpu).unwrap();
        after.model.quantize_base(base, true).unwrap();
        let mut during = loader::load_with(path, DType::F32, &Device::Cpu, base, true).unwrap();
        let packed = during
            .model
            .linears_mut()
            .iter()
            .filter(|(_, l)| l.packed.is_some())
            .count();
        assert_eq!(
            packed, 14,
            "{base:?}: every projection packed while loading"
        );
        assert_eq!(logits(&after.model), logits(&during.model), "{base:?}");
    }
}

/// Confidence tokens on a tied and an untied model: both new rows start at the mean,
/// so C and U have the same logit everywhere; with the loss on the token alone (found
/// by id, `<|im_end|>` after it) a few steps separate them in the direction each prompt
/// was labelled.
#[test]
fn new_label_tokens_start_equal_and_separate_with_the_loss_on_them_alone() {
    for arch in ["tiny:qwen2:4", "tiny:llama:4"] {
        let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let tied = m.model.config().tie_word_embeddings;
        assert_eq!(tied, arch.starts_with("tiny:qwen2"));
        let ids = m
            .tokenizer
            .add_special_tokens(&["<C>".into(), "<U>".into()])
            .unwrap();
        let mut adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(2)).unwrap();
        lora::add_trainable_tokens(&mut m.model, &mut adapter, ids.clone()).unwrap();
        let f = Formatter {
            tokenizer: &m.tokenizer,
            chat: true,
            mask: LossMask::LabelToken,
            max_len: 64,
            label_tokens: &ids,
        };
        let data: Vec<Example> = (0..8)
            .map(|i| {
                let (q, t) = if i % 2 == 0 {
                    ("sky", "<C>")
                } else {
                    ("mud", "<U>")
                };
                f.example(&Record::Pair {
                    prompt: format!("{q} {i}"),
                    response: format!("ok {t}"),
                })
                .unwrap()
                .unwrap()
            })
            .collect();
        // Only the token's position carries a label.
        for e in &data {
            let labelled: Vec<usize> = (0..e.labels.len()).filter(|&k| e.labels[k] >= 0).collect();
            assert_eq!(labelled.len(), 1);
            assert!(ids.contains(&e.ids[labelled[0]]));
        }
        let margin = |m: &pipe_train::loader::Loaded, e: &Example| -> f32 {
            let at = e.labels.iter().position(|&l| l >= 0).unwrap();
            let t = Tensor::new(e.ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = m
                .model
                .forward(&t, &KeyMask::full(1, e.ids.len()))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .get(at - 1)
                .unwrap();
            let v: Vec<f32> = logits.to_vec1().unwrap();
            v[ids[0] as usize] - v[ids[1] as usize]
        };
        for e in &data {
            assert_eq!(margin(&m, e), 0.0, "{arch}: C and U differ before training");
        }
        let mut s = settings(30, 0);
        s.optimizer.lr = 2e-2;
        s.warmup_steps = 0;
        s.eval_every = 0;
        train(&m.model, &adapter, &data, &[], &s, None, &mut ()).unwrap();
        for (i, e) in data.iter().enumerate() {
            let d = margin(&m, e);
            let want = if i % 2 == 0 { 1.0 } else { -1.0 };
            assert!(d * want > 0.5, "{arch} example {i}: C − U logit {d}");
        }
    }
}

/// The gradient check of the label-token loss: with the loss on the confidence token
/// alone, the loss's gradient with respect to the final hidden states is non-zero at
/// exactly one position, the one that predicts the token (and zero at the answer's
/// other tokens and at `<|im_end|>` after it), where the answer-only loss of the same
/// record spreads it over every answer position.
#[test]
fn label_token_loss_has_a_gradient_at_the_token_position_alone() {
    use pipe_train::loss::loss_from_hidden;
    for arch in ["tiny:qwen2:5", "tiny:llama:5"] {
        let mut m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let ids = m
            .tokenizer
            .add_special_tokens(&["<C>".into(), "<U>".into()])
            .unwrap();
        let mut adapter = lora::attach(&mut m.model, &all_linear(0.0), &mut Rng::new(3)).unwrap();
        lora::add_trainable_tokens(&mut m.model, &mut adapter, ids.clone()).unwrap();
        let record = Record::Pair {
            prompt: "is the sky green".into(),
            response: "no, it is blue <U>".into(),
        };
        let grad_rows = |mask: LossMask| -> (Vec<usize>, Vec<u32>) {
            let f = Formatter {
                tokenizer: &m.tokenizer,
                chat: true,
                mask,
                max_len: 128,
                label_tokens: &ids,
            };
            let e = f.example(&record).unwrap().unwrap();
            let t = Tensor::new(e.ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let keys = KeyMask::full(1, e.ids.len());
            let h = m.model.hidden(&t, &keys, None, None).unwrap().detach();
            let h = candle_core::Var::from_tensor(&h).unwrap();
            let loss =
                loss_from_hidden(&m.model, h.as_tensor(), std::slice::from_ref(&e.labels)).unwrap();
            let grads = loss.sum.backward().unwrap();
            let g = grads.get(h.as_tensor()).unwrap().squeeze(0).unwrap();
            let per: Vec<f32> = g.abs().unwrap().sum(1).unwrap().to_vec1().unwrap();
            ((0..per.len()).filter(|&i| per[i] > 0.0).collect(), e.ids)
        };
        let (rows, tokens) = grad_rows(LossMask::LabelToken);
        let at = tokens.iter().rposition(|t| ids.contains(t)).unwrap();
        assert_eq!(
            rows,
            vec![at - 1],
            "{arch}: gradient rows {rows:?}, token at {at}"
        );
        assert!(
            at + 1 < tokens.len(),
            "{arch}: the end-of-turn follows the token"
        );
        let (answer_rows, _) = grad_rows(LossMask::AnswerOnly);
        assert!(
            answer_rows.len() > 3 && answer_rows.contains(&(at - 1)),
            "{answer_rows:?}"
        );
    }
}
