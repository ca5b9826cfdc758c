//! The operation under autodiff: one node whose backward calls the inner backend's
//! [`AttentionBackward`] (flex or Cube), for any inner backend that has both.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;

use super::extension::{AttentionBackward, AttentionOps, Operands};
use super::layout::KeyLayout;

impl<B: AttentionOps + AttentionBackward, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        memory_keys: FloatTensor<Self>,
        memory_values: FloatTensor<Self>,
        key_pe: FloatTensor<Self>,
        span_z: FloatTensor<Self>,
        keys: KeyLayout,
        ramp: f32,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct TiledAttention;

        impl<B: AttentionBackward> Backward<B, 7> for TiledAttention {
            /// The inputs, the forward output (for its log-sum-exps) and the settings.
            type State = (Operands<B>, FloatTensor<B>, KeyLayout, (f32, f32, u32));

            fn backward(
                self,
                ops: Ops<Self::State, 7>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (inputs, out, keys, settings) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let input_grads = B::tiled_attention_backward(inputs, out, grad, &keys, settings);
                for (parent, grad) in ops.parents.into_iter().zip(input_grads) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let tensors = [q, k, v, memory_keys, memory_values, key_pe, span_z];
        let nodes = tensors.each_ref().map(|t| t.node());
        let inputs = tensors.map(|t| t.into_primitive());
        let [q, k, v, mk, mv, pe, z] = inputs.clone();
        let out = B::tiled_attention(q, k, v, mk, mv, pe, z, keys.clone(), ramp, dropout, seed);
        match TiledAttention
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((inputs, out.clone(), keys, (ramp, dropout, seed)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
