"""ALMT: Adaptive Language-guided Multimodal Transformer (Zhang et al., EMNLP 2023).

The whole network in one file. Every size comes from :class:`ModelConfig`; see
the paper (arXiv 2310.05804) and its released code for the architecture this reproduces. Notation in the shape comments:
B batch, L text tokens, T_a / T_v audio / vision frames, d_a / d_v their widths,
H text-encoder width, D model width (``cfg.dim``), T summary tokens (``cfg.n_tokens``),
h heads, e width of one head.

Default mode is the released code's: padded frames and padded text positions are fed to the
modality embeddings without a mask. With ``cfg.masked`` the lengths and the text attention mask
become key-padding masks, and each batch is trimmed to its longest real sequence first.

Attention is ``scaled_dot_product_attention`` (fused kernels, no materialised score matrix), and
only the outputs that are used are computed: the last block of a modality embedding queries only
the first ``n_tokens`` positions (every position is still a key), the last fusion block only
position 0, the one the head reads.

Two attention paths, same parameters, same function (``cfg.fast_attention`` chooses):
- :meth:`Attention.forward`, the reference: LayerNorms -> Q/K/V projections -> attention -> output
  projection, as the paper writes it. Check the model against the paper here.
- :meth:`Attention.forward_fast` (the default, for training speed): the three pre-norm LayerNorms
  of a block share one normalisation of their common input and their affine parameters are
  folded into the Q/K/V weights, so one matmul gives Q, K and V. In the few-queries block of a
  modality embedding the key and value projections are moved to the query side, so attention runs
  over the D-wide normalised input instead of projecting every frame to ``heads * dim_head``
  twice. The key LayerNorm's bias of that block adds the same score to every key of a query and
  cancels in the softmax (in the released code too): its gradient is zero in the reference path
  and absent (``None``) in the fast one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, check_model_config
from ..errors import ConfigError, TextModelError
from .text_encoder import load_text_config


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


class ModalityEmbedding(nn.Module):
    """Linear(d_m -> D), T learnable tokens prepended, positional embedding, transformer;
    returns the T token outputs."""

    def __init__(self, in_dim: int, max_len: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_tokens = cfg.n_tokens
        self.max_len = max_len
        self.proj = nn.Linear(in_dim, cfg.dim)
        self.tokens = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.dim))  # (1, T, D)
        self.pos = nn.Parameter(torch.randn(1, cfg.n_tokens + max_len, cfg.dim))  # (1, T + T_max, D)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.embed_heads, cfg.embed_dim_head, cfg.embed_mlp_dim, cfg.dropout,
                  cfg.fast_attention)
            for _ in range(cfg.embed_depth)
        )

    def forward(self, x: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """x (B, T_m, d_m); frame_mask (B, T_m) bool, True = real frame (None: all attend).
        Returns (B, T, D)."""
        b, t_m, _ = x.shape
        n = self.n_tokens
        h = torch.cat([self.tokens.expand(b, -1, -1), self.proj(x)], dim=1)  # (B, T + T_m, D)
        h = h + self.pos[:, : n + t_m]
        key_mask = None
        if frame_mask is not None:
            tokens_ok = frame_mask.new_ones(b, n)  # summary tokens are always keys
            key_mask = torch.cat([tokens_ok, frame_mask], dim=1)[:, None, None, :]  # (B, 1, 1, T + T_m)
        if not len(self.blocks):
            return h[:, :n]
        for blk in self.blocks[:-1]:
            h = blk(h, key_mask=key_mask)  # (B, T + T_m, D)
        return self.blocks[-1](h, key_mask=key_mask, n_queries=n)  # (B, T, D)


class AHLLayer(nn.Module):
    """Adaptive hyper-modality learning layer: language queries attend to audio and to vision;
    H_hyper^j = LN4(H_hyper^(j-1)) + Linear_out(attn_audio + attn_vision)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_lang, self.norm_audio = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_vision, self.norm_hyper = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k_audio = nn.Linear(dim, inner, bias=False)
        self.to_v_audio = nn.Linear(dim, inner, bias=False)
        self.to_k_vision = nn.Linear(dim, inner, bias=False)
        self.to_v_vision = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        return split_heads(t, self.heads)

    def forward(self, h_l: Tensor, h_a: Tensor, h_v: Tensor, hyper: Tensor) -> Tensor:
        """h_l, h_a, h_v, hyper: (B, T, D) -> new hyper (B, T, D)."""
        q = self._split(self.to_q(self.norm_lang(h_l)))  # (B, h, T, e)
        audio = self.norm_audio(h_a)  # (B, T, D)
        k_a, v_a = self._split(self.to_k_audio(audio)), self._split(self.to_v_audio(audio))  # 2 x (B, h, T, e)
        vision = self.norm_vision(h_v)  # (B, T, D)
        k_v, v_v = self._split(self.to_k_vision(vision)), self._split(self.to_v_vision(vision))  # 2 x (B, h, T, e)
        out = F.scaled_dot_product_attention(q, k_a, v_a) + \
            F.scaled_dot_product_attention(q, k_v, v_v)  # (B, h, T, e)
        return self.norm_hyper(hyper) + self.drop(self.to_out(merge_heads(out)))


class ALMT(nn.Module):
    """ALMT over a BERT-architecture text encoder; ``forward`` returns one score per sample."""

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module, text_dim: int) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.text_dim = text_dim
        d, n = cfg.dim, cfg.n_tokens
        self.text_encoder = text_encoder
        self.embed_text = ModalityEmbedding(text_dim, cfg.text_len, cfg)
        self.embed_audio = ModalityEmbedding(cfg.audio_dim, cfg.audio_len, cfg)
        self.embed_vision = ModalityEmbedding(cfg.vision_dim, cfg.vision_len, cfg)
        # language scales H_l^1..H_l^ahl_depth
        self.lang_pos = nn.Parameter(torch.randn(1, n, d))  # (1, T, D)
        self.lang_blocks = nn.ModuleList(
            Block(d, cfg.lang_heads, cfg.lang_dim_head, cfg.lang_mlp_dim, cfg.dropout, cfg.fast_attention)
            for _ in range(cfg.ahl_depth - 1)
        )
        # adaptive hyper-modality learning
        self.hyper = nn.Parameter(torch.ones(1, n, d))  # (1, T, D)
        self.ahl = nn.ModuleList(
            AHLLayer(d, cfg.ahl_heads, cfg.ahl_dim_head, cfg.dropout) for _ in range(cfg.ahl_depth)
        )
        # cross-modality fusion: hyper-modality (source) -> language (target)
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, d))  # (1, 1, D)
        self.fusion_pos_src = nn.Parameter(torch.randn(1, n + 1, d))  # (1, T + 1, D)
        self.fusion_pos_tgt = nn.Parameter(torch.randn(1, n + 1, d))  # (1, T + 1, D)
        self.fusion_blocks = nn.ModuleList(
            Block(d, cfg.fusion_heads, cfg.fusion_dim_head, cfg.fusion_mlp_dim, cfg.dropout, cfg.fast_attention)
            for _ in range(cfg.fusion_depth)
        )
        self.head = nn.Linear(d, 1)

    def _check_inputs(self, text_bert: Tensor, audio: Tensor, vision: Tensor) -> None:
        cfg = self.cfg
        if text_bert.dim() != 3 or text_bert.shape[1] != 3 or text_bert.shape[2] > cfg.text_len:
            raise ConfigError(
                f"text_bert has shape {tuple(text_bert.shape)}; expected (B, 3, L) with L <= "
                f"model.text_len={cfg.text_len}"
            )
        for name, x, width, max_len in (
            ("audio", audio, cfg.audio_dim, cfg.audio_len),
            ("vision", vision, cfg.vision_dim, cfg.vision_len),
        ):
            if x.dim() != 3 or x.shape[2] != width or x.shape[1] > max_len:
                raise ConfigError(
                    f"{name} input has shape {tuple(x.shape)}; the model config expects "
                    f"(B, T <= {name}_len={max_len}, {name}_dim={width})"
                )

    @staticmethod
    def _trim(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Cut x (B, T_m, d_m) to the longest real length; frame mask (B, T_m') or None."""
        if lengths is None:
            return x, None
        lengths = lengths.to(device=x.device).long().clamp(0, x.shape[1])  # (B,)
        t_max = max(int(lengths.max()), 1)
        x = x[:, :t_max]  # (B, T_m', d_m)
        return x, torch.arange(t_max, device=x.device)[None, :] < lengths[:, None]

    def forward(
        self, text_bert: Tensor, audio: Tensor, vision: Tensor,
        audio_lengths: Tensor | None = None, vision_lengths: Tensor | None = None,
    ) -> Tensor:
        """text_bert (B, 3, L) float ids / attention mask / segment ids; audio (B, T_a, d_a);
        vision (B, T_v, d_v); lengths (B,) used only when ``cfg.masked``. Returns (B,)."""
        self._check_inputs(text_bert, audio, vision)
        b = text_bert.shape[0]
        ids, attn_mask, segments = text_bert.long().unbind(1)  # 3 x (B, L)
        text_mask = a_mask = v_mask = None
        if self.cfg.masked:
            positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # (L,)
            l_max = max(int(((attn_mask > 0).any(0) * positions).max()), 1)
            ids, attn_mask, segments = ids[:, :l_max], attn_mask[:, :l_max], segments[:, :l_max]
            text_mask = attn_mask > 0  # (B, L')
            audio, a_mask = self._trim(audio, audio_lengths)
            vision, v_mask = self._trim(vision, vision_lengths)
        text = self.text_encoder(
            input_ids=ids, attention_mask=attn_mask, token_type_ids=segments
        )[0]  # (B, L, H)

        h_l = self.embed_text(text, text_mask)  # (B, T, D)
        h_a = self.embed_audio(audio, a_mask)  # (B, T, D)
        h_v = self.embed_vision(vision, v_mask)  # (B, T, D)

        scales = [h_l + self.lang_pos]  # H_l^1 (B, T, D)
        for blk in self.lang_blocks:
            scales.append(blk(scales[-1]))  # H_l^(j+1) (B, T, D)

        hyper = self.hyper.expand(b, -1, -1)  # (B, T, D)
        for layer, h_lang in zip(self.ahl, scales):
            hyper = layer(h_lang, h_a, h_v, hyper)  # (B, T, D)

        token = self.fusion_token.expand(b, -1, -1)  # (B, 1, D)
        src = torch.cat([token, hyper], dim=1) + self.fusion_pos_src  # (B, T + 1, D)
        tgt = torch.cat([token, scales[-1]], dim=1) + self.fusion_pos_tgt  # (B, T + 1, D)
        for i, blk in enumerate(self.fusion_blocks):
            last = i == len(self.fusion_blocks) - 1
            tgt = blk(tgt, src, n_queries=1 if last else None)  # (B, T + 1, D); last: (B, 1, D)
        return self.head(tgt[:, 0]).squeeze(-1)  # (B,)


def count_parameters(model: ALMT) -> tuple[int, int]:
    """(parameters outside the text encoder, all parameters)."""
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    total = sum(p.numel() for p in model.parameters())
    outside = sum(p.numel() for p in model.parameters() if id(p) not in text_ids)
    return outside, total


def almt_parameter_count(m: ModelConfig, text_dim: int) -> int:
    """Parameters of ``ALMT(m, text_encoder, text_dim)`` outside the text encoder, from the sizes
    alone (the layers of model/almt.py; nothing is built)."""
    d, t = m.dim, m.n_tokens

    def block(heads: int, dim_head: int, mlp: int) -> int:
        inner = heads * dim_head
        attention = 3 * 2 * d + 3 * d * inner + (inner * d + d)  # 3 LayerNorms, Q/K/V, output
        return attention + 2 * d + (d * mlp + mlp) + (mlp * d + d)  # + LayerNorm, MLP

    def embedding(width: int, length: int) -> int:  # projection, tokens, positions, blocks
        blocks = m.embed_depth * block(m.embed_heads, m.embed_dim_head, m.embed_mlp_dim)
        return (width * d + d) + t * d + (t + length) * d + blocks

    ahl_inner = m.ahl_heads * m.ahl_dim_head
    ahl_layer = 4 * 2 * d + 5 * d * ahl_inner + (ahl_inner * d + d)  # 4 LayerNorms, 5 projections, output
    return (
        embedding(text_dim, m.text_len) + embedding(m.audio_dim, m.audio_len)
        + embedding(m.vision_dim, m.vision_len)
        + t * d + (m.ahl_depth - 1) * block(m.lang_heads, m.lang_dim_head, m.lang_mlp_dim)  # language scales
        + t * d + m.ahl_depth * ahl_layer  # hyper-modality and AHL layers
        + d + 2 * (t + 1) * d  # fusion token and positions
        + m.fusion_depth * block(m.fusion_heads, m.fusion_dim_head, m.fusion_mlp_dim)
        + d + 1  # regression head
    )


def describe_model(cfg: ModelConfig) -> dict:
    """Parameter counts for ``cfg`` without loading pretrained weights (built on the meta device).

    Keys: ``text_dim``, ``text_note`` (empty, or why bert-base's shape was assumed),
    ``excluding_text``, ``total``. A hub model that is neither cached nor downloadable is
    counted as bert-base (BertConfig defaults), which the note says.
    """
    from transformers import BertConfig, BertModel  # heavy: imported when a count is asked for

    note = ""
    try:
        text_config = load_text_config(cfg.text_model)
    except TextModelError:
        if Path(cfg.text_model).expanduser().exists():
            raise
        text_config = BertConfig()
        note = "; assumed bert-base: its config is not available offline"
    with torch.device("meta"):
        model = ALMT(cfg, BertModel(text_config), text_config.hidden_size)
    outside, total = count_parameters(model)
    return {"text_dim": text_config.hidden_size, "text_note": note, "excluding_text": outside, "total": total}
