"""The transformer parts ALMT is built from: pre-norm multi-head attention (a reference path
and a fast path with the same parameters), the feed-forward sub-block and the residual block.

Notation as in :mod:`.almt`: B batch, N queries, S keys, D model width, h heads, e head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _folded(norm: nn.LayerNorm, proj: nn.Linear) -> tuple[Tensor, Tensor]:
    """Weight and bias with ``proj(norm(x)) == F.linear(layer_norm(x) without affine, w, b)``."""
    return proj.weight * norm.weight, proj.weight @ norm.bias  # (out, D), (out,)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, n, h*e) -> (B, h, n, e)."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, h, n, e) -> (B, n, h*e)."""
    b, h, n, e = t.shape
    return t.transpose(1, 2).reshape(b, n, h * e)


def attention_probabilities(q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(e)) as ``scaled_dot_product_attention`` computes it:
    q (B, h, N, e), k (B, h, S, e), key_mask broadcastable to (B, h, N, S), True = attend.
    Returns (B, h, N, S)."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, N, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Pre-norm multi-head attention: LayerNorms on query, key and value inputs, bias-free
    Q/K/V projections to ``heads * dim_head``, softmax attention, ``Linear(inner -> dim)``.

    ``forward`` is the reference computation, written as the paper states it; ``forward_fast``
    computes the same function with the LayerNorm affines folded into the projections and, when
    only a few query rows are wanted, the key/value projections moved to the query side. Both
    return the attention output without the residual and take the same arguments.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        return split_heads(t, self.heads)

    def forward(
        self, x: Tensor, src: Tensor | None = None, key_mask: Tensor | None = None,
        n_queries: int | None = None,
    ) -> Tensor:
        """x (B, N, D) queries; src (B, S, D) keys/values (None: self-attention over x);
        key_mask (B, 1, 1, S) bool, True = attend; n_queries: only query x[:, :n_queries].
        Returns (B, N or n_queries, D)."""
        src = x if src is None else src  # (B, S, D)
        if n_queries is not None:
            x = x[:, :n_queries]  # (B, n, D)
        q = self._split(self.to_q(self.norm_q(x)))  # (B, h, N, e)
        k = self._split(self.to_k(self.norm_k(src)))  # (B, h, S, e)
        v = self._split(self.to_v(self.norm_v(src)))  # (B, h, S, e)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, h, N, e)
        return self.drop(self.to_out(merge_heads(out)))  # (B, N, D)

    def weights(
        self, x: Tensor, src: Tensor | None = None, key_mask: Tensor | None = None,
        n_queries: int | None = None,
    ) -> Tensor:
        """The attention probabilities :meth:`forward` uses, per head: (B, h, N or n_queries, S),
        each row summing to 1 (masked keys get 0). For analysis; training never calls it."""
        src = x if src is None else src  # (B, S, D)
        if n_queries is not None:
            x = x[:, :n_queries]  # (B, n, D)
        q = self._split(self.to_q(self.norm_q(x)))  # (B, h, N, e)
        k = self._split(self.to_k(self.norm_k(src)))  # (B, h, S, e)
        return attention_probabilities(q, k, key_mask)

    def forward_fast(
        self, x: Tensor, src: Tensor | None = None, key_mask: Tensor | None = None,
        n_queries: int | None = None,
    ) -> Tensor:
        """Same arguments and result as :meth:`forward`, fewer operations.

        The three LayerNorms share one normalisation of their input and their affines are folded
        into the projection weights, so Q, K and V come from one matmul (self-attention) or two
        (cross-attention). Self-attention with ``n_queries`` goes to :meth:`_fast_few_queries`.
        """
        if src is None and n_queries is not None:
            return self._fast_few_queries(x, n_queries, key_mask)
        if n_queries is not None:
            x = x[:, :n_queries]  # (B, n, D)
        wq, bq = _folded(self.norm_q, self.to_q)
        wk, bk = _folded(self.norm_k, self.to_k)
        wv, bv = _folded(self.norm_v, self.to_v)
        if src is None:  # one normalisation, one matmul for Q, K and V
            qkv = F.linear(self._normalise(x), torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv]))
            q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, N, h*e)
        else:
            q = F.linear(self._normalise(x), wq, bq)  # (B, N, h*e)
            kv = F.linear(self._normalise(src), torch.cat([wk, wv]), torch.cat([bk, bv]))  # (B, S, 2*h*e)
            k, v = kv.chunk(2, dim=-1)  # 2 x (B, S, h*e)
        out = F.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v), attn_mask=key_mask
        )  # (B, h, N, e)
        return self.drop(self.to_out(merge_heads(out)))  # (B, N, D)

    def _normalise(self, x: Tensor) -> Tensor:
        """LayerNorm without its affine (the three norms share ``eps``): (B, N, D) -> (B, N, D)."""
        return F.layer_norm(x, x.shape[-1:], eps=self.norm_q.eps)

    def _fast_few_queries(self, x: Tensor, n: int, key_mask: Tensor | None) -> Tensor:
        """Fast self-attention where only x[:, :n] is queried, keys/values projected on the query side.

        score(i, j) = q_i . W_k (g_k * x^_j + b_k) = (g_k * W_k^T q_i) . x^_j + const(i), and the
        constant drops out of the softmax (so ``norm_k.bias`` gets no gradient here; its gradient
        in :meth:`forward` is zero too); sum_j a_ij W_v (g_v * x^_j + b_v) =
        W_v (g_v * sum_j a_ij x^_j + b_v) because the weights sum to one.
        x (B, N, D) -> (B, n, D).
        """
        b, _, dim = x.shape
        h, e = self.heads, self.dim_head
        x_hat = self._normalise(x)  # (B, N, D)
        wq, bq = _folded(self.norm_q, self.to_q)
        q = F.linear(x_hat[:, :n], wq, bq).view(b, n, h, e)  # (B, n, h, e)
        wk = self.to_k.weight.view(h, e, dim)  # (h, e, D)
        q_in = torch.einsum("bnhe,hed->bhnd", q, wk) * self.norm_k.weight  # (B, h, n, D)
        kv = x_hat.unsqueeze(1)  # (B, 1, N, D)
        ctx = F.scaled_dot_product_attention(
            q_in.reshape(b, 1, h * n, dim), kv, kv, attn_mask=key_mask, scale=e**-0.5
        )  # (B, 1, h*n, D)
        ctx = ctx.view(b, h, n, dim) * self.norm_v.weight + self.norm_v.bias  # (B, h, n, D)
        wv = self.to_v.weight.view(h, e, dim)  # (h, e, D)
        out = torch.einsum("bhnd,hed->bnhe", ctx, wv).reshape(b, n, h * e)  # (B, n, h*e)
        return self.drop(self.to_out(out))  # (B, n, D)


class FeedForward(nn.Module):
    """Pre-norm MLP: LN -> Linear(D -> mlp) -> GELU -> Linear(mlp -> D)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class Block(nn.Module):
    """x = x + Attn(x, src); x = x + FF(x). Self-attention when ``src`` is None.

    ``fast_attention`` picks :meth:`Attention.forward_fast` instead of the reference
    :meth:`Attention.forward`; the parameters are the same either way.
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
        fast_attention: bool = False,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, mlp_dim, dropout)
        self.fast_attention = fast_attention

    def forward(
        self, x: Tensor, src: Tensor | None = None, key_mask: Tensor | None = None,
        n_queries: int | None = None,
    ) -> Tensor:
        """x (B, N, D) -> (B, N, D), or (B, n_queries, D) when only the first outputs are needed."""
        residual = x if n_queries is None else x[:, :n_queries]  # (B, N or n_queries, D)
        attend = self.attn.forward_fast if self.fast_attention else self.attn
        x = residual + attend(x, src, key_mask, n_queries)
        return x + self.ff(x)
