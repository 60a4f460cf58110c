"""layers.Embedding: nn.Embedding with the CPU weight gradient as one row sum (layers.row_sums: index_add_ for rows
of >= 16 floats, one flat bincount below; the training step's embedding backward). Same forward, same state dict,
and the same gradient as nn.Embedding (padding row zero) up to float summation order, for any shapes, repeats and
output-gradient layouts (hypothesis); off the gradient path it is nn.Embedding itself."""
import torch
from hypothesis import given, settings, strategies as st

from twinv2.models.layers import Embedding


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 20), b=st.integers(1, 7), length=st.integers(1, 40),
       padding=st.sampled_from([None, 0]), seed=st.integers(0, 2**16), strided=st.booleans())
def test_gradient_equals_nn_embedding(n, d, b, length, padding, seed, strided):
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.Embedding(n, d, padding_idx=padding)
    ours = Embedding(n, d, padding_idx=padding)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, n, (b, length), generator=g)
    up = torch.randn(b, length, d, generator=g)
    (ref(idx) * up).sum().backward()
    out = ours(idx)
    if strided:     # the lookup concatenated with another one, as K_h is: its gradient arrives as a strided slice
        wide = torch.cat([out, torch.zeros(b, length, 5)], dim=-1)
        (wide * torch.cat([up, torch.ones(b, length, 5)], -1)).sum().backward()
    else:
        (out * up).sum().backward()
    torch.testing.assert_close(out, ref(idx))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    if padding is not None:
        assert (ours.weight.grad[padding] == 0).all()
    assert (ours.weight.grad.abs().sum(1) > 0).sum() <= len(idx.unique())        # only rows that were read


def test_no_grad_and_frozen_tables_take_nn_embeddings_path():
    e = Embedding(10, 3, padding_idx=0)
    idx = torch.tensor([[1, 0, 9]])
    with torch.no_grad():
        assert e(idx).grad_fn is None
    e.weight.requires_grad_(False)
    assert e(idx).grad_fn is None
    assert set(e.state_dict()) == {"weight"}


def test_row_sums_both_branches_equal_a_loop():
    """Both CPU branches of row_sums (bincount below 16 columns, index_add_ from 16) against a plain loop."""
    from twinv2.models.layers import row_sums

    g = torch.Generator().manual_seed(0)
    for d in (1, 8, 15, 16, 32):
        idx = torch.randint(0, 7, (300,), generator=g)
        rows = torch.randn(300, d + 3, generator=g)[:, 2:2 + d]          # strided
        want = torch.zeros(7, d)
        for i in range(300):
            want[idx[i]] += rows[i]
        got = row_sums(idx, rows, 7)
        assert got.shape == (7, d) and got.dtype == rows.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
