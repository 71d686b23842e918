"""The reliability matrix: bad inputs and faults, each -> one line, an exit code, nothing left behind.

Shared by ``tests/reliability/test_bad_inputs.py`` (pytest) and ``benchmarks/reliability.py`` (the table in
``benchmarks/results/reliability.md``). A case builds its input in its own folder from a prepared environment
(stories260K, a perturbed copy, compressed folders of both, a BitStack folder, a tiny model of another
vocabulary), runs ``hiercomp.cli.main([...])`` in process and is judged on: the exit code, the message's
fragment, a single ``error:`` line (no traceback), and the case folder's listing unchanged (no output, no
temporary folder).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED_DATA / "text" / "tinystories" / "valid_sample.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# -- environment -------------------------------------------------------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    """A writable copy (the shared data is read-only, and copytree copies modes)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, _dirs, _files in os.walk(dst):
        os.chmod(root, 0o755)
    return dst


def prepare_env(root: Path) -> dict[str, Path]:
    """Build the shared inputs once (about 10 s on one core)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import hiercomp
    from hiercomp.recipe import Recipe

    root.mkdir(parents=True, exist_ok=True)
    env = {"root": root, "stories": copy_folder(STORIES, root / "stories")}
    perturbed = copy_folder(STORIES, root / "perturbed")
    state = load_file(perturbed / "model.safetensors")
    save_file({k: v * 1.01 for k, v in state.items()}, str(perturbed / "model.safetensors"), metadata={"format": "pt"})
    env["perturbed"] = perturbed
    text = TINYSTORIES.read_text()[:20000]
    env["text"] = root / "text.txt"
    env["text"].write_text(text)
    for name, source in (("packed", env["stories"]), ("packed_b", perturbed)):
        hiercomp.compress(str(source), Recipe.single("rtn", bits=4, group_size=32), out=root / name, progress=False)
        env[name] = root / name
    # the output head compressed too: loading maps the input embedding from the file instead of reading it
    hiercomp.compress(str(env["stories"]), {"rules": [{"method": "rtn", "bits": 4, "group_size": 32}], "ignore": []},
                      out=root / "packed_head", progress=False)
    env["packed_head"] = root / "packed_head"
    tokens = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    hiercomp.compress(str(env["stories"]), Recipe.single("bitstack", n_blocks=3), tokens, out=root / "bitstack",
                      progress=False)
    env["bitstack"] = root / "bitstack"
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny_vocab")
    for name in TOKENIZER_FILES:
        shutil.copyfile(STORIES / name, root / "tiny_vocab" / name)
    env["tiny_vocab"] = root / "tiny_vocab"
    return env


# -- editing helpers -----------------------------------------------------------------------------------------


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def unhashed(meta: dict[str, Any]) -> None:
    """A folder as saved before hashes were recorded: exercises the structural checks behind the hashes."""
    meta.pop("files", None)
    meta.pop("structure_sha256", None)


def first_layer(meta: dict[str, Any]) -> dict[str, Any]:
    return next(iter(meta["layers"].values()))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    build: Callable[[dict[str, Path], Path], list[str]]  # (env, case dir) -> argv; may edit files in the case dir
    fragment: str  # expected in the message (case-insensitive)
    code: int = 2
    kind: str = "bad input"
    fault: Callable[..., Any] | None = None  # a context manager factory (case dir) for faults injected in process


def compress_args(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", str(out), "--quiet", *extra]


def rtn(model: Path | str, case: Path, *extra: str) -> list[str]:
    return compress_args(model, case / "out", "--method", "rtn", *extra)


def model_copy(env: dict[str, Path], case: Path, source: str = "stories") -> Path:
    return copy_folder(env[source], case / "model")


def export_args(folder: Path, case: Path) -> list[str]:
    return ["export", str(folder), "--out", str(case / "out"), "--format", "hf"]


# Input models (compress MODEL --method rtn --out OUT)


def _missing_tensor(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    edit_tensors(m / "model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    return rtn(m, case)


def _unexpected_tensor(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    edit_tensors(m / "model.safetensors", lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(4, 4)}))
    return rtn(m, case)


def _config_of(arch: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        from transformers import BertConfig, T5Config

        m = model_copy(env, case)
        config = (T5Config(vocab_size=512, d_model=64, num_layers=2) if arch == "t5"
                  else BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
        config.architectures = ["T5ForConditionalGeneration" if arch == "t5" else "BertModel"]
        config.save_pretrained(m)
        return rtn(m, case)
    return build


def _auto_map(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    (m / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    edit_json(m / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig",
                                                               "AutoModelForCausalLM": "evil.EvilModel"}))
    return rtn(m, case)


def _bad_config_json(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    (m / "config.json").write_text("{not json")
    return rtn(m, case)


def _no_config(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    (m / "config.json").unlink()
    return rtn(m, case)


def _no_weights(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    (m / "model.safetensors").unlink()
    return rtn(m, case)


def _truncated_weights(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    truncate(m / "model.safetensors")
    return rtn(m, case)


def _garbage_header(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    return rtn(m, case)


def _nan_weights(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    edit_tensors(m / "model.safetensors",
                 lambda s: s["model.layers.0.mlp.up_proj.weight"].view(-1).__setitem__(0, float("nan")))
    return rtn(m, case)


def _wrong_shape(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    edit_tensors(m / "model.safetensors", lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(172,
                                                                                                             32)}))
    return rtn(m, case)


def _model_is_file(env: dict[str, Path], case: Path) -> list[str]:
    return rtn(env["stories"] / "model.safetensors", case)


def _packed_as_input(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case, "packed")
    (m / "hiercomp.json").unlink()
    return rtn(m, case)


def _tokenizer_missing(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    for name in TOKENIZER_FILES:
        (m / name).unlink()
    return rtn(m, case)


# Compressed folders (export DIR --out OUT loads them; eval for the one read as an original)


def _packed(edit: Callable[[Path], None], via: str = "export",
            source: str = "packed") -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        folder = model_copy(env, case, source)
        edit(folder)
        if via == "eval":
            return ["eval", str(folder), "--text", str(env["text"]), "--max-windows", "1", "--seq-len", "32",
                    "--quiet"]
        return export_args(folder, case)
    return build


def _meta(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "hiercomp.json", change)


def _layer_edit(key: str, value: Any, keep_hash: bool = False) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        first_layer(meta)[key] = value
        if not keep_hash:
            unhashed(meta)
    return change


def _symlink_meta_to_dev_zero(folder: Path) -> None:
    (folder / "hiercomp.json").unlink()
    (folder / "hiercomp.json").symlink_to("/dev/zero")


def _swap_from_b(name: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        folder = model_copy(env, case, "packed")
        shutil.copyfile(env["packed_b"] / name, folder / name)
        return export_args(folder, case)
    return build


def _scaled_tensor(folder: Path) -> None:
    edit_tensors(folder / "model.safetensors",
                 lambda s: s.__setitem__("model.layers.0.mlp.up_proj.scales",
                                         s["model.layers.0.mlp.up_proj.scales"] * 2))


def _t5_config(folder: Path) -> None:
    from transformers import T5Config

    T5Config(vocab_size=512, d_model=64, num_layers=2).save_pretrained(folder)


def _auto_map_packed(folder: Path) -> None:
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    edit_json(folder / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))


def _huge_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _bitstack(edit: Callable[[dict[str, Any]], None], budget: str = "300KB") -> Callable[..., list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        folder = model_copy(env, case, "bitstack")
        edit_json(folder / "hiercomp.json", edit)
        return ["eval", str(folder), "--budget", budget, "--text", str(env["text"]), "--max-windows", "1",
                "--seq-len", "32", "--quiet"]
    return build


def _block_bits(times: int, keep_hash: bool) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        name = next(iter(meta["bitstack"]["block_bits"]))
        meta["bitstack"]["block_bits"][name] *= times
        if not keep_hash:
            unhashed(meta)
    return change


# Method parameters, recipes and plans


def _recipe(text: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        (case / "recipe.yaml").write_text(text)
        return compress_args(env["stories"], case / "out", "--recipe", str(case / "recipe.yaml"))
    return build


def _plan(change: Callable[[str], str]) -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        (case / "plan.yaml").write_text(change((env["packed"] / "plan.yaml").read_text()))
        return compress_args(env["stories"], case / "out", "--plan", str(case / "plan.yaml"))
    return build


def _recipe_symlink(env: dict[str, Path], case: Path) -> list[str]:
    (case / "recipe.yaml").symlink_to("/dev/zero")
    return compress_args(env["stories"], case / "out", "--recipe", str(case / "recipe.yaml"))


def _recipe_dir(env: dict[str, Path], case: Path) -> list[str]:
    (case / "recipe.yaml").mkdir()
    return compress_args(env["stories"], case / "out", "--recipe", str(case / "recipe.yaml"))


def _method(*extra: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda env, case: compress_args(env["stories"], case / "out", *extra)


# Output folders and faults


def _out_exists(env: dict[str, Path], case: Path) -> list[str]:
    (case / "out").mkdir()
    return rtn(env["stories"], case)


def _out_is_file(env: dict[str, Path], case: Path) -> list[str]:
    (case / "out").write_text("x")
    return rtn(env["stories"], case, "--force")


def _force_onto_input(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    return compress_args(m, m, "--method", "rtn", "--force")


def _force_onto_parent(env: dict[str, Path], case: Path) -> list[str]:
    m = model_copy(env, case)
    return compress_args(m, case, "--method", "rtn", "--force")


@contextlib.contextmanager
def _tmpfs(case: Path, options: str) -> Any:
    """A tiny tmpfs at case/mnt (root only); else the fault is injected by patching the writer."""
    mnt = case / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


@contextlib.contextmanager
def _raise_in_save(error: BaseException) -> Any:
    import hiercomp.io.saved as saved

    original = saved.save_file

    def failing(*args: Any, **kwargs: Any) -> None:
        raise error

    saved.save_file = failing
    try:
        yield
    finally:
        saved.save_file = original


@contextlib.contextmanager
def disk_full(case: Path) -> Any:
    with _tmpfs(case, "size=64k") as mnt:
        if mnt is not None:
            yield
        else:
            with _raise_in_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
                yield


@contextlib.contextmanager
def read_only(case: Path) -> Any:
    with _tmpfs(case, "size=1m") as mnt:
        if mnt is not None:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            yield
        else:
            with _raise_in_save(OSError(errno.EROFS, os.strerror(errno.EROFS))):
                yield


def _into_mnt(env: dict[str, Path], case: Path) -> list[str]:
    return compress_args(env["stories"], case / "mnt" / "out", "--method", "rtn")


@contextlib.contextmanager
def sigterm_during_save(case: Path) -> Any:
    """SIGTERM arrives while the weights are written: handled like Ctrl-C (exit 143, temporary folder removed)."""
    import hiercomp.io.saved as saved

    original = saved.save_file

    def killed(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    saved.save_file = killed
    try:
        yield
    finally:
        saved.save_file = original


@contextlib.contextmanager
def ctrl_c_during_save(case: Path) -> Any:
    with _raise_in_save(KeyboardInterrupt()):
        yield


@contextlib.contextmanager
def safetensors_error(case: Path) -> Any:
    from safetensors import SafetensorError

    with _raise_in_save(SafetensorError("Error while serializing: IoError(No space left on device)")):
        yield


def _stale_tmp(env: dict[str, Path], case: Path) -> list[str]:
    """Leftovers of a killed run (a dead writer's .tmp folder, an old-style one) are removed by the next run."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (case / f".out.tmp-{dead.pid}-abc123").mkdir()
    (case / ".out.tmp-oldstyle").mkdir()
    return rtn(env["stories"], case)


def _kl_other_vocab(env: dict[str, Path], case: Path) -> list[str]:
    return ["eval", str(env["packed"]), "--text", str(env["text"]), "--kl-against", str(env["tiny_vocab"]),
            "--max-windows", "1", "--seq-len", "32", "--quiet"]


def _context_option(spec: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def build(env: dict[str, Path], case: Path) -> list[str]:
        return ["eval", str(env["stories"]), "--tasks", "squad", "--limit", "1", "--context", spec, "--quiet"]
    return build


def _stream_without_safetensors(env: dict[str, Path], case: Path) -> list[str]:
    model = model_copy(env, case)
    (model / "model.safetensors").unlink()
    return rtn(model, case, "--stream")


def _search_args(env: dict[str, Path], case: Path, *extra: str) -> list[str]:
    return ["search", str(env["stories"]), "--budget", "3.0bpw", "--out", str(case / "plan.yaml"), "--calib",
            str(env["text"]), "--quiet", *extra]


PY_TAG = "rules:\n  - method: !!python/object/apply:os.system ['echo pwned']\n"

CASES: list[Case] = [
    # -- input models
    Case("model: a tensor missing from the safetensors", _missing_tensor, "missing 1, e.g. model.layers.1.mlp.up_proj"),
    Case("model: an unexpected tensor in the safetensors", _unexpected_tensor, "unexpected 1"),
    Case("model: T5 config over Llama weights", _config_of("t5"), "do not match config.json"),
    Case("model: BERT config over Llama weights", _config_of("bert"), "do not match config.json"),
    Case("model: config.json with auto_map (stdin closed): built-in class, code not run", _auto_map, "saved", code=0,
         kind="security"),
    Case("model: config.json not JSON", _bad_config_json, "is not valid json"),
    Case("model: no config.json", _no_config, "has no config.json"),
    Case("model: config but no weights", _no_weights, "no weights"),
    Case("model: truncated model.safetensors", _truncated_weights, "cannot read the weights"),
    Case("model: garbage safetensors header", _garbage_header, "cannot read the weights"),
    Case("model: NaN in a weight", _nan_weights, "nan or inf"),
    Case("model: a weight of the wrong shape", _wrong_shape, "mismatch"),
    Case("model: a file, not a folder", _model_is_file, "is a file"),
    Case("model: folder does not exist", lambda env, case: rtn(case / "nope", case), "does not exist"),
    Case("model: packed weights without hiercomp.json", _packed_as_input, "the metadata is missing"),
    Case("model: no tokenizer files", _tokenizer_missing, "tokenizer"),
    # -- compressed folders
    Case("folder: hiercomp.json missing (read as an original)", _packed(lambda f: (f / "hiercomp.json").unlink(),
                                                                        "eval"), "the metadata is missing"),
    Case("folder: hiercomp.json -> /dev/zero", _packed(_symlink_meta_to_dev_zero), "not a regular file",
         kind="security"),
    Case("folder: hiercomp.json not JSON", _packed(lambda f: (f / "hiercomp.json").write_text("{")), "damaged"),
    Case("folder: hiercomp.json a JSON list", _packed(lambda f: (f / "hiercomp.json").write_text("[1]")),
         "not a json object"),
    Case("folder: hiercomp.json not UTF-8", _packed(lambda f: (f / "hiercomp.json").write_bytes(b"\xff\xfe{")),
         "damaged"),
    Case("folder: format version from the future", _packed(_meta(lambda m: m.update(format_version=99))),
         "upgrade hiercomp"),
    Case("folder: 'layers' not a mapping", _packed(_meta(lambda m: m.update(layers=[1]))), "'layers' is not a dict"),
    Case("folder: a layer's bits edited", _packed(_meta(_layer_edit("bits", 3, keep_hash=True))), "was edited"),
    Case("folder: bits edited, no hashes (old folder)", _packed(_meta(_layer_edit("bits", 8))), "disagree"),
    Case("folder: a layer's shape edited, no hashes", _packed(_meta(_layer_edit("in_features", 128))), "disagree"),
    Case("folder: unknown layer type, no hashes", _packed(_meta(_layer_edit("type", "quantum"))), "cannot be rebuilt"),
    Case("folder: a layer config not a mapping, no hashes",
         _packed(_meta(lambda m: (m["layers"].update({next(iter(m["layers"])): 7}), unhashed(m)))),
         "cannot be rebuilt"),
    Case("folder: dtype edited, no hashes", _packed(_meta(lambda m: (m.update(dtype="float16"), unhashed(m)))),
         "disagree"),
    Case("folder: dtype not a dtype, no hashes", _packed(_meta(lambda m: (m.update(dtype="banana"), unhashed(m)))),
         "names dtype"),
    Case("folder: model class edited", _packed(_meta(lambda m: (m.update(model_class="os"), unhashed(m)))),
         "model class"),
    Case("folder: tied alias to a missing tensor, no hashes",
         _packed(_meta(lambda m: (m.update(aliases={"lm_head.weight": "nope"}), unhashed(m)))), "no tensor"),
    Case("folder: truncated model.safetensors", _packed(lambda f: truncate(f / "model.safetensors")), "truncated"),
    Case("folder: truncated model.safetensors, no hashes",
         _packed(lambda f: (truncate(f / "model.safetensors"), edit_json(f / "hiercomp.json", unhashed))), "damaged"),
    Case("folder, head compressed (embedding mapped): truncated model.safetensors, no hashes",
         _packed(lambda f: (truncate(f / "model.safetensors"), edit_json(f / "hiercomp.json", unhashed)), via="eval",
                 source="packed_head"), "damaged"),
    Case("folder: safetensors header length 1 TB, no hashes",
         _packed(lambda f: (_huge_header(f), edit_json(f / "hiercomp.json", unhashed))), "damaged"),
    Case("folder: model.safetensors missing", _packed(lambda f: (f / "model.safetensors").unlink()),
         "has no model.safetensors"),
    Case("folder: one tensor's values changed (same shape)", _packed(_scaled_tensor), "content hash differs"),
    Case("folder: weights of another folder swapped in", _swap_from_b("model.safetensors"), "content hash differs"),
    Case("folder: hiercomp.json of another folder swapped in", _swap_from_b("hiercomp.json"), "content hash differs"),
    Case("folder: T5 config.json over the packed weights", _packed(_t5_config), "another model"),
    Case("folder: config.json with auto_map (stdin closed): built-in class, code not run", _packed(_auto_map_packed),
         "exported", code=0, kind="security"),
    Case("folder: config.json not JSON", _packed(lambda f: (f / "config.json").write_text("{")), "cannot be read"),
    Case("folder: does not exist", lambda env, case: export_args(case / "nope", case), "does not exist"),
    Case("bitstack: a block size tampered", _bitstack(_block_bits(7, keep_hash=True)), "was edited"),
    Case("bitstack: a block size tampered, no hashes", _bitstack(_block_bits(7, keep_hash=False)), "block of"),
    Case("bitstack: a negative block size, no hashes", _bitstack(_block_bits(-1, keep_hash=False)), "damaged"),
    Case("bitstack: order entry out of place, no hashes",
         _bitstack(lambda m: (m["bitstack"]["order"].reverse(), unhashed(m))), "out of place"),
    Case("bitstack: budget below the base", _bitstack(lambda m: None, "1KB"), "below the bitstack base"),
    Case("bitstack: --budget on a folder without BitStack",
         lambda env, case: ["eval", str(env["packed"]), "--budget", "300KB", "--text", str(env["text"]), "--quiet"],
         "no bitstack layers"),
    # -- method parameters
    Case("param: --bits 9", _method("--method", "rtn", "--bits", "9"), "between 2 and 8"),
    Case("param: bits=4.5", _method("--method", "rtn", "--param", "bits=4.5"), "bits must be an integer"),
    Case("param: group_size=\"32\"", _method("--method", "rtn", "--param", "group_size='32'"), "must be an integer"),
    Case("param: symmetric=maybe", _method("--method", "rtn", "--param", "symmetric=maybe"), "true or false"),
    Case("param: --pattern 9:8", _method("--method", "magnitude", "--pattern", "9:8"), "0 < n < m"),
    Case("param: --pattern 2:4 --sparsity 0.9", _method("--method", "magnitude", "--pattern", "2:4", "--sparsity",
                                                        "0.9"), "fixes the sparsity"),
    Case("param: --pattern abc", _method("--method", "magnitude", "--pattern", "abc"), "must look like"),
    Case("param: --pattern 3:7 on 64-wide layers", _method("--method", "magnitude", "--pattern", "3:7"),
         "not a multiple of 7"),
    Case("param: --sparsity 1.5", _method("--method", "magnitude", "--sparsity", "1.5"), "[0, 1)"),
    Case("param: sparsity=nan", _method("--method", "magnitude", "--param", "sparsity=.nan"), "must be a number"),
    Case("param: unknown method", _method("--method", "zip"), "unknown method"),
    Case("param: --rank on rtn", _method("--method", "rtn", "--rank", "3"), "does not apply"),
    Case("param: --group-size -5", _method("--method", "rtn", "--group-size", "-5"), "positive"),
    Case("param: --param without =", _method("--method", "rtn", "--param", "bits"), "key=value"),
    Case("param: no method at all", _method(), "say what to do"),
    Case("param: quip scale_bits=4", _method("--method", "quip", "--bits", "3", "--param", "scale_bits=4"),
         "must be 16 or 8"),
    Case("param: quip scale_bits=8 with row_scales=false",
         _method("--method", "quip", "--bits", "3", "--param", "scale_bits=8", "--param", "row_scales=false"),
         "leave scale_bits at 16"),
    # -- recipes and plans
    Case("recipe: bits: 4.5", _recipe("rules:\n  - method: rtn\n    bits: 4.5\n"), "bits must be an integer"),
    Case("recipe: group_size: \"32\"", _recipe("rules:\n  - method: rtn\n    group_size: '32'\n"),
         "must be an integer"),
    Case("recipe: bad re: pattern", _recipe("rules:\n  - method: rtn\n    targets: ['re:model.(']\n"),
         "not a valid regular expression"),
    Case("recipe: pattern: 2:4 unquoted (YAML reads 124)",
         _recipe("rules:\n  - method: magnitude\n    pattern: 2:4\n"), "quote"),
    Case("recipe: YAML with a Python tag", _recipe(PY_TAG), "not valid yaml", kind="security"),
    Case("recipe: not YAML", _recipe("rules: [\n"), "not valid yaml"),
    Case("recipe: unknown key", _recipe("rules:\n  - method: rtn\nbogus: 1\n"), "unknown recipe key"),
    Case("recipe: rule without method", _recipe("rules:\n  - bits: 4\n"), "needs a 'method:'"),
    Case("recipe: a list, not a mapping", _recipe("- 1\n- 2\n"), "non-empty 'rules:'"),
    Case("recipe: -> /dev/zero", _recipe_symlink, "not a regular file", kind="security"),
    Case("recipe: a folder", _recipe_dir, "not a regular file"),
    Case("recipe: missing file", lambda env, case: compress_args(env["stories"], case / "out", "--recipe",
                                                                 str(case / "nope.yaml")), "does not exist"),
    Case("plan: bits: four", _plan(lambda t: t.replace("bits: 4", "bits: four", 1)), "bits must be an integer"),
    Case("plan: group_size: '32'", _plan(lambda t: t.replace("group_size: 32", "group_size: '32'", 1)),
         "must be an integer"),
    Case("plan: a layer that does not exist", _plan(lambda t: t.replace("model.layers.0.self_attn.q_proj",
                                                                        "model.layers.9.self_attn.q_proj", 1)),
         "layers.9"),
    Case("plan: no layers mapping", _plan(lambda t: "hiercomp_plan: 1\n"), "non-empty 'rules:'"),
    # -- outputs and faults
    Case("out: exists, no --force", _out_exists, "already exists", kind="output"),
    Case("out: a file, with --force", _out_is_file, "not a folder", kind="output"),
    Case("out: --force onto the input model", _force_onto_input, "the input", kind="output"),
    Case("out: --force onto the folder holding the input", _force_onto_parent, "the input", kind="output"),
    Case("fault: disk full while saving", _into_mnt, "no space left", kind="fault", fault=disk_full),
    Case("fault: read-only output folder", _into_mnt, "read-only file system", kind="fault", fault=read_only),
    Case("fault: SafetensorError while saving", lambda env, case: rtn(env["stories"], case), "cannot write",
         kind="fault", fault=safetensors_error),
    Case("fault: SIGTERM while saving", lambda env, case: rtn(env["stories"], case), "interrupted", code=143,
         kind="fault", fault=sigterm_during_save),
    Case("fault: Ctrl-C while saving", lambda env, case: rtn(env["stories"], case), "interrupted", code=130,
         kind="fault", fault=ctrl_c_during_save),
    Case("fault: stale .tmp folders of a killed run", _stale_tmp, "saved", code=0, kind="fault"),
    Case("eval: --kl-against a model with another vocabulary", _kl_other_vocab, "vocabular"),
    # -- compress --stream and the Ray options
    Case("stream: --stream with --budget", lambda env, case: compress_args(env["stories"], case / "out", "--stream",
                                                                            "--budget", "3.0bpw"), "drop --stream"),
    Case("stream: --stream with --resume", lambda env, case: rtn(env["stories"], case, "--stream", "--resume"),
         "does not combine with --stream"),
    Case("stream: a model folder without safetensors", _stream_without_safetensors, "no safetensors weights"),
    Case("compress: --workers without --budget", lambda env, case: rtn(env["stories"], case, "--workers", "2"),
         "add --budget"),
    Case("search: --workers 0", lambda env, case: _search_args(env, case, "--workers", "0"), "at least 1"),
    Case("search: --ray-address not an address", lambda env, case: _search_args(env, case, "--ray-address", "nowhere"),
         "is not 'auto', host:port"),
    # -- recovery tuning: too few windows to hold any out, and a step that diverges to NaN
    Case("compress: --tune-lr that diverges with no windows to hold out",
         lambda env, case: rtn(env["stories"], case, "--bits", "2", "--calib", str(env["text"]), "--calib-n", "2",
                               "--calib-len", "64", "--tune-steps", "6", "--tune-lr", "1e6"),
         "diverged"),
    Case("compress: --tune-codes without --tune-steps",
         lambda env, case: rtn(env["stories"], case, "--tune-codes", "4"), "add --tune-steps"),
    Case("compress: --tune-uncompressed without --tune-steps",
         lambda env, case: rtn(env["stories"], case, "--tune-uncompressed"), "add --tune-steps"),
    Case("compress: --tune-generated without --tune-steps",
         lambda env, case: rtn(env["stories"], case, "--tune-generated", "8"), "add --tune-steps"),
    Case("compress: trellis with its Hessian sweep and no --calib",
         lambda env, case: compress_args(env["stories"], case / "out", "--method", "trellis"), "pass --calib"),
    # -- context compression options
    Case("eval: --context cascade with coarse below 1", _context_option("cascade:budget=0.25x,coarse=0.5"),
         "coarse must be a number of at least 1"),
    Case("eval: --context with a question_weight that is not a number",
         _context_option("tokens:budget=0.25x,question_weight=lots"), "question_weight must be a number"),
]


# -- running -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    code: int | None
    message: str  # the last line of stderr (or of stdout for a success)
    lines: int  # error lines on stderr
    traceback: str | None  # an exception that escaped main()
    left_behind: list[str]

    @property
    def ok(self) -> bool:
        return (self.traceback is None and self.code == self.case.code and not self.left_behind
                and self.case.fragment.lower() in self.message.lower() and (self.code == 0 or self.lines == 1))

    @property
    def silent(self) -> bool:
        """A bad input that exited 0: the failure this matrix exists to prevent."""
        return self.code == 0 and self.case.code != 0


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_case(case: Case, env: dict[str, Path], case_dir: Path) -> Outcome:
    from hiercomp.cli import main

    case_dir.mkdir(parents=True)
    argv = case.build(env, case_dir)
    fault = case.fault(case_dir) if case.fault else contextlib.nullcontext()
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | None = None
    escaped = None
    with fault:
        before = listing(case_dir)
        stdin = sys.stdin
        sys.stdin = io.StringIO("")  # closed stdin: a prompt must never wait for an answer
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(argv)
        except BaseException as err:  # noqa: BLE001 - a traceback is what the matrix counts
            escaped = "".join(traceback.format_exception_only(type(err), err)).strip()
        finally:
            sys.stdin = stdin
        after = listing(case_dir)
    left = sorted(after - before)
    if case.code == 0:  # a success writes its output; only temporary folders count as left behind
        left = [p for p in left if ".tmp-" in p or ".old-" in p]
        left += sorted(p for p in before if ".tmp-" in p and p in after)  # stale ones must be gone
    err_lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    out_lines = [line for line in stdout.getvalue().splitlines() if line.strip()]
    message = (err_lines or out_lines or [""])[-1] if code != 0 else (out_lines or [""])[-1]
    return Outcome(case, code, message, len(err_lines), escaped, left)
