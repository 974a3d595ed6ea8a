//! Packed prefill, prompt-start reuse and continuous batching give what each sequence
//! gets alone.

use candle_core::{DType, Device, Tensor};
use pipe_train::generate::{generate, Decoding, Generation, PrefixCache, Sampling, Sequence};
use pipe_train::loader;
use pipe_train::model::{KeyMask, Prefill};
use pipe_train::Rng;

const FAMILIES: [&str; 7] = [
    "tiny:llama:7",
    "tiny:qwen2:7",
    "tiny:mistral:7",
    "tiny:qwen3:7",
    "tiny:gemma:7",
    "tiny:gemma2:7",
    "tiny:phi3:7",
];

/// Token ids of a text long enough to share a start with others.
fn ids(tok: &pipe_train::tokenizer::TextTokenizer, text: &str) -> Vec<u32> {
    tok.encode(text).unwrap()
}

const RUBRIC: &str = "Score the passage on accuracy, sourcing, clarity and balance, \
    each from 0 to 10, then say which kind of article it is and why, in one sentence. ";

#[test]
fn a_packed_prefill_equals_each_prompt_run_alone_on_every_family() {
    for arch in FAMILIES {
        let m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let tok = &m.tokenizer;
        let long = ids(tok, &format!("{RUBRIC} Passage: the moon is made of rock."));
        let short = ids(tok, "hi");
        let other = ids(tok, &format!("{RUBRIC} Passage: water boils at 100 C."));
        let alone = |p: &[u32]| -> Vec<f32> {
            let t = Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let h = m
                .model
                .hidden(&t, &KeyMask::full(1, p.len()), None, None)
                .unwrap();
            h.narrow(1, p.len() - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // The third prompt continues a cached start: the first 20 tokens of `other`.
        let (_, start) = m
            .model
            .prefill_packed(&[Prefill {
                ids: &other[..20],
                past: None,
            }])
            .unwrap();
        let (last, caches) = m
            .model
            .prefill_packed(&[
                Prefill {
                    ids: &long,
                    past: None,
                },
                Prefill {
                    ids: &short,
                    past: None,
                },
                Prefill {
                    ids: &other[20..],
                    past: Some(&start[0]),
                },
            ])
            .unwrap();
        let got: Vec<Vec<f32>> = last.to_vec2().unwrap();
        for (i, p) in [&long, &short, &other].into_iter().enumerate() {
            let want = alone(p);
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            let diff = got[i]
                .iter()
                .zip(&want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{arch} prompt {i}: {diff} of {scale}"
            );
            assert_eq!(caches[i].len(), p.len(), "{arch} prompt {i}");
        }
    }
}

fn greedy(n: usize) -> Sampling {
    Sampling {
        max_new_tokens: n,
        ..Default::default()
    }
}

fn alone(m: &loader::Loaded, prompt: &[u32], s: &Sampling, seed: u64) -> Generation {
    generate(
        &m.model,
        &m.tokenizer,
        &[prompt.to_vec()],
        s,
        &[],
        &mut [Rng::new(seed)],
    )
    .unwrap()
    .remove(0)
}

#[test]
fn sequences_that_join_a_running_batch_decode_as_they_would_alone() {
    for arch in ["tiny:llama:3", "tiny:gemma2:3"] {
        let m = loader::load(arch, DType::F32, &Device::Cpu).unwrap();
        let tok = &m.tokenizer;
        let prompts = [
            ids(tok, "hello there"),
            ids(tok, "hi"),
            // Longer than the batch's keys when it joins: the running rows get padded.
            ids(tok, &format!("{RUBRIC} and a long prompt that joins late")),
            ids(tok, "ok"),
        ];
        let sampled = Sampling {
            max_new_tokens: 9,
            temperature: 0.8,
            ..Default::default()
        };
        let settings = [greedy(12), greedy(4), sampled, greedy(7)];
        let seq = |i: usize| Sequence {
            prompt: prompts[i].clone(),
            sampling: settings[i].clone(),
            rng: Rng::new(i as u64),
            constraint: None,
        };
        let mut run = Decoding::new(&m.model, tok, vec![], PrefixCache::default());
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 4];
        let mut record = |id: usize, t: u32| {
            streamed[id].push(t);
            true
        };
        let mut done: Vec<Option<Generation>> = vec![None; 4];
        assert_eq!(
            run.add(vec![seq(0), seq(1)], &mut record).unwrap(),
            vec![0, 1]
        );
        for step in 0..40 {
            if step == 3 {
                assert_eq!(
                    run.add(vec![seq(2), seq(3)], &mut record).unwrap(),
                    vec![2, 3]
                );
            }
            for (id, g, _) in run.step(&mut record).unwrap() {
                done[id] = Some(g);
            }
            if run.is_idle() && step > 3 {
                break;
            }
        }
        for i in 0..4 {
            let got = done[i].clone().expect("finished");
            assert_eq!(
                got,
                alone(&m, &prompts[i], &settings[i], i as u64),
                "{arch} seq {i}"
            );
            assert_eq!(streamed[i], got.ids, "{arch} seq {i} streamed");
        }
    }
}

#[test]
fn a_shared_prompt_start_is_computed_once_and_changes_nothing() {
    let m = loader::load("tiny:qwen2:3", DType::F32, &Device::Cpu).unwrap();
    let tok = &m.tokenizer;
    let items = ["the moon", "water", "a cat sat", "rain"];
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|t| ids(tok, &format!("{RUBRIC}{RUBRIC} Item: {t}")))
        .collect();
    let shared = prompts
        .iter()
        .map(|p| {
            p.iter()
                .zip(&prompts[0])
                .take_while(|(a, b)| a == b)
                .count()
        })
        .min()
        .unwrap();
    assert!(shared >= 40, "{shared}");
    let total: usize = prompts.iter().map(Vec::len).sum();
    let run = |cache: PrefixCache, batches: &[&[usize]]| -> (Vec<Generation>, u64, u64) {
        let mut d = Decoding::new(&m.model, tok, vec![], cache);
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        // Ids count up from 0 in the order sequences are added.
        let mut order: Vec<usize> = Vec::new();
        for batch in batches {
            let seqs = batch
                .iter()
                .map(|&i| Sequence {
                    prompt: prompts[i].clone(),
                    sampling: greedy(6),
                    rng: Rng::new(0),
                    constraint: None,
                })
                .collect();
            d.add(seqs, &mut |_, _| true).unwrap();
            order.extend_from_slice(batch);
            while !d.is_idle() {
                for (id, g, _) in d.step(&mut |_, _| true).unwrap() {
                    out[order[id]] = Some(g);
                }
            }
        }
        let gens = out.into_iter().flatten().collect();
        (gens, d.prefixes.computed, d.prefixes.reused)
    };
    let (plain, computed, reused) = run(PrefixCache::new(0), &[&[0, 1, 2, 3]]);
    assert_eq!((computed, reused), (total as u64, 0));
    // One batch: the shared start runs once, then only each prompt's rest.
    let (within, computed, reused) = run(PrefixCache::default(), &[&[0, 1, 2, 3]]);
    assert_eq!(within, plain);
    assert_eq!(reused as usize, 4 * shared);
    assert_eq!(computed as usize, total - 4 * shared + shared);
    // Requests one after another: the later ones reuse the earlier ones' prompts.
    let (across, computed, reused) = run(PrefixCache::default(), &[&[0], &[1], &[2, 3]]);
    assert_eq!(across, plain);
    assert!(reused as usize >= 3 * shared, "{reused}");
    assert!((computed as usize) <= total - 3 * shared, "{computed}");
    // Without room, nothing is kept.
    let tiny = PrefixCache::new(1);
    let (_, _, reused) = run(tiny, &[&[0], &[1]]);
    assert_eq!(reused, 0);
}
