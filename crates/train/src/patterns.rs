//! The sparse attention patterns of a config: Yun et al.'s Assumption-1 report (printed by
//! `train` at start and by the `pattern` command) and a PNG picture of each layer's pattern.

use std::path::Path;

use anyhow::{Context, Result};
use mixlab_models::LmConfig;
use mixlab_models::mixer::{MixerConfig, SparseAttentionConfig};
use mixlab_models::pattern::LayerPattern;
use mixlab_models::pattern::check::{Report, check};
use serde_json::{Value, json};

/// One sparse mixer of a model (models with one sparse config have one of these).
#[derive(Debug)]
pub struct SparseLayers {
    /// The mixer's settings.
    pub config: SparseAttentionConfig,
    /// The model layers (input first) that use it.
    pub layers: Vec<usize>,
    /// Their patterns over the checked length, in layer order.
    pub patterns: Vec<LayerPattern>,
    /// Assumption 1 for that family (cycled, as if the layers repeated).
    pub report: Report,
}

/// Every distinct sparse mixer of `model` with the model layers (input first) that use it.
pub fn sparse_mixers(model: &LmConfig) -> Result<Vec<(SparseAttentionConfig, Vec<usize>)>> {
    let mut found: Vec<(SparseAttentionConfig, Vec<usize>)> = vec![];
    for (layer, mixer) in model.layer_mixers()?.into_iter().enumerate() {
        if let MixerConfig::Sparse(cfg) = mixer {
            match found.iter_mut().find(|(c, _)| *c == cfg) {
                Some((_, layers)) => layers.push(layer),
                None => found.push((cfg, vec![layer])),
            }
        }
    }
    Ok(found)
}

/// The patterns of `layers` of the sparse mixer `config` over `n` tokens, in layer order.
pub fn layer_patterns(
    config: &SparseAttentionConfig,
    layers: &[usize],
    n: usize,
) -> Vec<LayerPattern> {
    layers.iter().map(|&l| config.layer_pattern(l, n)).collect()
}

/// Every sparse mixer of `model`, with its patterns over `n` tokens and their report.
pub fn sparse_layers(model: &LmConfig, n: usize) -> Result<Vec<SparseLayers>> {
    Ok(sparse_mixers(model)?
        .into_iter()
        .map(|(config, layers)| {
            let patterns = layer_patterns(&config, &layers, n);
            let report = check(&patterns, n);
            SparseLayers {
                config,
                layers,
                patterns,
                report,
            }
        })
        .collect())
}

impl SparseLayers {
    /// Pattern names of one period, e.g. `window | dilated`.
    pub fn names(&self) -> String {
        self.config.pattern_names(" | ")
    }

    /// The human-readable summary: which layers, the report, and whether the model is deep
    /// enough for full reach.
    pub fn describe(&self) -> String {
        let depth = match self.report.reach_layers {
            Some(s) if s <= self.layers.len() => {
                format!(
                    "  the model's {} sparse layer(s) suffice",
                    self.layers.len()
                )
            }
            Some(s) => format!(
                "  the model has only {} sparse layer(s): full reach needs {s}",
                self.layers.len()
            ),
            None => "  no depth gives full reach".to_string(),
        };
        format!(
            "sparse attention [{}], block {}, layers {:?}\n{}\n{depth}",
            self.names(),
            self.config.block,
            self.layers,
            self.report
        )
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": "pattern",
            "pattern": self.names(),
            "block": self.config.block,
            "layers": self.layers,
            "report": self.report,
        })
    }
}

/// Draw `pattern` as a grayscale PNG: one square per head group, query blocks down, key blocks
/// across; black = attended, gray = the causal diagonal block (its upper triangle is masked),
/// white = skipped.
pub fn write_png(path: &Path, pattern: &LayerPattern) -> Result<()> {
    let n = pattern.groups[0].n_blocks;
    let scale = (512 / n.max(1)).max(1);
    let side = n * scale;
    let gap = 8;
    let groups = pattern.groups.len();
    let width = groups * side + (groups - 1) * gap;
    let mut pixels = vec![200u8; width * side];
    for (g, group) in pattern.groups.iter().enumerate() {
        let left = g * (side + gap);
        for y in 0..side {
            pixels[y * width + left..y * width + left + side].fill(255);
        }
        for (i, row) in group.rows.iter().enumerate() {
            for &j in row {
                let shade = if group.causal && i == j { 110 } else { 0 };
                for y in i * scale..(i + 1) * scale {
                    let at = y * width + left + j * scale;
                    pixels[at..at + scale].fill(shade);
                }
            }
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(&pixels)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
