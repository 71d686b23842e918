"""Fan-out on Ray (#15 part 3): a search and an evaluation sweep on a local 2-worker cluster give exactly the
numbers of the single-process run; bad cluster input is one line; the package works without Ray installed."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from hiercomp.budget.evo import EvoConfig, evolve
from hiercomp.budget.space import Space
from hiercomp.distributed import ClusterConfig, Executor, RayExecutor, executor_for
from hiercomp.errors import HiercompError
from tests.conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")  # the driver's 1 thread is what each worker copies


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (starting one costs ~5 s); the executors join it."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hiercomp[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# -- without a cluster ------------------------------------------------------------------------------------


def test_evolve_scores_a_stage_at_once_with_the_same_result() -> None:
    """fitness_many gets whole stages (more than one genome) and the search ends where one-by-one scoring does."""
    rng = random.Random(3)
    costs = tuple(tuple(sorted(rng.sample(range(1, 40), 4))) for _ in range(12))
    space = Space(costs, sum(c[1] for c in costs), (), 0)
    errors = [[rng.random() / (k + 1) for k in range(4)] for _ in costs]

    def fitness(genome, batch) -> float:
        return sum(errors[i][r] for i, r in enumerate(genome.rungs)) + batch

    calls: list[int] = []

    def many(genomes, batch) -> list[float]:
        calls.append(len(genomes))
        return [fitness(g, batch) for g in genomes]

    config = EvoConfig(generations=8, offspring=6, stages=((3, 1), (1, 2)), seed=5)
    sample = lambda n, r: r.random() * 1e-3  # noqa: E731
    one = evolve(space, fitness, sample, config, progress=False)
    stage = evolve(space, fitness, sample, config, progress=False, fitness_many=many)
    assert (stage.genome, stage.fitness, stage.history, stage.evaluations) == \
        (one.genome, one.fitness, one.history, one.evaluations)
    assert calls[1:3] == [6, 4] and sum(calls) == one.evaluations  # a stage of 6 children, then 3 survivors + parent


def test_bad_cluster_input_is_one_line() -> None:
    for bad, match in (({"workers": 0}, "at least 1"), ({"workers": -2}, "at least 1"),
                       ({"threads": 0, "workers": 1}, "worker-threads"), ({"address": " "}, "empty")):
        with pytest.raises(HiercompError, match=match):
            ClusterConfig(**bad)
    assert not ClusterConfig().distributed and ClusterConfig(workers=1).distributed
    with executor_for(None) as executor:  # no cluster asked: a loop here
        assert type(executor) is Executor and executor.map(lambda x: x * 2, [1, 2]) == [2, 4]


def test_cli_refuses_bad_cluster_options_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hiercomp.cli import main

    assert main(["search", "no/such/model", "--budget", "3bpw", "--calib", "x", "--out", str(tmp_path / "p.yaml"),
                 "--workers", "0"]) != 0
    err = capsys.readouterr().err
    assert "--workers must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "no/such/model", "--worker-threads", "2"]) != 0
    assert "--worker-threads needs --workers" in capsys.readouterr().err


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(HiercompError, match=r"pip install 'hiercomp\[ray\]'"):
        RayExecutor(ClusterConfig(workers=2))
    with pytest.raises(HiercompError, match=r"hiercomp\[ray\]"):  # the CLI's and search()'s check, before loading
        ClusterConfig(workers=2).preflight()
    ClusterConfig().preflight()  # no cluster asked: nothing to check


def test_unreachable_address_fails_fast() -> None:
    pytest.importorskip("ray")
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HiercompError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        RayExecutor(ClusterConfig(address=f"127.0.0.1:{port}"))
    with pytest.raises(HiercompError, match="no Ray cluster answers"):
        ClusterConfig(address=f"ray://127.0.0.1:{port}").preflight()
    with pytest.raises(HiercompError, match="is not 'auto', HOST:PORT"):
        RayExecutor(ClusterConfig(address="nowhere"))


# -- on a local 2-worker cluster --------------------------------------------------------------------------


def test_more_workers_than_the_cluster_holds_is_one_line(ray_cluster) -> None:
    with pytest.raises(HiercompError, match="has 2 CPUs, fewer than --workers 3 x 1"):
        RayExecutor(ClusterConfig(workers=3, threads=1))
    assert ray_cluster.is_initialized()  # a cluster it joined is left running
    with executor_for(ClusterConfig(workers=2, threads=1)) as executor:
        assert executor.workers == 2 and executor.map(abs, [-3, 1, -2, 5, -7]) == [3, 1, 2, 5, 7]


@needs_shared
def test_search_on_two_workers_gives_the_serial_plan(ray_cluster, calib_8x128: torch.Tensor, tmp_path: Path) -> None:
    """uniform + greedy table + removal damages + 3 generations: every fitness value, the history and the plan are
    the single-process run's, bit for bit, with the evaluations spread over both workers."""
    from hiercomp.budget.search import search
    from hiercomp.io.hf import load_hf_model

    loaded = load_hf_model(str(STORIES))
    kwargs = dict(calibration=calib_8x128, levels="gptq:bits=2,3:group_size=128;rtn:bits=4:group_size=128;remove",
                  max_removed=1, evo=EvoConfig(generations=3, offspring=4, stages=((2, 512), (1, 1024)), seed=0),
                  cache_dir=tmp_path / "cache", progress=False)
    serial = search(loaded, "3.0bpw", **kwargs)
    fanned = search(loaded, "3.0bpw", cluster=ClusterConfig(workers=2), **kwargs)
    assert fanned.extra["executor"] == "2 Ray workers x 1 torch threads"
    assert serial.extra["executor"] == "this process"
    a, b = serial.plan, fanned.plan
    assert (a.layers, a.removed, a.cost, a.history) == (b.layers, b.removed, b.cost, b.history)
    assert a.fitness["value"] == b.fitness["value"] and 0.5 < a.fitness["value"] < 2.0
    assert a.fitness["evaluations"] == b.fitness["evaluations"] == 150
    assert [p.fitness for p in serial.extra["uniform_points"]] == [p.fitness for p in fanned.extra["uniform_points"]]


@needs_shared
def test_compress_budget_on_two_workers_writes_the_serial_bytes(ray_cluster, tmp_path: Path) -> None:
    """`hiercomp compress --budget B --workers 2`: the search fans out, the saved plan and weights are the bytes of
    the single-process run."""
    from hiercomp.cli import main
    from hiercomp.plan import Plan

    common = ["compress", str(STORIES), "--budget", "3.0bpw", "--levels", "gptq:bits=2,3:group_size=128",
              "--generations", "2", "--calib", str(TINYSTORIES), "--calib-n", "8", "--calib-len", "128",
              "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "serial")]) == 0
    assert main([*common, "--workers", "2", "--out", str(tmp_path / "fanned")]) == 0
    serial, fanned = (Plan.load(tmp_path / run / "plan.yaml") for run in ("serial", "fanned"))
    assert (serial.layers, serial.removed, serial.cost, serial.history) == \
        (fanned.layers, fanned.removed, fanned.cost, fanned.history)
    assert serial.fitness["value"] == fanned.fitness["value"]  # only the wall time ("seconds") differs
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("serial", "fanned")]
    assert weights[0] == weights[1]


@needs_shared
def test_eval_sweep_on_two_workers_gives_the_serial_numbers(ray_cluster, calib_8x128: torch.Tensor,
                                                            tmp_path: Path) -> None:
    """`hiercomp eval A B --workers 2` and `hiercomp report A B --workers 2`: the numbers of the one-by-one run."""
    from hiercomp.api import compress
    from hiercomp.cli import main
    from hiercomp.recipe import Recipe

    for bits in (3, 8):
        compress(str(STORIES), Recipe.single("rtn", bits=bits, group_size=64), calib_8x128, out=tmp_path / f"rtn{bits}",
                 progress=False)
    models = [str(tmp_path / "rtn3"), str(tmp_path / "rtn8")]
    common = ["--text", str(TINYSTORIES), "--kl-against", str(STORIES), "--seq-len", "128", "--max-windows", "3",
              "--quiet"]
    assert main(["eval", *models, *common, "--json", str(tmp_path / "serial.json")]) == 0
    assert main(["eval", *models, *common, "--workers", "2", "--json", str(tmp_path / "ray.json")]) == 0
    serial = json.loads((tmp_path / "serial.json").read_text())
    fanned = json.loads((tmp_path / "ray.json").read_text())
    assert [r["model"] for r in fanned] == models
    for s, f in zip(serial, fanned):
        assert (s["perplexity"], s["kl"], s["top1_agreement"]) == (f["perplexity"], f["kl"], f["top1_agreement"])
    assert serial[0]["kl"] > 10 * serial[1]["kl"] > 0  # 3-bit damages far more than 8-bit

    # The report: variants measured on the workers into its cache, the same numbers as `eval`.
    report_args = ["report", *models, "--text", str(TINYSTORIES), "--kl-against", str(STORIES), "--seq-len", "128",
                   "--max-windows", "3", "--quiet"]
    assert main([*report_args, "--workers", "2", "--out", str(tmp_path / "r" / "report.md")]) == 0
    cached = [json.loads(p.read_text()) for p in (tmp_path / "r" / ".hiercomp_report_cache").glob("eval-*.json")]
    by_model = {c["model"]: c["result"] for c in cached}
    for model, s in zip(models, serial):
        assert by_model[model]["kl"] == s["kl"] and by_model[model]["perplexity"] == s["perplexity"]
    assert "rtn3" in (tmp_path / "r" / "report.md").read_text()
