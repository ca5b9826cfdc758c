//! The operation on flex: operands checked and made contiguous, then the CPU kernels of
//! `forward.rs` and `backward.rs`.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};

use super::backward::backward;
use super::extension::{AttentionBackward, AttentionOps};
use super::forward::forward;
use super::layout::{KeyLayout, Shape, pe_columns};
use super::tiles::Inputs;
use crate::ops::kernel::{Dropout, slice};

/// A tensor's shape.
pub(super) fn dims(t: &FlexTensor) -> Vec<usize> {
    let shape = t.layout().shape();
    (0..shape.num_dims()).map(|i| shape[i]).collect()
}

/// A contiguous f32 tensor's data and shape.
pub(super) fn data(t: &FlexTensor) -> (Vec<usize>, FlexTensor) {
    assert_eq!(t.dtype(), DType::F32, "tiled_attention: f32 only");
    (dims(t), t.to_contiguous())
}

/// The seven inputs as contiguous f32 with their shapes checked against each other and the
/// layout, and `extra` operands checked to be `[heads, n, d + 1]`.
fn operands<const E: usize>(
    inputs: [&FlexTensor; 7],
    extra: [&FlexTensor; E],
    keys: &KeyLayout,
    ramp: f32,
) -> (Shape, [FlexTensor; 7], [FlexTensor; E]) {
    let [
        (q_shape, q),
        (k_shape, k),
        (v_shape, v),
        (mk_shape, mk),
        (mv_shape, mv),
        (pe_shape, pe),
        (z_shape, z),
    ] = inputs.map(data);
    let [heads, n, d] = q_shape[..] else {
        panic!("tiled_attention: q must be [heads, n, d], got {q_shape:?}")
    };
    let nk = k_shape.get(1).copied().unwrap_or(0);
    assert!(
        k_shape == v_shape && k_shape == [heads, nk, d],
        "tiled_attention: k {k_shape:?} and v {v_shape:?} must both be [{heads}, keys, {d}]"
    );
    let (min_distance, max_distance) = keys.check(n, nk, heads);
    let [mem_heads, mem, mem_d] = mk_shape[..] else {
        panic!("tiled_attention: memory keys must be [mem_heads, m, d], got {mk_shape:?}")
    };
    assert!(
        mk_shape == mv_shape && (mem == 0 || (mem_d == d && mem_heads > 0)),
        "tiled_attention: memory keys {mk_shape:?} and values {mv_shape:?} must be [mem_heads, m, {d}]"
    );
    let [pe_d, pe_span] = pe_shape[..] else {
        panic!("tiled_attention: key_pe must be [d, span], got {pe_shape:?}")
    };
    if pe_span > 0 {
        let needed = pe_columns(nk, (min_distance, max_distance));
        assert!(
            pe_d == d && pe_span >= needed && keys.causal,
            "tiled_attention: key_pe {pe_shape:?} needs [{d}, ≥ {needed}] and causal keys"
        );
    }
    let [span_heads] = z_shape[..] else {
        panic!("tiled_attention: span_z must be [span_heads], got {z_shape:?}")
    };
    assert!(
        span_heads == 0 || ramp > 0.0,
        "tiled_attention: ramp {ramp}"
    );
    let extra = extra.map(|t| {
        let (shape, t) = data(t);
        assert_eq!(shape, [heads, n, d + 1], "tiled_attention: operand shapes");
        t
    });
    let shape = Shape {
        heads,
        n,
        nk,
        d,
        causal: keys.causal,
        min_distance,
        max_distance,
        mem: if mem_heads == 0 { 0 } else { mem },
        mem_heads: mem_heads.max(1),
        pe_span,
        span_heads,
        ramp,
    };
    (shape, [q, k, v, mk, mv, pe, z], extra)
}

impl AttentionOps for Flex {
    fn tiled_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        memory_keys: FlexTensor,
        memory_values: FlexTensor,
        key_pe: FlexTensor,
        span_z: FlexTensor,
        keys: KeyLayout,
        ramp: f32,
        dropout: f32,
        seed: u32,
    ) -> FlexTensor {
        let inputs = [&q, &k, &v, &memory_keys, &memory_values, &key_pe, &span_z];
        let (shape, inputs, []) = operands(inputs, [], &keys, ramp);
        let out = forward(
            Inputs::new(&inputs),
            shape,
            &keys,
            Dropout::new(dropout, seed),
        );
        FlexTensor::from_data(TensorData::new(out, [shape.heads, shape.n, shape.d + 1]))
    }
}

impl AttentionBackward for Flex {
    fn tiled_attention_backward(
        inputs: [FlexTensor; 7],
        out: FlexTensor,
        grad: FlexTensor,
        keys: &KeyLayout,
        (ramp, dropout, seed): (f32, f32, u32),
    ) -> [FlexTensor; 7] {
        let dims: Vec<Vec<usize>> = inputs.iter().map(dims).collect();
        let (shape, inputs, [out, grad]) = operands(inputs.each_ref(), [&out, &grad], keys, ramp);
        let grads = backward(
            Inputs::new(&inputs),
            slice(&out),
            slice(&grad),
            shape,
            keys,
            Dropout::new(dropout, seed),
        );
        let mut dims = dims.into_iter();
        grads.map(|g| {
            let dims = dims.next().expect("seven shapes");
            FlexTensor::from_data(TensorData::new(g, dims))
        })
    }
}
