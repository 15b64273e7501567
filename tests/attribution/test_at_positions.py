"""frozen.at_positions (each node's input at its own position, along its own direction) equals the
plain gather x[:, pos] · w, values and gradients, for repeated, unsorted and missing positions."""

from __future__ import annotations

import torch

from deepseemoe.attribution.frozen import at_positions


def test_equals_the_plain_gather_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, requires_grad=True)
    pos = torch.tensor([4, 0, 4, 6, 2, 4, 0])  # repeated, unsorted, positions 1, 3 and 5 unused
    w = torch.randn(len(pos), 5, generator=g)
    ours = at_positions(x, pos, w)
    plain = (x[:, pos, :] * w[None]).sum(-1)
    torch.testing.assert_close(ours, plain)
    up = torch.randn(3, len(pos), generator=g)
    (grad_ours,) = torch.autograd.grad((ours * up).sum(), x)
    (grad_plain,) = torch.autograd.grad((plain * up).sum(), x)
    torch.testing.assert_close(grad_ours, grad_plain)
    assert at_positions(x, torch.tensor([], dtype=torch.long), torch.zeros(0, 5)).shape == (3, 0)
