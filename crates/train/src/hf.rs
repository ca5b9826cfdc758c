//! `export --format hf`: a Mixlab model as a Hugging Face `transformers` checkpoint that
//! `AutoModelForCausalLM` / `AutoModelForMaskedLM.from_pretrained(dir)` load with no code of
//! ours, plus a `tokenizer.json` that gives Mixlab's ids.
//!
//! - A dense causal model is a `GPT2LMHeadModel`: learned positions, pre-norm, the tied head.
//!   Its `Conv1D` layers keep weights as `[d_in, d_out]`, as Burn's `Linear` does, so they are
//!   copied as they are; `qkv`'s columns are already GPT-2's `[q | k | v]` with heads
//!   contiguous.
//! - An FNet model is an `FNetForMaskedLM`: post-norm Fourier blocks, the embedding LayerNorm
//!   (`model.embedding_norm`) and MLM transform (`model.head_transform`) that class always
//!   has. Its `nn.Linear` weights are `[d_out, d_in]`: transposed.
//!
//! What `transformers` has and the Mixlab model lacks is written so that it changes nothing:
//! zero attention biases (`attention_bias = false`), an identity embedding projection, zero
//! token-type vectors and decoder bias. FNet's pooler, which only `transformers`' next-sentence
//! and classification heads read, is written untrained, initialised as `transformers`
//! initialises it (N(0, 0.02²) from a fixed seed, zero bias). Anything else a class cannot
//! express is refused with the option's name.
//!
//! The expected tensor lists and `config.json` keys were taken from `transformers` 5.25.0
//! (`models/gpt2/modeling_gpt2.py`, `models/fnet/modeling_fnet.py`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use mixlab_models::{Lm, LmConfig, MixerConfig, NormPlacement, Position};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};

/// The `transformers` version the names and configs here were checked against.
pub const TRANSFORMERS_VERSION: &str = "5.25.0";

/// The `transformers` class a model exports as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfClass {
    /// `GPT2LMHeadModel` (dense causal models).
    Gpt2,
    /// `FNetForMaskedLM` (bidirectional FNet models).
    FNet,
}

impl HfClass {
    /// The class name, as `config.json`'s `architectures` gives it.
    pub fn architecture(self) -> &'static str {
        match self {
            HfClass::Gpt2 => "GPT2LMHeadModel",
            HfClass::FNet => "FNetForMaskedLM",
        }
    }
}

fn refuse(option: &str, value: impl std::fmt::Display, class: &str, why: &str) -> anyhow::Error {
    anyhow!("export --format hf: model.{option} = {value}: {class} {why}")
}

/// The class `model` exports as, or an error naming the option no class can express.
pub fn class_of(model: &LmConfig) -> Result<HfClass> {
    let mixers = model.layer_mixers()?;
    let all = |f: fn(&MixerConfig) -> bool| mixers.iter().all(f);
    let class = if all(|m| matches!(m, MixerConfig::Dense(_))) {
        HfClass::Gpt2
    } else if all(|m| matches!(m, MixerConfig::Fourier(_))) {
        HfClass::FNet
    } else if mixers.iter().any(|m| m.kind() != mixers[0].kind()) {
        let option = if model.layers.is_empty() {
            "num_attention_layers"
        } else {
            "layers"
        };
        return Err(anyhow!(
            "export --format hf: model.{option}: a hybrid of {} layers; transformers' GPT2LMHeadModel \
             and FNetForMaskedLM have one kind of layer throughout. Use the default export \
             (safetensors with Mixlab's names)",
            mixers
                .iter()
                .map(|m| m.kind())
                .collect::<Vec<_>>()
                .join("/")
        ));
    } else {
        let kind = mixers[0].kind();
        return Err(refuse(
            "mixer.kind",
            format!("\"{kind}\""),
            "has no transformers class:",
            "--format hf writes dense attention models as GPT2LMHeadModel and FNet models as \
             FNetForMaskedLM; use the default export (safetensors with Mixlab's names)",
        ));
    };
    let name = class.architecture();
    let causal = model.is_causal();
    match class {
        HfClass::Gpt2 if !causal => {
            return Err(refuse(
                "mixer.causal",
                false,
                name,
                "is a causal language model",
            ));
        }
        HfClass::FNet if causal => {
            return Err(refuse(
                "mixer.causal",
                true,
                name,
                "mixes the whole window (Re(FFT2)) in both directions; a causal FNet has no \
                 transformers class",
            ));
        }
        _ => {}
    }
    if model.cache.is_some() {
        return Err(refuse(
            "cache",
            "{ .. }",
            name,
            "has no cache of earlier blocks",
        ));
    }
    if model.position != Position::Learned {
        let value = serde_json::to_string(&model.position)?;
        return Err(refuse(
            "position",
            value,
            name,
            "has learned absolute positions only",
        ));
    }
    let want_norm = match class {
        HfClass::Gpt2 => NormPlacement::Pre,
        HfClass::FNet => NormPlacement::Post,
    };
    if model.norm != want_norm {
        let value = serde_json::to_string(&model.norm)?;
        let is = if want_norm == NormPlacement::Pre {
            "is pre-norm (x + f(LN(x)), a final LayerNorm)"
        } else {
            "is post-norm (LN(x + f(x)))"
        };
        return Err(refuse("norm", value, name, is));
    }
    if !model.tie_embeddings {
        return Err(refuse(
            "tie_embeddings",
            false,
            name,
            "scores with its word embedding (tied output layer); train with tie_embeddings = \
             true",
        ));
    }
    if model.adaptive.is_some() {
        return Err(refuse(
            "adaptive",
            "{ .. }",
            name,
            "has a full softmax, not an adaptive one",
        ));
    }
    if model.d_ff == 0 {
        return Err(refuse(
            "d_ff",
            0,
            name,
            "has a feed-forward sublayer in every block",
        ));
    }
    match class {
        HfClass::Gpt2 => {
            for (option, on) in [
                ("head_bias", model.head_bias),
                ("embedding_norm", model.embedding_norm),
                ("embedding_projection", model.embedding_projection),
                ("head_transform", model.head_transform),
                ("token_types", model.token_types > 0),
            ] {
                if on {
                    let value = if option == "token_types" {
                        model.token_types.to_string()
                    } else {
                        "true".into()
                    };
                    return Err(refuse(
                        option,
                        value,
                        name,
                        "has no such part (GPT-2: word + position embeddings, pre-norm blocks, \
                         final LayerNorm, tied head without a bias)",
                    ));
                }
            }
        }
        HfClass::FNet => {
            for (option, on) in [
                ("embedding_norm", model.embedding_norm),
                ("head_transform", model.head_transform),
            ] {
                if !on {
                    return Err(refuse(
                        option,
                        false,
                        name,
                        "always has it (FNet as published: configs/fnet-paper.toml sets \
                         embedding_norm and head_transform)",
                    ));
                }
            }
        }
    }
    Ok(class)
}

/// One tensor as raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    fn from_view(view: &TensorView) -> Self {
        RawTensor {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        }
    }

    /// The `[a, b]` matrix as `[b, a]`.
    fn transposed(&self) -> Self {
        let [a, b] = self.shape[..] else {
            panic!("transpose of a {:?} tensor", self.shape)
        };
        let size = self.dtype.bitsize() / 8;
        let mut data = vec![0u8; self.data.len()];
        for i in 0..a {
            for j in 0..b {
                let from = (i * b + j) * size;
                let to = (j * a + i) * size;
                data[to..to + size].copy_from_slice(&self.data[from..from + size]);
            }
        }
        RawTensor {
            dtype: self.dtype,
            shape: vec![b, a],
            data,
        }
    }

    /// A tensor of `values` in `dtype` (f32, f16 or bf16).
    fn from_f32(dtype: Dtype, shape: Vec<usize>, values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for &v in values {
            match dtype {
                Dtype::F32 => data.extend(v.to_le_bytes()),
                Dtype::F16 => data.extend(burn::tensor::f16::from_f32(v).to_le_bytes()),
                Dtype::BF16 => data.extend(burn::tensor::bf16::from_f32(v).to_le_bytes()),
                other => panic!("no {other:?} parameters"),
            }
        }
        RawTensor { dtype, shape, data }
    }
}

/// Every parameter of `model` under its Mixlab name (the default export's), as raw bytes.
pub fn mixlab_tensors(model: &Lm) -> Result<Vec<(String, RawTensor)>> {
    let path = std::env::temp_dir().join(format!(
        "mixlab-hf-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    crate::export::to_safetensors(model, &path)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()));
    let _ = std::fs::remove_file(&path);
    let bytes = bytes?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{e}"))?;
    let mut out: Vec<(String, RawTensor)> = file
        .tensors()
        .iter()
        .map(|(name, view)| (name.clone(), RawTensor::from_view(view)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The `transformers` name of Mixlab's parameter `name` in `class`, and whether its matrix is
/// transposed there; `None` for a parameter the class has no place for (a bug: [`class_of`]
/// refuses such models).
pub fn hf_name(class: HfClass, name: &str) -> Option<(String, bool)> {
    let norm = |prefix: &str, rest: &str| match rest {
        "gamma" => Some(format!("{prefix}.weight")),
        "beta" => Some(format!("{prefix}.bias")),
        _ => None,
    };
    if name == "tied_bias" {
        return (class == HfClass::FNet).then(|| ("cls.predictions.bias".into(), false));
    }
    let (head, rest) = name.split_once('.')?;
    match class {
        HfClass::Gpt2 => {
            let plain = |s: Option<String>| s.map(|s| (s, false));
            match head {
                "token_embedding" if rest == "weight" => {
                    plain(Some("transformer.wte.weight".into()))
                }
                "pos_embedding" if rest == "weight" => plain(Some("transformer.wpe.weight".into())),
                "norm_final" => plain(norm("transformer.ln_f", rest)),
                "blocks" => {
                    let (i, rest) = rest.split_once('.')?;
                    let (part, leaf) = rest.rsplit_once('.')?;
                    let layer = format!("transformer.h.{i}");
                    plain(match part {
                        "norm_mixer" => norm(&format!("{layer}.ln_1"), leaf),
                        "norm_mlp" => norm(&format!("{layer}.ln_2"), leaf),
                        "mixer.qkv" => Some(format!("{layer}.attn.c_attn.{leaf}")),
                        "mixer.proj" => Some(format!("{layer}.attn.c_proj.{leaf}")),
                        "mlp.fc" => Some(format!("{layer}.mlp.c_fc.{leaf}")),
                        "mlp.proj" => Some(format!("{layer}.mlp.c_proj.{leaf}")),
                        _ => None,
                    })
                }
                _ => None,
            }
        }
        HfClass::FNet => {
            let embeddings = "fnet.embeddings";
            let linear = |prefix: &str, leaf: &str| match leaf {
                "weight" => Some((format!("{prefix}.weight"), true)),
                "bias" => Some((format!("{prefix}.bias"), false)),
                _ => None,
            };
            let plain = |s: Option<String>| s.map(|s| (s, false));
            match head {
                "token_embedding" if rest == "weight" => {
                    plain(Some(format!("{embeddings}.word_embeddings.weight")))
                }
                "pos_embedding" if rest == "weight" => {
                    plain(Some(format!("{embeddings}.position_embeddings.weight")))
                }
                "type_embedding" if rest == "weight" => {
                    plain(Some(format!("{embeddings}.token_type_embeddings.weight")))
                }
                "embedding_norm" => plain(norm(&format!("{embeddings}.LayerNorm"), rest)),
                "embedding_projection" => linear(&format!("{embeddings}.projection"), rest),
                "head_transform" => {
                    let (part, leaf) = rest.split_once('.')?;
                    match part {
                        "dense" => linear("cls.predictions.transform.dense", leaf),
                        "norm" => plain(norm("cls.predictions.transform.LayerNorm", leaf)),
                        _ => None,
                    }
                }
                "blocks" => {
                    let (i, rest) = rest.split_once('.')?;
                    let (part, leaf) = rest.rsplit_once('.')?;
                    let layer = format!("fnet.encoder.layer.{i}");
                    match part {
                        "norm_mixer" => {
                            plain(norm(&format!("{layer}.fourier.output.LayerNorm"), leaf))
                        }
                        "norm_mlp" => plain(norm(&format!("{layer}.output.LayerNorm"), leaf)),
                        "mlp.fc" => linear(&format!("{layer}.intermediate.dense"), leaf),
                        "mlp.proj" => linear(&format!("{layer}.output.dense"), leaf),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
    }
}

/// The checkpoint `transformers` loads: every tensor of `class` by its name, Mixlab's
/// parameters renamed (and transposed where the layouts differ), the parts the model lacks
/// written as the neutral values of the module doc.
pub fn hf_tensors(config: &LmConfig, model: &Lm) -> Result<Vec<(String, RawTensor)>> {
    let class = class_of(config)?;
    let mut out: Vec<(String, RawTensor)> = vec![];
    let mut dtype = Dtype::F32;
    for (name, tensor) in mixlab_tensors(model)? {
        let (hf, transpose) = hf_name(class, &name).ok_or_else(|| {
            anyhow!(
                "export --format hf: no {} tensor for Mixlab's {name}",
                class.architecture()
            )
        })?;
        dtype = tensor.dtype;
        out.push((
            hf,
            if transpose {
                tensor.transposed()
            } else {
                tensor
            },
        ));
    }
    let d = config.d_model;
    let has = |out: &[(String, RawTensor)], name: &str| out.iter().any(|(n, _)| n == name);
    let mut neutral: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    match class {
        HfClass::Gpt2 => {
            for i in 0..config.n_layers {
                for (name, width) in [("c_attn", 3 * d), ("c_proj", d)] {
                    let full = format!("transformer.h.{i}.attn.{name}.bias");
                    if !has(&out, &full) {
                        neutral.push((full, vec![width], vec![0.0; width]));
                    }
                }
            }
        }
        HfClass::FNet => {
            let vocab = config.vocab_size.context("model.vocab_size")?;
            if !has(&out, "fnet.embeddings.projection.weight") {
                let mut identity = vec![0.0; d * d];
                for i in 0..d {
                    identity[i * d + i] = 1.0;
                }
                neutral.push((
                    "fnet.embeddings.projection.weight".into(),
                    vec![d, d],
                    identity,
                ));
                neutral.push((
                    "fnet.embeddings.projection.bias".into(),
                    vec![d],
                    vec![0.0; d],
                ));
            }
            if !has(&out, "fnet.embeddings.token_type_embeddings.weight") {
                let types = FNET_TOKEN_TYPES;
                neutral.push((
                    "fnet.embeddings.token_type_embeddings.weight".into(),
                    vec![types, d],
                    vec![0.0; types * d],
                ));
            }
            if !has(&out, "cls.predictions.bias") {
                neutral.push(("cls.predictions.bias".into(), vec![vocab], vec![0.0; vocab]));
            }
            neutral.push((
                "fnet.pooler.dense.weight".into(),
                vec![d, d],
                pooler_init(d * d),
            ));
            neutral.push(("fnet.pooler.dense.bias".into(), vec![d], vec![0.0; d]));
        }
    }
    for (name, shape, values) in neutral {
        out.push((name, RawTensor::from_f32(dtype, shape, &values)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Token types an FNet export has when the model has none (FNet's `type_vocab_size`).
pub const FNET_TOKEN_TYPES: usize = 4;

/// `n` draws of N(0, 0.02²) from a fixed seed (SplitMix64 and Box–Muller): the untrained
/// pooler, the same bits on every export.
fn pooler_init(n: usize) -> Vec<f32> {
    let mut state = 0x4D49_584C_4142_u64; // "MIXLAB"
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (1.0 - next(), next());
            let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
            (0.02 * z) as f32
        })
        .collect()
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// `config.json` for `class` from the model's configuration (`dtype`: the tensors').
pub fn hf_config(config: &LmConfig, dtype: Dtype) -> Result<Value> {
    let class = class_of(config)?;
    let vocab = config.vocab_size.context("model.vocab_size")?;
    let d = config.d_model;
    let common = json!({
        "architectures": [class.architecture()],
        "vocab_size": vocab,
        "initializer_range": mixlab_models::init::STD,
        "tie_word_embeddings": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "dtype": dtype_name(dtype),
        "transformers_version": TRANSFORMERS_VERSION,
    });
    let specific = match class {
        HfClass::Gpt2 => {
            let MixerConfig::Dense(attn) = &config.layer_mixers()?[0] else {
                unreachable!("class_of: dense")
            };
            json!({
                "model_type": "gpt2",
                "n_positions": config.seq_len,
                "n_embd": d,
                "n_layer": config.n_layers,
                "n_head": attn.n_heads,
                "n_inner": config.d_ff,
                "activation_function": config.activation.hf_name(),
                "resid_pdrop": config.dropout,
                "embd_pdrop": config.dropout,
                "attn_pdrop": config.dropout,
                "layer_norm_epsilon": LAYER_NORM_EPS,
                "scale_attn_weights": true,
                "scale_attn_by_inverse_layer_idx": false,
                "reorder_and_upcast_attn": false,
                "use_cache": true,
            })
        }
        HfClass::FNet => json!({
            "model_type": "fnet",
            "hidden_size": d,
            "num_hidden_layers": config.n_layers,
            "intermediate_size": config.d_ff,
            "hidden_act": config.activation.hf_name(),
            "hidden_dropout_prob": config.dropout,
            "max_position_embeddings": config.seq_len,
            "type_vocab_size": if config.token_types > 0 { config.token_types } else { FNET_TOKEN_TYPES },
            "layer_norm_eps": LAYER_NORM_EPS,
            "use_tpu_fourier_optimizations": false,
            "tpu_short_seq_length": config.seq_len,
        }),
    };
    let mut out = common;
    for (k, v) in specific.as_object().expect("object") {
        out[k] = v.clone();
    }
    Ok(out)
}

/// Burn's LayerNorm epsilon, which every Mixlab LayerNorm uses.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// What [`write`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The class.
    pub class: HfClass,
    /// Every tensor: name, dtype, shape.
    pub tensors: Vec<(String, String, Vec<usize>)>,
    /// Whether a `tokenizer.json` was written.
    pub tokenizer: bool,
}

/// Write `dir/config.json`, `dir/model.safetensors` and, for a text corpus, `dir/tokenizer.json`
/// with `dir/tokenizer_config.json` (`mask`: the masked objective's `[MASK]` id). Each file is
/// written to a temporary name and renamed, so a failed export leaves no half-written file.
pub fn write(
    dir: &Path,
    config: &LmConfig,
    model: &Lm,
    tokenizer: Option<&mixlab_data::Tokenizer>,
    mask: bool,
) -> Result<Written> {
    let class = class_of(config)?;
    let tensors = hf_tensors(config, model)?;
    let dtype = tensors.first().map_or(Dtype::F32, |(_, t)| t.dtype);
    let json = hf_config(config, dtype)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let put = |name: &str, write: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        write(&tmp)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    };
    put("model.safetensors", &|path| {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, t)| {
                Ok((
                    n.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
                ))
            })
            .collect::<Result<_, safetensors::SafeTensorError>>()
            .map_err(|e| anyhow!("{e}"))?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), path)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
    })?;
    put("config.json", &|path| {
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    })?;
    if let Some(tokenizer) = tokenizer {
        let hf = tokenizer
            .to_hf(mask)
            .map_err(|e| anyhow!("cannot build the Hugging Face tokenizer: {e}"))?;
        let text = hf.to_string(true).map_err(|e| anyhow!("{e}"))?;
        put("tokenizer.json", &|path| {
            std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))
        })?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.seq_len,
            "clean_up_tokenization_spaces": false,
        });
        if mask {
            tc["mask_token"] = json!(mixlab_data::hf::MASK);
        }
        if let Some(unk) = unknown_token(tokenizer) {
            tc["unk_token"] = json!(unk);
        }
        put("tokenizer_config.json", &|path| {
            std::fs::write(path, serde_json::to_string_pretty(&tc)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))
        })?;
    }
    Ok(Written {
        class,
        tensors: tensors
            .iter()
            .map(|(n, t)| (n.clone(), format!("{:?}", t.dtype), t.shape.clone()))
            .collect(),
        tokenizer: tokenizer.is_some(),
    })
}

fn unknown_token(tokenizer: &mixlab_data::Tokenizer) -> Option<&'static str> {
    match tokenizer {
        mixlab_data::Tokenizer::Char { unknown: true, .. } => Some(mixlab_data::hf::CHAR_UNK),
        mixlab_data::Tokenizer::Word(words) => words
            .id(mixlab_data::text::UNK)
            .map(|_| mixlab_data::text::UNK),
        _ => None,
    }
}

/// Read an export of [`write`] back into `model` (a model of `config`, whose values are
/// replaced): each Mixlab parameter from its `transformers` tensor, transposed back; the
/// neutral parts are not read. The round trip of the tests.
pub fn read(dir: &Path, config: &LmConfig, model: Lm) -> Result<Lm> {
    let class = class_of(config)?;
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut mixlab: Vec<(String, RawTensor)> = vec![];
    for (name, template) in mixlab_tensors(&model)? {
        let (hf, transpose) = hf_name(class, &name)
            .ok_or_else(|| anyhow!("no {} tensor for Mixlab's {name}", class.architecture()))?;
        let view = file
            .tensor(&hf)
            .map_err(|e| anyhow!("{}: {hf}: {e}", path.display()))?;
        let raw = RawTensor::from_view(&view);
        let raw = if transpose { raw.transposed() } else { raw };
        if raw.shape != template.shape || raw.dtype != template.dtype {
            bail!(
                "{}: {hf} is {:?} {:?}, Mixlab's {name} is {:?} {:?}",
                path.display(),
                raw.dtype,
                raw.shape,
                template.dtype,
                template.shape
            );
        }
        mixlab.push((name, raw));
    }
    let tmp = std::env::temp_dir().join(format!(
        "mixlab-hf-read-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    let views: Vec<(String, TensorView)> = mixlab
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{e}"))?;
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| anyhow!("{e}"))?;
    let loaded = crate::export::from_safetensors(model, &tmp);
    let _ = std::fs::remove_file(&tmp);
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use mixlab_models::{Activation, DenseAttentionConfig, mixer::FourierMixerConfig};

    /// What `transformers` 5.25.0 keeps in the state dict of `GPT2LMHeadModel` (vocab 11, 8
    /// positions, d 16, 2 layers, d_ff 32; `modeling_gpt2.py`), `{i}` for each layer. Its
    /// `lm_head.weight` is tied to `transformer.wte.weight` and not stored.
    const GPT2_TENSORS: &[(&str, &[usize])] = &[
        ("transformer.wte.weight", &[11, 16]),
        ("transformer.wpe.weight", &[8, 16]),
        ("transformer.h.{i}.ln_1.weight", &[16]),
        ("transformer.h.{i}.ln_1.bias", &[16]),
        ("transformer.h.{i}.attn.c_attn.weight", &[16, 48]),
        ("transformer.h.{i}.attn.c_attn.bias", &[48]),
        ("transformer.h.{i}.attn.c_proj.weight", &[16, 16]),
        ("transformer.h.{i}.attn.c_proj.bias", &[16]),
        ("transformer.h.{i}.ln_2.weight", &[16]),
        ("transformer.h.{i}.ln_2.bias", &[16]),
        ("transformer.h.{i}.mlp.c_fc.weight", &[16, 32]),
        ("transformer.h.{i}.mlp.c_fc.bias", &[32]),
        ("transformer.h.{i}.mlp.c_proj.weight", &[32, 16]),
        ("transformer.h.{i}.mlp.c_proj.bias", &[16]),
        ("transformer.ln_f.weight", &[16]),
        ("transformer.ln_f.bias", &[16]),
    ];

    /// The same for `FNetForMaskedLM` (`modeling_fnet.py`, type_vocab_size 4). Its
    /// `cls.predictions.decoder.weight` / `.bias` are tied to the word embedding and
    /// `cls.predictions.bias` and not stored.
    const FNET_TENSORS: &[(&str, &[usize])] = &[
        ("fnet.embeddings.word_embeddings.weight", &[11, 16]),
        ("fnet.embeddings.position_embeddings.weight", &[8, 16]),
        ("fnet.embeddings.token_type_embeddings.weight", &[4, 16]),
        ("fnet.embeddings.LayerNorm.weight", &[16]),
        ("fnet.embeddings.LayerNorm.bias", &[16]),
        ("fnet.embeddings.projection.weight", &[16, 16]),
        ("fnet.embeddings.projection.bias", &[16]),
        (
            "fnet.encoder.layer.{i}.fourier.output.LayerNorm.weight",
            &[16],
        ),
        (
            "fnet.encoder.layer.{i}.fourier.output.LayerNorm.bias",
            &[16],
        ),
        (
            "fnet.encoder.layer.{i}.intermediate.dense.weight",
            &[32, 16],
        ),
        ("fnet.encoder.layer.{i}.intermediate.dense.bias", &[32]),
        ("fnet.encoder.layer.{i}.output.dense.weight", &[16, 32]),
        ("fnet.encoder.layer.{i}.output.dense.bias", &[16]),
        ("fnet.encoder.layer.{i}.output.LayerNorm.weight", &[16]),
        ("fnet.encoder.layer.{i}.output.LayerNorm.bias", &[16]),
        ("fnet.pooler.dense.weight", &[16, 16]),
        ("fnet.pooler.dense.bias", &[16]),
        ("cls.predictions.bias", &[11]),
        ("cls.predictions.transform.dense.weight", &[16, 16]),
        ("cls.predictions.transform.dense.bias", &[16]),
        ("cls.predictions.transform.LayerNorm.weight", &[16]),
        ("cls.predictions.transform.LayerNorm.bias", &[16]),
    ];

    fn expected(list: &[(&str, &[usize])], layers: usize) -> Vec<(String, String, Vec<usize>)> {
        let mut out = vec![];
        for (name, shape) in list {
            let names: Vec<String> = if name.contains("{i}") {
                (0..layers)
                    .map(|i| name.replace("{i}", &i.to_string()))
                    .collect()
            } else {
                vec![name.to_string()]
            };
            for n in names {
                out.push((n, "F32".to_string(), shape.to_vec()));
            }
        }
        out.sort();
        out
    }

    fn gpt2() -> LmConfig {
        LmConfig {
            vocab_size: Some(11),
            d_model: 16,
            n_layers: 2,
            d_ff: 32,
            seq_len: 8,
            mixer: MixerConfig::Dense(DenseAttentionConfig {
                n_heads: 2,
                causal: true,
            }),
            ..LmConfig::default()
        }
    }

    fn fnet_paper() -> LmConfig {
        LmConfig {
            norm: NormPlacement::Post,
            activation: Activation::GeluNew,
            token_types: 4,
            embedding_norm: true,
            embedding_projection: true,
            head_transform: true,
            head_bias: true,
            mixer: MixerConfig::Fourier(FourierMixerConfig::default()),
            ..gpt2()
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mixlab-hf-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn written(dir: &Path) -> Vec<(String, String, Vec<usize>)> {
        let mut names: Vec<(String, String, Vec<usize>)> =
            crate::export::tensor_names(&dir.join("model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(n, d, s)| (n, d, s.into_iter().map(|x| x as usize).collect()))
                .collect();
        names.sort();
        names
    }

    fn logits(model: &Lm, device: &Device) -> Vec<f32> {
        let ids: Vec<i64> = (0..16).map(|i| (i * 7 + 3) % 11).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 8]), device);
        model
            .forward(tokens)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// Both classes: every tensor `transformers` expects, by name, shape and dtype, and nothing
    /// else; `config.json`'s keys and values from the model; and the export read back
    /// rebuilds the same model (same parameters, same logits).
    #[test]
    fn exports_have_transformers_tensors_and_config_and_read_back() {
        let device = Device::flex();
        for (class, config, list) in [
            (HfClass::Gpt2, gpt2(), GPT2_TENSORS),
            (HfClass::FNet, fnet_paper(), FNET_TENSORS),
        ] {
            let dir = scratch(class.architecture());
            device.seed(7);
            let model = config.init(&device).unwrap();
            let w = write(&dir, &config, &model, None, false).unwrap();
            assert_eq!(w.class, class);
            assert_eq!(written(&dir), expected(list, 2), "{class:?}");
            let json: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(json["architectures"], json!([class.architecture()]));
            assert_eq!(json["vocab_size"], 11);
            assert_eq!(json["tie_word_embeddings"], true);
            assert_eq!(json["dtype"], "float32");
            let want = match class {
                HfClass::Gpt2 => json!({
                    "model_type": "gpt2", "n_positions": 8, "n_embd": 16, "n_layer": 2,
                    "n_head": 2, "n_inner": 32, "activation_function": "gelu",
                    "layer_norm_epsilon": 1e-5, "scale_attn_weights": true,
                    "scale_attn_by_inverse_layer_idx": false, "reorder_and_upcast_attn": false,
                }),
                HfClass::FNet => json!({
                    "model_type": "fnet", "hidden_size": 16, "num_hidden_layers": 2,
                    "intermediate_size": 32, "hidden_act": "gelu_new",
                    "max_position_embeddings": 8, "type_vocab_size": 4, "layer_norm_eps": 1e-5,
                    "use_tpu_fourier_optimizations": false,
                }),
            };
            for (k, v) in want.as_object().unwrap() {
                assert_eq!(&json[k], v, "{class:?} config.json {k}");
            }
            device.seed(8);
            let fresh = config.init(&device).unwrap();
            assert_ne!(logits(&fresh, &device), logits(&model, &device));
            let back = read(&dir, &config, fresh).unwrap();
            assert_eq!(
                crate::export::parameter_values(&back),
                crate::export::parameter_values(&model),
                "{class:?}"
            );
            assert_eq!(logits(&back, &device), logits(&model, &device), "{class:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Layouts: GPT-2's Conv1D keeps Burn's `[d_in, d_out]`, FNet's `nn.Linear` is
    /// transposed; parts the model lacks are neutral (zero attention biases, an identity
    /// projection, zero token types and decoder bias); the pooler is the fixed-seed init.
    #[test]
    fn layouts_and_neutral_parts() {
        let device = Device::flex();
        let f32s = |t: &RawTensor| -> Vec<f32> {
            t.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let find = |all: &[(String, RawTensor)], name: &str| {
            all.iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name}"))
                .1
                .clone()
        };
        device.seed(3);
        let config = LmConfig {
            attention_bias: false,
            ..gpt2()
        };
        let model = config.init(&device).unwrap();
        let ours = mixlab_tensors(&model).unwrap();
        let theirs = hf_tensors(&config, &model).unwrap();
        assert_eq!(
            find(&theirs, "transformer.h.1.mlp.c_fc.weight"),
            find(&ours, "blocks.1.mlp.fc.weight")
        );
        for name in ["c_attn", "c_proj"] {
            let bias = find(&theirs, &format!("transformer.h.0.attn.{name}.bias"));
            assert!(f32s(&bias).iter().all(|&x| x == 0.0), "{name}");
        }
        // FNet without the optional parts, and its transposed layout.
        let config = LmConfig {
            embedding_projection: false,
            token_types: 0,
            head_bias: false,
            ..fnet_paper()
        };
        let model = config.init(&device).unwrap();
        let ours = mixlab_tensors(&model).unwrap();
        let theirs = hf_tensors(&config, &model).unwrap();
        let fc = find(&ours, "blocks.0.mlp.fc.weight"); // [16, 32]
        let dense = find(&theirs, "fnet.encoder.layer.0.intermediate.dense.weight"); // [32, 16]
        assert_eq!(dense.shape, [32, 16]);
        let (a, b) = (f32s(&fc), f32s(&dense));
        for i in 0..16 {
            for j in 0..32 {
                assert_eq!(a[i * 32 + j], b[j * 16 + i]);
            }
        }
        let projection = f32s(&find(&theirs, "fnet.embeddings.projection.weight"));
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(projection[i * 16 + j], f32::from(i == j));
            }
        }
        for name in [
            "fnet.embeddings.projection.bias",
            "fnet.embeddings.token_type_embeddings.weight",
            "cls.predictions.bias",
            "fnet.pooler.dense.bias",
        ] {
            assert!(
                f32s(&find(&theirs, name)).iter().all(|&x| x == 0.0),
                "{name}"
            );
        }
        let pooler = f32s(&find(&theirs, "fnet.pooler.dense.weight"));
        let mean = pooler.iter().sum::<f32>() / 256.0;
        let std = (pooler.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 256.0).sqrt();
        assert!(
            mean.abs() < 0.004 && (0.015..0.025).contains(&std),
            "{mean} {std}"
        );
        assert_eq!(
            hf_tensors(&config, &model).unwrap(),
            theirs,
            "the same bits every time"
        );
    }

    /// Every option a class cannot express is refused, the message naming the option, the
    /// format and the class.
    #[test]
    fn inexpressible_options_are_refused_by_name() {
        use mixlab_models::{CacheConfig, adaptive::AdaptiveConfig};
        let cases: Vec<(&str, LmConfig, &str)> = vec![
            (
                "model.position",
                LmConfig {
                    position: Position::Rope,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.norm",
                LmConfig {
                    norm: NormPlacement::Post,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.tie_embeddings",
                LmConfig {
                    tie_embeddings: false,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.head_bias",
                LmConfig {
                    head_bias: true,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.embedding_norm",
                LmConfig {
                    embedding_norm: true,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.head_transform",
                LmConfig {
                    head_transform: true,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.token_types",
                LmConfig {
                    token_types: 2,
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.d_ff",
                LmConfig { d_ff: 0, ..gpt2() },
                "GPT2LMHeadModel",
            ),
            (
                "model.cache",
                LmConfig {
                    position: Position::None,
                    cache: Some(CacheConfig {
                        span: 8,
                        ..Default::default()
                    }),
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.adaptive",
                LmConfig {
                    adaptive: Some(AdaptiveConfig {
                        cutoffs: vec![4],
                        ..Default::default()
                    }),
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.mixer.causal",
                LmConfig {
                    mixer: MixerConfig::Dense(DenseAttentionConfig {
                        n_heads: 2,
                        causal: false,
                    }),
                    ..gpt2()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.mixer.causal",
                LmConfig {
                    mixer: MixerConfig::Fourier(FourierMixerConfig {
                        causal: true,
                        ..Default::default()
                    }),
                    ..fnet_paper()
                },
                "FNetForMaskedLM",
            ),
            (
                "model.norm",
                LmConfig {
                    norm: NormPlacement::Pre,
                    ..fnet_paper()
                },
                "FNetForMaskedLM",
            ),
            (
                "model.embedding_norm",
                LmConfig {
                    embedding_norm: false,
                    ..fnet_paper()
                },
                "FNetForMaskedLM",
            ),
            (
                "model.head_transform",
                LmConfig {
                    head_transform: false,
                    ..fnet_paper()
                },
                "FNetForMaskedLM",
            ),
            (
                "model.num_attention_layers",
                LmConfig {
                    num_attention_layers: 1,
                    ..fnet_paper()
                },
                "GPT2LMHeadModel",
            ),
            (
                "model.mixer.kind",
                LmConfig {
                    mixer: MixerConfig::Sparse(Default::default()),
                    ..gpt2()
                },
                "FNetForMaskedLM",
            ),
        ];
        for (option, config, class) in cases {
            let err = class_of(&config).unwrap_err().to_string();
            assert!(
                err.contains(option) && err.contains("--format hf") && err.contains(class),
                "{option}: {err}"
            );
        }
        assert_eq!(class_of(&gpt2()).unwrap(), HfClass::Gpt2);
        assert_eq!(class_of(&fnet_paper()).unwrap(), HfClass::FNet);
    }

    /// The exported `tokenizer.json` (read by the `tokenizers` crate, as `transformers` reads
    /// it) encodes text to Mixlab's ids, `[MASK]` included; `tokenizer_config.json` names it.
    #[test]
    fn the_exported_tokenizer_gives_mixlabs_ids() {
        let device = Device::flex();
        let text = "the cat sat on the mat\nthe dog sat\n";
        let words = mixlab_data::Tokenizer::Word(mixlab_data::WordVocab::from_train(text));
        let config = LmConfig {
            vocab_size: Some(words.vocab_size() + 1),
            ..fnet_paper()
        };
        let dir = scratch("tokenizer");
        let model = config.init(&device).unwrap();
        write(&dir, &config, &model, Some(&words), true).unwrap();
        let hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let sample = "the dog sat on the cat\n";
        let ids = hf.encode(sample, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, words.encode(sample));
        let mask = words.vocab_size() as u32;
        assert_eq!(hf.token_to_id(mixlab_data::hf::MASK), Some(mask));
        let tc: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["mask_token"], "[MASK]");
        assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
