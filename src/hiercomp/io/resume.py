"""Resume a killed ``compress`` run from its last finished block, with the bytes of an uninterrupted run.

While a run that saves to ``OUT`` works through the blocks, each finished block is checkpointed beside the
output, in ``.OUT.resume-<key>/``:

- ``manifest.json``: the key and its parts (digests of the model's tensors as the block loop receives them, the
  plan, the calibration tokens, the loop's settings with the hiercomp and torch versions). Not the global random
  state: a CLI process starts with a different one each time, and no method draws from it (every seeded draw
  uses its own ``torch.Generator``; the contract suite's same-bytes test would fail otherwise);
- ``block-NNNN/``, one per finished block, written under a temporary name and renamed: ``state.safetensors``
  (the block's whole state: packed layers and any float weight a block-level step such as AWQ's fold changed),
  ``inputs.safetensors`` (the next block's inputs exactly as the loop computed them, and the random state after
  the block) and ``block.json`` (each packed layer's config, the block's report rows and notes, and the two
  files' content hashes).

A rerun with ``resume=True`` (``--resume``) and the same arguments restores the finished blocks, loads the saved
inputs instead of recomputing them (GPTQ-style propagation makes each block depend on every earlier compressed
one) and continues: what it writes is what the uninterrupted run writes, byte for byte (``hiercomp.json`` records
wall times, which differ between any two runs). Other arguments give another key: ``--resume`` then refuses in one
line and names what differs. Without ``resume`` a leftover folder is removed and named once.

Only a hard kill (SIGKILL, power loss) leaves the folder: an error, Ctrl-C or SIGTERM unwinds and removes it,
as every other temporary output is removed (nothing left behind), and the saved output's rename removes it too.
Nothing in it is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercomp.errors import HiercompError
from hiercomp.io.integrity import HASH, file_digest, read_regular

FORMAT = "hiercomp-resume"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_JSON_BYTES = 64 * 2**20
KEY_CHARS = 16  # of the key's hex digest, in the folder's name
# What each part of the key means to a user, for the one-line refusal of a mismatched --resume.
PART_NAMES = {"model": "the model's weights", "plan": "the method, recipe or plan", "calibration":
              "the calibration text or its options (--calib, --calib-n, --calib-len, --seed)",
              "settings": "the engine settings (--propagate, --no-sequential) or the hiercomp/torch version"}
KILL_ENV = "HIERCOMP_TEST_KILL_AT"


def kill_point(where: str) -> None:
    """Test hook: SIGKILL this process when ``$HIERCOMP_TEST_KILL_AT`` names ``where`` ("calibration",
    "block:N" mid block N, "save" while the output is written), so a kill lands at a chosen point every time."""
    if os.environ.get(KILL_ENV) == where:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _digest_tensors(named: Iterator[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.new(HASH)
    for name, tensor in named:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():  # hashed from the tensor's memory, without a bytes copy of a large model
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _digest_json(value: Any) -> str:
    return hashlib.new(HASH, json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_key_parts(model: nn.Module, plan_dict: dict[str, Any], calibration: torch.Tensor | None,
                  settings: dict[str, Any]) -> dict[str, str]:
    """Digests of everything the block loop's result depends on."""
    import hiercomp

    state = model.state_dict()
    calib = [] if calibration is None else [("calibration", calibration)]
    return {
        "model": _digest_tensors(iter(sorted(state.items()))),
        "plan": _digest_json(plan_dict),
        "calibration": _digest_tensors(iter(calib)),
        "settings": _digest_json({**settings, "hiercomp": hiercomp.__version__, "torch": torch.__version__}),
    }


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(read_regular(path, MAX_JSON_BYTES, what))
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise HiercompError(f"{path} is damaged; rerun without --resume to start over")
    return value


class BlockCheckpoints:
    """The resume folder of one run writing to ``out``: opened by :meth:`start` (from the block loop), one
    :meth:`save_block` per finished block, :meth:`restore_block` for those a killed run finished."""

    def __init__(self, out: str | Path, resume: bool) -> None:
        self.out = Path(out)
        self.resume = resume
        self.folder: Path | None = None
        self.finished = 0  # blocks restorable from the folder (a prefix of the model's blocks)

    # -- opening -----------------------------------------------------------------------------------------
    def _leftovers(self) -> list[Path]:
        parent = self.out.parent
        if not parent.is_dir():
            return []
        return sorted(p for p in parent.glob(f".{self.out.name}.resume-*") if p.is_dir() and not p.is_symlink())

    def start(self, model: nn.Module, plan_dict: dict[str, Any], calibration: torch.Tensor | None,
              settings: dict[str, Any]) -> int:
        """Find or create this run's folder; returns how many leading blocks can be restored (0 for a fresh run).

        With ``resume``, a folder of other arguments is refused in one line; without, leftovers are removed."""
        parts = run_key_parts(model, plan_dict, calibration, settings)
        key = _digest_json(parts)
        folder = self.out.parent / f".{self.out.name}.resume-{key[:KEY_CHARS]}"
        leftovers = [p for p in self._leftovers() if p != folder]
        if self.resume and not folder.is_dir() and leftovers:
            raise HiercompError(self._mismatch(leftovers[-1], parts))
        for stale in leftovers + ([folder] if folder.is_dir() and not self.resume else []):
            _note(f"removed {stale}, left by a killed run writing {self.out} (pass --resume to continue such a run)")
            shutil.rmtree(stale, ignore_errors=True)
        self.folder = folder
        if self.resume and folder.is_dir():
            manifest = _read_json(folder / MANIFEST, "resume manifest")
            if manifest.get("format") != FORMAT or manifest.get("key") != key:
                raise HiercompError(f"{folder} is damaged or from another hiercomp; rerun without --resume to "
                                    "start over")
            self.finished = self._finished_blocks()
            _note(f"resuming {self.out}: {self.finished} finished block(s) restored from {folder}"
                  if self.finished else f"resuming {self.out}: no block had finished, starting from the first")
        else:
            if self.resume:
                _note(f"nothing to resume for {self.out}; starting from the first block")
            self.out.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True)
            _write_json(folder / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
                                            "parts": parts})
        return self.finished

    def _mismatch(self, other: Path, parts: dict[str, str]) -> str:
        try:
            theirs = json.loads(read_regular(other / MANIFEST, MAX_JSON_BYTES, "resume manifest")).get("parts", {})
        except Exception:  # noqa: BLE001 - a damaged manifest: say only that the arguments differ
            theirs = {}
        differ = [PART_NAMES[k] for k in PART_NAMES if isinstance(theirs, dict) and theirs.get(k) != parts[k]]
        what = "; ".join(differ) if differ and len(differ) < len(PART_NAMES) else "the arguments"
        return (f"--resume: the killed run writing {self.out} ({other.name}) was started with other arguments "
                f"({what} differ); rerun it with the same arguments, or without --resume to start over")

    def _block_dir(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"block-{index:04d}"

    def _finished_blocks(self) -> int:
        count = 0
        while self._block_dir(count).is_dir():
            count += 1
        return count

    # -- writing -----------------------------------------------------------------------------------------
    def save_block(self, index: int, block: nn.Module, layer_configs: dict[str, dict[str, Any]],
                   report_rows: list[dict[str, Any]], notes: dict[str, str],
                   next_inputs: list[torch.Tensor] | None) -> None:
        """Checkpoint finished block ``index`` (atomically: a block folder is complete or absent)."""
        from safetensors.torch import save_file

        final = self._block_dir(index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
        save_file(state, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        inputs = {"rng.torch_cpu": torch.get_rng_state()}
        inputs.update({f"hidden.{i}": h.detach().contiguous() for i, h in enumerate(next_inputs or [])})
        save_file(inputs, str(tmp / "inputs.safetensors"), metadata={"format": "pt"})
        info = {"index": index, "layers": layer_configs, "report": report_rows, "notes": notes,
                "n_inputs": len(next_inputs or []),
                "files": {name: file_digest(tmp / name) for name in ("state.safetensors", "inputs.safetensors")}}
        _write_json(tmp / "block.json", info)
        tmp.rename(final)
        if index:  # only the last block's outputs are needed: drop the previous one's (the largest file here)
            previous = self._block_dir(index - 1) / "inputs.safetensors"
            previous.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------------------
    def _block_info(self, index: int, files: tuple[str, ...]) -> dict[str, Any]:
        folder = self._block_dir(index)
        info = _read_json(folder / "block.json", "resume block record")
        for name in files:
            recorded = (info.get("files") or {}).get(name)
            path = folder / name
            if not path.is_file() or recorded != file_digest(path):
                raise HiercompError(f"{path} is missing or damaged; rerun without --resume to start over")
        return info

    def restore_block(self, index: int, block: nn.Module, positions: dict[str, str]) -> tuple[list[dict], dict]:
        """Put finished block ``index`` back into ``block`` (packed layers swapped in, whole state loaded).
        ``positions``: full layer name -> position in the block. Returns its report rows and notes."""
        from safetensors.torch import load_file

        from hiercomp.hierarchy import set_module
        from hiercomp.layers import build_layer

        info = self._block_info(index, ("state.safetensors",))
        folder = self._block_dir(index)
        try:
            for name, config in info["layers"].items():
                set_module(block, positions[name], build_layer(config))
            block.load_state_dict(load_file(folder / "state.safetensors"), strict=True)
        except HiercompError:
            raise
        except Exception as err:  # the model's blocks do not match the saved ones: another model or version
            raise HiercompError(f"{folder} does not fit block {index} ({type(err).__name__}); rerun without "
                                "--resume to start over") from None
        return info["report"], info["notes"]

    def restore_inputs(self, index: int, n_batches: int) -> list[torch.Tensor]:
        """The inputs of block ``index + 1`` as the killed run computed them (``n_batches`` of them: 0 after the
        last block the plan touches or without calibration); sets the random state the run had then."""
        from safetensors.torch import load_file

        info = self._block_info(index, ("inputs.safetensors",))
        saved = load_file(self._block_dir(index) / "inputs.safetensors")
        if info.get("n_inputs") != n_batches:
            raise HiercompError(f"{self._block_dir(index)} holds {info.get('n_inputs')} calibration batches, this run "
                                f"has {n_batches}; rerun without --resume to start over")
        torch.set_rng_state(saved["rng.torch_cpu"])
        return [saved[f"hidden.{i}"] for i in range(info["n_inputs"])]

    # -- closing -----------------------------------------------------------------------------------------
    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def resume_folder(out: str | Path | None, resume: bool) -> Iterator[BlockCheckpoints | None]:
    """The checkpoints of a run writing to ``out`` (None without ``out``): removed when the body ends, by the saved
    output or by an error, Ctrl-C or SIGTERM; only a hard kill leaves them for ``resume``."""
    if out is None:
        if resume:
            raise HiercompError("resume continues a run that saves its output: pass out=... (--out)")
        yield None
        return
    checkpoints = BlockCheckpoints(out, resume)
    try:
        yield checkpoints
    finally:
        checkpoints.remove()
