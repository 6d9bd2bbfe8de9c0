"""The compiled paged decode kernel computes what the pure-torch gathered path computes."""

import pytest
import torch

from sagellm.accel.kernels import paged_decode_kernel
from sagellm.models.attention import AttentionMetadata, paged_attention


@pytest.fixture(scope="module")
def kernel():
    k = paged_decode_kernel()
    if k is None:
        pytest.skip("no C++ toolchain here: the torch path is used instead")
    return k


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_kernel_matches_torch_path(kernel, dtype, tol, block_size):
    gen = torch.Generator().manual_seed(block_size)
    n_heads, n_kv, dim, num_blocks = 6, 2, 32, 80
    lens = [1, 5, block_size * 3, 37, 2]
    max_blocks = max(-(-n // block_size) for n in lens)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used : used + nb]
        tables[i, nb:] = perm[used]  # padding with a valid id, as the runner does
        used += nb
    k_cache = torch.randn(num_blocks, block_size, n_kv, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), n_heads, dim, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    span = max_blocks * block_size
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        decode_rows=torch.arange(len(lens)),
        decode_block_tables=tables,
        decode_mask=(torch.arange(span)[None] < lens_t[:, None]).view(len(lens), 1, 1, span),
        prefills=[],
        block_size=block_size,
        decode_lens=lens_t,
    )
    k_new = torch.zeros(len(lens), n_kv, dim, dtype=dtype)
    want = paged_attention(q, k_new, k_new, k_cache, v_cache, meta, scale=dim**-0.5)
    meta.decode_kernel = kernel
    got = paged_attention(q, k_new, k_new, k_cache, v_cache, meta, scale=dim**-0.5)
    assert (want.float() - got.float()).abs().max().item() < tol


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_bf16_linear_is_bit_identical(rows, with_bias):
    from sagellm.accel.linear import Linear

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).bfloat16()
    b = torch.randn(96, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    lin = Linear(w, b, pack=True)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert lin.packed is not None and lin.weight is None
    assert torch.equal(lin(x), torch.nn.functional.linear(x, w, b))
    # float32 is never packed and goes through F.linear unchanged
    assert Linear(w.float(), None, pack=True).packed is None
