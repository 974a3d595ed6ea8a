use candle_core::{DType, Device, Tensor};
use pipe_train::linear::BaseQuant;
use pipe_train::lora::{LoraConfig, Targets};
use pipe_train::{loader, lora, KeyMask, Rng};
use std::time::Instant;
fn main() {
    pipe_train::allocator::keep_freed_memory();
    pipe_train::fix_thread_count();
    for base in [BaseQuant::None, BaseQuant::Nf4] {
        let mut m = loader::load(
            "gguf:models/SmolLM2-135M-Instruct.Q4_1.gguf",
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        m.model.quantize_base(base, true).unwrap();
        let cfg = LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        };
        let _a = lora::attach(&mut m.model, &cfg, &mut Rng::new(1)).unwrap();
        let ids = Tensor::from_vec(
            (0..128u32).map(|i| 100 + i).collect::<Vec<_>>(),
            (1, 128),
            &Device::Cpu,
        )
        .unwrap();
        let keys = KeyMask::full(1, 128);
        for _ in 0..2 {
            let t = Instant::now();
            let logits = m.model.forward(&ids, &keys).unwrap();
            let f = t.elapsed().as_secs_f64();
            let loss = logits.sqr().unwrap().mean_all().unwrap();
            let t2 = Instant::now();
            let _g = loss.backward().unwrap();
            println!(
                "{base:?}: forward {:.2}s backward {:.2}s",
                f,
                t2.elapsed().as_secs_f64()
            );
        }
    }
}
