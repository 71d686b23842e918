"""`hiercomp report`: Pareto front, pictures that show something, tables that hold the measured numbers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import hiercomp  # noqa: E402
from hiercomp.cli import main  # noqa: E402
from hiercomp.errors import HiercompError  # noqa: E402
from hiercomp.report import EvalOptions, Variant, make_report, write_report  # noqa: E402
from hiercomp.report.plots import layer_allocation, pareto_front, quality_vs_size  # noqa: E402
from tests.conftest import STORIES, TINYSTORIES, needs_shared  # noqa: E402


def assert_real_picture(path, min_kb: float = 10.0) -> None:
    """A PNG of some size whose pixels are not all one colour."""
    import matplotlib.image as mpimg

    assert path.stat().st_size > min_kb * 1000
    pixels = mpimg.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels[..., :3].var()) > 1e-3


# -- the Pareto front ------------------------------------------------------------------------------------------

def test_pareto_front_lower_is_better():
    points = [(100, 0.5), (200, 0.1), (150, 0.6), (300, 0.1), (50, 2.0), (250, 0.01), (200, 0.1)]
    # (150, 0.6) is beaten by (100, 0.5); (300, 0.1) and the duplicate (200, 0.1) by the first (200, 0.1).
    assert pareto_front(points, lower_is_better=True) == [4, 0, 1, 5]


def test_pareto_front_higher_is_better_and_non_finite_points():
    points = [(1.0, 0.3), (2.0, 0.2), (3.0, 0.9), (0.5, float("nan")), (4.0, 0.9), (0.1, float("inf"))]
    assert pareto_front(points, lower_is_better=False) == [0, 2]
    assert pareto_front([], lower_is_better=True) == []


def test_pareto_front_is_never_dominated(tmp_path):
    rng = np.random.default_rng(0)
    points = [(float(s), float(q)) for s, q in rng.random((60, 2))]
    front = set(pareto_front(points))
    for i, (s, q) in enumerate(points):
        beaten = any(s2 <= s and q2 <= q and (s2, q2) != (s, q) for s2, q2 in points)
        assert (i in front) == (not beaten)


# -- the two pictures on constructed data ------------------------------------------------------------------------

def test_quality_vs_size_and_layer_allocation_pictures(tmp_path):
    series = {"rtn": [(150e3, 0.9), (190e3, 0.05), (260e3, 0.001)], "evo": [(170e3, 0.04)]}
    path = quality_vs_size(series, tmp_path / "q.png", labels={"rtn": ["3b", "4b", "8b"], "evo": ["plan"]})
    assert_real_picture(path)
    layers = [{"name": f"model.layers.{b}.{n}", "bits_per_weight": 2.0 + (b + k) % 3, "sparsity": 0.5 if k else None,
               "removed": b == 2 and n.startswith("mlp"), "rel_error": 0.01 * (1 + k)}
              for b in range(3) for k, n in enumerate(("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))]
    assert_real_picture(layer_allocation(layers, tmp_path / "l.png", title="plan"))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    with pytest.raises(HiercompError):
        quality_vs_size({"a": [(1.0, float("nan"))]}, tmp_path / "none.png")


# -- rendering constructed results: tasks, verdicts, disagreements ---------------------------------------------

def constructed_variants() -> list[Variant]:
    layers = [{"name": f"model.layers.{i}.mlp.up_proj", "bits_per_weight": 4.25, "sparsity": None, "removed": False,
               "rel_error": 0.02 * (i + 1)} for i in range(4)]
    base = Variant("original (baseline)", None, "uncompressed", 1_044_992, None, [],
                   {"perplexity": 4.7512, "kl": 0.0, "top1_agreement": 1.0,
                    "tasks": {"arc_easy": {"acc": 0.2600, "acc_norm": 0.2500, "n": 100}}}, is_reference=True)
    good = Variant("gptq4", "/x/gptq4", "gptq(bits=4)", 277_216, 4.643, layers,
                   {"perplexity": 4.8123, "kl": 0.01234, "top1_agreement": 0.9412,
                    "tasks": {"arc_easy": {"acc": 0.2400, "acc_norm": 0.2510, "n": 100}},
                    "verdicts": {"perplexity": "matches", "arc_easy": {"acc": "worse", "acc_norm": "matches"}},
                    "disagreements": ["perplexity matches the original but arc_easy acc is worse (0.240 vs 0.260)"],
                    "probes": {"closed_book": "worse", "open_book": "matches"}})
    bad = Variant("rtn2", "/x/rtn2", "rtn(bits=2)", 150_000, 2.5, layers,
                  {"perplexity": 9.9, "kl": 0.9, "top1_agreement": 0.5,
                   "tasks": {"arc_easy": {"acc": 0.2700, "acc_norm": 0.2500, "n": 100}},
                   "verdicts": {"perplexity": "worse", "arc_easy": {"acc": "better", "acc_norm": "matches"}}})
    return [base, good, bad]


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_report_from_constructed_results(tmp_path, suffix):
    out = write_report(constructed_variants(), tmp_path / f"r{suffix}", EvalOptions(text="t.txt", reference="ref"))
    text = out.read_text()
    for number in ("4.812", "0.01234", "0.9412", "4.751", "0.2400 (WORSE)", "0.2510 (matches)", "arc_easy acc (n=100)",
                   "277.2 KB (277,216 B)", "4.643", "9.900 (WORSE)"):
        assert number in text, number
    assert "arc_easy acc_norm" in text
    # The runner's own disagreement note, and one derived from the verdicts where the runner gave none.
    assert "gptq4: perplexity matches the original but arc_easy acc is worse" in text
    assert ("rtn2: perplexity is worse than the original (9.900 vs 4.751) but these task scores hold up (match or "
            "beat the original): arc_easy acc (0.270 vs 0.260), arc_easy acc_norm (0.250 vs 0.250)") in text
    assert "closed_book: WORSE; open_book: matches" in text
    if suffix == ".md":
        pictures = sorted((tmp_path / "r_files").glob("*.png"))
        # KL, perplexity and arc_easy's headline metric (acc) vs size; bits per layer of the two variants.
        assert [p.name.split("-")[0] for p in pictures] == ["layers"] * 2 + ["quality"] * 3
        assert (tmp_path / "r_files" / "quality-arc_easy-acc.png").is_file()
        for picture in pictures:
            assert f"r_files/{picture.name}" in text
            assert_real_picture(picture)
    else:
        images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
        assert len(images) == 5
        for n, data in enumerate(images):
            (tmp_path / f"{n}.png").write_bytes(base64.b64decode(data))
            assert_real_picture(tmp_path / f"{n}.png")


def test_mixed_plan_method_cell_is_a_summary():
    from hiercomp.report.collect import method_family, method_summary

    layers = ([{"method": "gptq(bits=4, group_size=128, symmetric=False, damp=0.01)"}] * 6
              + [{"method": "gptq(bits=3, group_size=32, symmetric=False, damp=0.01)"}] * 14
              + [{"method": "rtn(bits=8, group_size=128, symmetric=False)"}] * 2)
    assert method_summary(layers, ["model.layers.3", "model.layers.4.mlp"]) == \
        "gptq 3-4 bit (g32/g128) ×20; rtn 8-bit (g128) ×2; 2 removed (model.layers.3, model.layers.4.mlp)"
    assert method_family(layers, removed=True) == "gptq+rtn mixed + depth"
    uniform = layers[:6]
    assert method_summary(uniform) == uniform[0]["method"] and method_family(uniform) == "gptq"
    assert method_summary([{"method": "wanda(sparsity=0.5, pattern=None)"},
                           {"method": "wanda(sparsity=0.6, pattern=None)"}]) == "wanda 50%/60% sparse ×2"


def test_one_colour_per_method_across_plots_and_captions_that_match(tmp_path, monkeypatch):
    import hiercomp.report.render as render

    variants = constructed_variants()
    variants[1].family, variants[2].family = "gptq", "rtn"
    seen = []
    real = render.quality_vs_size

    def recording(series, out, **kwargs):
        seen.append({name: kwargs["colors"][name] for name in series})
        return real(series, out, **kwargs)

    monkeypatch.setattr(render, "quality_vs_size", recording)
    figures = render.make_figures(variants, tmp_path, "t")
    assert len(seen) == 3  # KL, perplexity, arc_easy acc
    for name in ("gptq", "rtn"):
        assert len({str(colours[name]) for colours in seen}) == 1  # the same colour in every plot
    assert seen[0]["gptq"] != seen[0]["rtn"]
    captions = [f.caption for f in figures]
    kl_caption = next(c for c in captions if c.startswith("KL"))
    ppl_caption = next(c for c in captions if c.startswith("perplexity"))
    assert "the original is not drawn" in kl_caption and "the original is not drawn" not in ppl_caption
    assert all("Pareto front" in c and "one colour per method" in c for c in captions[:3])
    assert "lower panel" not in captions[3] and "relative output error" in captions[3]


def test_report_refuses_bad_output(tmp_path):
    (tmp_path / "r.html").write_text("old")
    with pytest.raises(HiercompError, match="--force"):
        write_report(constructed_variants(), tmp_path / "r.html", EvalOptions())
    with pytest.raises(HiercompError, match=r"\.html or \.md"):
        write_report(constructed_variants(), tmp_path / "r.pdf", EvalOptions())
    assert (tmp_path / "r.html").read_text() == "old"


# -- end to end on stories260K --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_variants(tmp_path_factory):
    """stories260K at RTN 8 bits per channel and 3 bits g32 (RTN needs no calibration: fast)."""
    root = tmp_path_factory.mktemp("variants")
    for bits, group in ((8, None), (3, 32)):
        recipe = hiercomp.Recipe.single("rtn", bits=bits, group_size=group)
        hiercomp.compress(str(STORIES), recipe, progress=False).save(root / f"rtn{bits}")
    return root


@needs_shared
def test_report_on_stories260k_end_to_end(stories_variants, tmp_path, monkeypatch):
    dirs = [str(stories_variants / "rtn8"), str(stories_variants / "rtn3")]
    # Two windows of 128 tokens need ~1 KB of text; a short excerpt spares tokenizing the whole sample.
    excerpt = tmp_path / "held_out.txt"
    excerpt.write_text(TINYSTORIES.read_text()[:8000])
    options = ["--text", str(excerpt), "--kl-against", str(STORIES), "--seq-len", "128", "--max-windows", "2",
               "--quiet"]
    assert main(["report", *dirs, "--out", str(tmp_path / "r.md"), *options]) == 0
    cached = sorted((tmp_path / ".hiercomp_report_cache").glob("eval-*.json"))
    assert len(cached) == 3  # the original once, then each variant once
    results = {json.loads(p.read_text())["model"]: json.loads(p.read_text())["result"] for p in cached}
    r8, r3, original = results[dirs[0]], results[dirs[1]], results[str(STORIES)]
    # Every variant's verdicts read the one evaluation of the original.
    assert r8["reference_perplexity"] == r3["reference_perplexity"] == original["perplexity"]
    # 8 bits barely moves the model, 3 bits does; the report's table holds these very numbers.
    assert r8["kl"] < 0.01 < r3["kl"] and r3["perplexity"] > r8["perplexity"]
    assert r8["size_bytes"] < r8["reference_size_bytes"] and r3["size_bytes"] < r8["size_bytes"]
    text = (tmp_path / "r.md").read_text()
    original_row = "| original (baseline) | uncompressed | 1.045 MB (1,044,992 B) | 32.000 | "
    assert f"{original_row}{r8['reference_perplexity']:.3f} |" in text
    for result in (r8, r3):
        assert f"{result['perplexity']:.3f}" in text and format(result["kl"], ".4g") in text
        assert f"{result['top1_agreement']:.4f}" in text and f"{result['bits_per_weight']:.3f}" in text
    assert "rtn(bits=3, group_size=32" in text
    assert "2 non-overlapping windows of 128 tokens" in text  # the perplexity protocol in the header
    for picture in (tmp_path / "r_files").glob("*.png"):
        assert_real_picture(picture)
    assert len(list((tmp_path / "r_files").glob("*.png"))) == 4  # KL, perplexity, two layer plots

    # A rerun with the same folders and options reads the cache: evaluating again would fail here.
    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again despite the cache")

    monkeypatch.setattr("hiercomp.evaluation.evaluate", no_evaluation)
    assert main(["report", *dirs, "--out", str(tmp_path / "r.html"), *options]) == 0
    html_text = (tmp_path / "r.html").read_text()
    assert f"{r3['perplexity']:.3f}" in html_text and html_text.count("data:image/png;base64,") == 4
    assert main(["report", *dirs, "--out", str(tmp_path / "r.html"), *options]) == 2  # exists, no --force

    # Precomputed `hiercomp eval --json` results stand in for evaluation.
    (tmp_path / "e3.json").write_text(json.dumps(r3))
    variants = hiercomp.report.collect([dirs[1]], EvalOptions(text="unused.txt"),
                                       from_json=[str(tmp_path / "e3.json")])
    assert variants[0].metrics["kl"] == r3["kl"] and variants[0].layers[0]["bits_per_weight"] > 3.0
    with pytest.raises(HiercompError, match="size_bytes"):
        (tmp_path / "bad.json").write_text("{}")
        make_report([], tmp_path / "x.md", from_json=[str(tmp_path / "bad.json")])
