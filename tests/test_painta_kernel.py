"""PAIntA's math (kernels/painta.py) against a dense implementation of eq. (5), on random tensors."""
import math

import pytest
import torch

from faithful_inpaint.kernels import painta


def dense_painta(q, k, v, heads, c, query_mask):
    """Eq. (5) written out: build the N x N scores, scale (masked query, known key) pairs by c_j, softmax."""
    b, n, dim = q.shape
    d = dim // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2).float() for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)                     # [B, heads, N, N]
    m = query_mask.bool()
    pair = m[:, None, :, None] & ~m[:, None, None, :]                     # M_i = 1 and M_j = 0
    scaled = torch.where(pair, c[:, None, None, :].float() * scores, scores)
    out = torch.softmax(scaled, -1) @ vh
    return out.transpose(1, 2).reshape(b, n, dim)


def random_case(dtype=torch.float32, b=2, n=64, heads=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, heads * d, generator=g).to(dtype) for _ in range(3))
    c = torch.rand(b, n, generator=g)
    mask = (torch.rand(b, n, generator=g) > 0.6).float()
    return q, k, v, heads, c, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_linear_memory_form_equals_dense_eq5(dtype, tol):
    q, k, v, heads, c, mask = random_case(dtype)
    ours = painta.painta_attention(q, k, v, heads, c, mask)
    ref = dense_painta(q, k, v, heads, c, mask)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, atol=tol, rtol=tol)


def test_keys_appended_by_other_patches_are_left_unscaled():
    """RefineNet-style patches append keys/values after the image's own: eq. (5) scales only known pixels."""
    q, k, v, heads, c, mask = random_case()
    g = torch.Generator().manual_seed(5)
    k_extra, v_extra = (torch.randn(k.shape[0], 7, k.shape[2], generator=g) for _ in range(2))
    ours = painta.painta_attention(q, torch.cat([k, k_extra], 1), torch.cat([v, v_extra], 1), heads, c, mask)
    # the dense form with the appended keys counted as masked (never scaled) pixels
    ones = torch.ones(c.shape[0], 7)
    ref_all = dense_painta(torch.cat([q, torch.zeros_like(k_extra)], 1), torch.cat([k, k_extra], 1),
                           torch.cat([v, v_extra], 1), heads, torch.cat([c, ones], 1), torch.cat([mask, ones], 1))
    torch.testing.assert_close(ours, ref_all[:, :q.shape[1]], atol=1e-5, rtol=1e-5)


def test_relevance_one_everywhere_is_plain_attention_exactly():
    q, k, v, heads, _, mask = random_case()
    ones = torch.ones(mask.shape)
    assert torch.equal(painta.painta_attention(q, k, v, heads, ones, mask), painta.sdpa(q, k, v, heads))


def test_empty_mask_is_plain_attention_exactly():
    q, k, v, heads, c, mask = random_case()
    zero = torch.zeros_like(mask)
    assert torch.equal(painta.painta_attention(q, k, v, heads, c, zero), painta.sdpa(q, k, v, heads))


def test_unmasked_query_rows_are_untouched():
    q, k, v, heads, c, mask = random_case()
    out = painta.painta_attention(q, k, v, heads, c, mask)
    plain = painta.sdpa(q, k, v, heads)
    keep = ~mask.bool()
    assert torch.equal(out[keep], plain[keep])


def attention_mass(q, k, heads, scale_keys=None):
    b, n, dim = q.shape
    d = dim // heads
    kk = k if scale_keys is None else k * scale_keys[..., None]
    qh, kh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, kk))
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1).mean(1)  # [B, N, N]


def test_masked_queries_give_less_attention_to_low_relevance_known_pixels():
    g = torch.Generator().manual_seed(3)
    b, n, heads, d = 1, 64, 2, 16
    # Positive query-key similarity, so damping a score lowers that pair's weight.
    base = torch.randn(1, 1, heads * d, generator=g)
    q = base + 0.1 * torch.randn(b, n, heads * d, generator=g)
    k = base + 0.1 * torch.randn(b, n, heads * d, generator=g)
    mask = torch.zeros(b, n)
    mask[:, :16] = 1
    c = torch.ones(b, n)
    low = torch.zeros(b, n, dtype=torch.bool)
    low[:, 32:48] = True
    c[low] = 0.05
    key_scale = torch.where(mask.bool(), torch.ones_like(c), c)
    before = attention_mass(q, k, heads)[:, :16][:, :, 32:48].sum(-1).mean()
    after = attention_mass(q, k, heads, key_scale)[:, :16][:, :, 32:48].sum(-1).mean()
    assert after < 0.5 * before
    # and the kernel's output moves accordingly: equal to the dense eq. (5) with that c
    out = painta.painta_attention(q, k, q, heads, c, mask)
    torch.testing.assert_close(out, dense_painta(q, k, q, heads, c, mask), atol=1e-5, rtol=1e-5)


def test_normalise_relevance_by_hand():
    s = torch.tensor([[0.1, 0.2, 0.3, 0.4, 1.0]])
    # median 0.3, max 1.0 -> clip(s - 0.3, 0, 1)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.7]])
    torch.testing.assert_close(painta.normalise_relevance(s), expected)


def test_smoothing_matches_reference_kernel_weights():
    s = torch.zeros(1, 9)
    s[0, 4] = 1.0  # centre of a 3x3 grid
    out = painta.smooth(s, 3, 3).view(3, 3)
    w = torch.exp(-torch.tensor([1.0, 0.0, 1.0]))  # reference per-axis weights exp(-d^2)
    w = w / w.sum()
    torch.testing.assert_close(out, w[:, None] * w[None, :])
    assert torch.equal(painta.smooth(s, 3, 3, sigma=0), s)


def test_token_relevance_sums_selected_token_probabilities():
    g = torch.Generator().manual_seed(1)
    q_c = torch.randn(2, 6, 8, generator=g)
    k_c = torch.randn(1, 5, 8, generator=g)
    probs = torch.softmax(q_c @ k_c.transpose(-1, -2) / math.sqrt(8), -1)  # one head of width 8
    torch.testing.assert_close(painta.token_relevance(q_c, k_c, 1, [1, 3]), probs[..., [1, 3]].sum(-1))
    # all tokens -> 1
    torch.testing.assert_close(painta.token_relevance(q_c, k_c, 2, range(5)), torch.ones(2, 6))
