//! The data family: stages that turn raw datasets into the JSONL records the other
//! stages read. [`build_data`] reads native formats through [`readers`] (one file per
//! dataset), attaches BM25 evidence and mines hard negatives ([`bm25`]); [`split`]
//! makes a leak-free, hash-stable, stratified train/val/test split. New dataset
//! readers (MedQA, BoolQ, FinQA...) go in [`readers`]; new data-shaping stages
//! (candidate pools, tagging) go beside these.

pub mod bm25;
pub mod build_data;
pub mod dot_pairs;
pub mod hub;
pub mod readers;
pub mod split;
