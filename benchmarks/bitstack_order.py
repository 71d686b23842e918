"""Does BitStack's global block order matter? Three orders of the same stack on stories260K, at equal bits.

One BitStack compression (6 blocks of rank 1 per layer, 32 × 256 calibration tokens from the second half of
the TinyStories sample), then, at each bits-per-weight target, every layer gets the blocks that a prefix of the
order allows, and KL(original ‖ compressed) is measured on 16 held-out windows (first half of the sample):
- ``greedy rel/bit`` (what hiercomp saves): next block with the largest drop in the layer's *relative*
  activation-weighted error per stored bit;
- ``greedy abs/bit``: the same drop weighted by the layer's number of weights (a larger layer's relative error
  counted as more output error);
- ``level-major``: every layer's block b before any layer's block b+1, in model order (the structure of the
  paper's order, without its per-level perplexity scoring).

    python benchmarks/bitstack_order.py     # writes benchmarks/results/bitstack_order.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hiercomp  # noqa: E402
from _common import RESULTS, STORIES, TINYSTORIES, machine, markdown_table, require_shared  # noqa: E402
from hiercomp import eval as ev  # noqa: E402
from hiercomp.anysize import bitstack_layers, global_order  # noqa: E402
from hiercomp.api import load_any  # noqa: E402
from hiercomp.layers import BitStackLinear  # noqa: E402

TARGETS = (2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
N_BLOCKS = 6


def weighted_order(layers: dict[str, BitStackLinear]) -> list[tuple[str, int]]:
    """The stack order with each layer's error reduction weighted by its number of weights."""
    return global_order(layers, weight=lambda layer: layer.in_features * layer.out_features)


def apply_prefix(layers: dict[str, BitStackLinear], order: list[tuple[str, int]], max_bits: float) -> float:
    """Activate the longest prefix of ``order`` whose layer bits fit ``max_bits``; returns the bits per weight."""
    counts = dict.fromkeys(layers, 0)
    fixed = sum(layer.total_bits() - layer.active * layer.block_bits() for layer in layers.values())
    used = fixed
    for position, (name, _block) in enumerate(order):
        cost = layers[name].block_bits()
        if used + cost > max_bits and position >= len(layers):
            break
        used += cost
        counts[name] += 1
    for name, count in counts.items():
        layers[name].set_active(count)
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    return sum(layer.total_bits() for layer in layers.values()) / weights


def main() -> None:
    require_shared()
    torch.set_num_threads(1)
    start = time.perf_counter()
    ref = load_any(str(STORIES))
    text = ev.load_eval_text(TINYSTORIES).replace("<|endoftext|>", "\n")
    ids = torch.tensor(ref.tokenizer(text, add_special_tokens=False)["input_ids"])
    first, second = ids[: ids.numel() // 2], ids[ids.numel() // 2:]

    def windows(tokens: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stack([torch.cat([torch.tensor([1]), tokens[i * 255:(i + 1) * 255]]) for i in range(n)])

    cm = hiercomp.compress(str(STORIES), hiercomp.Recipe.single("bitstack", n_blocks=N_BLOCKS, rank=1),
                           windows(second, 32), progress=False)
    held_out = windows(first, 16)
    layers = bitstack_layers(cm.model)
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    orders = {"greedy rel/bit (saved)": global_order(layers), "greedy abs/bit": weighted_order(layers),
              "level-major": [(name, b) for b in range(N_BLOCKS) for name in layers]}
    rows = []
    for target in TARGETS:
        row: dict[str, object] = {"target": target}
        for key, order in orders.items():
            bpw = apply_prefix(layers, order, target * weights)
            kl = ev.compare_distributions(ref.model, cm.model, held_out, progress=False).kl
            row[key] = f"{kl:.3f} ({bpw:.2f})"
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(rows, [("target", "bpw target", "{:.1f}".format),
                                  *((key, f"{key}: KL (bpw)", None) for key in orders)])
    text = f"""# BitStack: does the global block order matter? (stories260K)

Machine: {machine()}. `python benchmarks/bitstack_order.py`, {time.perf_counter() - start:.0f} s.
One stack ({N_BLOCKS} blocks of rank 1 per layer); at each target every order keeps its longest prefix that
fits (all bases always kept), KL(original ‖ compressed) on 16 held-out windows of 256 tokens.

{table}
"""
    (RESULTS / "bitstack_order.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
