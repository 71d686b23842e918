"""What a compression run reports: per layer, the method, exact stored bits and the error it caused."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    method: str
    kind: str
    shape: list[int]
    bits: dict[str, int]
    bits_per_weight: float
    rel_output_error: float | None  # on calibration inputs; None when compressed without data
    rel_weight_error: float
    seconds: float


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def compressed_weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def compressed_bits(self) -> int:
        return sum(sum(r.bits.values()) for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits of the compressed layers (codes, scales, zeros, masks, indices, biases) per weight."""
        return self.compressed_bits / self.compressed_weights if self.layers else 16.0

    def to_dict(self) -> dict[str, Any]:
        return {"bits_per_weight": self.bits_per_weight, "compressed_weights": self.compressed_weights,
                "compressed_bits": self.compressed_bits, "seconds": self.seconds, "settings": self.settings,
                "layers": [asdict(r) for r in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        return cls([LayerReport(**r) for r in data.get("layers", [])], data.get("seconds", 0.0),
                   data.get("settings", {}))
