//! Datasets: FewCLUE tasks, prompt templates and verbalizers, preference
//! pairs, and the multiple-choice → preference construction of the paper.
//!
//! - [`jsonl`]: JSON Lines / JSON array records with 1-based line numbers.
//! - [`fewclue`]: the EPRSTMT, TNEWS, OCNLI and BUSTM loaders and label sets.
//! - [`template`]: Table-6-style prompts with lettered options and verbalizers.
//! - [`preference`]: preference-pair files and the multiple-choice construction.
//! - [`formats`]: TRL's dataset types (text, messages, prompt, prompt +
//!   completion, preference), standard or conversational, checked per row.
//! - [`render`]: those rows as token ids and a loss mask, through the
//!   model's chat template.
//! - [`batch`]: prompt truncation, padding, and a resumable seeded shuffler.
//!
//! Corrupt input is an [`Error::DataLine`](crate::Error::DataLine) naming
//! `file:line` and the field, or an [`Error::Data`](crate::Error::Data).

pub mod batch;
pub mod fewclue;
pub mod formats;
pub mod jsonl;
pub mod preference;
pub mod render;
pub mod template;

pub use batch::{truncate_prompt, Shuffler};
pub use fewclue::{label_name_zh, labels, stride_subset, Example, Task};
pub use jsonl::read_records;
pub use preference::{bare_answer_pairs, from_multiple_choice, load_pairs, PreferencePair};
pub use template::{default_template, Template};
