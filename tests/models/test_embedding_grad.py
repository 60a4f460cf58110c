"""layers.Embedding: nn.Embedding with the CPU weight gradient as one index_add_ (the training step's embedding
backward). Same forward, same state dict, and the same gradient as nn.Embedding (padding row zero) up to float
summation order, for any shapes and repeats (hypothesis); off the gradient path it is nn.Embedding itself."""
import torch
from hypothesis import given, settings, strategies as st

from twinv2.models.layers import Embedding


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 9), b=st.integers(1, 7), length=st.integers(1, 40),
       padding=st.sampled_from([None, 0]), seed=st.integers(0, 2**16))
def test_gradient_equals_nn_embedding(n, d, b, length, padding, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.Embedding(n, d, padding_idx=padding)
    ours = Embedding(n, d, padding_idx=padding)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, n, (b, length), generator=g)
    up = torch.randn(b, length, d, generator=g)
    (ref(idx) * up).sum().backward()
    out = ours(idx)
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
