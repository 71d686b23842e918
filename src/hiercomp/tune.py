"""Recovery tuning after quantization (PV-Tuning's continuous half, on CPU, with a step budget).

After every layer is quantized, the discrete part (codes, lattice indices, trellis paths) stays fixed and the
continuous part is fine-tuned by distillation from the original model: KL(P_teacher ‖ P_student) of
next-token distributions (causal LMs; the MSE of the last hidden states for encoders) on the calibration
windows. What is trained:

- every floating-point tensor a compressed layer stores: scales (integer grids, E8 stage scales, trellis row
  scales), float zeros (HQQ), HLQ's plane scales and offsets, low-rank factors, kept sparse values, biases;
- the weights of the normalisation layers (RMSNorm / LayerNorm), which are stored dense anyway;
- with ``uncompressed``, every other parameter the compression left dense as well: the embeddings, the output
  head, any layer a plan skipped (PV-Tuning's ``update_non_quantized_parameters``, on in its published recipe).
  They keep their size and dtype, so the bits per weight do not change. On stories260K's 3.0 bpw search plan
  (256 windows) the embedding's 32k values took the mean KL on held-out TinyStories and WikiText-2 text from
  0.380 (norms only) to 0.337 (benchmarks/results/frontier.md).

Training text: the calibration windows, and with ``generated`` that many more windows, sampled from the original
model itself at temperature 1 (LLM-QAT's data-free distillation): text from the very distribution the
student must match, for when the calibration text is short. The held-out windows stay real text, so the kept
state is still chosen on it. stories260K's 3.0 bpw search plan with 32 calibration windows (28 train), embeddings
tuned too: held-out loss 0.298 -> 0.260 and mean KL on held-out TinyStories and WikiText-2 0.413 -> 0.336 with
224 sampled windows; the real ones alone overfit by step 128 of 256.

Integer zeros and the computed codebooks (E8 lattice, the trellis's hashed Gaussian) are discrete or not stored,
so they stay. The codes stay too, unless ``code_every`` asks for PV-Tuning's other half: every that many steps a
V step (:mod:`hiercomp.tune_codes`) re-chooses the few codes a projected gradient step moves most; the codes are
part of the state the held-out checks keep.

Exactness: each stored tensor keeps its dtype. Training runs on a float32 master copy, and the forward uses
that master rounded to the stored dtype (straight-through), so the model that was trained is bit for bit the
model that is saved and reloaded: the tuned float16 scales (and any re-chosen codes, packed) are what goes to
disk, nothing else changes form.

Step size: Adam with one learning rate per tensor, ``lr`` times that tensor's root mean square, so ``lr`` is a
relative step (1e-3 moves a scale by about 0.1 % per step) whatever the tensor's units, decayed to zero on a
cosine over the steps (a constant step kept shaking 3-bit scales that were already close: on SmolLM2 quip 3.0,
32 constant steps at 1e-2 raised the held-out KL from 0.46 to 0.70).

Never worse than untuned: when there are at least 4 calibration windows, an eighth of them (1 to 8) are held
out of training, the distillation loss on them is measured before the first step and every ``check_every``
steps, and the tensors of the best check are the ones kept, the untuned ones included.

The training loop :func:`distill` is shared with depth pruning's recovery (:mod:`hiercomp.depth.recovery`),
which trains whole dense blocks before quantizing instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hiercomp.depth.scoring import model_outputs, output_damage
from hiercomp.errors import HiercompError
from hiercomp.generate import LOGIT_SETTINGS
from hiercomp.hierarchy import compressed_layers, set_module
from hiercomp.layers.base import CompressedLinear
from hiercomp.layers.rotated import INNER_PREFIX
from hiercomp.tune_codes import code_tensors, recode, recoder_for

# Teacher outputs are computed once per calibration window and kept while they fit in this many bytes
# (SmolLM2: 16 windows x 256 tokens x 49152 log-probabilities = 0.8 GB); beyond it they are recomputed each step.
TEACHER_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class TuneConfig:
    """Recovery tuning after quantization (``--tune-steps``, ``--tune-lr``)."""

    steps: int = 100
    lr: float = 1e-3  # relative: Adam's step for each tensor is lr x its root mean square
    batch_size: int = 2
    seed: int = 0
    norms: bool = True  # also tune the normalisation layers' weights
    uncompressed: bool = False  # also every other parameter left dense (embeddings, head, skipped layers)
    generated: int = 0  # also distil on this many windows sampled from the original (causal LMs)
    schedule: str = "cosine"  # "cosine" (decay to zero over the steps) or "constant"
    keep_best: bool = True  # hold windows out, check the loss on them, keep the best state (the untuned included)
    check_every: int = 0  # steps between held-out checks; 0: steps // 8 (at least 1)
    # The discrete half (hiercomp.tune_codes): every code_every steps (0: never) re-choose the codes of the
    # code_fraction of units that a step of code_lr x the weights' RMS along the gradient moves most.
    code_every: int = 0
    code_lr: float = 0.05
    code_fraction: float = 0.01


@dataclass(frozen=True)
class TuneReport:
    steps: int
    tensors: int  # tensors tuned
    trained_params: int
    loss_first: float  # distillation loss of the first step (before any update)
    loss_last: float  # of the last step
    seconds: float
    held_out: int = 0  # calibration windows held out of training for the checks (0: no checks)
    held_out_before: float | None = None  # distillation loss on them before tuning
    held_out_after: float | None = None  # ... of the state kept
    best_step: int | None = None  # the step whose state was kept (0: the untuned one)
    codes_changed: int = 0  # code integers the V steps changed, in the state kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_recovery(recovery: Any) -> tuple[Any, TuneConfig | None]:
    """``compress(recovery=...)``: a :class:`hiercomp.depth.RecoveryConfig` (distil after removing units, before
    quantizing), a :class:`TuneConfig` (tune after quantizing), or a list/tuple of one of each. Returns
    (depth recovery or None, tuning or None)."""
    items = list(recovery) if isinstance(recovery, (list, tuple)) else [] if recovery is None else [recovery]
    tuning = [r for r in items if isinstance(r, TuneConfig)]
    depth = [r for r in items if not isinstance(r, TuneConfig)]
    if len(tuning) > 1 or len(depth) > 1:
        raise HiercompError("recovery takes at most one RecoveryConfig (after removals) and one TuneConfig "
                            "(after quantizing)")
    return (depth[0] if depth else None), (tuning[0] if tuning else None)


# -- the distillation loop, shared with depth recovery ---------------------------------------------------------

def distillation_loss(teacher_out: torch.Tensor, student_out: torch.Tensor, encoder: bool) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over positions from log-probabilities, or the MSE of hidden states."""
    if encoder:
        return F.mse_loss(student_out, teacher_out)
    return output_damage(teacher_out, student_out, encoder=False).mean()


@dataclass
class DistillRun:
    losses: list[float]  # the training loss of every step
    checks: list[tuple[int, float]]  # (steps done, held-out loss), when windows were held out
    best_step: int | None  # the steps done at the best check, whose state the parameters hold at the end


def distill(
    student: nn.Module,
    teacher: nn.Module,
    calibration: torch.Tensor,
    param_groups: list[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    encoder: bool = False,
    progress: bool = True,
    desc: str = "distillation",
    schedule: str = "constant",
    held_out: torch.Tensor | None = None,
    check_every: int = 0,
    after_step: Callable[[int], None] | None = None,
    state: list[torch.Tensor] | None = None,
) -> DistillRun:
    """Adam on ``param_groups`` (torch's form: dicts with "params" and "lr") for ``steps`` batches of calibration
    windows drawn in a seeded order. Deterministic on CPU. The teacher's outputs are computed once per window
    while they fit in :data:`TEACHER_CACHE_BYTES`. ``schedule="cosine"`` decays every group's step to zero over
    the steps. With ``held_out`` windows, the loss on them is checked before the first step, every
    ``check_every`` steps (0: steps // 8) and after the last, and the parameters end in the best checked state.
    ``after_step(steps done)`` runs after each update (the V steps of tuning); tensors it changes in place that
    belong to the state are listed in ``state``, kept and restored with the parameters."""
    if steps < 1:
        raise HiercompError(f"distillation needs at least 1 step, got {steps}")
    if calibration is None or calibration.dim() != 2 or calibration.shape[0] == 0:
        raise HiercompError("distillation needs calibration token windows; pass --calib TEXT")
    if schedule not in ("constant", "cosine"):
        raise HiercompError(f"unknown tuning schedule {schedule!r}; use 'cosine' or 'constant'")
    teacher.eval()
    student.eval()  # no dropout: the target is the deterministic teacher
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(param_groups)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
                 if schedule == "cosine" else None)
    params = [p for g in param_groups for p in g["params"]] + list(state or [])
    checks: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None
    every = check_every or max(1, steps // 8)
    if held_out is not None:
        with torch.no_grad():
            held_targets = model_outputs(teacher, held_out, encoder)

        def check(done_steps: int) -> None:
            nonlocal best
            with torch.no_grad():
                loss = float(distillation_loss(held_targets, model_outputs(student, held_out, encoder), encoder))
            checks.append((done_steps, loss))
            if best is None or loss < best[0]:
                best = (loss, done_steps, [p.detach().clone() for p in params])
    cache: dict[int, torch.Tensor] = {}
    cached_bytes = 0
    order: list[int] = []
    losses: list[float] = []
    if held_out is not None:
        check(0)
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    with torch.enable_grad():
        for step in bar:
            if len(order) < batch_size:
                order += torch.randperm(calibration.shape[0], generator=generator).tolist()
            batch, order = order[:batch_size], order[batch_size:]
            missing = [i for i in batch if i not in cache]
            if missing:
                with torch.no_grad():
                    fresh = model_outputs(teacher, calibration[missing], encoder)
                for i, out in zip(missing, fresh):
                    if cached_bytes + out.numel() * 4 <= TEACHER_CACHE_BYTES:
                        cache[i] = out
                        cached_bytes += out.numel() * 4
                fresh_of = dict(zip(missing, fresh))
                target = torch.stack([cache[i] if i in cache else fresh_of[i] for i in batch])
            else:
                target = torch.stack([cache[i] for i in batch])
            loss = distillation_loss(target, model_outputs(student, calibration[batch], encoder), encoder)
            if not torch.isfinite(loss):  # diverged: stop here; the best checked state is kept, or it is an error
                losses.append(float(loss.detach()))
                if held_out is None:
                    raise HiercompError(f"{desc} diverged (the loss is {losses[-1]} at step {step + 1}); "
                                        "lower its learning rate")
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(step + 1)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if held_out is not None and ((step + 1) % every == 0 or step + 1 == steps):
                check(step + 1)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
    return DistillRun(losses, checks, best[1] if best is not None else None)


# -- what is tuned in a compressed layer -------------------------------------------------------------------------

def _core(layer: CompressedLinear) -> CompressedLinear:
    """The layer that holds the codes: the inner layer of a rotation, else the layer itself."""
    return layer.inner if hasattr(layer, "inner") else layer


def _round_to(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``master`` rounded to the stored dtype in the forward, the identity in the backward (straight-through)."""
    if dtype == torch.float32:
        return master
    return master + (master.to(dtype).float() - master).detach()


class _TuningLinear(nn.Module):
    """Stands in for a compressed layer while it is tuned: its weight is recomputed from the float32 masters of its
    float buffers (rounded to their stored dtype) and its fixed, once-unpacked codes."""

    def __init__(self, layer: CompressedLinear) -> None:
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: its buffers are not what is trained
        self.names = [n for n, b in layer.named_buffers(recurse=False) if b is not None and b.is_floating_point()]
        self.dtypes = {n: layer._buffers[n].dtype for n in self.names}
        self.masters = nn.ParameterList([nn.Parameter(layer._buffers[n].detach().float().clone())
                                         for n in self.names])
        self.originals = {n: layer._buffers[n] for n in self.names}
        core = _core(layer)
        self.__dict__["core"] = core
        self.kernels = [(m, m.kernel) for m in (layer, core) if m.kernel is not None]
        for m, _ in self.kernels:
            m.restore_stored()
            m.kernel = None  # a kernel holds its own copy of the scales: rebuilt from the tuned ones at the end
        # Unpack the codes once, kept compact (their dequantize reads them as they are, or as indices).
        self.cached: dict[str, Any] = {}
        for attr in ("codes", "states"):
            if callable(getattr(core, attr, None)):
                self.cached[attr] = _compact(getattr(core, attr)())
                core.__dict__[attr] = _constant(self.cached[attr])
        recoder = recoder_for(core)
        self.__dict__["recoder"] = recoder if recoder is not None and recoder.attr in self.cached else None
        self.grad: torch.Tensor | None = None  # the gradient of the core's weight, summed since the last V step
        self.track = False  # sum the weight's gradient (only when V steps are on: see start_recoding)
        self.original: list[torch.Tensor] = []

    def start_recoding(self) -> None:
        self.track = self.recoder is not None
        self.original = [c.clone() for c in self.codes()]

    def changed(self) -> int:
        """Code elements that differ from the ones the layer came with."""
        return sum(int((c != o).sum()) for c, o in zip(self.codes(), self.original))

    def codes(self) -> list[torch.Tensor]:
        """The unpacked code tensors the V steps change in place (empty when this kind's codes stay)."""
        return [] if self.recoder is None else code_tensors(self.cached[self.recoder.attr])

    def _sum_grad(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach().clone() if self.grad is None else self.grad.add_(grad)

    def _core_weight(self) -> torch.Tensor:
        weight = self.core.dequantize() if self.core is self.layer else self.layer.inner.dequantize()
        if self.track and weight.requires_grad:
            weight.register_hook(self._sum_grad)
        return weight

    def recode(self, lr: float, fraction: float) -> int:
        """A V step on this layer's codes from the gradient summed since the last one (see hiercomp.tune_codes)."""
        if self.recoder is None or self.grad is None:
            return 0
        attr, core = self.recoder.attr, self.core
        codes = self.cached[attr]

        def dequantize(other: Any) -> torch.Tensor:
            core.__dict__[attr] = _constant(other)
            try:
                return core.dequantize()
            finally:
                core.__dict__[attr] = _constant(codes)

        with torch.no_grad():
            self._hand_masters()
            self._refresh_inner()
            changed = recode(core, self.recoder, codes, core.dequantize(), self.grad, dequantize, lr, fraction)
        self.grad = None
        return changed

    def _hand_masters(self) -> None:
        for n, p in zip(self.names, self.masters):
            self.layer._buffers[n] = _round_to(p, self.dtypes[n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._hand_masters()
        layer = self.layer
        bias = layer._buffers.get("bias")
        if self.core is layer:
            return F.linear(x, self._core_weight(), bias)
        t_in, t_out = layer.transforms()  # a rotated layer: rotate the input, unrotate the output
        y = t_out.apply_transpose(F.linear(t_in.apply(x), self._core_weight()))  # .inner hands the masters on
        return y if bias is None else y + bias

    def finish(self) -> None:
        """Write the tuned values, in their stored dtype, into the layer's buffers; undo the code cache."""
        for n, p in zip(self.names, self.masters):
            self.layer._buffers[n] = p.detach().to(self.dtypes[n]).contiguous()
        if self.original and self.changed():  # V steps re-chose codes: pack them (into the outer layer's buffers)
            prefix = "" if self.core is self.layer else INNER_PREFIX
            for name, value in self.core.packed_codes(self.cached[self.recoder.attr]).items():
                self.layer._buffers[prefix + name] = value
        self._refresh_inner()
        for attr in ("codes", "states"):
            self.core.__dict__.pop(attr, None)
        from hiercomp.layers.kernels import select_kernel

        for m, _ in self.kernels:
            m.kernel = select_kernel(m)

    def _refresh_inner(self) -> None:
        if self.core is not self.layer:
            _ = self.layer.inner  # the property hands the outer layer's buffers to the inner layer

    def undo(self) -> None:
        for n in self.names:
            self.layer._buffers[n] = self.originals[n]
        self._refresh_inner()
        for attr in ("codes", "states"):
            self.core.__dict__.pop(attr, None)
        for m, kernel in self.kernels:
            m.kernel = kernel


def _constant(value: Any) -> Any:
    return lambda: value


def _compact(value: Any) -> Any:
    """Integer codes in the smallest dtype that holds them (SmolLM2's 2-bit codes: 1 byte instead of 4 or 8)."""
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.numel():
        top = int(value.max())
        if int(value.min()) >= 0 and top < 256:
            return value.to(torch.uint8)
        if top < 2**31:
            return value.to(torch.int32)
    return value


def _dense_parameters(model: nn.Module, config: TuneConfig) -> list[nn.Parameter]:
    """The dense parameters ``config`` tunes besides the compressed layers' tensors: the normalisation weights
    (``norms``), or every floating-point parameter outside the compressed layers (``uncompressed``)."""
    if config.uncompressed:  # a compressed layer's float tensors train through its wrapper's masters instead
        inside = {id(p) for layer in compressed_layers(model).values() for p in layer.parameters()}
        return [p for p in model.parameters() if p.is_floating_point() and id(p) not in inside]
    if not config.norms:
        return []
    return [p for m in model.modules() if "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False) if p.is_floating_point()]


def _group(params: list[torch.Tensor], lr: float) -> list[dict[str, Any]]:
    groups = []
    for p in params:
        rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
        groups.append({"params": [p], "lr": lr * (rms if rms > 0 else 1.0)})
    return groups


def check_tuning(config: TuneConfig, has_calibration: bool, encoder: bool) -> None:
    """Every error a tuning config can have with this model and calibration, as one line. ``compress`` calls it
    before any quantizing, so a bad config fails in seconds, not after the work it would tune."""
    if config.steps < 1:
        raise HiercompError(f"tuning needs at least 1 step, got {config.steps}; drop --tune-steps to skip it")
    if not config.lr > 0:
        raise HiercompError(f"the tuning learning rate must be positive, got {config.lr}")
    if config.code_every < 0 or (config.code_every and not (config.code_lr > 0 and 0 < config.code_fraction <= 1)):
        raise HiercompError("re-choosing codes needs code_every >= 0, code_lr > 0 and 0 < code_fraction <= 1, got "
                            f"{config.code_every}, {config.code_lr}, {config.code_fraction}")
    if not has_calibration:
        raise HiercompError("recovery tuning distils from the original model on calibration text: pass --calib FILE")
    if config.generated < 0:
        raise HiercompError(f"the number of sampled windows must be 0 or more, got {config.generated}")
    if config.generated and encoder:
        raise HiercompError("sampled windows come from a causal LM's next-token distribution and this model is an "
                            "encoder: drop --tune-generated")


def tune(
    model: nn.Module,
    teacher: nn.Module,
    calibration: torch.Tensor,
    config: TuneConfig = TuneConfig(),
    *,
    encoder: bool = False,
    progress: bool = True,
) -> TuneReport:
    """Tune ``model``'s compressed layers' float tensors (and norm weights, or every dense parameter) in place to
    match ``teacher``."""
    check_tuning(config, calibration is not None, encoder)
    layers = compressed_layers(model)
    if not layers:
        raise HiercompError("recovery tuning needs compressed layers: give a method, recipe, plan or budget too")
    start = time.perf_counter()
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = {name: _TuningLinear(layer) for name, layer in layers.items()}
    tensors: list[torch.Tensor] = [p for w in wrappers.values() for p in w.masters]
    dense = _dense_parameters(model, config)
    for p in dense:
        p.requires_grad_(True)
    tensors += dense
    dense_before = [p.detach().clone() for p in dense]  # trained in place: put back if tuning fails
    done = False
    try:
        for name, wrapper in wrappers.items():
            set_module(model, name, wrapper)
        train, held_out = split_held_out(calibration) if config.keep_best else (calibration, None)
        if config.generated:
            train = torch.cat([train, sampled_windows(teacher, train, config.generated, config.seed, progress)])
        codes: list[torch.Tensor] = []
        if config.code_every:
            for wrapper in wrappers.values():
                wrapper.start_recoding()
                codes += wrapper.codes()

        def v_step(done_steps: int) -> None:
            if done_steps % config.code_every == 0:
                for wrapper in wrappers.values():
                    wrapper.recode(config.code_lr, config.code_fraction)

        run = distill(model, teacher, train, _group(tensors, config.lr), steps=config.steps,
                      batch_size=config.batch_size, seed=config.seed, encoder=encoder, progress=progress,
                      desc="recovery tuning", schedule=config.schedule, held_out=held_out,
                      check_every=config.check_every, after_step=v_step if config.code_every else None,
                      state=codes)
        codes_changed = sum(w.changed() for w in wrappers.values()) if config.code_every else 0
        done = True
    finally:
        for name, wrapper in wrappers.items():
            wrapper.finish() if done else wrapper.undo()
            set_module(model, name, wrapper.layer)
        if not done:
            with torch.no_grad():
                for p, before in zip(dense, dense_before):
                    p.copy_(before)
        for p in model.parameters():
            p.requires_grad_(was_trainable.get(id(p), False))
    checks = dict(run.checks)
    return TuneReport(config.steps, len(tensors), sum(t.numel() for t in tensors), run.losses[0], run.losses[-1],
                      time.perf_counter() - start, held_out=0 if held_out is None else held_out.shape[0],
                      held_out_before=checks.get(0), held_out_after=checks.get(run.best_step),
                      best_step=run.best_step, codes_changed=codes_changed)


def sampled_windows(teacher: nn.Module, windows: torch.Tensor, count: int, seed: int,
                    progress: bool = False) -> torch.Tensor:
    """``count`` windows as long as ``windows``, sampled from ``teacher`` at temperature 1 (no top-k, top-p or
    generation-config penalties: the distribution itself), each started from the first token of one of ``windows``
    in turn. End-of-text does not stop a window (calibration windows run across documents too). Seeded, so a rerun
    samples the same text."""
    length = windows.shape[1]
    if length < 2:
        raise HiercompError(f"sampling windows needs calibration windows of at least 2 tokens, got {length}")
    starts = windows[torch.arange(count) % windows.shape[0], :1]
    batch = 32
    out = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for i in tqdm(range(0, count, batch), desc="sampling windows", disable=not progress):
            prompt = starts[i:i + batch]
            out.append(teacher.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                        eos_token_id=None, pad_token_id=0,
                                        **LOGIT_SETTINGS))  # its generation config's penalties off
    sampled = torch.cat(out)
    if sampled.shape != (count, length):  # generate stopped early: nothing to train on at full length
        raise HiercompError(f"sampling stopped at {sampled.shape[1]} of {length} tokens; tune without generated")
    return sampled.to(windows.dtype)


def split_held_out(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows, held-out windows): the last eighth (1 to 8 windows) once there are at least 4, else
    (all, None). The last ones: a fixed choice, so a rerun holds out the same text."""
    n = calibration.shape[0]
    if n < 4:
        return calibration, None
    k = min(8, max(1, n // 8))
    return calibration[:-k], calibration[-k:]
