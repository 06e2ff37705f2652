"""Packed weight formats of hanlin/kernels/qlinear.h: quantize, dequantize and row operations in PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Weight kinds, as in qlinear.h.
Q8 = 1
Q4 = 2
F32_PANELS = 3  # fp32, 16 output rows interleaved per panel: [ceil(M / 16), K, 16]; group holds M
PANEL = 16
SCHEMES = ("int8", "int4")
NIBBLE_RUN = 32  # 4-bit weights are packed in runs of 32: byte j holds weight j (low) and j + 16 (high)


@dataclass
class PackedWeight:
    """A weight [out_features, in_features] in a qlinear.h layout; scales and mins are float16 [M, K / group]
    (empty for F32_PANELS, whose group is out_features)."""

    kind: int
    qdata: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor  # empty for Q8
    group: int

    @property
    def out_features(self) -> int:
        return self.group if self.kind == F32_PANELS else self.qdata.shape[0]

    @property
    def in_features(self) -> int:
        return self.qdata.shape[1] * (2 if self.kind == Q4 else 1)

    def rows(self, index: torch.Tensor) -> "PackedWeight":
        """The given output rows (a row permutation or selection), in the same layout."""
        if self.kind == F32_PANELS:
            return pack_panels(panel_rows(self.qdata, torch.arange(self.group, device=self.qdata.device)[index]))
        mins = self.mins[index] if self.mins.numel() else self.mins
        return PackedWeight(self.kind, self.qdata[index], self.scales[index], mins, self.group)

    def regrouped(self, group: int) -> "PackedWeight":
        """The same values with a finer scale group (Q8 only: each scale is repeated, nothing is rounded)."""
        if group == self.group:
            return self
        if self.kind != Q8 or self.group % group or self.in_features % group:
            raise ValueError(f"cannot regroup a kind {self.kind} weight from group {self.group} to {group}")
        return PackedWeight(Q8, self.qdata, self.scales.repeat_interleave(self.group // group, dim=1), self.mins, group)


def int4_fits(in_features: int, group: int) -> bool:
    return group % NIBBLE_RUN == 0 and in_features % group == 0


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16, upwards (so a range computed in fp32 stays covered)."""
    h = x.clamp(max=65504.0).to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    h = x.clamp(min=-65504.0).to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _divide(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.where(step > 0, x / torch.where(step > 0, step, 1.0), 0.0)


def pack_int8(weight: torch.Tensor) -> PackedWeight:
    """Symmetric per output channel (group = in_features); |error| <= scale / 2 with the stored fp16 scale."""
    w = weight.detach().float().contiguous()
    scale_M1 = _fp16_at_least(w.abs().amax(dim=1, keepdim=True) / 127.0)
    q = torch.round(_divide(w, scale_M1.float())).clamp(-127, 127).to(torch.int8)
    return PackedWeight(Q8, q, scale_M1, torch.empty(0, dtype=torch.float16, device=w.device), w.shape[1])


def pack_int4(weight: torch.Tensor, group: int = 32) -> PackedWeight:
    """Asymmetric per group of `group` inputs: w ≈ q * scale + min, q in 0..15; |error| <= scale / 2."""
    w = weight.detach().float().contiguous()
    M, K = w.shape
    if not int4_fits(K, group):
        raise ValueError(f"4-bit packing needs in_features ({K}) divisible by group ({group}), a multiple of 32")
    w_MGk = w.view(M, K // group, group)
    min_MG = _fp16_at_most(w_MGk.amin(dim=2))
    scale_MG = _fp16_at_least((w_MGk.amax(dim=2) - min_MG.float()) / 15.0)
    q = _divide(w_MGk - min_MG.float()[..., None], scale_MG.float()[..., None])
    q = torch.round(q).clamp(0, 15).to(torch.uint8).view(M, K // NIBBLE_RUN, 2, NIBBLE_RUN // 2)
    packed = q[:, :, 0] | (q[:, :, 1] << 4)
    return PackedWeight(Q4, packed.reshape(M, K // 2), scale_MG, min_MG, group)


def pack_weight(weight: torch.Tensor, scheme: str, group: int = 32) -> PackedWeight:
    """int4 where the shape allows it (in_features % group == 0, group % 32 == 0), int8 per channel otherwise."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (use {' or '.join(SCHEMES)})")
    if scheme == "int4" and int4_fits(weight.shape[1], group):
        return pack_int4(weight, group)
    return pack_int8(weight)


def pack_panels(weight: torch.Tensor) -> PackedWeight:
    """fp32 [M, K] -> F32_PANELS [ceil(M / 16), K, 16], the same values (rows past M are zeros); one copy."""
    w = weight.detach()
    M, K = w.shape
    full, rest = divmod(M, PANEL)
    panels = torch.empty(full + (rest > 0), K, PANEL, dtype=torch.float32, device=w.device)
    panels[:full].transpose(1, 2).copy_(w[: full * PANEL].view(full, PANEL, K))
    if rest:
        panels[full].zero_()
        panels[full, :, :rest].copy_(w[full * PANEL :].t())
    empty = torch.empty(0, dtype=torch.float16, device=w.device)
    return PackedWeight(F32_PANELS, panels, empty, empty, M)


def panel_rows(qdata: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fp32 [len(index), K]: rows `index` (int64) of a F32_PANELS weight, gathered (exact)."""
    return qdata[index // PANEL, :, index % PANEL]


def panel_range(qdata: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """fp32 [end - start, K]: rows start .. end of a F32_PANELS weight (copies only the panels they are in)."""
    first = start // PANEL
    block = qdata[first : -(-end // PANEL)]
    return block.transpose(1, 2).reshape(-1, qdata.shape[1])[start - first * PANEL : end - first * PANEL]


def dequantize(kind: int, qdata: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [M, K] values of a quantized weight (or of some of its rows); panels go through panel_range."""
    scale = scales.float().repeat_interleave(group, dim=-1)
    if kind == Q8:
        return qdata.float() * scale[..., : qdata.shape[-1]]
    if kind != Q4:
        raise ValueError(f"unknown weight kind {kind}")
    runs = qdata.view(*qdata.shape[:-1], -1, 1, NIBBLE_RUN // 2)
    q = torch.cat([runs & 15, runs >> 4], dim=-2).view(*qdata.shape[:-1], -1)
    return q.float() * scale + mins.float().repeat_interleave(group, dim=-1)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stacks the rows of packed weights (fused q/k/v, gate/up); Q8 scale groups are unified first."""
    if len(parts) == 1:
        return parts[0]
    if len({p.kind for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
        raise ValueError("cannot fuse packed weights of different kinds or widths")
    if parts[0].kind == F32_PANELS:
        return pack_panels(torch.cat([panel_range(p.qdata, 0, p.group) for p in parts]))
    group = min(p.group for p in parts)
    parts = [p.regrouped(group) for p in parts]
    mins = torch.cat([p.mins for p in parts]) if parts[0].kind == Q4 else parts[0].mins
    return PackedWeight(
        parts[0].kind, torch.cat([p.qdata for p in parts]), torch.cat([p.scales for p in parts]), mins, group
    )
