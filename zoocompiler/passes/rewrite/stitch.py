"""Stitch layers: an affine map from one block interface to another (DeRy, SN-Net, Learngene Pool).

A stitch layer turns a value with interface ``src`` (the output of block A) into a value with
interface ``dst`` (the input block B expects). It is one learnable affine channel map (a 1×1
``nn.Conv2d`` for feature maps, an ``nn.Linear`` for tokens and flat vectors) wrapped in fixed,
parameter-free glue chosen from the two interfaces:

* layout adapters: NHWC ↔ NCHW permutes, map → tokens (``flatten(2).transpose(1, 2)``),
  tokens → map (drop prefix tokens, reshape to the patch grid), anything → flat (global mean,
  or the first prefix token for tokens that have one);
* spatial resampling to the destination grid: identity when equal, ``nn.AvgPool2d`` for an
  integer down-sampling factor, bilinear ``nn.Upsample`` otherwise (deterministic, exportable);
* prefix (class / distillation) tokens: the first ``min(src, dst)`` are kept and mapped, extra
  destination tokens are new learnable parameters initialised to the probe mean of ``dst``'s tokens.

Resampling acts on each channel alike and keeps constants, so it commutes with the channel map;
the layer applies the map at whichever resolution is smaller.

Initialisation ``"ls"`` is SN-Net's closed form: with ``X`` the source features at every
destination position (after the same resampling) and ``Y`` the destination features there,
``[W; b] = pinv([X, 1]) Y`` in float64, or with ``ridge=λ > 0`` the ridge solution on centred
data, ``W = (XcᵀXc + λI)⁻¹ XcᵀYc`` and ``b = ȳ - x̄W`` (the bias is not shrunk; ``λ`` is absolute,
added to a Gram matrix summed over all probe rows). A given matrix ``M`` follows the same
convention, ``Y = [X, 1] M``: shape ``(C_src + 1, C_dst)`` (last row the bias) or ``(C_src, C_dst)``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.errors import InputShapeError, PassError, ZooError
from zoocompiler.ir import Layout, TensorInfo, graph_info, node_info

from .blocks import Block, extract_block

InitSpec = Literal["ls", "random"] | torch.Tensor
_MAP_LAYOUTS = (Layout.MAP, Layout.MAP_NHWC)
_SUPPORTED = (Layout.MAP, Layout.MAP_NHWC, Layout.TOKENS, Layout.FLAT)


def resampler(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> nn.Module:
    """Parameter-free N×C×H×W resampling from ``src_hw`` to ``dst_hw``: identity, average pooling
    (every side divides by an integer factor ≥ 1) or bilinear interpolation (any other pair)."""
    src_hw, dst_hw = tuple(src_hw), tuple(dst_hw)
    if src_hw == dst_hw:
        return nn.Identity()
    if all(d <= s and s % d == 0 for s, d in zip(src_hw, dst_hw)):
        factor = tuple(s // d for s, d in zip(src_hw, dst_hw))
        return nn.AvgPool2d(kernel_size=factor, stride=factor)
    return nn.Upsample(size=dst_hw, mode="bilinear", align_corners=False)


class Stitch(nn.Module):
    """Base class: ``proj`` is the stitch's only affine map (``weight`` C_dst×C_src, ``bias`` C_dst).

    Subclasses implement ``forward`` and ``paired_rows(src_act, dst_act)``: the (X, Y) rows, one per
    destination position, that the least-squares fit relates by ``Y ≈ X Wᵀ + b``.
    """

    proj: nn.Conv2d | nn.Linear
    new_tokens: nn.Parameter | None

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__()
        self.src_info = src
        self.dst_info = dst
        self.new_tokens = None

    @property
    def in_channels(self) -> int:
        return int(self.src_info.channels)

    @property
    def out_channels(self) -> int:
        return int(self.dst_info.channels)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel map as (weight C_dst×C_src, bias C_dst), detached."""
        w = self.proj.weight.detach().reshape(self.out_channels, self.in_channels)
        return w.clone(), self.proj.bias.detach().clone()

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Overwrite the channel map (weight C_dst×C_src, bias C_dst); dtype follows the layer."""
        self.proj.weight.copy_(weight.reshape(self.proj.weight.shape).to(self.proj.weight.dtype))
        self.proj.bias.copy_(bias.to(self.proj.bias.dtype))

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def set_new_tokens(self, dst_act: torch.Tensor | None) -> None:
        """Initialise added prefix tokens to the probe mean of ``dst``'s tokens at those positions (else 0)."""
        if self.new_tokens is None:
            return
        if dst_act is None:
            self.new_tokens.zero_()
            return
        kept = self.new_tokens.shape[1]
        first = self.dst_info.prefix_tokens - kept
        self.new_tokens.copy_(dst_act[:, first : first + kept].mean(0, keepdim=True).to(self.new_tokens.dtype))

    def _with_new_tokens(self, tokens: torch.Tensor, kept: int) -> torch.Tensor:
        """Insert the learnable prefix tokens after the ``kept`` mapped source prefix tokens."""
        if self.new_tokens is None:
            return tokens
        new = self.new_tokens.expand(tokens.shape[0], -1, -1)
        if kept == 0:
            return torch.cat([new, tokens], dim=1)
        return torch.cat([tokens[:, :kept], new, tokens[:, kept:]], dim=1)

    def extra_repr(self) -> str:
        return f"{self.src_info.describe()} -> {self.dst_info.describe()}"


def _hw(info: TensorInfo) -> tuple[int, int]:
    """Spatial size of a map / NHWC map, or the patch grid of tokens."""
    if info.layout == Layout.MAP:
        return int(info.shape[2]), int(info.shape[3])
    if info.layout == Layout.MAP_NHWC:
        return int(info.shape[1]), int(info.shape[2])
    return _grid(info)


def _grid(info: TensorInfo) -> tuple[int, int]:
    patches = int(info.shape[1]) - info.prefix_tokens
    if info.grid is None or info.grid[0] * info.grid[1] != patches:
        raise PassError(
            f"tokens interface {info.describe()} has no patch grid matching its {patches} patch tokens",
            "pass a TensorInfo with grid=(h, w) and prefix_tokens set so that h*w = tokens - prefix",
        )
    return int(info.grid[0]), int(info.grid[1])


def _rows(nchw: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → (N·H·W)×C."""
    return nchw.permute(0, 2, 3, 1).reshape(-1, nchw.shape[1])


class _MapOutput(Stitch):
    """Shared tail for stitches that produce a map: resample and 1×1 conv, the cheaper one first."""

    def __init__(self, src: TensorInfo, dst: TensorInfo, src_hw: tuple[int, int]):
        super().__init__(src, dst)
        dst_hw = _hw(dst)
        self.resample = resampler(src_hw, dst_hw)
        self.resample_first = dst_hw[0] * dst_hw[1] <= src_hw[0] * src_hw[1]
        self.proj = nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.resample(x)) if self.resample_first else self.resample(self.proj(x))
        if self.dst_info.layout == Layout.MAP_NHWC:
            x = x.permute(0, 2, 3, 1)
        return x

    def _dst_rows(self, dst_act: torch.Tensor) -> torch.Tensor:
        return _rows(dst_act.permute(0, 3, 1, 2) if self.dst_info.layout == Layout.MAP_NHWC else dst_act)


class MapToMap(_MapOutput):
    """map / map_nhwc → map / map_nhwc: resampling + 1×1 conv."""

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__(src, dst, _hw(src))

    def _nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.src_info.layout == Layout.MAP_NHWC else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self._nchw(x))

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rows(self.resample(self._nchw(src_act))), self._dst_rows(dst_act)


class TokensToMap(_MapOutput):
    """tokens → map / map_nhwc: drop prefix tokens, reshape to the patch grid, resample, 1×1 conv."""

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__(src, dst, _grid(src))
        self.src_grid = _grid(src)

    def _grid_map(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.src_info.prefix_tokens :].transpose(1, 2).unflatten(2, self.src_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self._grid_map(x))

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rows(self.resample(self._grid_map(src_act))), self._dst_rows(dst_act)


class MapToTokens(Stitch):
    """map / map_nhwc → tokens: resample to the destination grid, flatten to tokens, linear, add prefix tokens."""

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__(src, dst)
        self.resample = resampler(_hw(src), _grid(dst))
        self.proj = nn.Linear(self.in_channels, self.out_channels)
        if dst.prefix_tokens:
            self.new_tokens = nn.Parameter(torch.zeros(1, dst.prefix_tokens, self.out_channels))

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.src_info.layout == Layout.MAP_NHWC:
            x = x.permute(0, 3, 1, 2)
        return self.resample(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_new_tokens(self.proj(self._patch_tokens(x)), kept=0)

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._patch_tokens(src_act)
        y = dst_act[:, self.dst_info.prefix_tokens :]
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


class TokensToTokens(Stitch):
    """tokens → tokens: keep the shared prefix tokens, resample the patch grid, linear over D, add prefix tokens."""

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__(src, dst)
        self.kept = min(src.prefix_tokens, dst.prefix_tokens)
        self.src_grid = _grid(src)
        self.resample = resampler(self.src_grid, _grid(dst))
        self.proj = nn.Linear(self.in_channels, self.out_channels)
        if dst.prefix_tokens > self.kept:
            self.new_tokens = nn.Parameter(torch.zeros(1, dst.prefix_tokens - self.kept, self.out_channels))

    def _source_tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.src_info.prefix_tokens :]
        if not isinstance(self.resample, nn.Identity):
            grid = patches.transpose(1, 2).unflatten(2, self.src_grid)
            patches = self.resample(grid).flatten(2).transpose(1, 2)
        if self.kept == 0:
            return patches
        return torch.cat([x[:, : self.kept], patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_new_tokens(self.proj(self._source_tokens(x)), self.kept)

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._source_tokens(src_act)
        y = torch.cat([dst_act[:, : self.kept], dst_act[:, self.dst_info.prefix_tokens :]], dim=1)
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


class ToFlat(Stitch):
    """any → flat: global mean over positions (first prefix token for tokens that have one), then linear."""

    def __init__(self, src: TensorInfo, dst: TensorInfo):
        super().__init__(src, dst)
        self.proj = nn.Linear(self.in_channels, self.out_channels)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.src_info.layout
        if layout == Layout.MAP:
            return x.mean(dim=(2, 3))
        if layout == Layout.MAP_NHWC:
            return x.mean(dim=(1, 2))
        if layout == Layout.TOKENS:
            return x[:, 0] if self.src_info.prefix_tokens else x.mean(dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._pooled(x))

    def paired_rows(self, src_act: torch.Tensor, dst_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pooled(src_act), dst_act


def _stitch_class(src: TensorInfo, dst: TensorInfo) -> type[Stitch]:
    for info, side in ((src, "source"), (dst, "destination")):
        if info is None or info.layout not in _SUPPORTED:
            layout = None if info is None else info.describe()
            raise PassError(
                f"cannot stitch a {side} interface of layout {layout}",
                f"cut at a value whose layout is one of {', '.join(_SUPPORTED)}",
            )
    if dst.layout == Layout.FLAT:
        return ToFlat
    if src.layout == Layout.FLAT:
        raise PassError(
            f"cannot stitch flat {src.describe()} into spatial {dst.describe()}: a vector has no positions",
            "cut model A before its global pooling, or model B after its pooling",
        )
    if src.layout == Layout.TOKENS:
        return TokensToTokens if dst.layout == Layout.TOKENS else TokensToMap
    return MapToTokens if dst.layout == Layout.TOKENS else MapToMap


# --- initialisation ----------------------------------------------------------------------------------


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine fit ``y ≈ x Wᵀ + b`` in float64: (W C_y×C_x, b C_y).

    ``ridge == 0``: ``[W; b]ᵀ = pinv([x, 1]) y`` (minimum-norm least squares, SN-Net). ``ridge > 0``:
    ridge regression on centred data, the bias unpenalised.
    """
    x64, y64 = x.detach().double(), y.detach().double()
    if ridge == 0:
        x_aug = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], dim=1)
        m = torch.linalg.pinv(x_aug) @ y64
        return m[:-1].T.contiguous(), m[-1].contiguous()
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    xc, yc = x64 - x_mean, y64 - y_mean
    gram = xc.T @ xc + ridge * torch.eye(x64.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ yc).T
    return w.contiguous(), (y_mean - w @ x_mean).contiguous()


def _check_probe(name: str, probe: torch.Tensor, info: TensorInfo) -> None:
    if tuple(probe.shape[1:]) != tuple(info.shape[1:]):
        raise InputShapeError(
            f"{name} has shape {tuple(probe.shape)} but the interface is {info.describe()}",
            f"pass activations of shape (N, {', '.join(map(str, info.shape[1:]))})",
        )


def _matrix_init(layer: Stitch, m: torch.Tensor) -> None:
    c_in, c_out = layer.in_channels, layer.out_channels
    if tuple(m.shape) == (c_in + 1, c_out):
        layer.set_affine(m[:-1].T, m[-1])
    elif tuple(m.shape) == (c_in, c_out):
        layer.set_affine(m.T, torch.zeros(c_out))
    else:
        raise ZooError(
            f"init matrix has shape {tuple(m.shape)}, expected ({c_in + 1}, {c_out}) or ({c_in}, {c_out})",
            "pass M with Y = [X, 1] M (rows: source channels, then the bias; columns: destination channels)",
        )


def make_stitch(
    src: TensorInfo,
    dst: TensorInfo,
    *,
    probe_src: torch.Tensor | None = None,
    probe_dst: torch.Tensor | None = None,
    init: InitSpec = "ls",
    ridge: float = 0.0,
) -> Stitch:
    """A stitch layer from interface ``src`` to ``dst`` (eval mode, float32).

    ``init="ls"`` fits the channel map by least squares on ``probe_src``/``probe_dst`` (the two
    interfaces' activations on the same inputs, batch first); ``"random"`` keeps PyTorch's default
    init; a tensor is a matrix ``M`` with ``Y = [X, 1] M``. Added prefix tokens start at the probe
    mean of ``probe_dst`` when given. Raises ``PassError`` for interfaces it cannot join.
    """
    layer = _stitch_class(src, dst)(src, dst)
    if ridge < 0:
        raise ZooError(f"ridge must be >= 0, got {ridge}", "pass ridge=0 (plain least squares) or a positive value")
    if probe_src is not None:
        _check_probe("probe_src", probe_src, src)
    if probe_dst is not None:
        _check_probe("probe_dst", probe_dst, dst)
    if probe_src is not None and probe_dst is not None and probe_src.shape[0] != probe_dst.shape[0]:
        raise InputShapeError(
            f"probe_src has {probe_src.shape[0]} samples but probe_dst has {probe_dst.shape[0]}",
            "compute both probes from the same input batch",
        )
    with torch.no_grad():
        if isinstance(init, torch.Tensor):
            _matrix_init(layer, init)
        elif init == "ls":
            if probe_src is None or probe_dst is None:
                raise PassError("init='ls' needs probe activations", "pass probe_src= and probe_dst=, or init='random'")
            x, y = layer.double().paired_rows(probe_src.double(), probe_dst.double())
            layer.float()
            layer.set_affine(*least_squares(x, y, ridge))
        elif init != "random":
            raise ZooError(f"unknown stitch init {init!r}", "use 'ls', 'random' or a matrix tensor")
        layer.set_new_tokens(probe_dst)
    return layer.eval()


# --- whole blocks and models ---------------------------------------------------------------------------


@torch.no_grad()
def batched_forward(module: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``module(x)`` without gradients, ``batch_size`` samples at a time, concatenated along the batch."""
    return torch.cat([module(chunk) for chunk in x.split(batch_size)], dim=0)


def stitch(
    block_a: Block,
    block_b: Block,
    probe_a: torch.Tensor,
    probe_b: torch.Tensor,
    *,
    init: InitSpec = "ls",
    ridge: float = 0.0,
) -> nn.Sequential:
    """``Sequential(head=A, stitch=S, tail=B)`` joining ``block_a``'s output to ``block_b``'s input.

    ``probe_a`` / ``probe_b`` are the blocks' *inputs* computed from the same images (block A is run
    on ``probe_a`` to get the source activations; ``probe_b`` already is the destination one).
    The blocks are copied, so the result trains without touching the source models.
    """
    src_act = batched_forward(block_a.module, probe_a)
    layer = make_stitch(block_a.output, block_b.input, probe_src=src_act, probe_dst=probe_b, init=init, ridge=ridge)
    head, tail = copy.deepcopy(block_a.module), copy.deepcopy(block_b.module)
    return nn.Sequential(OrderedDict(head=head, stitch=layer, tail=tail)).eval()


def _cut(gm: fx.GraphModule, cut: str | int) -> tuple[int, TensorInfo]:
    cuts = graph_info(gm).cut_points
    if isinstance(cut, int):
        if not -len(cuts) <= cut < len(cuts):
            raise PassError(f"cut index {cut} out of range", f"use 0..{len(cuts) - 1}")
        index = cut % len(cuts)
    elif cut in cuts:
        index = cuts.index(cut)
    else:
        raise PassError(f"'{cut}' is not a cut point", "pick a node from graph_info(gm).cut_points")
    node = next(n for n in gm.graph.nodes if n.name == cuts[index])
    return index, node_info(node).tensor


def _part(gm: fx.GraphModule, start: int, end: int) -> nn.Module:
    """Copy of the block from cut ``start`` to cut ``end`` (identity when they coincide)."""
    return nn.Identity() if start == end else copy.deepcopy(extract_block(gm, start, end).module)


def stitch_models(
    model_a_gm: fx.GraphModule,
    cut_a: str | int,
    model_b_gm: fx.GraphModule,
    cut_b: str | int,
    probe_x: torch.Tensor,
    *,
    init: InitSpec = "ls",
    ridge: float = 0.0,
    batch_size: int = 64,
) -> nn.Sequential:
    """Model A up to ``cut_a`` → stitch → model B from ``cut_b`` to its output, as
    ``Sequential(head, stitch, tail)``; both probes come from running each model's prefix on ``probe_x``.

    The two GraphModules must be annotated (``zoocompiler.trace``); cuts are cut-point names or indices.
    The result is fx-traceable and ONNX-exportable and shares no parameters with the inputs.
    """
    if not graph_info(model_a_gm).cut_points or not graph_info(model_b_gm).cut_points:
        raise PassError("a model graph has no cut points", "trace both models with zoocompiler.trace(model, x)")
    a_idx, src = _cut(model_a_gm, cut_a)
    b_idx, dst = _cut(model_b_gm, cut_b)
    last_b = len(graph_info(model_b_gm).cut_points) - 1
    head = _part(model_a_gm, 0, a_idx).eval()
    b_prefix = _part(model_b_gm, 0, b_idx).eval()
    probe_src = batched_forward(head, probe_x, batch_size)
    probe_dst = batched_forward(b_prefix, probe_x, batch_size)
    layer = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst, init=init, ridge=ridge)
    tail = _part(model_b_gm, b_idx, last_b)
    return nn.Sequential(OrderedDict(head=head, stitch=layer, tail=tail)).eval()
