//! Text generation from a trained run: load its config, tokenizer and newest valid checkpoint,
//! then sample token by token with temperature, top-k and top-p (nucleus) filtering from a
//! seeded generator, streaming the text as it comes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Int, Tensor, TensorData};
use mixlab_data::Tokenizer;
use rand::{Rng, SeedableRng};

use crate::checkpoint;
use crate::config::{Config, Objective};
use crate::device::{self, BackendChoice};

/// How to sample.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Text to continue.
    pub prompt: String,
    /// Tokens to generate.
    pub tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = all).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Backend name (`auto`, `flex`, ...).
    pub backend: String,
}

/// Turn `logits` into a probability vector under temperature, top-k and top-p. A temperature of
/// 0 puts all the mass on the arg-max.
pub fn filtered_probs(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<f64> {
    let n = logits.len();
    if temperature <= 0.0 {
        let best = (0..n)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap_or(0);
        return (0..n).map(|i| if i == best { 1.0 } else { 0.0 }).collect();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l - max) / temperature).exp())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let keep_k = if top_k == 0 { n } else { top_k.min(n) };
    let total: f64 = probs.iter().sum();
    let mut kept = vec![false; n];
    let mut mass = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        if rank >= keep_k || (rank > 0 && mass >= top_p * total) {
            break;
        }
        kept[i] = true;
        mass += probs[i];
    }
    for (p, k) in probs.iter_mut().zip(&kept) {
        if !k {
            *p = 0.0;
        }
    }
    let z: f64 = probs.iter().sum();
    probs.iter().map(|p| p / z).collect()
}

/// Generate from the run in `run_dir`, writing the text to `out` as it is produced. Returns
/// the generated token ids.
pub fn sample(run_dir: &Path, opts: &SampleOptions, out: &mut dyn Write) -> Result<Vec<u32>> {
    let config_path = run_dir.join("config.toml");
    let config = Config::load(&config_path, &[])?;
    if config.train.objective != Objective::Causal {
        bail!(
            "{}: sampling needs a model trained with train.objective = \"causal\"",
            config_path.display()
        );
    }
    let tok_path = run_dir.join("tokenizer.json");
    let tokenizer: Tokenizer =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).with_context(|| {
            format!(
                "cannot read {} (sampling needs a text corpus run)",
                tok_path.display()
            )
        })?)
        .with_context(|| format!("{} is not a tokenizer", tok_path.display()))?;
    let (ckpt, manifest) = checkpoint::newest(run_dir, "sample from")?;
    let mut selected = device::select(BackendChoice::parse(&opts.backend)?)?;
    device::set_precision(&mut selected, config.train.precision)?;
    let device = selected.device.clone();
    let model = config.model.init(&device).context("invalid [model]")?;
    let model = checkpoint::load_model(&ckpt, model)?;
    eprintln!(
        "mixlab: sampling from {} (step {}) on {}",
        ckpt.display(),
        manifest.step,
        selected.description
    );

    let mut ids = tokenizer.encode(&opts.prompt);
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens; give --prompt some text");
    }
    let seq_len = config.model.seq_len;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut generated = vec![];
    let mut pending = vec![]; // byte-level output waits for whole UTF-8 characters
    let mut pending_ids = vec![]; // so does BPE output
    write!(out, "{}", opts.prompt)?;
    for _ in 0..opts.tokens {
        let context = &ids[ids.len().saturating_sub(seq_len)..];
        let input: Vec<i64> = context.iter().map(|&t| i64::from(t)).collect();
        let n = input.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(input, [1, n]), &device);
        // The head scores the last position only (an adaptive softmax's whole distribution).
        let last = model.hidden(tokens, None).0.narrow(1, n - 1, 1);
        let logits = model.logits(last); // [1, 1, vocab]
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let probs = filtered_probs(&logits, opts.temperature, opts.top_k, opts.top_p);
        let mut u: f64 = rng.random();
        let mut next = probs.len() - 1;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                next = i;
                break;
            }
            u -= p;
        }
        let next = next as u32;
        ids.push(next);
        generated.push(next);
        match &tokenizer {
            Tokenizer::Byte => {
                pending.push(next as u8);
                if let Ok(text) = std::str::from_utf8(&pending) {
                    write!(out, "{text}")?;
                    pending.clear();
                }
            }
            Tokenizer::Word(_) => {
                let word = tokenizer.decode(&[next]);
                if word == "\n" {
                    writeln!(out)?
                } else {
                    write!(out, " {word}")?
                }
            }
            Tokenizer::Char { .. } => write!(out, "{}", tokenizer.decode(&[next]))?,
            Tokenizer::Bpe(_) => {
                // A token can end inside a UTF-8 character: print once the text is whole
                // (or after 8 tokens that never complete one).
                pending_ids.push(next);
                let text = tokenizer.decode(&pending_ids);
                if !text.ends_with('\u{FFFD}') || pending_ids.len() >= 8 {
                    write!(out, "{text}")?;
                    pending_ids.clear();
                }
            }
        }
        out.flush()?;
    }
    writeln!(out)?;
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_the_right_tokens() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let greedy = filtered_probs(&logits, 0.0, 0, 1.0);
        assert_eq!(greedy, vec![1.0, 0.0, 0.0, 0.0]);
        let all = filtered_probs(&logits, 1.0, 0, 1.0);
        assert!((all.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(all.windows(2).all(|w| w[0] > w[1]));
        let k2 = filtered_probs(&logits, 1.0, 2, 1.0);
        assert!(k2[2] == 0.0 && k2[3] == 0.0 && (k2[0] + k2[1] - 1.0).abs() < 1e-12);
        // p(0) = 0.644 of the mass: top-p 0.5 keeps token 0 only, 0.7 keeps two.
        assert_eq!(
            filtered_probs(&logits, 1.0, 0, 0.5)
                .iter()
                .filter(|&&p| p > 0.0)
                .count(),
            1
        );
        assert_eq!(
            filtered_probs(&logits, 1.0, 0, 0.7)
                .iter()
                .filter(|&&p| p > 0.0)
                .count(),
            2
        );
        // Higher temperature flattens.
        let hot = filtered_probs(&logits, 10.0, 0, 1.0);
        assert!(hot[0] - hot[3] < all[0] - all[3]);
    }
}
