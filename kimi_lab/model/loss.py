"""Next-token cross-entropy from the last hidden states, chunked over tokens so (N, V) logits never exist at once.

``linear_cross_entropy(hidden, weight, targets, chunk_tokens)`` equals
``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (mean over tokens) in value and gradients.
The logits of one chunk of ``chunk_tokens`` rows are formed, reduced to their loss and their gradient
``softmax - onehot`` (the softmax-CE derivative), and turned straight into the chunk's gradients w.r.t. the hidden
states and the head weight, then freed: the peak is one (chunk, V) block instead of the full (N, V) logits, their
log-softmax and its gradient. Gradients are computed in the forward (the fused linear-cross-entropy idea of Liger
Kernel, Hsu et al. 2024, arXiv 2410.10989), so the FLOPs are those of the unchunked head: 3 matmuls, no recompute.

Precision: the three matmuls run in the dtype ``F.linear`` would use (bf16 under bf16-mixed autocast: tensor cores,
fp32 accumulation inside each GEMM); each chunk's logits are cast to fp32 (at least) for the max, log-sum-exp, loss
and ``softmax - onehot``, and the loss and the head-weight gradient are summed over chunks in fp32. Only one (C, V)
block exists in fp32 at a time; the unchunked fallback casts the full logits to fp32 as ``F.cross_entropy`` needs.

Written by hand: no PyTorch op fuses the head projection with the loss on CPU (``torch.nn.functional`` has none,
and the fused kernels of Liger / Apple's cut-cross-entropy are Triton, CUDA only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would run the head in: autocast's when it is on (bf16-mixed), else the input's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``hidden (N, D) @ weight (V, D)^T`` against ``targets (N,)``, ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # softmax, loss and the weight gradient: >= fp32
        h, w = hidden.to(dtype), weight.to(dtype)
        n_tokens = hidden.shape[0]
        needs_grad = hidden.requires_grad or weight.requires_grad
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(h) if needs_grad else None  # (N, D)
        grad_w = torch.zeros_like(w, dtype=acc) if needs_grad else None  # (V, D)
        for start in range(0, n_tokens, chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]  # (C, D), (C,)
            logits = (h_c @ w.t()).to(acc)  # (C, V)
            target_logit = logits.gather(1, t_c.unsqueeze(1))  # (C, 1)
            row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            exp = logits.sub_(row_max).exp_()  # in place: no second (C, V) block
            sum_exp = exp.sum(dim=-1, keepdim=True)  # (C, 1)
            loss += (sum_exp.log() + row_max - target_logit).sum()  # sum of logsumexp - target logit
            if needs_grad:
                # d(mean CE)/d logits = (softmax - onehot) / N, in place on the chunk's block
                grad_logits = exp.div_(sum_exp * n_tokens)  # the same block, renamed
                grad_logits.scatter_add_(1, t_c.unsqueeze(1), exp.new_full((t_c.shape[0], 1), -1.0 / n_tokens))
                g = grad_logits.to(dtype)  # (C, V); the same block when dtype is acc, a bf16 copy under autocast
                grad_h[start:start + chunk] = g @ w  # (C, D)
                if g.dtype == acc:  # fp32 / fp64 runs: accumulate in place, no (V, D) temporary
                    grad_w.addmm_(g.t(), h_c)  # (V, D) += (V, C) @ (C, D)
                else:  # a bf16 GEMM (fp32 accumulation inside it), its (V, D) result summed over chunks in fp32
                    grad_w.add_(g.t() @ h_c)
                del grad_logits, g
            del logits, exp  # before the next chunk's logits: one (C, V) block alive at a time
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss / n_tokens

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_hidden = (grad_h * grad_loss).to(h_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_w * grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None) -> torch.Tensor:
    """Mean next-token CE of ``hidden (..., D)`` through the head ``weight (V, D)`` against ``targets (...)``.

    ``chunk_tokens`` null or >= the token count: the plain full-logits path (F.linear + F.cross_entropy in fp32)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk_tokens is None or chunk_tokens >= hidden.shape[0]:
        logits = F.linear(hidden, weight)  # (N, V)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
    return LinearCrossEntropy.apply(hidden, weight, targets, int(chunk_tokens))
