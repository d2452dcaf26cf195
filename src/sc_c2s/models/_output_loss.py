"""The output layer and the cross-entropy of training as one autograd step.

``cross_entropy(hidden @ weight.T)`` keeps the logits and their log-softmax, and its backward pass fills a
gradient of the same size with zeros before computing that of the log-softmax: several passes over a matrix of
answer tokens × vocabulary, which take a third of a training step of the small from-scratch models on a CPU. Here
the forward pass computes the softmax once and turns it in place into the gradient of each token's loss with
respect to its logits (the softmax minus the one-hot target), the only large matrix kept; the backward pass
multiplies it into the gradients of the hidden states and of the output weights. Each token's weight in the loss
scales those two products, not the large matrix.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights):
        probabilities = torch.softmax(hidden @ weight.T, dim=1)
        target = targets.clamp(min=0)[:, None]  # a token of weight 0 may take any column
        picked = probabilities.gather(1, target)[:, 0]
        token_loss = -picked.clamp(min=torch.finfo(picked.dtype).tiny).log()
        probabilities.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=picked.dtype, device=picked.device))
        ctx.save_for_backward(hidden, weight, probabilities, token_weights)
        return (token_weights * token_loss).sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, grad_logits, token_weights = ctx.saved_tensors
        scale = (token_weights * grad)[:, None]
        grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.T @ (hidden * scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted sum of the tokens' cross-entropy, their logits being ``hidden @ weight.T``.

    Parameters
    ----------
    hidden
        Hidden states of the tokens, ``(tokens, hidden size)``.
    weight
        Weights of a linear output layer without bias, ``(vocabulary, hidden size)``.
    targets
        Token each row predicts, ``(tokens,)``; where `token_weights` is 0 it is ignored (may be negative).
    token_weights
        Weight of each token's loss, ``(tokens,)``.

    Returns
    -------
    The loss, a scalar, differentiable with respect to `hidden` and `weight`.
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, token_weights)
