//! All-attention's relative-position term: `q_i · key_pe[:, i − j]` for every query and
//! earlier key, from one GEMM and Transformer-XL's relative shift.

use burn::tensor::Tensor;

/// Relative-position scores `q_i · key_pe[:, i - j]` for every query `i` and key `j <= i`
/// (entries with `j > i` hold other values and must be masked by the caller).
///
/// # Shapes
/// - `q`: `[batch, n_heads, seq, d_head]`
/// - `key_pe`: `[d_head, span]`, `span >= seq`
/// - output: `[batch, n_heads, seq, seq]`
pub fn relative_scores(q: Tensor<4>, key_pe: &Tensor<2>) -> Tensor<4> {
    let [batch, n_heads, seq, _] = q.dims();
    let [_, span] = key_pe.dims();
    assert!(
        span >= seq,
        "key_pe covers {span} distances, sequence has {seq}"
    );
    let device = q.device();
    // by_distance[.., i, m] = q_i · key_pe[:, seq - 1 - m] (distances in reverse order).
    let reversed = key_pe.clone().narrow(1, 0, seq).flip([1]); // [d_head, seq]
    let by_distance = q.matmul(reversed.unsqueeze::<4>()); // [batch, n_heads, seq, seq]
    // The relative shift (Transformer-XL's `_rel_shift`): pad one zero column on the left, read
    // the [seq, seq + 1] rows as [seq + 1, seq], drop the first row. Then
    // out[i, j] = by_distance[i, j + seq - 1 - i] = q_i · key_pe[:, i - j] for j <= i: a few
    // copies instead of a gather (whose backward is a slow scatter-add).
    let zeros = Tensor::<4>::zeros([batch, n_heads, seq, 1], &device);
    Tensor::cat(vec![zeros, by_distance], 3)
        .reshape([batch, n_heads, seq + 1, seq])
        .narrow(2, 1, seq)
        .reshape([batch, n_heads, seq, seq])
}
