//! Tests of all-attention: naive-loop references, the tiled operation against the composed
//! path, memory gradients, and small models that train.

use super::*;
use crate::mixer::{MixerConfig, MixerContext};
use crate::test_util::{assert_all_close, devices, to_vec, tokens};
use crate::{BlockConfig, LmConfig, Position};
use burn::optim::GradientsParams;
use burn::tensor::Int;

pub(super) fn ctx(d_model: usize, relative: bool) -> MixerContext {
    MixerContext {
        d_model,
        n_layers: 2,
        dropout: 0.0,
        max_seq_len: 8,
        rope_theta: None,
        relative_positions: relative,
        bias: true,
        layer: 0,
        fused_attention: true,
    }
}

pub(super) fn config(n: usize) -> PersistentAttentionConfig {
    PersistentAttentionConfig {
        n_heads: 2,
        n_persistent: Some(n),
        ..Default::default()
    }
}

#[test]
fn without_memory_and_with_absolute_positions_it_is_dense_attention() {
    for (name, device) in devices() {
        device.seed(1);
        let dense = DenseAttentionConfig {
            n_heads: 2,
            causal: true,
        }
        .init(&ctx(8, false), &device);
        let mut layer = config(0).init(&ctx(8, false), &device);
        assert!(layer.persistent_keys.is_none());
        layer.attn = dense.clone();
        let x = Tensor::<3>::random([2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let a = to_vec(dense.forward(x.clone()));
        let b = to_vec(layer.forward(x, None));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-6, "{name}: {p} vs {q}");
        }
    }
}

/// Naive loops: joint softmax over context (with the relative term) and memory.
#[test]
fn weights_and_output_match_naive_loops() {
    for (name, device) in devices() {
        device.seed(4);
        let (b, h, s, dh, n) = (2, 2, 5, 4, 3);
        let layer = config(n).init(&ctx(h * dh, true), &device);
        let q = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
        let pe = Tensor::<2>::random([dh, 8], Distribution::Normal(0.0, 1.0), &device);
        let w = layer.weights(q.clone(), k.clone(), Some(&pe));
        let out = to_vec(layer.combine(w.clone(), v.clone()));
        let w = to_vec(w);
        let (qv, kv, vv, pev) = (to_vec(q), to_vec(k), to_vec(v), to_vec(pe));
        let mk = to_vec(layer.persistent_keys.as_ref().unwrap().val());
        let mv = to_vec(layer.persistent_values.as_ref().unwrap().val());
        let idx4 = |bi: usize, hi: usize, si: usize, d: usize| ((bi * h + hi) * s + si) * dh + d;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..s {
                    let dot = |f: &dyn Fn(usize) -> f64| (0..dh).map(f).sum::<f64>();
                    let mut scores = vec![];
                    for j in 0..=i {
                        let qk = dot(&|d| {
                            f64::from(qv[idx4(bi, hi, i, d)]) * f64::from(kv[idx4(bi, hi, j, d)])
                        });
                        let qp = dot(&|d| {
                            f64::from(qv[idx4(bi, hi, i, d)]) * f64::from(pev[d * 8 + (i - j)])
                        });
                        scores.push(qk + qp);
                    }
                    for m in 0..n {
                        let key =
                            |d: usize| f64::from(mk[(hi * n + m) * dh + d]) * (dh as f64).sqrt();
                        scores.push(dot(&|d| f64::from(qv[idx4(bi, hi, i, d)]) * key(d)));
                    }
                    let scores: Vec<f64> = scores.iter().map(|x| x / (dh as f64).sqrt()).collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    let p: Vec<f64> = scores.iter().map(|x| (x - max).exp() / z).collect();
                    let row = &w
                        [((bi * h + hi) * s + i) * (s + n)..((bi * h + hi) * s + i + 1) * (s + n)];
                    for j in 0..s + n {
                        let expected = if j <= i {
                            p[j]
                        } else if j < s {
                            0.0
                        } else {
                            p[i + 1 + (j - s)]
                        };
                        assert!(
                            (f64::from(row[j]) - expected).abs() < 1e-5,
                            "{name} w[{i},{j}] {} vs {expected}",
                            row[j]
                        );
                    }
                    for d in 0..dh {
                        let mut y: f64 = (0..=i)
                            .map(|j| p[j] * f64::from(vv[idx4(bi, hi, j, d)]))
                            .sum();
                        for m in 0..n {
                            y += p[i + 1 + m]
                                * f64::from(mv[(hi * n + m) * dh + d])
                                * (n as f64).sqrt();
                        }
                        let got = f64::from(out[idx4(bi, hi, i, d)]);
                        assert!((got - y).abs() < 1e-4, "{name} out {got} vs {y}");
                    }
                }
            }
        }
    }
}

#[test]
fn fused_kernel_equals_materialised_weights_path() {
    for (name, device) in devices() {
        for (relative, span) in [(false, false), (true, false), (true, true)] {
            device.seed(8);
            let mut cfg = config(5);
            cfg.adaptive_span = span;
            cfg.span_ramp = 2;
            cfg.span_init = 0.4;
            let layer = cfg.init(&ctx(8, relative), &device);
            let r = |shape: [usize; 4]| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
            };
            let (q, k, v) = (r([3, 2, 7, 4]), r([3, 2, 7, 4]), r([3, 2, 7, 4]));
            let pe = relative
                .then(|| Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device));
            let reference =
                to_vec(layer.combine(layer.weights(q.clone(), k.clone(), pe.as_ref()), v.clone()));
            let fused = to_vec(layer.attend(q, k, v, pe.as_ref()));
            for (a, b) in fused.iter().zip(&reference) {
                assert!(
                    (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "{name} rel={relative} span={span}: {a} vs {b}"
                );
            }
        }
    }
}

/// The tiled operation on flex (tiles of 64 query rows, probabilities recomputed in its
/// backward) against the same attention composed from tensor ops: outputs and the
/// gradients of queries, keys, values, the persistent keys and values, `key_pe` and the
/// span fractions, with 300 tokens (four full tiles and a partial one, two key blocks, key
/// blocks wholly past the span skipped), causal or not, relative positions (causal only)
/// and adaptive span. Scores are scaled up so that the row maximum is sometimes a memory
/// score and sometimes a context one.
#[test]
fn flex_tiled_operation_equals_the_composed_path_in_values_and_gradients() {
    tiled_operation_equals_the_composed_path(&Device::flex().autodiff(), "flex");
}

/// The same through the mixer on wgpu (the CubeCL kernels of `ops/attention/cube/`) against
/// the composed path on the same device.
#[test]
fn cube_tiled_operation_equals_the_composed_path_in_values_and_gradients() {
    let Some(device) = crate::test_util::wgpu() else {
        return;
    };
    assert!(
        crate::mixer::attention_fused_on(&device, 8),
        "all-attention should take the kernels on wgpu"
    );
    tiled_operation_equals_the_composed_path(&device.autodiff(), "wgpu");
}

fn tiled_operation_equals_the_composed_path(device: &Device, name: &str) {
    let device = device.clone();
    for (causal, relative, span) in [
        (true, false, false),
        (false, false, true),
        (true, true, true),
    ] {
        device.seed(9);
        let mut cfg = config(37);
        cfg.causal = causal;
        cfg.adaptive_span = span;
        cfg.span_ramp = 3;
        cfg.span_init = 0.5;
        let mut context = ctx(16, relative);
        context.max_seq_len = 300;
        let layer = cfg.init(&context, &device);
        let r = |shape: [usize; 4], std: f64| {
            Tensor::<4>::random(shape, Distribution::Normal(0.0, std), &device).require_grad()
        };
        let shape = [2, 2, 300, 8];
        let (q, k, v) = (r(shape, 3.0), r(shape, 1.0), r(shape, 1.0));
        let pe = relative.then(|| {
            Tensor::<2>::random([8, 310], Distribution::Normal(0.0, 1.0), &device).require_grad()
        });
        let w = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let y = layer.attend_with(q.clone(), k.clone(), v.clone(), pe.as_ref(), fused);
            let grads = (y.clone() * w.clone()).sum().backward();
            let keys = layer.persistent_keys.as_ref().unwrap().val();
            let values = layer.persistent_values.as_ref().unwrap().val();
            let mut out = vec![to_vec(y)];
            for t in [&q, &k, &v] {
                out.push(to_vec(t.grad(&grads).unwrap()));
            }
            out.push(to_vec(keys.grad(&grads).unwrap()));
            out.push(to_vec(values.grad(&grads).unwrap()));
            if let Some(pe) = &pe {
                out.push(to_vec(pe.grad(&grads).unwrap()));
            }
            if let Some(fraction) = &layer.span_fraction {
                out.push(to_vec(fraction.val().grad(&grads).unwrap()));
            }
            out
        };
        let (fused, composed) = (run(true), run(false));
        let names = [
            "output",
            "dq",
            "dk",
            "dv",
            "d persistent keys",
            "d persistent values",
            if relative { "d key_pe" } else { "d span" },
            "d span",
        ];
        for ((part, a), b) in names.iter().zip(&fused).zip(&composed) {
            let what = format!("{name} causal={causal} relative={relative} span={span} {part}");
            assert_all_close(a, b, 2e-5, &what);
        }
    }
}

/// Attention dropout in the tiled operation: active only when training on an autodiff
/// device (two calls draw different masks; gradients stay finite), off for inference
/// (then equal to the composed path), as `Dropout::forward` decides.
#[test]
fn flex_memory_dropout_is_drawn_in_training_only() {
    let _stream = crate::test_util::FUSED_DROPOUT
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut context = ctx(16, false);
    context.dropout = 0.5;
    context.max_seq_len = 20;
    let train = Device::flex().autodiff();
    train.seed(11);
    let layer = config(37).init(&context, &train);
    let r = |device: &Device| {
        device.seed(12);
        Tensor::<4>::random([2, 2, 20, 8], Distribution::Normal(0.0, 1.0), device)
    };
    let q = r(&train).require_grad();
    let a = layer.attend_with(q.clone(), q.clone(), q.clone(), None, true);
    let b = layer.attend_with(q.clone(), q.clone(), q.clone(), None, true);
    assert_ne!(to_vec(a.clone()), to_vec(b), "each call draws its own mask");
    let grads = a.sum().backward();
    assert!(
        to_vec(q.grad(&grads).unwrap())
            .iter()
            .all(|g| g.is_finite())
    );

    let infer = Device::flex();
    let layer = layer.valid();
    let q = r(&infer);
    let fused = to_vec(layer.attend_with(q.clone(), q.clone(), q.clone(), None, true));
    let composed = to_vec(layer.attend_with(q.clone(), q.clone(), q, None, false));
    for (x, y) in fused.iter().zip(&composed) {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "inference: {x} vs {y}"
        );
    }
}

#[test]
fn joint_softmax_sums_to_one_and_never_looks_ahead() {
    for (name, device) in devices() {
        let (s, n) = (6, 5);
        let layer = config(n).init(&ctx(8, false), &device);
        let q = Tensor::<4>::random([1, 2, s, 4], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([1, 2, s, 4], Distribution::Normal(0.0, 1.0), &device);
        let w = to_vec(layer.weights(q, k, None));
        for row in 0..2 * s {
            let i = row % s;
            let r = &w[row * (s + n)..(row + 1) * (s + n)];
            let total: f32 = r.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{name}: row sums to {total}");
            assert!(
                r[i + 1..s].iter().all(|&x| x == 0.0),
                "{name}: future context has weight"
            );
            assert!(
                r[s..].iter().all(|&x| x > 0.0),
                "{name}: memory is always visible"
            );
        }
    }
}

pub(super) fn all_attention(n: usize, adaptive_span: bool) -> LmConfig {
    LmConfig {
        vocab_size: Some(11),
        d_model: 16,
        n_layers: 2,
        d_ff: 0,
        seq_len: 8,
        position: Position::Relative,
        mixer: MixerConfig::Persistent(PersistentAttentionConfig {
            n_heads: 2,
            n_persistent: Some(n),
            adaptive_span,
            span_ramp: 2,
            span_init: 0.5,
            span_loss: 1e-2,
            ..Default::default()
        }),
        ..LmConfig::default()
    }
}

pub(super) fn persistent(model: &crate::Lm, layer: usize) -> &PersistentAttention {
    match &model.blocks[layer].mixer {
        crate::Mixer::Persistent(m) => m,
        other => panic!("expected a persistent mixer, got {other:?}"),
    }
}

#[test]
fn gradients_reach_every_persistent_key_and_value() {
    for (name, device) in devices() {
        let ad = device.clone().autodiff();
        ad.seed(2);
        let model = all_attention(6, true).init(&ad).unwrap();
        let loss = crate::loss::cross_entropy_sum(
            model.forward(tokens(2, 8, 11, 1, &ad)),
            tokens(2, 8, 11, 2, &ad),
            None,
        ) + model.regularization().unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        for layer in 0..2 {
            let m = persistent(&model, layer);
            for p in [
                m.persistent_keys.as_ref().unwrap(),
                m.persistent_values.as_ref().unwrap(),
            ] {
                let g = grads.get::<3>(p.id).expect("a gradient");
                let rows = to_vec(g.abs().sum_dim(2)); // [n_heads, N, 1]
                assert_eq!(rows.len(), 12);
                assert!(
                    rows.iter().all(|&r| r > 0.0),
                    "{name} layer {layer}: {rows:?}"
                );
            }
            let span = grads
                .get::<1>(m.span_fraction.as_ref().unwrap().id)
                .expect("span gradient");
            assert!(
                to_vec(span).iter().all(|&g| g != 0.0),
                "{name}: span gets a gradient"
            );
        }
        let pe = grads
            .get::<2>(model.key_pe.as_ref().unwrap().id)
            .expect("key_pe gradient");
        assert!(to_vec(pe.abs().sum()).iter().all(|&g| g > 0.0));
    }
}

#[test]
fn memory_values_matter_and_future_tokens_do_not() {
    for (name, device) in devices() {
        device.seed(3);
        let mut model = all_attention(4, false).init(&device).unwrap();
        let a = tokens(1, 8, 11, 1, &device);
        let base = to_vec(model.forward(a.clone()));
        // Causality: change tokens after t = 3; logits at <= 3 stay exactly the same.
        let mut ids = a.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        for id in ids.iter_mut().skip(4) {
            *id = (*id + 5) % 11;
        }
        let b = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [1, 8]), &device);
        let changed = to_vec(model.forward(b));
        assert_eq!(
            base[..4 * 11],
            changed[..4 * 11],
            "{name}: the future leaked"
        );
        assert_ne!(base[4 * 11..5 * 11], changed[4 * 11..5 * 11]);
        // Zeroing every persistent value changes the output.
        for block in model.blocks.iter_mut() {
            if let crate::Mixer::Persistent(m) = &mut block.mixer {
                let v = m.persistent_values.take().unwrap();
                m.persistent_values = Some(Param::from_tensor(v.val().zeros_like()));
            }
        }
        assert_ne!(
            base,
            to_vec(model.forward(a)),
            "{name}: memory values unused"
        );
    }
}

#[test]
fn default_memory_has_the_parameter_count_of_the_ffn_it_replaces() {
    assert_eq!(PersistentAttentionConfig::default_n_persistent(512), 2048);
    let device = burn::tensor::Device::flex();
    for (d_model, n_heads) in [(64, 4), (128, 8)] {
        let d_ff = 4 * d_model;
        let mixer_ctx = ctx(d_model, true);
        let dense = BlockConfig {
            mixer: MixerConfig::Dense(DenseAttentionConfig {
                n_heads,
                causal: true,
            }),
            ctx: MixerContext {
                relative_positions: false,
                bias: true,
                ..mixer_ctx.clone()
            },
            d_ff: Some(d_ff),
            norm: crate::NormPlacement::Pre,
            activation: Default::default(),
        }
        .init(&device);
        let all_attn = BlockConfig {
            mixer: MixerConfig::Persistent(PersistentAttentionConfig {
                n_heads,
                ..Default::default()
            }),
            ctx: mixer_ctx,
            d_ff: None,
            norm: crate::NormPlacement::Pre,
            activation: Default::default(),
        }
        .init(&device);
        let crate::Mixer::Persistent(m) = &all_attn.mixer else {
            unreachable!()
        };
        let memory = m.persistent_keys.as_ref().unwrap().num_params()
            + m.persistent_values.as_ref().unwrap().num_params();
        assert_eq!(memory, 2 * d_model * d_ff, "memory = FFN weights");
        // The rest of the difference: FFN biases (d_ff + d_model) and its LayerNorm (2 d_model).
        assert_eq!(
            dense.num_params() - all_attn.num_params(),
            d_ff + 3 * d_model
        );
    }
}

#[test]
fn a_small_all_attention_model_overfits_one_batch() {
    let device = burn::tensor::Device::flex().autodiff();
    device.seed(7);
    let model = all_attention(8, false).init(&device).unwrap();
    let (x, y) = (tokens(4, 8, 11, 4, &device), tokens(4, 8, 11, 5, &device));
    let losses = crate::test_util::overfit(model, |m| {
        crate::loss::cross_entropy_sum(m.forward(x.clone()), y.clone(), None).div_scalar(32.0)
    });
    assert!(
        losses[149] < 0.1 * losses[0],
        "loss {} -> {}",
        losses[0],
        losses[149]
    );
}

/// `key_pe` embeds distances to earlier keys only, so a bidirectional all-attention layer
/// with relative positions is refused (it once scored later keys with the next query's
/// shifted position terms).
#[test]
fn relative_positions_need_a_causal_layer() {
    let mut cfg = all_attention(4, false);
    let MixerConfig::Persistent(p) = &mut cfg.mixer else {
        panic!("all_attention builds a persistent mixer")
    };
    p.causal = false;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("mixer.causal") && err.contains("relative"),
        "{err}"
    );
    cfg.position = crate::Position::Learned;
    cfg.validate().unwrap();
}

#[test]
fn relative_positions_are_refused_by_dense_attention() {
    let mut cfg = all_attention(4, false);
    cfg.mixer = MixerConfig::Dense(DenseAttentionConfig {
        n_heads: 2,
        causal: true,
    });
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("model.position") && err.contains("persistent"),
        "{err}"
    );
}
