//! The language model's tests: shapes, causality, gradients, the paper options' formulas,
//! norm placement, hybrids, adaptive softmax and input, config errors.

use super::*;
use crate::adaptive::{AdaptiveConfig, AdaptiveSoftmax, Clusters};
use crate::block::NormPlacement;
use crate::loss::cross_entropy_sum;
use crate::mixer::{DenseAttentionConfig, MixerConfig};
use crate::mlp::Activation;
use crate::test_util::{assert_all_close, devices, to_vec, tokens};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

fn tiny(position: Position, tie: bool) -> LmConfig {
    LmConfig {
        vocab_size: Some(11),
        d_model: 16,
        n_layers: 2,
        d_ff: 32,
        seq_len: 8,
        dropout: 0.0,
        position,
        rope_theta: 10_000.0,
        tie_embeddings: tie,
        mixer: MixerConfig::Dense(DenseAttentionConfig {
            n_heads: 4,
            causal: true,
        }),
        ..LmConfig::default()
    }
}

#[test]
fn logits_have_shape_batch_seq_vocab() {
    for (name, device) in devices() {
        for (position, tie) in [
            (Position::Learned, true),
            (Position::Rope, false),
            (Position::None, true),
        ] {
            let model = tiny(position, tie).init(&device).unwrap();
            let logits = model.forward(tokens(3, 5, 11, 0, &device));
            assert_eq!(logits.dims(), [3, 5, 11], "{name} {position:?}");
            assert!(to_vec(logits).iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn future_tokens_do_not_change_past_logits_exactly() {
    for (name, device) in devices() {
        for (position, norm) in [
            (Position::Learned, NormPlacement::Pre),
            (Position::Rope, NormPlacement::Pre),
            (Position::Learned, NormPlacement::Post),
        ] {
            device.seed(11);
            let model = LmConfig {
                norm,
                ..tiny(position, true)
            }
            .init(&device)
            .unwrap();
            let (batch, seq, vocab) = (2, 8, 11);
            let a = tokens(batch, seq, vocab, 1, &device);
            for t in 0..seq - 1 {
                // Change every token after position t.
                let mut ids = a.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
                for b in 0..batch {
                    for s in t + 1..seq {
                        ids[b * seq + s] = (ids[b * seq + s] + 3) % vocab as i64;
                    }
                }
                let changed = Tensor::<2, Int>::from_data(
                    burn::tensor::TensorData::new(ids, [batch, seq]),
                    &device,
                );
                let la = to_vec(model.forward(a.clone()));
                let lb = to_vec(model.forward(changed));
                for b in 0..batch {
                    for s in 0..seq {
                        let row = |l: &[f32]| {
                            l[(b * seq + s) * vocab..(b * seq + s + 1) * vocab].to_vec()
                        };
                        if s <= t {
                            assert_eq!(
                                row(&la),
                                row(&lb),
                                "{name} {position:?}: t={t} leaked into s={s}"
                            );
                        } else if s == t + 1 {
                            assert_ne!(
                                row(&la),
                                row(&lb),
                                "{name}: position {s} should see its own token"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    struct Check<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        missing: Vec<String>,
        count: usize,
    }
    impl ModuleVisitor for Check<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.count += 1;
            let norm = self
                .grads
                .get::<D>(param.id)
                .map_or(0.0, |g| g.abs().sum().into_scalar::<f32>());
            if norm.is_nan() || norm <= 0.0 {
                self.missing.push(self.path.join("."));
            }
        }
    }
    for (name, device) in devices() {
        // `paper`: Sukhbaatar et al.'s biases (none in the projections, one on the head).
        for (position, tie, norm, paper) in [
            (Position::Learned, true, NormPlacement::Pre, false),
            (Position::Rope, false, NormPlacement::Pre, false),
            (Position::Learned, false, NormPlacement::Post, false),
            (Position::None, false, NormPlacement::Post, true),
        ] {
            let ad = device.clone().autodiff();
            ad.seed(5);
            let model = LmConfig {
                norm,
                attention_bias: !paper,
                head_bias: paper,
                ..tiny(position, tie)
            }
            .init(&ad)
            .unwrap();
            let loss = cross_entropy_sum(
                model.forward(tokens(2, 8, 11, 2, &ad)),
                tokens(2, 8, 11, 3, &ad),
                None,
            );
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let mut check = Check {
                grads: &grads,
                path: vec![],
                missing: vec![],
                count: 0,
            };
            model.visit(&mut check);
            assert!(check.count >= 10, "{name}: visited {} params", check.count);
            assert!(
                check.missing.is_empty(),
                "{name} {position:?}: no gradient for {:?}",
                check.missing
            );
        }
    }
}

#[test]
fn projection_and_head_biases_follow_the_config() {
    let device = Device::flex();
    let count = |c: LmConfig| c.init(&device).unwrap().num_params();
    let base = tiny(Position::Learned, false);
    let p = count(base.clone());
    // 2 layers x (3·16 query/key/value + 16 output) biases.
    let no_bias = LmConfig {
        attention_bias: false,
        ..base.clone()
    };
    assert_eq!(count(no_bias.clone()), p - 2 * 64);
    let model = no_bias.init(&device).unwrap();
    let attn = match &model.blocks[0].mixer {
        crate::mixer::Mixer::Dense(a) => a,
        other => panic!("{other:?}"),
    };
    assert!(attn.qkv.bias.is_none() && attn.proj.bias.is_none());
    let head_bias = LmConfig {
        head_bias: true,
        ..base.clone()
    };
    assert_eq!(
        count(head_bias.clone()),
        p + 11,
        "one bias per vocabulary entry"
    );
    // The head's bias is added to every position's logits.
    let mut model = head_bias.init(&device).unwrap();
    let x = tokens(2, 8, 11, 1, &device);
    let before = to_vec(model.forward(x.clone()));
    let head = model.head.as_mut().unwrap();
    let b = head.bias.take().unwrap();
    head.bias = Some(Param::from_tensor(b.val().add_scalar(0.5)));
    let after = to_vec(model.forward(x));
    for (a, b) in before.iter().zip(&after) {
        assert!((b - a - 0.5).abs() < 1e-5, "{a} -> {b}");
    }
    // A tied head's bias (BERT's and FNet's decoder) is a vector of its own, added too.
    let tied = tiny(Position::Learned, true);
    let tied_bias = LmConfig {
        head_bias: true,
        ..tied.clone()
    };
    assert_eq!(count(tied_bias.clone()), count(tied) + 11);
    let mut model = tied_bias.init(&device).unwrap();
    let x = tokens(2, 8, 11, 1, &device);
    let before = to_vec(model.forward(x.clone()));
    let b = model.tied_bias.take().unwrap();
    let shift = Tensor::<1, Int>::arange(0..11, &device).float() * 0.25;
    model.tied_bias = Some(Param::from_tensor(b.val() + shift));
    let after = to_vec(model.forward(x));
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let expected = 0.25 * (i % 11) as f32;
        assert!((b - a - expected).abs() < 1e-5, "{i}: {a} -> {b}");
    }
}

/// FNet's published model (`configs/fnet-paper.toml`'s options) computes what
/// `transformers`' FNetForMaskedLM does: `x = LN(E[t] + P[pos] + T[0])`, projected; the
/// post-norm blocks; `h = LN(gelu_new(dense(x)))`; logits `h · Eᵀ + b`. Checked against
/// those formulas from tensor ops (a LayerNorm of our own, not the fused kernel), with
/// non-trivial norm parameters and biases so a misplaced piece shows.
#[test]
fn fnet_paper_options_compute_their_formulas() {
    fn reference_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        let y = centred / var.add_scalar(1e-5).sqrt();
        y * norm.gamma.val().unsqueeze::<3>() + norm.beta.as_ref().unwrap().val().unsqueeze::<3>()
    }
    fn jiggle(norm: &mut LayerNorm, device: &Device) {
        let d = norm.gamma.val().dims()[0];
        norm.gamma =
            Param::from_tensor(Tensor::random([d], Distribution::Uniform(0.5, 1.5), device));
        norm.beta = Some(Param::from_tensor(Tensor::random(
            [d],
            Distribution::Uniform(-0.5, 0.5),
            device,
        )));
    }
    let linear = |l: &Linear, x: Tensor<3>| {
        x.matmul(l.weight.val().unsqueeze::<3>()) + l.bias.as_ref().unwrap().val().unsqueeze::<3>()
    };
    for (name, device) in devices() {
        let config = LmConfig {
            norm: NormPlacement::Post,
            activation: Activation::GeluNew,
            token_types: 4,
            embedding_norm: true,
            embedding_projection: true,
            head_transform: true,
            head_bias: true,
            mixer: MixerConfig::Fourier(crate::mixer::FourierMixerConfig::default()),
            ..tiny(Position::Learned, true)
        };
        device.seed(5);
        let mut model = config.init(&device).unwrap();
        jiggle(model.embedding_norm.as_mut().unwrap(), &device);
        let transform = model.head_transform.as_mut().unwrap();
        jiggle(&mut transform.norm, &device);
        transform.dense.bias = Some(Param::from_tensor(Tensor::random(
            [16],
            Distribution::Normal(0.0, 0.5),
            &device,
        )));
        model.tied_bias = Some(Param::from_tensor(Tensor::random(
            [11],
            Distribution::Normal(0.0, 1.0),
            &device,
        )));
        let ids = tokens(2, 8, 11, 3, &device);
        let table = model.token_embedding.as_ref().unwrap().weight.val();
        let rows: Vec<i64> = ids
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        let gathered = table.clone().select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(rows, [16]), &device),
        );
        let x = gathered.reshape([2, 8, 16])
            + model
                .pos_embedding
                .as_ref()
                .unwrap()
                .weight
                .val()
                .unsqueeze::<3>()
            + model
                .type_embedding
                .as_ref()
                .unwrap()
                .weight
                .val()
                .narrow(0, 0, 1)
                .unsqueeze::<3>();
        let x = reference_norm(model.embedding_norm.as_ref().unwrap(), x);
        let mut x = linear(model.embedding_projection.as_ref().unwrap(), x);
        for block in &model.blocks {
            x = block.forward(x, None);
        }
        let t = model.head_transform.as_ref().unwrap();
        let h = reference_norm(&t.norm, crate::mlp::gelu_new(linear(&t.dense, x)));
        let want = h.matmul(table.transpose().unsqueeze::<3>())
            + model.tied_bias.as_ref().unwrap().val().unsqueeze::<3>();
        assert_all_close(&to_vec(model.forward(ids)), &to_vec(want), 1e-4, name);
    }
}

#[test]
fn post_norm_model_has_no_final_norm_and_ends_in_its_last_blocks_norm() {
    for (name, device) in devices() {
        let pre = tiny(Position::Learned, false).init(&device).unwrap();
        let post_config = LmConfig {
            norm: NormPlacement::Post,
            ..tiny(Position::Learned, false)
        };
        let post = post_config.init(&device).unwrap();
        assert!(pre.norm_final.is_some() && post.norm_final.is_none());
        assert!(post.blocks.iter().all(|b| b.post_norm));
        assert!(pre.blocks.iter().all(|b| !b.post_norm));
        assert_eq!(
            pre.num_params() - post.num_params(),
            2 * 16,
            "{name}: the final norm's gamma and beta"
        );
        // The logits are the head applied to the last block's (normalised) output.
        let ids = tokens(2, 8, 11, 6, &device);
        let mut x = post.token_embedding.as_ref().unwrap().forward(ids.clone());
        let positions = Tensor::<1, Int>::arange(0..8, &device).reshape([1, 8]);
        x = x + post
            .pos_embedding
            .as_ref()
            .unwrap()
            .forward(positions)
            .expand([2, 8, 16]);
        for block in &post.blocks {
            x = block.forward(x, None);
        }
        let head = post.head.as_ref().unwrap();
        let expected = to_vec(head.forward(x));
        let got = to_vec(post.forward(ids));
        let diff = expected
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

#[test]
fn tiny_pre_and_post_norm_models_overfit_one_batch_on_flex() {
    let device = burn::tensor::Device::flex().autodiff();
    for norm in [NormPlacement::Pre, NormPlacement::Post] {
        device.seed(7);
        let config = LmConfig {
            norm,
            ..tiny(Position::Learned, true)
        };
        let model = config.init(&device).unwrap();
        let inputs = tokens(4, 8, 11, 4, &device);
        let targets = tokens(4, 8, 11, 5, &device);
        let losses = crate::test_util::overfit(model, |m| {
            cross_entropy_sum(m.forward(inputs.clone()), targets.clone(), None).div_scalar(32.0)
        });
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.1 * first, "{norm:?}: loss {first} -> {last}");
    }
}

#[test]
fn hybrid_layouts_place_attention_layers() {
    use AttentionLayout::*;
    assert_eq!(attention_positions(Top, 12, 2), vec![10, 11]);
    assert_eq!(attention_positions(Bottom, 12, 2), vec![0, 1]);
    assert_eq!(attention_positions(Middle, 12, 2), vec![5, 6]);
    assert_eq!(attention_positions(Mixed, 12, 2), vec![3, 9]);
    assert_eq!(attention_positions(Mixed, 4, 4), vec![0, 1, 2, 3]);
    let fnet = crate::mixer::FourierMixerConfig::default();
    let mut c = tiny(Position::Learned, true);
    c.n_layers = 4;
    c.mixer = MixerConfig::Fourier(fnet.clone());
    c.num_attention_layers = 2;
    let kinds: Vec<&str> = c.layer_mixers().unwrap().iter().map(|m| m.kind()).collect();
    assert_eq!(kinds, vec!["fourier", "fourier", "dense", "dense"]);
    assert_eq!(c.kind(), "hybrid");
    assert!(
        !c.is_causal(),
        "default attention follows the (bidirectional) mixer"
    );
    let model = c.init(&burn::tensor::Device::flex()).unwrap();
    assert!(matches!(model.blocks[3].mixer, crate::Mixer::Dense(_)));
    assert!(matches!(model.blocks[0].mixer, crate::Mixer::Fourier(_)));
    assert_eq!(
        model
            .forward(tokens(2, 8, 11, 0, &burn::tensor::Device::flex()))
            .dims(),
        [2, 8, 11]
    );
    // An explicit per-layer list must have n_layers entries.
    c.num_attention_layers = 0;
    c.layers = vec![MixerConfig::Fourier(fnet)];
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("model.layers") && err.contains("n_layers = 4"),
        "{err}"
    );
}

#[test]
fn invalid_config_names_the_field() {
    let mut c = tiny(Position::Learned, true);
    c.vocab_size = None;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("model.vocab_size")
    );
    let mut c = tiny(Position::Learned, true);
    c.dropout = 1.5;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("model.dropout")
    );
    let mut c = tiny(Position::Learned, true);
    c.mixer = MixerConfig::Dense(DenseAttentionConfig {
        n_heads: 5,
        causal: true,
    });
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("model.mixer.n_heads = 5"), "{err}");
}

/// A tiny model with an adaptive softmax over 40 words (head 8, tails 12 and 20 at widths
/// 8 and 4), adaptive input or not, tied or not.
fn adaptive(input: bool, tie: bool) -> LmConfig {
    LmConfig {
        vocab_size: Some(40),
        tie_embeddings: tie,
        adaptive: Some(AdaptiveConfig {
            cutoffs: vec![8, 20],
            div_val: 2,
            input,
        }),
        ..tiny(Position::Learned, tie)
    }
}

/// Every float parameter's gradient, in module order (zeros where none reached it).
fn parameter_grads(model: &Lm, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self
                .0
                .get::<D>(param.id)
                .map_or_else(|| vec![0.0; param.val().shape().num_elements()], to_vec);
            self.1.push(g);
        }
    }
    let mut c = Collect(grads, vec![]);
    model.visit(&mut c);
    c.1
}

/// With an adaptive softmax the logits are log-probabilities over the whole vocabulary
/// (log-sum-exp 0 at every position), and the training loss (`hidden` + `nll_sum`, tails
/// only for their positions, weights some zero) equals the cross-entropy of those logits
/// in value and in every parameter's gradient: plain or adaptive input, tied or not.
#[test]
fn an_adaptive_lm_scores_the_whole_vocabulary_and_trains_on_it() {
    for (name, device) in devices() {
        for (input, tie) in [(false, false), (true, false), (true, true)] {
            let ad = device.clone().autodiff();
            ad.seed(21);
            let model = adaptive(input, tie).init(&ad).unwrap();
            assert_eq!(model.token_embedding.is_some(), !input);
            assert_eq!(
                model.adaptive_softmax.as_ref().unwrap().words.is_none(),
                tie
            );
            assert!(model.head.is_none());
            let (batch, seq) = (3, 8);
            let x = tokens(batch, seq, 40, 4, &ad);
            let y = tokens(batch, seq, 40, 5, &ad);
            let w = Tensor::<2>::from_data(
                TensorData::new(
                    (0..batch * seq)
                        .map(|i| [1.0f32, 0.0, 2.0][i % 3])
                        .collect::<Vec<_>>(),
                    [batch, seq],
                ),
                &ad,
            );
            let logits = model.forward(x.clone());
            assert_eq!(logits.dims(), [batch, seq, 40]);
            let lse = to_vec(logits.clone().exp().sum_dim(2).log());
            assert!(
                lse.iter().all(|v| v.abs() < 1e-5),
                "{name} input {input} tie {tie}: {lse:?}"
            );
            let fast = model.nll_sum(model.hidden(x, None).0, y.clone(), Some(w.clone()));
            let reference = cross_entropy_sum(logits, y, Some(w));
            let what = format!("{name} input {input} tie {tie}");
            assert_all_close(
                &to_vec(fast.clone()),
                &to_vec(reference.clone()),
                1e-5,
                &what,
            );
            let g_fast = GradientsParams::from_grads(fast.backward(), &model);
            let g_ref = GradientsParams::from_grads(reference.backward(), &model);
            let (a, b) = (
                parameter_grads(&model, &g_fast),
                parameter_grads(&model, &g_ref),
            );
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_all_close(x, y, 1e-4, &format!("{what} parameter {i}"));
            }
        }
    }
}

/// Tying shares the tensors: a tied model has one set of cluster vectors and projections
/// (its parameter count is the untied one's less a whole set), and their gradient is the
/// sum of the input's and the softmax's gradients in an untied model holding copies of the
/// same values — one update moves both.
#[test]
fn tied_adaptive_clusters_are_one_set_of_parameters_for_input_and_output() {
    let device = Device::flex().autodiff();
    device.seed(22);
    let tied = adaptive(true, true).init(&device).unwrap();
    let untied_count = adaptive(true, false).init(&device).unwrap().num_params();
    let input = tied.adaptive_input.as_ref().unwrap();
    let copy = |p: &Param<Tensor<2>>| Param::from_tensor(p.val().detach());
    let words = Clusters {
        head: copy(&input.head),
        tails: input
            .tails
            .iter()
            .map(|t| crate::adaptive::Tail {
                start: t.start,
                end: t.end,
                proj: copy(&t.proj),
                weight: copy(&t.weight),
            })
            .collect(),
        shortlist: input.shortlist,
    };
    assert_eq!(untied_count - tied.num_params(), words.num_params());
    let untied = Lm {
        adaptive_softmax: Some(AdaptiveSoftmax {
            words: Some(words),
            ..tied.adaptive_softmax.clone().unwrap()
        }),
        ..tied.clone()
    };
    let (x, y) = (tokens(2, 8, 40, 6, &device), tokens(2, 8, 40, 7, &device));
    let loss = |m: &Lm| m.nll_sum(m.hidden(x.clone(), None).0, y.clone(), None);
    let (lt, lu) = (loss(&tied), loss(&untied));
    assert_eq!(to_vec(lt.clone()), to_vec(lu.clone()), "same function");
    let gt = GradientsParams::from_grads(lt.backward(), &tied);
    let gu = GradientsParams::from_grads(lu.backward(), &untied);
    let grad = |g: &GradientsParams, p: &Param<Tensor<2>>| to_vec(g.get::<2>(p.id).unwrap());
    let own = untied
        .adaptive_softmax
        .as_ref()
        .unwrap()
        .words
        .as_ref()
        .unwrap();
    let mut pairs = vec![(&input.head, &own.head)];
    for (a, b) in input.tails.iter().zip(&own.tails) {
        pairs.push((&a.proj, &b.proj));
        pairs.push((&a.weight, &b.weight));
    }
    for (i, (shared, out)) in pairs.into_iter().enumerate() {
        let through_input = grad(&gu, shared); // the untied model's input copy
        let through_output = grad(&gu, out);
        assert!(through_input.iter().any(|v| *v != 0.0), "tensor {i} input");
        assert!(
            through_output.iter().any(|v| *v != 0.0),
            "tensor {i} output"
        );
        let sum: Vec<f32> = through_input
            .iter()
            .zip(&through_output)
            .map(|(a, b)| a + b)
            .collect();
        assert_all_close(&grad(&gt, shared), &sum, 1e-5, &format!("tensor {i}"));
    }
}

/// Without cutoffs a tied adaptive model is the plain tied model: the same logits up to
/// log-softmax (the adaptive head gives log-probabilities) and the same loss, from the
/// same weights.
#[test]
fn without_cutoffs_a_tied_adaptive_lm_is_the_plain_tied_lm() {
    for (name, device) in devices() {
        device.seed(23);
        let config = LmConfig {
            adaptive: Some(AdaptiveConfig::default()),
            ..tiny(Position::Learned, true)
        };
        let a = config.init(&device).unwrap();
        let plain = Lm {
            token_embedding: Some(Embedding {
                weight: a.adaptive_input.as_ref().unwrap().head.clone(),
            }),
            adaptive_input: None,
            adaptive_softmax: None,
            ..a.clone()
        };
        let (x, y) = (tokens(2, 8, 11, 8, &device), tokens(2, 8, 11, 9, &device));
        let got = to_vec(a.forward(x.clone()));
        let want = to_vec(burn::tensor::activation::log_softmax(
            plain.forward(x.clone()),
            2,
        ));
        assert_all_close(&got, &want, 1e-6, name);
        let la = to_vec(a.nll_sum(a.hidden(x.clone(), None).0, y.clone(), None));
        let lp = to_vec(cross_entropy_sum(plain.forward(x), y, None));
        assert_all_close(&la, &lp, 1e-6, name);
    }
}

/// An adaptive model (tied adaptive input and softmax) overfits a fixed batch.
#[test]
fn an_adaptive_lm_overfits_a_batch() {
    let device = Device::flex().autodiff();
    device.seed(24);
    let model = adaptive(true, true).init(&device).unwrap();
    let (x, y) = (tokens(2, 8, 40, 10, &device), tokens(2, 8, 40, 11, &device));
    let losses = crate::test_util::overfit(model, |m| {
        m.nll_sum(m.hidden(x.clone(), None).0, y.clone(), None)
            .div_scalar(16.0)
    });
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.2 * first, "{first} -> {last}");
}

/// Adaptive settings that cannot build a model are refused, naming the key.
#[test]
fn bad_adaptive_settings_name_the_key() {
    let err = |c: LmConfig| c.validate().unwrap_err().to_string();
    let e = err(adaptive(false, true));
    assert!(e.contains("model.adaptive.input"), "{e}");
    let e = err(LmConfig {
        head_bias: true,
        ..adaptive(true, false)
    });
    assert!(e.contains("model.head_bias"), "{e}");
    let mut c = adaptive(true, true);
    c.adaptive.as_mut().unwrap().cutoffs = vec![8, 40];
    let e = err(c);
    assert!(
        e.contains("model.adaptive.cutoffs") && e.contains("40 words"),
        "{e}"
    );
    assert!(adaptive(true, true).validate().is_ok());
}
