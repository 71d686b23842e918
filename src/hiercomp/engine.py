"""The engine: compress a model block by block, as the plan says.

For each transformer block in order:
1. its inputs are the outputs of the already-compressed earlier blocks (``propagate="compressed"``,
   the GPTQ/SparseGPT/Wanda default), or of the original blocks (``propagate="original"``, as AWQ does);
2. its linear layers are split into *stages* by the tensor they read (q/k/v read the same normed hidden
   state, then o_proj, then gate/up, then down_proj); with ``sequential=True`` each stage's statistics are
   gathered after the previous stages were compressed, so later layers see their real inputs;
3. methods with a block-level step (AWQ's ``prepare_group``) first rewrite each stage group of the still
   uncompressed block: search per-channel scales on the group's input, fold them into the operation
   before it, scale the group's weights (see :func:`_transform_groups`);
4. statistics (E[x xᵀ], E[x²]) are gathered with forward hooks, each layer is compressed and swapped
   for its packed module, and its relative output error ||ΔW x||² / ||W x||² on the calibration inputs is
   recorded.
Only one block's inputs and outputs are held at a time (sequences x length x hidden), never the
activations of the whole model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hiercomp.errors import HiercompError
from hiercomp.hierarchy import ModelHierarchy, linear_weight, set_module, walk
from hiercomp.layers import CompressedLinear
from hiercomp.methods import LayerStats, Method


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


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass once what we need has been seen."""


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@dataclass
class _BlockBatch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int, encoder: bool
) -> list[_BlockBatch]:
    """Run the model up to its first block and keep what that block receives, batch by batch."""
    captured: list[_BlockBatch] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "cache", "layer_past")}
        captured.append(_BlockBatch(hidden.detach(), tuple(_detach(a) for a in rest), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                ids = calibration[start : start + batch_size]
                call = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if not encoder:
                    call["use_cache"] = False
                try:
                    model(**call)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, batch: _BlockBatch) -> torch.Tensor:
    return _first_tensor(block(batch.hidden, *batch.args, **batch.kwargs))


class _StatsCollector:
    """Forward pre-hooks that accumulate E[x xᵀ] and E[x²] for a set of linear layers."""

    def __init__(self, modules: dict[str, nn.Module], want_hessian: dict[str, bool]) -> None:
        self.modules = modules
        self.want_hessian = want_hessian
        self.sums: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(modules, 0)
        self.seen: set[str] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> _StatsCollector:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.counts[name] += x.shape[0]
            sq = (x * x).sum(dim=0)
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
            if self.want_hessian[name]:
                xtx = x.t() @ x
                self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx
            self.seen.add(name)
            if len(self.seen) == len(self.modules):
                raise _StopForward

        return hook

    def stats(self, name: str) -> LayerStats:
        """The statistics gathered at layer ``name`` (a group leader: its group reads the same input)."""
        n = max(self.counts[name], 1)
        hessian = self.sums[name] / n if name in self.sums else None
        stats = LayerStats(channel_sq_mean=self.sq[name] / n, n_tokens=self.counts[name], hessian=hessian)
        for tensor in (stats.channel_sq_mean, stats.hessian):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise HiercompError(
                    f"calibration statistics of layer {name} contain NaN or Inf: the activations overflow "
                    "(check the model's weights, or compress a float32 copy)"
                )
        return stats


def input_hessians(model: nn.Module, names: list[str], calls: list[dict[str, torch.Tensor]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (weight (out, in), H = E[x xᵀ] over every input token the layer saw in ``model(**call)`` for each
    call), both float32. Whole-model forward passes with sums in float64: for measuring a method on real
    layers outside the engine (benchmarks, tests), not for calibration, which goes block by block."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable:
        def grab(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.t() @ x if name in sums else x.t() @ x
            counts[name] += x.shape[0]

        return grab

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for call in calls:
                model(**call)
    finally:
        for h in handles:
            h.remove()
    return {n: (modules[n].weight.detach().float().clone(), (sums[n] / counts[n]).float()) for n in names}


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Ŵ) x||² / ||W x||² averaged over the tokens that produced ``hessian`` = E[x xᵀ]."""
    delta = weight - approx
    num = float(((delta @ hessian) * delta).sum())
    den = float(((weight @ hessian) * weight).sum())
    return num / den if den > 0 else float(num > 0)


def _compress_one(
    name: str, module: nn.Module, method: Method, stats: LayerStats | None, origin: str
) -> tuple[CompressedLinear, LayerReport]:
    start = time.perf_counter()
    weight = linear_weight(module).float().clone()
    if not bool(torch.isfinite(weight).all()):
        raise HiercompError(f"layer {name} has NaN or Inf weights; the model file is damaged — re-download it")
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().clone()
    compressed = method.compress(weight, bias, stats, name, origin)
    approx = compressed.dequantize()
    rel_out = relative_output_error(weight, approx, stats.hessian) if stats and stats.hessian is not None else None
    rel_w = float((weight - approx).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))
    report = LayerReport(name, method.describe(), compressed.kind, [compressed.out_features, compressed.in_features],
                         compressed.storage_bits(), compressed.bits_per_weight(), rel_out, rel_w,
                         time.perf_counter() - start)
    return compressed, report


def _stages(block: nn.Module, names: dict[str, nn.Module], probe: _BlockBatch) -> list[list[str]]:
    """Group a block's target layers by the input tensor they read, in call order."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their memory from being reused
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
               for name, module in names.items()]
    try:
        with torch.inference_mode():
            _run_block(block, probe)
    finally:
        for h in handles:
            h.remove()
    stages: list[tuple[torch.Tensor, list[str]]] = []
    assigned: set[str] = set()
    for name, tensor in calls:
        if name in assigned:
            continue
        stage = next((members for source, members in stages if source is tensor), None)
        if stage is None:
            stages.append((tensor, [name]))
        else:
            stage.append(name)
        assigned.add(name)
    never_called = [n for n in names if n not in assigned]
    return [members for _, members in stages] + ([never_called] if never_called else [])


class _ModuleRunner:
    """``runner(position)``: what submodule ``position`` of ``block`` ("" = the block) outputs on a few batches.

    A scale search calls this a score of times while changing only the module's own weights, so the
    module's inputs (args and kwargs, per batch) are captured once by running the block up to it, and the
    module alone is run after that. They are captured again when a parameter *outside* the module has
    changed since (its version counter moved): a fold into the norm or layer before the module changes
    what the module reads.
    """

    def __init__(self, block: nn.Module, batches: list[_BlockBatch]) -> None:
        self.block = block
        self.batches = batches
        self.cache: dict[str, tuple[tuple, list[tuple[tuple, dict]]]] = {}

    def _capture(self, module: nn.Module) -> list[tuple[tuple, dict]]:
        calls: list[tuple[tuple, dict]] = []

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))
            raise _StopForward

        handle = module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    try:
                        _run_block(self.block, batch)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        return calls

    def inputs(self, position: str, max_tokens: int | None = None) -> torch.Tensor:
        """What layer ``position`` reads, (tokens, in_features): the first ``max_tokens`` tokens."""
        calls = self._capture(self.block.get_submodule(position))
        return torch.cat([args[0].reshape(-1, args[0].shape[-1]).float() for args, _ in calls])[:max_tokens]

    def __call__(self, position: str) -> torch.Tensor:
        module = self.block.get_submodule(position)
        inside = {id(p) for p in module.parameters()}
        stamp = tuple((id(p), p._version) for p in self.block.parameters() if id(p) not in inside)
        if position not in self.cache or self.cache[position][0] != stamp:
            self.cache[position] = (stamp, self._capture(module))
        outputs = []
        with torch.inference_mode():
            for args, kwargs in self.cache[position][1]:
                out = _first_tensor(module(*args, **kwargs)).float()
                outputs.append(out.reshape(-1, out.shape[-1]))
        return torch.cat(outputs)


def _transform_groups(
    block: nn.Module, block_name: str, groups: list[list[str]], methods: dict[str, Method],
    batches: list[_BlockBatch],
) -> dict[str, str]:
    """Let methods with a block-level step (AWQ) rewrite each stage group before anything in the block is compressed.

    ``method.prepare_group(block, positions, inputs, run_module)`` gets the group's members that use it,
    ``inputs()``, a sample of their shared input (tokens, in_features; computed when asked for, since a
    group with nothing to fold does not need it), and ``run_module(position)``, which returns
    that submodule's output on the same calibration sequences (:class:`_ModuleRunner`); it may change the
    block's float weights in place (scales folded into the norm or layer before the group) and returns
    a note on what it did. All groups go first because a fold can reach into another stage's layer
    (down_proj's scales into up_proj's rows), which must still hold float weights then. Returns the notes
    by full layer name.
    """
    notes: dict[str, str] = {}
    for group in groups:
        members = [p for p in group if callable(getattr(methods.get(p), "prepare_group", None))]
        if not members:
            continue
        method: Any = methods[members[0]]
        n_tokens = int(getattr(method, "n_tokens", 4096))
        # Whole sequences (attention needs them), the first batches until n_tokens: bounded memory and time.
        chosen, tokens = [], 0
        for batch in batches:
            if tokens >= n_tokens:
                break
            chosen.append(batch)
            tokens += batch.hidden.shape[0] * batch.hidden.shape[1]
        runner = _ModuleRunner(block, chosen)
        note = method.prepare_group(block, members, partial(runner.inputs, members[0], n_tokens), runner)
        if note:
            notes[f"{block_name}.{members[0]}"] = note
    return notes


def compress_model(
    model: nn.Module,
    plan: dict[str, Method],
    calibration: torch.Tensor | None,
    *,
    encoder: bool = False,
    propagate: str = "compressed",
    sequential: bool = True,
    batch_size: int = 8,
    measure_error: bool = True,
    progress: bool = True,
    hierarchy: ModelHierarchy | None = None,
) -> CompressionReport:
    """Compress ``model`` in place following ``plan`` (layer name -> method). Returns the report."""
    if propagate not in ("compressed", "original"):
        raise HiercompError(f"propagate must be 'compressed' or 'original', got {propagate!r}")
    # AWQ measures every block on the original model's activations (it does not propagate quantization
    # error); a plan made only of methods that ask for this gets it whatever ``propagate`` says.
    if plan and all(getattr(m, "propagate_original", False) for m in plan.values()):
        propagate = "original"
    start = time.perf_counter()
    hierarchy = hierarchy or walk(model)
    report = CompressionReport(settings={"propagate": propagate, "sequential": sequential,
                                         "calibration_shape": None if calibration is None else list(calibration.shape)})
    needs_data = sorted(n for n, m in plan.items() if m.needs_calibration)
    if needs_data and calibration is None:
        raise HiercompError(f"{plan[needs_data[0]].name} needs calibration data: pass --calib FILE (.txt or .jsonl)")
    model.eval()

    for lin in hierarchy.outside:
        if lin.name in plan:
            method = plan[lin.name]
            if method.needs_calibration:
                raise HiercompError(
                    f"layer {lin.name} lies outside the transformer blocks, where only calibration-free methods "
                    f"(rtn, magnitude) can be applied; {method.name} cannot — add it to the recipe's ignore list"
                )
            module = model.get_submodule(lin.name)
            compressed, rep = _compress_one(lin.name, module, method, None, lin.origin)
            set_module(model, lin.name, compressed)
            report.layers.append(rep)

    block_targets = [[lin for lin in b.linears if lin.name in plan] for b in hierarchy.blocks]
    last_needed = max((i for i, t in enumerate(block_targets) if t), default=-1)
    if last_needed < 0:
        report.seconds = time.perf_counter() - start
        return report

    use_data = calibration is not None
    batches = (capture_block_inputs(model, hierarchy.blocks[0].module, calibration, batch_size, encoder)
               if use_data else [])
    bar = tqdm(total=last_needed + 1, desc="compressing blocks", unit="block", disable=not progress)
    for block_info, targets in zip(hierarchy.blocks[: last_needed + 1], block_targets[: last_needed + 1]):
        block = block_info.module
        original = copy.deepcopy(block) if (use_data and propagate == "original" and targets) else None
        if targets and not use_data:
            for lin in targets:
                compressed, rep = _compress_one(lin.name, block.get_submodule(lin.position), plan[lin.name],
                                                None, lin.origin)
                set_module(block, lin.position, compressed)
                report.layers.append(rep)
        elif targets:
            modules = {lin.position: block.get_submodule(lin.position) for lin in targets}
            # Layers reading the same tensor (q/k/v; gate/up) share one set of statistics.
            groups = _stages(block, modules, batches[0])
            notes = _transform_groups(block, block_info.name, groups,
                                      {lin.position: plan[lin.name] for lin in targets}, batches)
            if notes:
                report.settings.setdefault("group_transforms", {}).update(notes)
            passes = groups if sequential else [[p for g in groups for p in g]]
            by_position = {lin.position: lin for lin in targets}
            for pass_positions in passes:
                leaders = {g[0]: g for g in groups if g[0] in pass_positions}
                leader_modules = {p: block.get_submodule(p) for p in leaders}
                want_h = {p: measure_error or any(plan[by_position[q].name].needs_hessian for q in members)
                          for p, members in leaders.items()}
                with _StatsCollector(leader_modules, want_h) as collector, torch.inference_mode():
                    for batch in batches:
                        collector.seen.clear()
                        try:
                            _run_block(block, batch)
                        except _StopForward:
                            pass
                for leader, members in leaders.items():
                    stats = collector.stats(leader)
                    for position in members:
                        lin = by_position[position]
                        bar.set_postfix_str(position)
                        compressed, rep = _compress_one(lin.name, block.get_submodule(position), plan[lin.name],
                                                        stats, lin.origin)
                        set_module(block, position, compressed)
                        report.layers.append(rep)
                del collector
        if use_data and block_info.index < last_needed:
            source = original if original is not None else block
            with torch.inference_mode():
                for batch in batches:
                    batch.hidden = _run_block(source, batch)
        del original
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report
