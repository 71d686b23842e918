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
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hiercomp.calibration.capture import BlockBatch, ModuleRunner, StopForward, capture_block_inputs, run_block
from hiercomp.calibration.stats import StatsCollector, relative_output_error
from hiercomp.compression_report import CompressionReport, LayerReport
from hiercomp.errors import HiercompError
from hiercomp.hierarchy import ModelHierarchy, linear_weight, set_module, walk
from hiercomp.io.resume import BlockCheckpoints, kill_point
from hiercomp.layers import CompressedLinear
from hiercomp.methods import LayerStats, Method
from hiercomp.plan import Plan


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


def _stages(block: nn.Module, names: dict[str, nn.Module], probe: BlockBatch) -> list[list[str]]:
    """Group a block's target layers by the input tensor they read, in call order."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their memory from being reused
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
               for name, module in names.items()]
    try:
        with torch.inference_mode():
            run_block(block, probe)
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


def _transform_groups(
    block: nn.Module, block_name: str, groups: list[list[str]], methods: dict[str, Method],
    batches: list[BlockBatch],
) -> dict[str, str]:
    """Let methods with a block-level step (AWQ) rewrite each stage group before anything in the block is compressed.

    ``method.prepare_group(block, positions, inputs, run_module)`` gets the group's members that use it,
    ``inputs()``, a sample of their shared input (tokens, in_features; computed when asked for, since a
    group with nothing to fold does not need it), and ``run_module(position)``, which returns
    that submodule's output on the same calibration sequences (:class:`ModuleRunner`); it may change the
    block's float weights in place (scales folded into the norm or layer before the group) and returns
    a note on what it did. All groups go first because a fold can reach into another stage's layer
    (down_proj's scales into up_proj's rows), which must still hold float weights then. Returns the notes
    by full layer name.
    """
    notes: dict[str, str] = {}
    for group in groups:
        members = [p for p in group if p in methods and methods[p].transforms_groups]
        if not members:
            continue
        method = methods[members[0]]
        n_tokens = method.group_tokens()
        # Whole sequences (attention needs them), the first batches until n_tokens: bounded memory and time.
        chosen, tokens = [], 0
        for batch in batches:
            if tokens >= n_tokens:
                break
            chosen.append(batch)
            tokens += batch.hidden.shape[0] * batch.hidden.shape[1]
        runner = ModuleRunner(block, chosen)
        note = method.prepare_group(block, members, partial(runner.inputs, members[0], n_tokens), runner)
        if note:
            notes[f"{block_name}.{members[0]}"] = note
    return notes


def compress_model(
    model: nn.Module,
    plan: Plan,
    calibration: torch.Tensor | None,
    *,
    encoder: bool = False,
    propagate: str = "compressed",
    sequential: bool = True,
    batch_size: int = 8,
    measure_error: bool = True,
    progress: bool = True,
    hierarchy: ModelHierarchy | None = None,
    checkpoints: BlockCheckpoints | None = None,
    stream: Any = None,
) -> CompressionReport:
    """Compress ``model`` in place following ``plan``'s layers (its removals must already be applied: see
    :func:`hiercomp.api.compress`). Returns the report.

    ``checkpoints`` (:mod:`hiercomp.io.resume`): each finished block is saved there with the next block's inputs,
    and the blocks a killed run with the same arguments finished are restored instead of compressed again.
    ``stream`` (:class:`hiercomp.stream.ShardStream`): ``before_block(i, block)`` fills block i's weights before it
    is compressed and ``after_block(i, block)`` writes and releases it, for a model built on ``meta``."""
    plan_methods = plan.methods()
    if propagate not in ("compressed", "original"):
        raise HiercompError(f"propagate must be 'compressed' or 'original', got {propagate!r}")
    # AWQ measures every block on the original model's activations (it does not propagate quantization
    # error); a plan made only of methods that ask for this gets it whatever ``propagate`` says.
    if plan_methods and all(m.propagate_original for m in plan_methods.values()):
        propagate = "original"
    start = time.perf_counter()
    hierarchy = hierarchy or walk(model)
    report = CompressionReport(settings={"propagate": propagate, "sequential": sequential,
                                         "calibration_shape": None if calibration is None else list(calibration.shape)})
    needs_data = sorted(n for n, m in plan_methods.items() if m.needs_calibration)
    if needs_data and calibration is None:
        raise HiercompError(f"{plan_methods[needs_data[0]].name} needs calibration data: "
                            "pass --calib FILE (.txt or .jsonl)")
    model.eval()

    for lin in hierarchy.outside:
        if lin.name in plan_methods:
            method = plan_methods[lin.name]
            if method.needs_calibration:
                raise HiercompError(
                    f"layer {lin.name} lies outside the transformer blocks, where only calibration-free methods "
                    f"(rtn, magnitude) can be applied; {method.name} cannot — add it to the recipe's ignore list"
                )
            module = model.get_submodule(lin.name)
            compressed, rep = _compress_one(lin.name, module, method, None, lin.origin)
            set_module(model, lin.name, compressed)
            report.layers.append(rep)

    block_targets = [[lin for lin in b.linears if lin.name in plan_methods] for b in hierarchy.blocks]
    last_needed = max((i for i, t in enumerate(block_targets) if t), default=-1)
    if last_needed < 0:
        report.seconds = time.perf_counter() - start
        return report

    use_data = calibration is not None
    finished = 0 if checkpoints is None else checkpoints.start(model, plan.to_dict(), calibration, {
        "encoder": encoder, "propagate": propagate, "sequential": sequential, "batch_size": batch_size,
        "measure_error": measure_error})
    batches = (capture_block_inputs(model, hierarchy.blocks[0].module, calibration, batch_size, encoder)
               if use_data else [])
    kill_point("calibration")
    bar = tqdm(total=last_needed + 1, desc="compressing blocks", unit="block", disable=not progress)
    for block_info, targets in zip(hierarchy.blocks[: last_needed + 1], block_targets[: last_needed + 1]):
        block = block_info.module
        first_row, notes = len(report.layers), {}
        n_next = len(batches) if use_data and block_info.index < last_needed else 0
        if block_info.index < finished:  # a killed run's finished block: restored, its outputs read back
            positions = {lin.name: lin.position for lin in targets}
            rows, notes = checkpoints.restore_block(block_info.index, block, positions)
            report.layers.extend(LayerReport(**row) for row in rows)
            if notes:
                report.settings.setdefault("group_transforms", {}).update(notes)
            if block_info.index == finished - 1:
                for batch, hidden in zip(batches, checkpoints.restore_inputs(block_info.index, n_next)):
                    batch.hidden = hidden
            bar.update(1)
            continue
        if stream is not None:  # hiercomp.stream: the block's weights are read now (the model is on meta)
            stream.before_block(block_info.index, block)
        original = copy.deepcopy(block) if (use_data and propagate == "original" and targets) else None
        if targets and not use_data:
            for lin in targets:
                compressed, rep = _compress_one(lin.name, block.get_submodule(lin.position), plan_methods[lin.name],
                                                None, lin.origin)
                set_module(block, lin.position, compressed)
                report.layers.append(rep)
                kill_point(f"block:{block_info.index}")
        elif targets:
            modules = {lin.position: block.get_submodule(lin.position) for lin in targets}
            # Layers reading the same tensor (q/k/v; gate/up) share one set of statistics.
            groups = _stages(block, modules, batches[0])
            notes = _transform_groups(block, block_info.name, groups,
                                      {lin.position: plan_methods[lin.name] for lin in targets}, batches)
            if notes:
                report.settings.setdefault("group_transforms", {}).update(notes)
            passes = groups if sequential else [[p for g in groups for p in g]]
            by_position = {lin.position: lin for lin in targets}
            for pass_positions in passes:
                leaders = {g[0]: g for g in groups if g[0] in pass_positions}
                leader_modules = {p: block.get_submodule(p) for p in leaders}
                want_h = {p: measure_error or any(plan_methods[by_position[q].name].needs_hessian for q in members)
                          for p, members in leaders.items()}
                with StatsCollector(leader_modules, want_h) as collector, torch.inference_mode():
                    for batch in batches:
                        collector.seen.clear()
                        try:
                            run_block(block, batch)
                        except StopForward:
                            pass
                for leader, members in leaders.items():
                    stats = collector.stats(leader)
                    for position in members:
                        lin = by_position[position]
                        bar.set_postfix_str(position)
                        compressed, rep = _compress_one(lin.name, block.get_submodule(position), plan_methods[lin.name],
                                                        stats, lin.origin)
                        set_module(block, position, compressed)
                        report.layers.append(rep)
                        kill_point(f"block:{block_info.index}")
                del collector
        if use_data and block_info.index < last_needed:
            source = original if original is not None else block
            with torch.inference_mode():
                for batch in batches:
                    batch.hidden = run_block(source, batch)
        del original
        if checkpoints is not None:
            checkpoints.save_block(block_info.index, block,
                                   {lin.name: block.get_submodule(lin.position).full_config() for lin in targets},
                                   [asdict(row) for row in report.layers[first_row:]], notes,
                                   [batch.hidden for batch in batches[:n_next]])
        if stream is not None:  # written to the output folder and released
            stream.after_block(block_info.index, block)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report
