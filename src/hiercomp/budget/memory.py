"""One memory budget across the hierarchy: split the bytes between the weights and the KV cache by measured damage.

    hiercomp plan-memory MODEL --memory 1GB --context 8192 --batch 4 --calib TEXT --out plan.yaml

The memory a causal LM needs to generate with ``batch`` sequences of ``context`` tokens is counted as

    weights bytes   the plan's saved weights (``Plan.cost["size_bytes"]``: packed layers + every other tensor, tied
                    ones once; the file's upper bound, see budget.py) — what ``hiercomp.load`` holds in memory
  + KV bytes        the cache after a prefill of ``context`` tokens per sequence, all layers, the whole batch, by the
                    cache classes' own accounting (``KVLayer.bytes_for_tokens``, within 1% of the bytes its tensors
                    hold; the formula is checked against a real cache at the evaluation prefix and the check is
                    written into the plan), tokens kept at full precision in the model's dtype (what ``make_cache``
                    does); every token generated after the prefill adds ``kv_bytes_per_new_token``
  + overhead        the decode step's largest transients: one layer's past decoded to the compute dtype twice (the
                    cache materialises it, the attention concatenates the new token), one layer's attention scores
                    in fp32, the fp32 logits and the block's hidden activations, for the whole batch. The *prefill*
                    peak (activations of ``context`` tokens at once) is not counted: it depends on the attention
                    kernel and on chunking the prompt, which this plan does not choose.

Damage is the teacher-forced continuation KL (``hiercomp.kv.evaluate.continuation_quality``): sequences of the
calibration text are a prefix of ``prefix`` tokens and a continuation; KL(P ‖ Q) in nats per continuation position,
P the original model with the full cache, Q the candidate.

* KV side: each spec of a small ladder (``DEFAULT_KV_SPECS``) measured with the original weights.
* Weight side: for each KV rung, the existing budget search (:mod:`hiercomp.budget.search`, uniform or greedy over
  ``levels``) at the bytes the rung leaves for the weights, then that plan's KL measured with the full cache on the
  same positions (its layers assembled from the candidate database, see :mod:`hiercomp.budget.fitness`).
* Combination: damage = KL(weights) + KL(KV). Two small independent perturbations of the logits add in KL to second
  order (KL ≈ ½ δᵀFδ; the cross term is the Fisher inner product of two unrelated errors, near zero); the
  ``verify`` best pairs by that sum are then measured together (compressed weights *and* compressed cache) and the
  choice is the lowest measured one. Both numbers are written into the plan, so the sum's error is visible.

Evaluating at ``prefix`` tokens (default 1024) instead of ``context`` is a cost trade: a CPU cannot teacher-force
8192-token prefixes for every candidate. Quantization's damage hardly depends on the length; eviction at a fixed
ratio usually hurts less at longer contexts (more redundant tokens), so the plan is conservative there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hiercomp.budget.budget import Budget, parse_budget
from hiercomp.budget.evo import EvoConfig
from hiercomp.budget.levels import parse_levels
from hiercomp.budget.search import SearchProblem, prepare_problem, run_allocator
from hiercomp.budget.space import Genome
from hiercomp.errors import HiercompError
from hiercomp.plan import Plan
from hiercomp.report.plots import format_bytes

DEFAULT_KV_SPECS = ("none", "kivi:bits=8", "kivi:bits=4", "kivi:bits=2", "snapkv:ratio=0.5+kivi:bits=4",
                    "snapkv:ratio=0.5+kivi:bits=2", "snapkv:ratio=0.75+kivi:bits=2", "snapkv:ratio=0.875+kivi:bits=2")
# Cheaper than the search's default (12 GPTQ levels): one level per bit width is enough to trade bytes against the
# cache, and the candidates are built once per model and calibration (cached on disk).
DEFAULT_MEMORY_LEVELS = "gptq:bits=2,3,4,8:group_size=32"
MEMORY_SEARCHES = ("uniform", "greedy")


def parse_memory(text: str) -> int:
    """``"1GB"`` / ``"800MiB"`` / ``"123456B"`` -> bytes (the budget module's units: KB = 1000 B, KiB = 1024 B)."""
    budget = parse_budget(text)
    if budget.unit != "bytes":
        raise HiercompError(f"--memory {text!r} must be bytes (e.g. 1GB, 800MiB, 500000000B), not {budget.unit}")
    return int(budget.value)


# --- bytes -------------------------------------------------------------------------------------------------------

def kv_layer_like(model: nn.Module, spec: Any, store_dtype: torch.dtype | None = None) -> Any:
    """An empty ``KVLayer`` of ``model``'s shape for ``spec`` (batch 1), to evaluate the accounting formula without
    filling a cache (evictors' per-token state, e.g. H2O's, is then not counted: use a filled layer for that)."""
    from hiercomp.kv import adapter, parse
    from hiercomp.kv.cache import KVLayer

    spec = parse(spec) if isinstance(spec, str) else spec
    n_layers, heads, head_dim = adapter.model_shape(model)
    layer = KVLayer(spec.evictor, spec.encoder, store_dtype, n_layers, 0)
    empty = torch.empty(1, heads, 0, head_dim, dtype=model_dtype(model))
    layer.lazy_initialization(empty, empty)
    return layer


def kv_bytes_at(layer: Any, n_layers: int, context: int, batch: int, generated: int = 0) -> float:
    """Bytes of a whole cache (``n_layers`` like ``layer``) after a prefill of ``context`` tokens per sequence, for
    ``batch`` sequences: the evictor's kept tokens (its budget at that prompt length), each at the encoder's or the
    store dtype's bytes, by ``KVLayer.bytes_for_tokens``; plus ``generated`` decoded tokens appended (an evictor
    that keeps its budget while decoding, StreamingLLM or H2O, stays at its budget)."""
    scale = batch / layer.batch  # bytes_for_tokens counts the layer's own batch

    def whole(n: int) -> float:
        return n_layers * layer.bytes_for_tokens(n) * scale

    kept = context
    if layer.evictor is not None:
        kept = min(context, layer.evictor.budget.keep_tokens(context, whole))
        if layer.evictor.decode_evict:
            return whole(kept)
    return whole(kept + generated)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def decode_overhead_bytes(model: nn.Module, context: int, batch: int) -> int:
    """The decode step's largest transients (see the module docstring), for ``batch`` sequences at ``context``."""
    from hiercomp.kv import adapter

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    _, kv_heads, head_dim = adapter.model_shape(model)
    elem = torch.empty((), dtype=model_dtype(model)).element_size()
    past = 2 * 2 * batch * kv_heads * context * head_dim * elem  # K and V, materialised and concatenated
    scores = batch * config.num_attention_heads * (context + 1) * 4
    logits = batch * config.vocab_size * 4
    hidden = batch * (4 * config.hidden_size + 3 * getattr(config, "intermediate_size", 4 * config.hidden_size)) * elem
    return int(past + scores + logits + hidden)


# --- the two sides -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVOption:
    spec: str  # "none" = the full cache
    bytes: float  # at context × batch
    bytes_per_new_token: float  # each generated token, whole batch (0 for a cache that keeps a fixed budget)
    kl: float  # continuation KL with the original weights
    top1: float
    measured_prefix_bytes: float  # a real cache after the evaluation prefix (batch 1), from its tensors' storage
    formula_prefix_bytes: float  # the accounting formula at the same prefix


@dataclass(frozen=True)
class WeightOption:
    plan: Plan | None  # None: the original weights
    bytes: int  # saved size (all tensors)
    kl: float  # continuation KL with the full cache
    genome: Genome | None = None  # the plan in the search space (to assemble it again)


@dataclass(frozen=True)
class MemoryChoice:
    weights: WeightOption
    kv: KVOption
    overhead: int
    predicted_kl: float  # weights KL + KV KL
    measured_kl: float | None = None  # both together, when verified

    @property
    def total_bytes(self) -> float:
        return self.weights.bytes + self.kv.bytes + self.overhead

    @property
    def kl(self) -> float:
        return self.predicted_kl if self.measured_kl is None else self.measured_kl

    def row(self) -> dict[str, Any]:
        return {"kv": self.kv.spec, "kv_bytes": int(self.kv.bytes), "kv_kl": self.kv.kl,
                "weights": "original" if self.weights.plan is None else self.weights.plan.summary(),
                "weights_bytes": int(self.weights.bytes), "weights_kl": self.weights.kl,
                "total_bytes": int(self.total_bytes), "predicted_kl": self.predicted_kl,
                "measured_kl": self.measured_kl}


def continuation_sequences(ids: list[int], prefix: int, continuation: int, count: int) -> torch.Tensor:
    """``count`` windows of ``prefix + continuation + 1`` tokens spread evenly over a token stream."""
    length = prefix + continuation + 1
    if len(ids) < length * count:
        raise HiercompError(f"the evaluation text has {len(ids)} tokens, fewer than {count} sequences of {length} "
                            "(prefix + continuation + 1); use a longer text or smaller --eval-prefix/--eval-sequences")
    stride = len(ids) // count
    return torch.stack([torch.tensor(ids[i * stride:i * stride + length]) for i in range(count)])


@dataclass
class MemorySetup:
    """Everything measured once per model and text, shared by every memory target (and by the benchmark)."""

    model: nn.Module
    source: str
    sequences: torch.Tensor  # [N, prefix + continuation + 1]
    prefix: int
    references: list[torch.Tensor]  # original model, full cache
    prefills: list[Any]
    problem: SearchProblem | None = None  # the weight search's candidates, built on first use
    search: str = "greedy"
    fitness_tokens: int = 4096
    store_dtype: torch.dtype | None = None
    kv: dict[str, KVOption] = field(default_factory=dict)
    _weight_kl: dict[Genome | None, float] = field(default_factory=dict)
    _plans: dict[int, tuple[Plan, Genome] | None] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return adapter_layers(self.model)

    # -- KV side --------------------------------------------------------------------------------------------------
    def measure_kv(self, spec: str, context: int, batch: int) -> KVOption:
        """Bytes at ``context`` × ``batch`` from a real cache's accounting, and the continuation KL (cached)."""
        from hiercomp.kv import evaluate as ev
        from hiercomp.kv import make_cache, parse

        key = f"{spec}@{context}x{batch}"
        if key in self.kv:
            return self.kv[key]
        parsed = parse(spec)
        cache = ev.replay_prefill(make_cache(self.model, parsed, self.store_dtype), self.prefills[0])
        layer = cache.layers[0]
        measured = float(cache.held_bytes())
        formula = kv_bytes_at(layer, self.n_layers, self.prefix, 1)
        total = kv_bytes_at(layer, self.n_layers, context, batch)
        per_token = (kv_bytes_at(layer, self.n_layers, context, batch, generated=256) - total) / 256
        if parsed.is_exact:
            kl, top1 = 0.0, 1.0  # the replayed cache holds the prefill's own keys and values
        else:
            result = ev.continuation_quality(
                self.model, lambda: make_cache(self.model, parsed, self.store_dtype), self.sequences, self.prefix,
                self.prefills, self.references)
            kl, top1 = result.kl, result.top1_agreement
        option = KVOption(spec, total, per_token, kl, top1, measured, formula)
        self.kv[key] = option
        return option

    # -- weight side ----------------------------------------------------------------------------------------------
    def weights_within(self, limit_bytes: int, progress: bool = True) -> WeightOption | None:
        """The search's plan whose saved weights fit ``limit_bytes`` and its continuation KL; None when even the
        cheapest level does not fit (or, with the uniform search, no single level does)."""
        problem = self.problem
        assert problem is not None
        layer_limit = limit_bytes - problem.size.fixed_bytes
        if layer_limit < problem.space.smallest_cost():
            return None
        if layer_limit not in self._plans:
            problem.space = dataclasses.replace(problem.space, limit=layer_limit)
            budget = Budget("bytes", float(limit_bytes), f"{limit_bytes}B")
            evo = EvoConfig(stages=((1, self.fitness_tokens),))
            try:
                plan, genome, _ = run_allocator(problem, budget, self.search, evo=evo, model_name=self.source,
                                                progress=progress)
                self._plans[layer_limit] = (plan, genome)
            except HiercompError:  # the uniform search: no single level fits this limit
                self._plans[layer_limit] = None
        found = self._plans[layer_limit]
        if found is None:
            return None
        plan, genome = found
        return WeightOption(plan, int(plan.cost["size_bytes"]), self.weight_kl(genome), genome)

    def weight_kl(self, genome: Genome | None) -> float:
        """Continuation KL of the weights ``genome`` picks (None: the original) with the full cache."""
        if genome not in self._weight_kl:
            if genome is None:
                self._weight_kl[genome] = 0.0
            else:
                model = self.assembled(genome)
                total = count = 0.0
                with torch.no_grad():
                    for seq, ref in zip(self.sequences, self.references):
                        got = model(seq[None]).logits[0, self.prefix:-1].float().log_softmax(-1)
                        total += F.kl_div(got, ref, log_target=True, reduction="sum").double().item()
                        count += ref.shape[0]
                self._weight_kl[genome] = total / count
        return self._weight_kl[genome]

    def assembled(self, genome: Genome) -> nn.Module:
        """The working copy with the genome's candidate layers (valid until the next call)."""
        assert self.problem is not None and self.problem.fitness_fn is not None
        assignment, removed = self.problem.assignment(genome)
        return self.problem.fitness_fn.assemble(assignment, removed)

    def original_weights(self) -> WeightOption:
        assert self.problem is not None
        return WeightOption(None, int(self.problem.size.original_bytes), 0.0)

    def measure_pair(self, choice: MemoryChoice) -> float:
        """Continuation KL of the compressed weights and the compressed cache together."""
        from hiercomp.kv import evaluate as ev
        from hiercomp.kv import make_cache, parse

        if choice.weights.genome is None:
            return choice.kv.kl
        model = self.assembled(choice.weights.genome)
        parsed = parse(choice.kv.spec)
        result = ev.continuation_quality(model, lambda: make_cache(model, parsed, self.store_dtype), self.sequences,
                                         self.prefix, None, self.references)
        return result.kl



# --- choosing ----------------------------------------------------------------------------------------------------

@dataclass
class MemoryResult:
    """The chosen split, every pair considered (fitting ones, by predicted KL) and what the target was."""

    choice: MemoryChoice
    candidates: list[MemoryChoice]
    memory_bytes: int
    context: int
    batch: int
    search: str
    skipped: dict[str, str] = field(default_factory=dict)  # KV specs that could not run here, and why

    def to_plan(self, setup: MemorySetup) -> Plan:
        """The weights' plan with ``kv:`` (the spec) and ``memory:`` (the split and how it was measured)."""
        choice = self.choice
        plan = dataclasses.replace(choice.weights.plan) if choice.weights.plan is not None else Plan({})
        plan.kv = None if choice.kv.spec == "none" else choice.kv.spec
        kv = choice.kv
        plan.memory = {
            "memory_bytes": self.memory_bytes, "context": self.context, "batch": self.batch,
            "weights_bytes": int(choice.weights.bytes), "kv_bytes": int(kv.bytes), "overhead_bytes": choice.overhead,
            "total_bytes": int(choice.total_bytes), "kv_bytes_per_new_token": round(kv.bytes_per_new_token, 1),
            "kv_dtype": str(setup.store_dtype or model_dtype(setup.model)).replace("torch.", ""),
            "damage": {"metric": "continuation_kl", "weights_kl": _r(choice.weights.kl), "kv_kl": _r(kv.kl),
                       "predicted_kl": _r(choice.predicted_kl), "measured_kl": _r(choice.measured_kl)},
            "evaluation": {"prefix": setup.prefix, "continuation": setup.sequences.shape[1] - setup.prefix - 1,
                           "sequences": setup.sequences.shape[0], "search": self.search,
                           "kv_bytes_check": {"prefix_tokens": setup.prefix, "formula": int(kv.formula_prefix_bytes),
                                              "measured": int(kv.measured_prefix_bytes)}},
        }
        plan.notes = {**plan.notes, "memory_candidates": [
            {k: _r(v) if isinstance(v, float) else v for k, v in c.row().items()} for c in self.candidates]}
        if self.skipped:
            plan.notes["memory_skipped_kv"] = dict(self.skipped)
        return plan


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def smallest_reachable(setup: MemorySetup, kv_options: list[KVOption], overhead: int) -> tuple[float, str]:
    """The least memory any pair needs, and in words what it is made of."""
    assert setup.problem is not None
    weights = setup.problem.size.fixed_bytes + setup.problem.space.smallest_cost()
    kv = min(kv_options, key=lambda o: o.bytes)
    return weights + kv.bytes + overhead, (f"weights at their cheapest level {format_bytes(weights)} + KV cache "
                                           f"{kv.spec} {format_bytes(kv.bytes)} + decode overhead "
                                           f"{format_bytes(overhead)}")


def check_reachable(model: nn.Module, memory_bytes: int, context: int, batch: int, kv_specs: tuple[str, ...]) -> None:
    """Fail early (before any candidate is built) when even weights whose compressible layers cost nothing, the
    cheapest KV spec and the decode overhead exceed the memory."""
    from hiercomp.budget.budget import SizeModel
    from hiercomp.hierarchy import walk

    n_layers = adapter_layers(model)
    kv = []
    for spec in kv_specs:
        try:
            kv.append((kv_bytes_at(kv_layer_like(model, spec), n_layers, context, batch), spec))
        except HiercompError:
            continue
    layers = [lin.name for block in walk(model).blocks for lin in block.linears]
    fixed = SizeModel.of(model, layers).fixed_bytes
    overhead = decode_overhead_bytes(model, context, batch)
    least_kv, spec = min(kv) if kv else (0.0, "none")
    if fixed + least_kv + overhead > memory_bytes:
        need = fixed + least_kv + overhead
        raise HiercompError(f"memory {format_bytes(memory_bytes)} cannot hold context {context} × batch {batch}: even "
                            f"with the compressible layers at 0 bytes it needs {format_bytes(need)} (embeddings, norms "
                            f"and head {format_bytes(fixed)} + KV cache {spec} "
                            f"{format_bytes(least_kv)} + decode overhead {format_bytes(overhead)}); raise --memory, "
                            "lower --context/--batch, or add cheaper --kv specs")


def adapter_layers(model: nn.Module) -> int:
    from hiercomp.kv import adapter

    return adapter.model_shape(model)[0]


def choose(setup: MemorySetup, memory_bytes: int, context: int, batch: int,
           kv_specs: tuple[str, ...] = DEFAULT_KV_SPECS, verify: int = 2, progress: bool = True) -> MemoryResult:
    """The (weights plan, KV spec) pair of least damage whose bytes fit ``memory_bytes`` (see the module
    docstring). An impossible memory is a one-line error naming the smallest reachable."""
    overhead = decode_overhead_bytes(setup.model, context, batch)
    options, skipped = [], {}
    for spec in kv_specs:
        try:
            options.append(setup.measure_kv(spec, context, batch))
        except HiercompError as err:  # e.g. an eviction budget below its window at the evaluation prefix
            skipped[spec] = str(err)
    if not options:
        raise HiercompError(f"no KV spec could be measured: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    pairs: list[MemoryChoice] = []
    for kv in options:
        weights = setup.weights_within(int(memory_bytes - kv.bytes - overhead), progress)
        if weights is not None:
            pairs.append(MemoryChoice(weights, kv, overhead, weights.kl + kv.kl))
    if not pairs:
        least, parts = smallest_reachable(setup, options, overhead)
        raise HiercompError(f"memory {format_bytes(memory_bytes)} cannot hold context {context} × batch {batch}: "
                            f"the smallest reachable is {format_bytes(least)} ({parts}); raise --memory, lower "
                            "--context/--batch, or add cheaper --levels or --kv specs")
    pairs.sort(key=lambda c: (c.predicted_kl, c.total_bytes))
    checked = [dataclasses.replace(c, measured_kl=setup.measure_pair(c)) for c in pairs[:max(verify, 0)]]
    pairs[:len(checked)] = checked
    best = min(checked, key=lambda c: (c.kl, c.total_bytes)) if checked else pairs[0]
    return MemoryResult(best, pairs, memory_bytes, context, batch, setup.search, skipped)


def build_setup(model: nn.Module, source: str, calibration: torch.Tensor, eval_ids: list[int], *,
                prefix: int = 1024, continuation: int = 32, sequences: int = 4,
                levels: str = DEFAULT_MEMORY_LEVELS, search: str = "greedy", fitness_tokens: int = 4096,
                cache_dir: str | Path | None = None, store_dtype: torch.dtype | None = None,
                progress: bool = True) -> MemorySetup:
    """Measure once: the evaluation windows, the original model's references and prefills, and the weight search's
    candidate database (``levels`` on ``calibration``)."""
    from hiercomp.kv import adapter
    from hiercomp.kv import evaluate as ev

    if search not in MEMORY_SEARCHES:
        raise HiercompError(f"unknown search {search!r} for plan-memory; choose one of {', '.join(MEMORY_SEARCHES)}")
    adapter.check_supported(model)
    level_list, allow_remove = parse_levels(levels)
    seqs = continuation_sequences(eval_ids, prefix, continuation, sequences)
    refs = ev.reference_logprobs(model, seqs, prefix)
    prefills = [ev.capture_prefill(model, s[None, :prefix]) for s in seqs]
    setup = MemorySetup(model, source, seqs, prefix, refs, prefills, search=search, fitness_tokens=fitness_tokens,
                        store_dtype=store_dtype)
    setup.problem = prepare_problem(model, parse_budget("1x"), level_list, calibration, encoder=False,
                                    allow_remove=allow_remove, cache_dir=cache_dir, progress=progress)
    return setup


def plan_memory(model_or_path: Any, memory: str | int, context: int, batch: int, calibration: Any, *,
                kv_specs: tuple[str, ...] | None = None, levels: str | None = None, search: str = "greedy",
                prefix: int = 1024, continuation: int = 32, sequences: int = 4, fitness_tokens: int = 4096,
                verify: int = 2, cache_dir: str | Path | None = None, out: str | Path | None = None,
                tokenizer: Any = None, progress: bool = True,
                trust_remote_code: bool = False) -> tuple[Plan, MemoryResult]:
    """Split ``memory`` ("1GB" or bytes) between the weights and the KV cache for ``batch`` sequences of ``context``
    tokens; returns the plan (weights' layers + ``kv`` + ``memory``) and what was compared. ``calibration``: a text
    file or :class:`~hiercomp.calibration.CalibrationConfig` (its windows build the weight candidates; its text,
    read again, gives the evaluation sequences). Apply with ``hiercomp.compress(model, plan, calibration)``."""
    from hiercomp.api import model_context
    from hiercomp.calibration import CalibrationConfig, calibration_tokens, read_documents, token_stream
    from hiercomp.io.hf import as_loaded
    from hiercomp.kv import parse

    memory_bytes = parse_memory(memory) if isinstance(memory, str) else int(memory)
    specs = tuple(kv_specs or DEFAULT_KV_SPECS)
    for spec in specs:
        parse(spec)  # bad specs fail before the model loads
    parse_levels(levels or DEFAULT_MEMORY_LEVELS)
    if context < 1 or batch < 1:
        raise HiercompError(f"context ({context}) and batch ({batch}) must be at least 1")
    loaded = as_loaded(model_or_path, tokenizer, trust_remote_code)
    if loaded.is_encoder:
        raise HiercompError("plan-memory plans a causal LM's generation (weights + KV cache); this model is an encoder")
    limit = model_context(loaded.model)
    if limit is not None and context > limit:
        raise HiercompError(f"--context {context} is longer than the model's {limit} positions")
    check_reachable(loaded.model, memory_bytes, context, batch, specs)  # before the candidates are built
    config = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(str(calibration))
    tokens = calibration_tokens(loaded.tokenizer, config, limit)
    eval_ids = token_stream(loaded.tokenizer, read_documents(config.source, config.field)).tolist()
    setup = build_setup(loaded.model, loaded.source, tokens, eval_ids, prefix=min(prefix, context),
                        continuation=continuation, sequences=sequences, levels=levels or DEFAULT_MEMORY_LEVELS,
                        search=search, fitness_tokens=fitness_tokens, cache_dir=cache_dir, progress=progress)
    result = choose(setup, memory_bytes, context, batch, specs, verify, progress)
    plan = result.to_plan(setup)
    plan.model = loaded.source
    if out is not None:
        plan.save(out)
    return plan, result
