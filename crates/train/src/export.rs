//! Weight export to safetensors (through burn-store), so PyTorch users can load a Mixlab model
//! with `safetensors.torch.load_file`, and import back into the same architecture.
//!
//! Tensor names are the module paths, dot-separated, e.g. `token_embedding.weight`,
//! `blocks.0.norm_mixer.gamma`, `blocks.0.mixer.qkv.weight` (the mixer enum variant is not part
//! of the name), `blocks.0.mlp.fc.weight`, `norm_final.gamma`, `head.weight`. Linear weights are
//! stored as Burn keeps them, `[d_input, d_output]` (the transpose of PyTorch's `nn.Linear`).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use mixlab_models::Lm;

/// Write `model`'s parameters to a safetensors file.
pub fn to_safetensors(model: &Lm, path: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path.to_path_buf())
        .skip_enum_variants(true)
        .metadata("producer", "mixlab");
    model
        .save_into(&mut store)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// Load a safetensors file written by [`to_safetensors`] into `model` (same architecture).
pub fn from_safetensors(mut model: Lm, path: &Path) -> Result<Lm> {
    let mut store = SafetensorsStore::from_file(path.to_path_buf()).skip_enum_variants(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(anyhow!(
            "{} does not fit this architecture: {} errors, missing {:?}",
            path.display(),
            result.errors.len(),
            result.missing
        ));
    }
    Ok(model)
}

/// Every float parameter of `model` as f32, in module order (for exact comparisons).
pub fn parameter_values(model: &Lm) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0
                .extend(data.try_to_vec::<f32>().expect("f32 after convert"));
        }
    }
    let mut c = Collect(vec![]);
    model.visit(&mut c);
    c.0
}

/// Names, dtypes and shapes of the tensors in a safetensors file, from its JSON header.
pub fn tensor_names(path: &Path) -> Result<Vec<(String, String, Vec<u64>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = u64::from_le_bytes(bytes.get(..8).context("file too short")?.try_into()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8 + len).context("truncated header")?)?;
    let mut out = vec![];
    for (name, info) in header.as_object().context("header is not an object")? {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?").to_string();
        let shape = info["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        out.push((name.clone(), dtype, shape));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use mixlab_models::LmConfig;

    #[test]
    fn safetensors_round_trip_with_documented_names() {
        let device = Device::flex();
        let cfg = LmConfig {
            vocab_size: Some(20),
            d_model: 16,
            n_layers: 2,
            d_ff: 32,
            seq_len: 8,
            tie_embeddings: false,
            ..LmConfig::default()
        };
        device.seed(1);
        let model = cfg.init(&device).unwrap();
        let path =
            std::env::temp_dir().join(format!("mixlab-export-{}.safetensors", std::process::id()));
        to_safetensors(&model, &path).unwrap();
        device.seed(2);
        let fresh = cfg.init(&device).unwrap();
        assert_ne!(parameter_values(&fresh), parameter_values(&model));
        let loaded = from_safetensors(fresh, &path).unwrap();
        assert_eq!(parameter_values(&loaded), parameter_values(&model));
        let names: Vec<String> = tensor_names(&path)
            .unwrap()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        for expected in [
            "token_embedding.weight",
            "pos_embedding.weight",
            "blocks.0.norm_mixer.gamma",
            "blocks.0.mixer.qkv.weight",
            "blocks.1.mlp.fc.weight",
            "norm_final.gamma",
            "head.weight",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        // Another architecture is refused.
        let other = LmConfig { d_model: 32, ..cfg }.init(&device).unwrap();
        assert!(from_safetensors(other, &path).is_err());
    }
}
