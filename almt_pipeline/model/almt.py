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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, check_model_config
from ..errors import ConfigError, TextModelError
from .heads import MODALITY_LETTERS, AuxiliaryHeads, HeadSpec, aux_parameter_count
from .layers import Block, FeedForward, attention_probabilities, merge_heads, split_heads
from .text_encoder import load_text_config

Trace = dict[str, Any]  # attention maps collected by ``ALMT.forward(..., trace={})``


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

    def forward(self, x: Tensor, frame_mask: Tensor | None = None, trace: list[Tensor] | None = None) -> Tensor:
        """x (B, T_m, d_m); frame_mask (B, T_m) bool, True = real frame (None: all attend).
        Returns (B, T, D). With ``trace`` (a list), appends the last block's attention of the T
        summary tokens over its keys, heads averaged: (B, T, T + T_m), keys = tokens then frames."""
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
        last = self.blocks[-1]
        assert isinstance(last, Block)
        if trace is not None:
            trace.append(last.attn.weights(h, key_mask=key_mask, n_queries=n).mean(1))  # (B, T, T + T_m)
        return last(h, key_mask=key_mask, n_queries=n)  # (B, T, D)


class PooledEmbedding(nn.Module):
    """The "without modality embedding" ablation: Linear(d_m -> D) plus a positional embedding,
    then each sample's real frames are cut into T equal segments and each segment is averaged into
    one token (no transformer, no learnable tokens)."""

    def __init__(self, in_dim: int, max_len: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_tokens = cfg.n_tokens
        self.max_len = max_len
        self.proj = nn.Linear(in_dim, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, cfg.dim))  # (1, T_max, D)

    def forward(self, x: Tensor, frame_mask: Tensor | None = None, trace: list[Tensor] | None = None) -> Tensor:
        """x (B, T_m, d_m); frame_mask (B, T_m) bool or None (then every frame is real). Returns
        (B, T, D). With ``trace``, appends each token's pooling weights over the frames: (B, T, T_m),
        rows summing to 1 (to 0 for a sample without a real frame)."""
        b, t_m, _ = x.shape
        h = self.proj(x) + self.pos[:, :t_m]  # (B, T_m, D)
        lengths = (torch.full((b,), t_m, device=x.device) if frame_mask is None
                   else frame_mask.sum(1))  # (B,) real frames, which lead the sequence
        # segment j of sample b covers frames [floor(j n_b / T), ceil((j + 1) n_b / T)) of its n_b real
        # frames (as adaptive pooling cuts them): per sample, so a score does not depend on its batch
        j = torch.arange(self.n_tokens, device=x.device)[None, :]  # (1, T)
        starts = (j * lengths[:, None]) // self.n_tokens  # (B, T)
        ends = -((-(j + 1) * lengths[:, None]) // self.n_tokens)  # (B, T)
        frames = torch.arange(t_m, device=x.device)[None, None, :]  # (1, 1, T_m)
        weights = ((frames >= starts[..., None]) & (frames < ends[..., None])).to(h.dtype)  # (B, T, T_m)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)  # the mean of each segment
        if trace is not None:
            trace.append(weights)
        return weights @ h  # (B, T, D)


class AHLLayer(nn.Module):
    """Adaptive hyper-modality learning layer: language queries attend to audio and to vision;
    H_hyper^j = LN4(H_hyper^(j-1)) + Linear_out(attn_audio + attn_vision). A modality listed in
    ``dropped`` has no keys, values or LayerNorm here (the "without audio/vision" ablations)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0,
                 dropped: Sequence[str] = ()) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.has_audio, self.has_vision = "audio" not in dropped, "vision" not in dropped
        self.norm_lang = nn.LayerNorm(dim)
        self.norm_audio = nn.LayerNorm(dim) if self.has_audio else None
        self.norm_vision = nn.LayerNorm(dim) if self.has_vision else None
        self.norm_hyper = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k_audio = nn.Linear(dim, inner, bias=False) if self.has_audio else None
        self.to_v_audio = nn.Linear(dim, inner, bias=False) if self.has_audio else None
        self.to_k_vision = nn.Linear(dim, inner, bias=False) if self.has_vision else None
        self.to_v_vision = nn.Linear(dim, inner, bias=False) if self.has_vision else None
        self.to_out = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        return split_heads(t, self.heads)

    def _streams(self, h_a: Tensor | None, h_v: Tensor | None) -> list[tuple[str, Tensor, Tensor]]:
        """(name, keys, values) of the modalities this layer attends to: 2 x (B, h, T, e) each."""
        out = []
        for name, x, norm, to_k, to_v in (
            ("audio", h_a, self.norm_audio, self.to_k_audio, self.to_v_audio),
            ("vision", h_v, self.norm_vision, self.to_k_vision, self.to_v_vision),
        ):
            if norm is not None and to_k is not None and to_v is not None and x is not None:
                normed = norm(x)  # (B, T, D)
                out.append((name, self._split(to_k(normed)), self._split(to_v(normed))))
        return out

    def forward(self, h_l: Tensor, h_a: Tensor | None, h_v: Tensor | None, hyper: Tensor,
                trace: dict[str, Tensor] | None = None) -> Tensor:
        """h_l, h_a, h_v, hyper: (B, T, D) (h_a / h_v None when dropped) -> new hyper (B, T, D).
        With ``trace`` (a dict), stores the language -> audio ("audio", alpha) and language ->
        vision ("vision", beta) attention, heads averaged: (B, T, T) each."""
        q = self._split(self.to_q(self.norm_lang(h_l)))  # (B, h, T, e)
        out = torch.zeros_like(q)  # (B, h, T, e)
        for name, k, v in self._streams(h_a, h_v):
            out = out + F.scaled_dot_product_attention(q, k, v)  # (B, h, T, e)
            if trace is not None:
                trace[name] = attention_probabilities(q, k).mean(1)  # (B, T, T)
        return self.norm_hyper(hyper) + self.drop(self.to_out(merge_heads(out)))


class UnguidedLayer(nn.Module):
    """An AHL layer without language guidance (paper Table 6): H_hyper^j = LN(H_hyper^(j-1)) +
    MLP(H_hyper^(j-1)), the MLP pre-norm with hidden width ``ahl_heads * ahl_dim_head``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_hyper = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, hidden, dropout)

    def forward(self, h_l: Tensor, h_a: Tensor | None, h_v: Tensor | None, hyper: Tensor,
                trace: dict[str, Tensor] | None = None) -> Tensor:
        return self.norm_hyper(hyper) + self.ff(hyper)  # (B, T, D)


class ALMT(nn.Module):
    """ALMT over a BERT-architecture text encoder; ``forward`` returns one score per sample.

    The ablation switches of :class:`ModelConfig` (``ahl``, ``fusion``, ``modality_embedding``,
    ``guided_layers``, ``drop_modalities``) remove parts; with their defaults this is the released
    model, parameter for parameter and in the same creation order. ``heads`` adds the parts an
    auxiliary training objective needs (:mod:`.heads`), after all of those.
    """

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module, text_dim: int,
                 heads: HeadSpec | None = None) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.text_dim = text_dim
        d, n = cfg.dim, cfg.n_tokens
        self.modalities = [m for m in ("audio", "vision") if m not in cfg.drop_modalities]
        embedding = ModalityEmbedding if cfg.modality_embedding else PooledEmbedding
        self.text_encoder = text_encoder
        self.embed_text = embedding(text_dim, cfg.text_len, cfg)
        self.embed_audio = embedding(cfg.audio_dim, cfg.audio_len, cfg) if "audio" in self.modalities else None
        self.embed_vision = embedding(cfg.vision_dim, cfg.vision_len, cfg) if "vision" in self.modalities else None
        # language scales H_l^1..H_l^ahl_depth
        self.lang_pos = nn.Parameter(torch.randn(1, n, d))  # (1, T, D)
        self.lang_blocks = nn.ModuleList(
            Block(d, cfg.lang_heads, cfg.lang_dim_head, cfg.lang_mlp_dim, cfg.dropout, cfg.fast_attention)
            for _ in range(cfg.ahl_depth - 1)
        )
        # adaptive hyper-modality learning
        self.hyper = nn.Parameter(torch.ones(1, n, d)) if cfg.ahl else None  # (1, T, D)
        guided = range(1, cfg.ahl_depth + 1) if cfg.guided_layers is None else cfg.guided_layers
        self.ahl = nn.ModuleList(
            AHLLayer(d, cfg.ahl_heads, cfg.ahl_dim_head, cfg.dropout, cfg.drop_modalities) if j in guided
            else UnguidedLayer(d, cfg.ahl_heads * cfg.ahl_dim_head, cfg.dropout)
            for j in range(1, cfg.ahl_depth + 1)
        ) if cfg.ahl else nn.ModuleList()
        # cross-modality fusion: hyper-modality (source) -> language (target)
        n_src = n if cfg.ahl else n * (1 + len(self.modalities))  # source tokens without the fusion token
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.fusion else None  # (1, 1, D)
        self.fusion_pos_src = nn.Parameter(torch.randn(1, n_src + 1, d)) if cfg.fusion else None  # (1, S + 1, D)
        self.fusion_pos_tgt = nn.Parameter(torch.randn(1, n + 1, d)) if cfg.fusion else None  # (1, T + 1, D)
        self.fusion_blocks = nn.ModuleList(
            Block(d, cfg.fusion_heads, cfg.fusion_dim_head, cfg.fusion_mlp_dim, cfg.dropout, cfg.fast_attention)
            for _ in range(cfg.fusion_depth if cfg.fusion else 0)
        )
        # regression head: the fusion token, or [pooled language; pooled source] without fusion
        self.head = nn.Linear(d if cfg.fusion else 2 * d, 1)
        self.aux = None if heads is None or not heads.any else AuxiliaryHeads(
            heads, d, [MODALITY_LETTERS[m] for m in ("text", *self.modalities)], cfg.dropout)

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
        trace: Trace | None = None, outputs: dict[str, Any] | None = None,
    ) -> Tensor:
        """text_bert (B, 3, L) float ids / attention mask / segment ids; audio (B, T_a, d_a);
        vision (B, T_v, d_v); lengths (B,) used only when ``cfg.masked``. Returns (B,).

        ``trace`` (an empty dict) receives, for analysis: ``"summary"``: per modality, the summary
        tokens' attention over that modality's inputs (see the embeddings' ``forward``);
        ``"ahl"``: one dict per AHL layer with "audio" (alpha) and "vision" (beta) maps (B, T, T)
        (empty for a layer not guided by language; no key for a dropped modality).

        ``outputs`` (an empty dict), for a model with auxiliary heads, receives what the training
        objectives need: ``representations`` (modality letter -> (B, D), the mean of its summary
        tokens; ``"fused"`` -> what the fused head reads), ``scores`` (stage -> (B,)) and
        ``projections`` (letter -> (B, P)). Without auxiliary heads it stays empty.
        """
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

        summary: dict[str, list[Tensor]] | None = None if trace is None else {m: [] for m in ("text", *self.modalities)}
        h_l = self.embed_text(text, text_mask, None if summary is None else summary["text"])  # (B, T, D)
        h_a = h_v = None
        if self.embed_audio is not None:
            h_a = self.embed_audio(audio, a_mask, None if summary is None else summary["audio"])  # (B, T, D)
        if self.embed_vision is not None:
            h_v = self.embed_vision(vision, v_mask, None if summary is None else summary["vision"])  # (B, T, D)

        scales = [h_l + self.lang_pos]  # H_l^1 (B, T, D)
        for blk in self.lang_blocks:
            scales.append(blk(scales[-1]))  # H_l^(j+1) (B, T, D)

        layer_maps: list[dict[str, Tensor]] = []
        if self.hyper is not None:
            source = self.hyper.expand(b, -1, -1)  # (B, T, D)
            for layer, h_lang in zip(self.ahl, scales):
                maps: dict[str, Tensor] = {}
                source = layer(h_lang, h_a, h_v, source, maps if trace is not None else None)  # (B, T, D)
                layer_maps.append(maps)
        else:  # without AHL: the last language scale and the audio and vision summary tokens, concatenated
            source = torch.cat([scales[-1]] + [h for h in (h_a, h_v) if h is not None], dim=1)  # (B, S, D)
        if trace is not None and summary is not None:
            trace["summary"] = {m: v[0] for m, v in summary.items() if v}
            trace["ahl"] = layer_maps
        if self.fusion_token is None or self.fusion_pos_src is None or self.fusion_pos_tgt is None:
            fused = torch.cat([scales[-1].mean(1), source.mean(1)], dim=-1)  # (B, 2D)
        else:
            token = self.fusion_token.expand(b, -1, -1)  # (B, 1, D)
            src = torch.cat([token, source], dim=1) + self.fusion_pos_src  # (B, S + 1, D)
            tgt = torch.cat([token, scales[-1]], dim=1) + self.fusion_pos_tgt  # (B, T + 1, D)
            for i, blk in enumerate(self.fusion_blocks):
                last = i == len(self.fusion_blocks) - 1
                tgt = blk(tgt, src, n_queries=1 if last else None)  # (B, T + 1, D); last: (B, 1, D)
            fused = tgt[:, 0]  # (B, D)
        score = self.head(fused).squeeze(-1)  # (B,)
        if self.aux is None:
            return score
        reps = {"T": h_l.mean(1), "A": None if h_a is None else h_a.mean(1), "V": None if h_v is None else h_v.mean(1)}
        present = {m: r for m, r in reps.items() if r is not None}  # (B, D) each
        if outputs is not None:
            outputs["representations"] = {**present, "fused": fused}
        return self.aux(score, present, outputs)  # (B,)


def count_parameters(model: ALMT) -> tuple[int, int]:
    """(parameters outside the text encoder, all parameters)."""
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    total = sum(p.numel() for p in model.parameters())
    outside = sum(p.numel() for p in model.parameters() if id(p) not in text_ids)
    return outside, total


def almt_parameter_count(m: ModelConfig, text_dim: int, heads: HeadSpec | None = None) -> int:
    """Parameters of ``ALMT(m, text_encoder, text_dim, heads)`` outside the text encoder, from the
    sizes alone (the layers of model/almt.py, ablation switches and objective heads included;
    nothing is built)."""
    d, t = m.dim, m.n_tokens
    n_mod = 2 - len(m.drop_modalities)  # audio and vision streams kept

    def block(heads: int, dim_head: int, mlp: int) -> int:
        inner = heads * dim_head
        attention = 3 * 2 * d + 3 * d * inner + (inner * d + d)  # 3 LayerNorms, Q/K/V, output
        return attention + 2 * d + (d * mlp + mlp) + (mlp * d + d)  # + LayerNorm, MLP

    def embedding(width: int, length: int) -> int:  # projection, tokens, positions, blocks
        if not m.modality_embedding:  # projection and positions only
            return (width * d + d) + length * d
        blocks = m.embed_depth * block(m.embed_heads, m.embed_dim_head, m.embed_mlp_dim)
        return (width * d + d) + t * d + (t + length) * d + blocks

    ahl_inner = m.ahl_heads * m.ahl_dim_head
    # language and hyper LayerNorms, per kept modality one LayerNorm and K/V; the query and output projections
    ahl_layer = 2 * 2 * d + n_mod * (2 * d + 2 * d * ahl_inner) + d * ahl_inner + (ahl_inner * d + d)
    unguided_layer = 2 * d + 2 * d + (d * ahl_inner + ahl_inner) + (ahl_inner * d + d)  # LayerNorm + MLP
    guided = m.ahl_depth if m.guided_layers is None else len(m.guided_layers)
    ahl = t * d + guided * ahl_layer + (m.ahl_depth - guided) * unguided_layer if m.ahl else 0
    n_src = t if m.ahl else t * (1 + n_mod)
    fusion = (d + (n_src + 1) * d + (t + 1) * d  # fusion token and positions
              + m.fusion_depth * block(m.fusion_heads, m.fusion_dim_head, m.fusion_mlp_dim)) if m.fusion else 0
    head = (d if m.fusion else 2 * d) + 1
    return (
        embedding(text_dim, m.text_len)
        + (0 if "audio" in m.drop_modalities else embedding(m.audio_dim, m.audio_len))
        + (0 if "vision" in m.drop_modalities else embedding(m.vision_dim, m.vision_len))
        + t * d + (m.ahl_depth - 1) * block(m.lang_heads, m.lang_dim_head, m.lang_mlp_dim)  # language scales
        + ahl + fusion + head
        + (aux_parameter_count(heads, d, 1 + n_mod) if heads is not None and heads.any else 0)
    )


def describe_model(cfg: ModelConfig, heads: HeadSpec | None = None) -> dict:
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
        model = ALMT(cfg, BertModel(text_config), text_config.hidden_size, heads)
    outside, total = count_parameters(model)
    return {"text_dim": text_config.hidden_size, "text_note": note, "excluding_text": outside, "total": total}
