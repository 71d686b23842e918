"""Any-size models: BitStack blocks of all layers in one global stack, loaded up to a budget.

At save time every BitStack layer's blocks are ordered across layers into one stack (``hiercomp.json``,
key ``bitstack``): first each layer's first block (the *base*, which every size keeps), then the other
blocks by their estimated marginal value — the drop in the layer's relative activation-weighted error
that the block brings (``block_errors[i-1] − block_errors[i]``, measured at compression) divided by the
block's stored bits. A layer's blocks stay in their own order (block i+1 only after block i): a greedy
merge takes, among each layer's next block, the one worth most per bit. Weighing relative errors equally
treats every layer as equally sensitive to a given relative output error — an assumption, cheaper than
the paper's per-level perplexity sweeps (15 × #layers evaluations).

``load(dir, budget=...)`` takes the longest prefix of that stack whose saved size fits: the bytes of
every tensor that is not a BitStack block (embeddings, norms, other compressed layers, the per-layer
column scales and biases) plus the blocks of the prefix; or, for ``"3.0bpw"``, whose bits per weight
over the compressed layers (as the report counts them) fit. Only the prefix's blocks are read from the
file (sliced safetensors reads), never the whole stack.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from hiercomp.budget.budget import parse_budget as parse_any
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import compressed_layers
from hiercomp.io.saved import _unique_state
from hiercomp.layers.bitstack import BitStackLinear

BLOCK_BUFFERS = ("signs", "u", "v")
def parse_budget(budget: str | int | float) -> tuple[str, float]:
    """A plain number of bytes, or any budget :func:`hiercomp.budget.parse_budget` reads except a ratio
    (a BitStack folder does not know its original's size) -> ("bytes", n) or ("bpw", x).

    Bytes here are the tensor bytes of the weights file at that size (the safetensors header, a few hundred bytes
    to a few KB, is not counted, because it shrinks with the number of blocks loaded)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0:
            raise HiercompError(f"budget must be positive, got {budget}")
        return "bytes", float(budget)
    text = str(budget).strip()
    parsed = parse_any(text + "B" if text.replace(".", "", 1).isdigit() else text)
    if parsed.unit == "ratio":
        raise HiercompError(f"a BitStack folder cannot take a ratio budget ({text}); give bytes (120KB) or 3.0bpw")
    return parsed.unit, parsed.value


def bitstack_layers(model: nn.Module) -> dict[str, BitStackLinear]:
    return {name: layer for name, layer in compressed_layers(model).items() if isinstance(layer, BitStackLinear)}


def global_order(layers: dict[str, BitStackLinear],
                 weight: Callable[[BitStackLinear], float] = lambda layer: 1.0) -> list[tuple[str, int]]:
    """Every stored block as (layer, block index): all bases first (in model order), then the rest, greedily by
    error reduction per bit among each layer's next block (ties: model order). ``weight`` scales a layer's
    relative error reduction (benchmarks/bitstack_order.py compares weighting by layer size)."""
    order = [(name, 0) for name in layers]
    heap: list[tuple[float, int, str, int]] = []

    def offer(rank: int, name: str, block: int) -> None:
        layer = layers[name]
        if block < layer.n_blocks:
            errors = layer.block_errors
            gain = (errors[block] - errors[block + 1]) * weight(layer) if len(errors) > block + 1 else 0.0
            heapq.heappush(heap, (-gain / layer.block_bits(), rank, name, block))

    for rank, name in enumerate(layers):
        offer(rank, name, 1)
    while heap:
        _, rank, name, block = heapq.heappop(heap)
        order.append((name, block))
        offer(rank, name, block + 1)
    return order


def stack_meta(model: nn.Module) -> dict[str, Any]:
    """The ``bitstack`` entry of hiercomp.json ({} for a model without BitStack layers)."""
    layers = bitstack_layers(model)
    if not layers:
        return {}
    compressed = compressed_layers(model)
    prefixes = tuple(f"{name}." for name in compressed)
    tensors, _ = _unique_state(model)
    dense_bits = sum(8 * t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith(prefixes))
    # Compressed layers' stored bits, without the BitStack blocks (column scales and biases stay in).
    fixed_compressed = sum(layer.total_bits() for layer in compressed.values()) - sum(
        layer.active * layer.block_bits() for layer in layers.values())
    return {"bitstack": {
        "scoring": "relative activation-weighted error reduction per stored bit, greedy across layers",
        "fixed_bits": dense_bits + fixed_compressed,
        "fixed_compressed_bits": fixed_compressed,
        "compressed_weights": sum(layer.in_features * layer.out_features for layer in compressed.values()),
        "block_bits": {name: layer.block_bits() for name, layer in layers.items()},
        "order": [list(entry) for entry in global_order(layers)],
    }}


def prefix_sizes(stack: dict[str, Any]) -> tuple[int, list[int]]:
    """(number of base blocks, stored bits of the whole model at each prefix length 0..len(order))."""
    sizes = [stack["fixed_bits"]]
    for name, _block in stack["order"]:
        sizes.append(sizes[-1] + stack["block_bits"][name])
    return len(stack["block_bits"]), sizes


def choose_prefix(stack: dict[str, Any], budget: str | int | float) -> int:
    """The longest prefix length of the stack that fits ``budget`` (one-line error below the base)."""
    kind, value = parse_budget(budget)
    n_base, sizes = prefix_sizes(stack)
    if kind == "bytes":
        fits = [p for p in range(n_base, len(sizes)) if sizes[p] / 8 <= value]
        base_text = f"{sizes[n_base] / 8:.0f} bytes ({sizes[n_base] / 8000:.1f} KB)"
    else:
        extra = stack["fixed_compressed_bits"] - stack["fixed_bits"]
        per_weight = [(s + extra) / stack["compressed_weights"] for s in sizes]
        fits = [p for p in range(n_base, len(sizes)) if per_weight[p] <= value]
        base_text = f"{per_weight[n_base]:.3f} bpw"
    if not fits:
        raise HiercompError(f"budget {budget} is below the BitStack base of {base_text} (every layer keeps its "
                            f"first block, plus the tensors that are not blocks); pass at least that")
    return fits[-1]


def check_stack(stack: Any, info: dict[str, Any], path: str | Path) -> None:
    """The ``bitstack`` entry is well formed: positive integer sizes, an order of stored blocks of BitStack layers,
    each layer's blocks in their own order (one-line errors for an edited or damaged entry)."""
    def bad(what: str) -> HiercompError:
        return HiercompError(f"{path}/hiercomp.json: the BitStack entry is damaged ({what}); compress the model again")

    if not isinstance(stack, dict):
        raise bad("not an object")
    block_bits = stack.get("block_bits")
    if not isinstance(block_bits, dict) or not block_bits:
        raise bad("no block sizes")
    for key in ("fixed_bits", "fixed_compressed_bits", "compressed_weights"):
        if not isinstance(stack.get(key), int) or isinstance(stack.get(key), bool) or stack[key] < 0:
            raise bad(f"{key} is {stack.get(key)!r}")
    next_block: dict[str, int] = {}
    for entry in stack.get("order") or []:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in block_bits):
            raise bad(f"order entry {entry!r}")
        name, block = entry
        layer = info.get("layers", {}).get(name)
        if not isinstance(layer, dict) or block != next_block.get(name, 0) or block >= layer.get("n_blocks", 0):
            raise bad(f"block {block} of {name} out of place")
        next_block[name] = block + 1
    for name, bits in block_bits.items():
        if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0 or name not in next_block:
            raise bad(f"block size of {name} is {bits!r}")


def load_budget(path: str | Path, info: dict[str, Any], budget: str | int | float) -> tuple[nn.Module, dict]:
    """The model of the folder at ``path`` with the longest stack prefix that fits ``budget``, and ``info``
    updated to it (layer configs, report bits, ``loaded`` entry)."""
    from safetensors import safe_open

    from hiercomp.io.integrity import verify_files, verify_structure
    from hiercomp.io.saved import WEIGHTS_FILE, build_skeleton

    stack = info.get("bitstack")
    if not stack:
        raise HiercompError(f"{path} has no BitStack layers, so it has one size only; load it without a budget "
                            "(compress with --method bitstack for an any-size model)")
    verify_structure(path, info)
    verify_files(path, info)
    check_stack(stack, info, path)
    length = choose_prefix(stack, budget)
    counts: dict[str, int] = {}
    for name, _block in stack["order"][:length]:
        counts[name] = counts.get(name, 0) + 1
    info = copy.deepcopy(info)
    stored_blocks = {name: info["layers"][name]["n_blocks"] for name in counts}
    for name, count in counts.items():
        info["layers"][name].update(n_blocks=count, active=count)
    model = build_skeleton(path, info)
    for name, layer in bitstack_layers(model).items():  # the sizes the budget was chosen by are the real ones
        if layer.block_bits() != stack["block_bits"].get(name):
            raise HiercompError(f"{path}/hiercomp.json says a block of {name} has {stack['block_bits'].get(name)} "
                                f"bits, the layer's config makes it {layer.block_bits()}; the metadata was edited — "
                                "compress the model again")
    sliced = {f"{name}.{buffer}": count for name, count in counts.items() for buffer in BLOCK_BUFFERS}
    weights = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as handle:
            state = {key: handle.get_slice(key)[: sliced[key]] if key in sliced else handle.get_tensor(key)
                     for key in handle.keys()}
    except Exception as err:
        raise HiercompError(f"{weights} is damaged or missing ({str(err).splitlines()[0]}); "
                            "compress the model again") from None
    for alias, target in info.get("aliases", {}).items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HiercompError(f"{weights} does not match its config (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); compress the model again")
    model.eval()
    layers = bitstack_layers(model)
    for entry in info.get("report", {}).get("layers", []):
        layer = layers.get(entry["name"])
        if layer is not None:
            entry["bits"] = layer.storage_bits()
            entry["bits_per_weight"] = layer.bits_per_weight()
            entry["method"] = f"{entry['method']} [{layer.active}/{stored_blocks[entry['name']]} blocks]"
            entry["rel_output_error"] = None  # measured on the full stack; not this prefix's
    report = info.get("report", {})
    if report.get("layers"):
        report["compressed_bits"] = sum(sum(e["bits"].values()) for e in report["layers"])
        report["bits_per_weight"] = report["compressed_bits"] / max(report.get("compressed_weights", 1), 1)
    _, sizes = prefix_sizes(stack)
    info["loaded"] = {"budget": str(budget), "stack_prefix": length, "stack_length": len(stack["order"]),
                      "size_bytes": -(-sizes[length] // 8), "blocks": counts}
    return model, info
