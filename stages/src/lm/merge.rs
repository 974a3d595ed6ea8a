//! `merge`: folds a LoRA adapter into its base model and writes a full HF folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`)
//! that `transformers` loads without `peft`. A GGUF base comes out as float weights.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model;
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeParams {
    /// The base model the adapter was trained on.
    model: String,
    /// `auto` (f32 on CPU), `f32`, `bf16` or `f16`.
    #[serde(default = "auto")]
    dtype: String,
}

fn auto() -> String {
    "auto".into()
}

/// LoRA merge into a standalone HF model folder.
pub struct MergeStage;

impl Stage for MergeStage {
    fn kind(&self) -> &'static str {
        "merge"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "fold a LoRA adapter into its base model; writes an HF folder"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: MergeParams = parse_params(params)?;
        Ok(Signature {
            inputs: vec![InputDecl::required("adapter")],
            deps: model::model_dep(&p.model)?.into_iter().collect(),
            outputs: vec![OutputDecl::staged("model", "model")],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        model::key_with_identity(params)
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: MergeParams = parse_params(&ctx.params)?;
        let mut loaded = model::load_model(
            ctx,
            &p.model,
            "cpu",
            &p.dtype,
            model::BaseQuant::None,
            false,
        )?;
        let adapter_dir = ctx.input("adapter")?;
        let adapter = pipe_train::lora::load(&mut loaded.model, adapter_dir)
            .map_err(model::failed("loading the adapter"))?;
        if adapter_dir.join("tokenizer.json").is_file() {
            loaded.tokenizer = pipe_train::tokenizer::TextTokenizer::from_dir(adapter_dir)
                .map_err(model::failed("loading the adapter's tokenizer"))?;
        }
        let dir = ctx.out_dir.join("model");
        std::fs::create_dir_all(&dir).map_err(StageError::io("creating the model folder"))?;
        pipe_train::export::save_hf_dir(&mut loaded.model, &loaded.tokenizer, &dir)
            .map_err(model::failed("writing the merged model"))?;
        let mut metrics = BTreeMap::new();
        metrics.insert("merged_tensors".into(), json!(adapter.vars.len() / 2));
        metrics.insert("adapter_parameters".into(), json!(adapter.parameters()));
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
