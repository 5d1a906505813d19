"""The LM head's decoding paths (CPU): the blocked vocabulary GEMM equals one GEMM exactly."""

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.modeling.heads import VOCAB_BLOCK, LMHead, vocab_logits_blocked


@pytest.mark.parametrize("rows", [2, 10, 64])
def test_blocked_vocab_logits_equal_one_gemm(rows: int) -> None:
    vocab = 2 * VOCAB_BLOCK + 37  # a last block shorter than the others
    weight, bias = torch.randn(vocab, 48), torch.randn(vocab)
    h = torch.randn(rows, 1, 48)
    out = vocab_logits_blocked(h, weight, bias)
    assert out.shape == (rows, 1, vocab)
    assert torch.equal(out, F.linear(h, weight, bias))


def test_head_without_grad_equals_the_autograd_logits() -> None:
    """Without autograd the head runs `small_linear` (native) or the blocked GEMM; with it, F.linear."""
    head = LMHead(48, 3000)
    torch.nn.init.normal_(head.bias)
    weight = torch.randn(3000, 48, requires_grad=True)
    h = torch.randn(5, 48)
    ref = F.linear(head.norm(F.gelu(head.dense(h))), weight, head.bias)
    with torch.no_grad():
        torch.testing.assert_close(head(h, weight), ref.detach(), rtol=1e-5, atol=1e-5)
    out = head(h, weight)  # training: autograd through F.linear
    out.sum().backward()
    assert weight.grad is not None and torch.equal(out.detach(), ref.detach())
