//! The `local` backend: a model pipe-train loads, asked in batches of
//! `batch_size` (GGUF and float models decode with Q8_0 weight copies on CPU).

use super::{Ask, AskError, Backend, Budget, OracleSpec};
use crate::contract::{CancelToken, StageError};
use crate::model::chat::{ChatModel, ChatRequest, Completion};

/// An in-process model.
pub struct LocalBackend {
    model: ChatModel,
    batch_size: usize,
}

impl LocalBackend {
    /// Loads the spec's model, on the stage's GPU for `device: cuda` (see
    /// [`crate::StageContext::device_for`]).
    pub fn load(spec: &OracleSpec, ctx: &crate::StageContext) -> Result<LocalBackend, StageError> {
        let workdir = ctx.workdir.as_path();
        let opts = crate::model::LoadOptions {
            device: ctx.device_for(&spec.device),
            dtype: spec.dtype.clone(),
            base: spec.quantize,
            double_quant: spec.double_quant,
            decode_int8: true,
        };
        let model =
            ChatModel::load(&spec.model, workdir, None, &opts).map_err(StageError::Failed)?;
        Ok(LocalBackend {
            model,
            batch_size: spec.batch_size,
        })
    }
}

impl Backend for LocalBackend {
    fn identity(&self) -> String {
        format!("local:{}", self.model.identity())
    }

    fn ask_all(
        &self,
        asks: &[Ask],
        budget: &Budget,
        cancel: &CancelToken,
        done: &(dyn Fn(usize, Result<Completion, AskError>) + Sync),
    ) {
        // Longest prompts together, so a batch pads little.
        let mut order: Vec<usize> = (0..asks.len()).collect();
        let len = |a: &Ask| a.messages.iter().map(|m| m.content.len()).sum::<usize>();
        order.sort_by_key(|&i| std::cmp::Reverse(len(&asks[i])));
        for chunk in order.chunks(self.batch_size) {
            if cancel.is_cancelled() {
                for &i in chunk {
                    done(i, Err(AskError::Cancelled));
                }
                continue;
            }
            let reserve: f64 = chunk.iter().map(|&i| budget.worst_case(&asks[i])).sum();
            if let Err(e) = budget.reserve(reserve) {
                for &i in chunk {
                    done(i, Err(e.clone()));
                }
                continue;
            }
            let reqs: Vec<ChatRequest> = chunk
                .iter()
                .map(|&i| ChatRequest {
                    messages: asks[i].messages.clone(),
                    sampling: asks[i].sampling.clone(),
                    seed: asks[i].seed,
                    schema: asks[i].schema.clone(),
                    prompt: None,
                })
                .collect();
            match self.model.complete(&reqs) {
                Ok(cs) => {
                    let actual: f64 = cs
                        .iter()
                        .map(|c| budget.prices().cost(c.prompt_tokens, c.completion_tokens))
                        .sum();
                    budget.settle(reserve, actual);
                    for (c, &i) in cs.into_iter().zip(chunk) {
                        done(i, Ok(c));
                    }
                }
                Err(e) => {
                    budget.settle(reserve, 0.0);
                    for &i in chunk {
                        done(i, Err(AskError::Fatal(e.clone())));
                    }
                }
            }
        }
    }
}
