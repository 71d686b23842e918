"""Budgets, plans and the three allocators (uniform, sensitivity-greedy, EvoPress-style evolutionary)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from hiercomp.budget import Plan, parse_budget, parse_levels
from hiercomp.budget.budget import SizeModel, file_overhead_bytes
from hiercomp.budget.evo import EvoConfig, evolve
from hiercomp.budget.greedy import greedy_allocate
from hiercomp.budget.space import Genome, Space, depth_switch, level_switch, mutate
from hiercomp.errors import HiercompError
from tests.conftest import STORIES, TINYSTORIES, needs_shared

# -- budget units ---------------------------------------------------------------------------------


def test_budget_units() -> None:
    assert parse_budget("3.0bpw").unit == "bpw" and parse_budget("3.0bpw").value == 3.0
    assert parse_budget("150KB").value == 150_000
    assert parse_budget("150KiB").value == 150 * 1024
    assert parse_budget("2.5GB").value == 2.5e9
    assert parse_budget("300MiB").value == 300 * 2**20
    assert parse_budget("5000B").value == 5000
    assert (parse_budget("0.25x").unit, parse_budget("0.25x").value) == ("ratio", 0.25)
    for bad in ("3.0", "abc", "-1bpw", "2x", "10furlongs", "0bpw"):
        with pytest.raises(HiercompError):
            parse_budget(bad)


def test_levels_spec() -> None:
    levels, remove = parse_levels("gptq:bits=2,3:group_size=32,128; sparsegpt:sparsity=0.9; remove")
    assert [lv.label for lv in levels] == ["gptq:bits=2:group_size=32", "gptq:bits=2:group_size=128",
                                          "gptq:bits=3:group_size=32", "gptq:bits=3:group_size=128",
                                          "sparsegpt:sparsity=0.9"]
    assert remove
    for bad in ("nosuch:bits=2", "gptq:bits", "gptq:colour=red", "awq:bits=4", "remove"):
        with pytest.raises(HiercompError):
            parse_levels(bad)
    # Per-channel is written 'channel' (or 0, as --group-size takes it); both are one level, labelled 'channel'.
    levels, _ = parse_levels("gptq:bits=3:group_size=channel,0,128")
    assert [lv.label for lv in levels] == ["gptq:bits=3:group_size=channel", "gptq:bits=3:group_size=128"]
    assert levels[0].make().group_size is None


def test_size_model_bounds_the_saved_file(tmp_path: Path) -> None:
    """The byte formula is an upper bound on model.safetensors, tight to the header's number widths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiercomp.api import compress
    from hiercomp.hierarchy import walk
    from hiercomp.recipe import Recipe

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    layers = [lin.name for b in walk(model).blocks for lin in b.linears]
    size = SizeModel.of(model, layers)
    cm = compress(model, Recipe.single("rtn", bits=3, group_size=16), None, progress=False)
    from hiercomp.budget.levels import candidate_of

    predicted = size.fixed_bytes + sum(candidate_of(n, model.get_submodule(n), None).nbytes for n in layers)
    cm.save(tmp_path / "m")
    actual = (tmp_path / "m" / "model.safetensors").stat().st_size
    n_tensors = len(cm.model.state_dict())
    assert actual <= predicted <= actual + 40 * n_tensors + file_overhead_bytes()


# -- the abstract space: mutations keep the budget ------------------------------------------------


def _random_space(rng: random.Random, removable: bool) -> Space:
    n = rng.randint(3, 12)
    costs = []
    for _ in range(n):
        base = rng.randint(10, 500)
        ladder = sorted(base * b + rng.randint(0, 40) for b in range(1, rng.randint(2, 7)))
        costs.append(tuple(ladder))
    lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    groups = ()
    if removable:
        idx = list(range(n))
        rng.shuffle(idx)
        groups = tuple(tuple(sorted(idx[k:k + 2])) for k in range(0, n - 1, 2))
    return Space(tuple(costs), rng.randint(lo, hi), groups, 2 if removable else 0)


def test_mutations_never_exceed_budget() -> None:
    """Property test: from a fitting genome, every mutation result fits, over many random spaces and seeds."""
    checked = 0
    for seed in range(300):
        rng = random.Random(seed)
        space = _random_space(rng, removable=seed % 2 == 1)
        genome = space.uniform_fill(rng)
        assert genome is not None and space.fits(genome)
        for _ in range(40):
            for op in (level_switch, depth_switch, mutate):
                if op is depth_switch and not space.max_removed:
                    continue
                child = op(space, genome, rng)
                if child is None:
                    continue
                assert space.cost(child) <= space.limit, (seed, child)
                assert len(child.removed) <= space.max_removed
                assert all(0 <= r <= space.top(i) for i, r in enumerate(child.rungs))
                checked += 1
                genome = child
    assert checked > 10_000


def test_level_switch_on_equal_ladders_keeps_cost_exact() -> None:
    """EvoPress's case: equal-size layers, one up one down: the total stays exactly at the budget."""
    space = Space(tuple((100, 200, 300, 400) for _ in range(6)), limit=6 * 250)
    genome = Genome((2, 1, 2, 1, 2, 1))
    rng = random.Random(0)
    for _ in range(500):
        child = level_switch(space, genome, rng)
        if child is not None:
            assert space.cost(child) == space.cost(genome) == space.limit
            genome = child


# -- toy problem with a known optimum --------------------------------------------------------------


def _toy() -> tuple[Space, list[list[float]]]:
    """6 layers of different sizes, bits 2..6; error = sensitivity * size * 4^-bits (additive over layers)."""
    sizes = [64, 64, 128, 128, 256, 256]
    sens = [5.0, 0.3, 2.0, 0.5, 1.0, 0.1]
    bits = [2, 3, 4, 5, 6]
    costs = tuple(tuple(s * b + 16 for b in bits) for s in sizes)
    errors = [[sv * s * 4.0 ** -b for b in bits] for s, sv in zip(sizes, sens)]
    limit = int(3.5 * sum(sizes)) + 6 * 16
    return Space(costs, limit), errors


def _toy_optimum(space: Space, errors: list[list[float]]) -> tuple[float, tuple[int, ...]]:
    best = (float("inf"), ())
    for rungs in itertools.product(*(range(len(c)) for c in space.costs)):
        if space.cost(Genome(rungs)) <= space.limit:
            best = min(best, (sum(errors[i][r] for i, r in enumerate(rungs)), rungs))
    return best


def _toy_fitness(errors: list[list[float]]):
    return lambda genome, batch: sum(errors[i][r] for i, r in enumerate(genome.rungs))


def test_greedy_removes_a_cheap_sub_block() -> None:
    """Removing group 0 costs 0.5 for 8 units saved; every rung drop costs at least 1 per 2 units: greedy removes
    it and keeps the rest on top rungs. Group 1 (damage 10) is never removed; without removal data nothing is."""
    space = Space(((1, 2, 4),) * 4, limit=8, groups=((0, 1), (2, 3)), max_removed=1)
    single = [[5.0, 1.0, 0.0]] * 4
    assert greedy_allocate(space, single, removal=[0.5, 10.0]) == Genome((2, 2, 2, 2), frozenset({0}))
    plain = greedy_allocate(space, single)
    assert plain is not None and not plain.removed and space.fits(plain)


def test_evo_finds_toy_optimum() -> None:
    space, errors = _toy()
    optimum, rungs = _toy_optimum(space, errors)
    result = evolve(space, _toy_fitness(errors), lambda n, rng: None,
                    EvoConfig(generations=150, offspring=8, stages=((2, 1), (1, 1)), seed=1), progress=False)
    assert space.fits(result.genome)
    assert result.fitness == pytest.approx(optimum, rel=1e-9), (result.genome.rungs, rungs)
    greedy = greedy_allocate(space, errors)  # greedy on exactly additive errors: close, not guaranteed optimal
    assert greedy is not None and space.fits(greedy)
    assert _toy_fitness(errors)(greedy, None) <= 1.5 * optimum


def test_resume_gives_the_same_plan(tmp_path: Path) -> None:
    space, errors = _toy()
    noisy = random.Random(5)
    # A stochastic-looking but deterministic fitness: depends on the batch drawn from the search's own RNG.
    def fitness(genome: Genome, batch: float) -> float:
        return _toy_fitness(errors)(genome, None) * (1 + 0.05 * batch)

    def sample(n: int, rng: random.Random) -> float:
        return rng.random()

    config = EvoConfig(generations=40, offspring=6, stages=((2, 1), (1, 1)), seed=3)
    straight = evolve(space, fitness, sample, config, progress=False)

    ckpt = tmp_path / "evo.json"
    calls = {"n": 0}

    def interrupted(genome: Genome, batch: float) -> float:
        calls["n"] += 1
        if calls["n"] == 137:  # mid-generation
            raise KeyboardInterrupt
        return fitness(genome, batch)

    with pytest.raises(KeyboardInterrupt):
        evolve(space, interrupted, sample, config, checkpoint=ckpt, progress=False)
    assert ckpt.is_file()
    half = evolve(space, fitness, sample, EvoConfig(**{**config.__dict__, "generations": 25}), checkpoint=ckpt,
                  progress=False)
    assert len(half.history) == 26
    resumed = evolve(space, fitness, sample, config, checkpoint=ckpt, progress=False)
    assert resumed.genome == straight.genome
    assert resumed.fitness == straight.fitness
    assert resumed.evaluations == straight.evaluations
    assert noisy  # unused RNG kept out of the search on purpose: the search's draws come from its own seed


def test_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    space, errors = _toy()
    ckpt = tmp_path / "evo.json"
    evolve(space, _toy_fitness(errors), lambda n, r: None, EvoConfig(generations=2, seed=0), checkpoint=ckpt,
           progress=False)
    with pytest.raises(HiercompError, match="other settings"):
        evolve(space, _toy_fitness(errors), lambda n, r: None, EvoConfig(generations=2, seed=1), checkpoint=ckpt,
               progress=False)


# -- plan files ------------------------------------------------------------------------------------


def test_plan_round_trip(tmp_path: Path) -> None:
    levels, _ = parse_levels("gptq:bits=2,4:group_size=32")
    plan = Plan({"model.layers.0.mlp.up_proj": levels[0], "model.layers.0.mlp.down_proj": levels[1]},
                removed=["model.layers.1.mlp"], budget="3.0bpw", search="evo", model="m",
                cost={"bits_per_weight": 2.9, "size_bytes": 1234}, fitness={"metric": "kl", "value": 0.01},
                history=[[0, 0.02], [1, 0.01]])
    path = plan.save(tmp_path / "plan.yaml")
    again = Plan.load(path)
    assert again == plan
    assert again.to_yaml() == plan.to_yaml()
    text = path.read_text()
    assert "model.layers.0.mlp.up_proj: {method: gptq, bits: 2, group_size: 32}" in text
    assert again.removed == ["model.layers.1.mlp"]
    assert sorted(again.kept_layers()) == sorted(plan.layers)  # neither layer lies in the removed sub-block
    (tmp_path / "bad.yaml").write_text("layers: {x: {method: gptq, bits: 11}}\n")
    with pytest.raises(HiercompError, match="layer x"):
        Plan.load(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("layer: {}\n")
    with pytest.raises(HiercompError, match="layers"):
        Plan.load(tmp_path / "bad2.yaml")


# -- end to end on stories260K ----------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


LEVELS = "gptq:bits=2,3:group_size=32,128;rtn:bits=4,8:group_size=128"


@needs_shared
def test_impossible_budget_names_smallest_size(calib_8x128: torch.Tensor, tmp_path: Path) -> None:
    from hiercomp.api import search

    with pytest.raises(HiercompError, match=r"smallest reachable size is 2\.\d+bpw"):
        search(str(STORIES), "1.0bpw", calibration=calib_8x128, levels="rtn:bits=2,3:group_size=64",
               cache_dir=tmp_path / "cache", progress=False)


@needs_shared
def test_search_then_compress_stays_within_budget(calib_8x128: torch.Tensor, tmp_path: Path) -> None:
    from hiercomp.api import saved_size_bytes, search
    from hiercomp.cli import main

    cache = tmp_path / "cache"
    plan_path = tmp_path / "plan.yaml"
    config = EvoConfig(generations=4, offspring=4, stages=((2, 512), (1, 1024)), seed=0)
    plan = search(str(STORIES), "3.0bpw", calibration=calib_8x128, search="evo", levels=LEVELS, evo=config,
                  cache_dir=cache, out=plan_path, progress=False)
    assert 2.9 < plan.cost["bits_per_weight"] <= 3.0
    assert (tmp_path / "plan.allocation.png").stat().st_size > 1000
    assert (tmp_path / "plan.quality_vs_size.png").stat().st_size > 1000
    # The cache is packed: the candidate layers' own bytes (+ a small config file), not dense float copies.
    weights = 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)
    for folder in cache.iterdir():
        bpw = 8 * sum(f.stat().st_size for f in folder.iterdir()) / weights
        assert bpw < 1.5 * 8.2, folder  # at most 8-bit codes + scales here; float32 copies would be 32

    calib_args = ["--calib", str(TINYSTORIES), "--calib-n", "8", "--calib-len", "128", "--quiet"]
    # The CLI's search on the same tokens (all 8 windows either way): the cache is hit, nothing is recompressed.
    assert main(["search", str(STORIES), "--budget", "3.0bpw", "--search", "uniform", "--levels", LEVELS,
                 "--cache", str(cache), "--out", str(tmp_path / "uniform.yaml"), "--no-pictures", *calib_args]) == 0
    uniform = Plan.load(tmp_path / "uniform.yaml")
    assert len(set(uniform.layers.values())) == 1 and uniform.cost["bits_per_weight"] <= 3.0
    assert plan.fitness["value"] <= uniform.fitness["value"] + 1e-12  # evo starts from the best uniform plan
    assert main(["compress", str(STORIES), "--plan", str(plan_path), "--out", str(tmp_path / "m"), *calib_args]) == 0
    import json

    info = json.loads((tmp_path / "m" / "hiercomp.json").read_text())
    assert info["report"]["bits_per_weight"] == pytest.approx(plan.cost["bits_per_weight"], abs=1e-12)
    assert saved_size_bytes(tmp_path / "m")["size_bytes"] <= plan.cost["size_bytes"]

    # A ratio budget through the CLI: search + compress in one command (the cache is reused), file within it.
    out = tmp_path / "cli"
    assert main(["compress", str(STORIES), "--budget", "0.25x", "--search", "uniform", "--levels", LEVELS,
                 "--cache", str(cache), "--out", str(out), *calib_args]) == 0
    original = (STORIES / "model.safetensors").stat().st_size
    assert saved_size_bytes(out)["size_bytes"] <= 0.25 * original + 2000  # ratio of the formula's original
    assert Plan.load(out / "plan.yaml").cost["size_bytes"] >= saved_size_bytes(out)["size_bytes"]


@needs_shared
def test_removal_genes_assemble_and_apply_within_budget(calib_8x128: torch.Tensor, tmp_path: Path) -> None:
    """A plan that drops a sub-block: its layers cost 0, the freed bits go elsewhere, and it applies as planned."""
    from hiercomp.api import compress, saved_size_bytes
    from hiercomp.budget.search import prepare_problem
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(str(STORIES))
    levels, remove = parse_levels("rtn:bits=2,4:group_size=128;remove")
    problem = prepare_problem(loaded.model, parse_budget("2.5bpw"), levels, calib_8x128, encoder=False,
                              allow_remove=remove, max_removed=1, cache_dir=tmp_path / "cache", progress=False)
    assert len(problem.groups) == 10 and problem.space.max_removed == 1
    mlp = problem.groups.index("model.layers.4.mlp")
    rng = random.Random(0)
    base = problem.space.uniform_fill(rng)
    dropped = Genome(base.rungs, frozenset({mlp}))
    assert problem.space.cost(dropped) < problem.space.cost(base)
    batch = problem.sample_batch(256, rng)
    assert problem.fitness(dropped, batch) > problem.fitness(base, batch) > 0
    plan = problem.to_plan(dropped, budget=parse_budget("2.5bpw"), search="test", model=None, fitness={},
                           history=[])
    assert plan.removed == ["model.layers.4.mlp"] and plan.cost["bits_per_weight"] <= 2.5
    plan.check(loaded.model)
    with pytest.raises(HiercompError, match="does not have"):
        Plan({"model.layers.9.mlp.up_proj": levels[0]}).check(loaded.model)
    cm = compress(str(STORIES), plan, calib_8x128, progress=False)
    cm.save(tmp_path / "m")
    assert saved_size_bytes(tmp_path / "m")["size_bytes"] <= plan.cost["size_bytes"]


@needs_shared
def test_evo_starts_from_the_greedy_plan(calib_8x128: torch.Tensor, tmp_path: Path) -> None:
    """With no generations the evolutionary search returns the better of its starts: at 3.0 bpw the greedy plan
    (KL ~1) beats every fitting uniform level (2-bit, KL ~4) by far, so evo must return greedy's genome; without
    the greedy start it can only return the uniform one."""
    from hiercomp.budget.search import prepare_problem, run_allocator
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(str(STORIES))
    levels, _ = parse_levels(LEVELS)
    budget = parse_budget("3.0bpw")
    problem = prepare_problem(loaded.model, budget, levels, calib_8x128, encoder=False,
                              cache_dir=tmp_path / "cache", progress=False)
    stages = ((1, 512), (1, 1024))
    _, greedy, _ = run_allocator(problem, budget, "greedy", evo=EvoConfig(stages=stages), progress=False)
    _, uniform, _ = run_allocator(problem, budget, "uniform", evo=EvoConfig(stages=stages), progress=False)
    assert greedy != uniform
    plan, evo, extra = run_allocator(problem, budget, "evo", progress=False,
                                     evo=EvoConfig(generations=0, initial_random=0, stages=stages))
    assert evo == greedy and extra["evo"]["start_from_greedy"]
    greedy_value = problem.fitness(greedy, problem.sample_batch(1024, random.Random(7919)))
    plan, _, _ = run_allocator(problem, budget, "evo", progress=False,
                               evo=EvoConfig(generations=2, offspring=4, stages=stages))
    assert plan.fitness["value"] <= greedy_value + 1e-12  # never worse than its start on the comparison batch
    _, evo, _ = run_allocator(problem, budget, "evo", progress=False,
                              evo=EvoConfig(generations=0, initial_random=0, stages=stages, start_from_greedy=False))
    assert evo == uniform
