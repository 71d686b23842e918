"""Text generation from a compressed folder or an original model, streamed, with its speed and memory measured.

Greedy by default; sampling when ``temperature > 0`` (with ``top_p`` and ``seed``). The timing splits the
prefill (prompt to first new token) from the decode (every later token): ``decode_tokens_per_s`` is what a
user waits on in a long answer. ``peak_rss_mb`` is the process's peak resident memory so far (model load
included), from ``getrusage``. ``kv_bytes`` is what the KV cache held at the end, measured from its tensors: a
compressed cache (``kv=SPEC``, see :mod:`hiercomp.kv.use`) beside the 16-bit full cache of the same tokens, or
transformers' own cache as it is.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hiercomp.errors import HiercompError


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the new text only
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # prompt in, first new token out
    decode_s: float  # the tokens after the first
    peak_rss_mb: float
    notes: tuple[str, ...] = field(default=())
    kv_spec: str | None = None  # the compressed KV cache's spec; None: transformers' full cache
    kv_bytes: float | None = None  # what the cache held at the end (measured from its tensors)
    kv_full_bytes: float | None = None  # with kv_spec: a 16-bit full cache of the same tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        return (f"{self.new_tokens} new tokens: {self.decode_tokens_per_s:.1f} tokens/s decode, prefill of "
                f"{self.prompt_tokens} tokens {self.prefill_s:.2f} s; peak memory {self.peak_rss_mb:.0f} MB"
                f"{self._kv_summary()}")

    def _kv_summary(self) -> str:
        from hiercomp.cli._common import fmt_bytes

        if self.kv_bytes is None:
            return ""
        if self.kv_spec is None:
            return f"; KV cache {fmt_bytes(self.kv_bytes)} (full cache; its spare room for later tokens included)"
        factor = self.kv_full_bytes / self.kv_bytes if self.kv_bytes and self.kv_full_bytes else float("nan")
        return (f"; KV cache {fmt_bytes(self.kv_bytes)} ({self.kv_spec}; full 16-bit cache "
                f"{fmt_bytes(self.kv_full_bytes or 0)}, {factor:.2f}x smaller)")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _TimedStreamer:
    """A transformers streamer: writes decoded text as it comes (through TextStreamer's word-boundary logic)
    and stamps the time of every new token."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None] | None) -> None:
        from transformers import TextStreamer

        self.stamps: list[float] = []
        self._prompt_seen = False
        self._text = None
        if write is not None:
            self._text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self._text.on_finalized_text = lambda text, stream_end=False: write(text + ("\n" if stream_end else ""))

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.stamps.append(time.perf_counter())
        self._prompt_seen = True
        if self._text is not None:
            self._text.put(value)

    def end(self) -> None:
        if self._text is not None:
            self._text.end()


def _load(model: Any, runtime: str) -> tuple[Any, Any, list[str], Any]:
    """(module, tokenizer, notes, loaded object) from a path (compressed folder or original) or a loaded model."""
    from hiercomp.layers.kernels import RUNTIMES, set_runtime

    if runtime not in RUNTIMES:
        raise HiercompError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    notes: list[str] = []
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from hiercomp.api import load_any

        model = load_any(model)
    module, tokenizer = getattr(model, "model", model), getattr(model, "tokenizer", None)
    if getattr(model, "is_encoder", False) or not hasattr(module, "generate"):
        raise HiercompError("generate needs a causal language model; this one is an encoder")
    if tokenizer is None:
        raise HiercompError("this model has no tokenizer files; save them beside the model to generate text")
    paths = set_runtime(module, runtime)
    if runtime == "fast" and any(p == "reference" for p in paths.values()):
        notes.append(f"{sum(p == 'reference' for p in paths.values())} of {len(paths)} compressed layers have "
                     "no fast path and compute through dequantize")
    return module, tokenizer, notes, model


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token from (batch, vocab) logits: argmax, or a sample at ``temperature`` from the smallest set of
    tokens whose probability reaches ``top_p``, through transformers' own warpers (what its generate samples
    from)."""
    if temperature <= 0:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


def decode_loop(module: Any, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                top_p: float = 1.0, generator: torch.Generator | None = None, eos_ids: tuple[int, ...] = (),
                min_new_tokens: int = 0, on_token: Callable[[torch.Tensor], None] | None = None) -> tuple[
                    torch.Tensor, Any]:
    """Decode a batch-1 prompt token by token with a KV cache: (new token ids, the cache).

    What transformers' ``generate`` does for greedy and nucleus sampling, without its per-step machinery (logits
    processors and stopping criteria as objects, the attention mask grown by concatenation, input preparation):
    measured ~1-1.5 ms a token on 2 cores, 10-15% of a 4-bit decode step of SmolLM2 or a 2048-wide Llama. The
    cache is transformers' full one appended in place (:class:`hiercomp.kv.growing.GrowingCache`).
    Stops at ``max_new_tokens`` or at an ``eos_ids`` token once ``min_new_tokens`` are out. ``on_token`` gets the
    prompt first, then each new token (a transformers streamer's ``put``)."""
    from hiercomp.kv.adapter import cache_kwargs
    from hiercomp.kv.growing import GrowingCache
    from hiercomp.layers import native_step

    if input_ids.shape[0] != 1:
        raise HiercompError("decode_loop takes one prompt (batch 1)")
    cache = GrowingCache(config=module.config)  # transformers' full cache, appended in place
    key = cache_kwargs(cache)
    if on_token is not None:
        on_token(input_ids)
    logits = module(input_ids=input_ids, use_cache=True, logits_to_keep=1, **key).logits[:, -1]
    # Decode steps of a fast-runtime Llama-family model in one native call each, where it qualifies.
    step = native_step.build(module, cache) if max_new_tokens > 1 else None
    new: list[torch.Tensor] = []
    while True:
        token = pick_token(logits, temperature, top_p, generator)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if len(new) >= max_new_tokens or (len(new) >= min_new_tokens and int(token) in eos_ids):
            if step is not None:
                step.sync()
            return torch.cat(new), cache
        if step is not None:
            logits = step(token)
        else:
            logits = module(input_ids=token.view(1, 1), use_cache=True, logits_to_keep=1, **key).logits[:, -1]


def eos_token_ids(module: Any, tokenizer: Any = None) -> tuple[int, ...]:
    """The ids that end a generation: the model's generation config's (one or a list), else the tokenizer's."""
    eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def generate(
    model: Any,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    runtime: str = "fast",
    stream: Callable[[str], None] | None = None,
    past_key_values: Callable[[Any], Any] | None = None,
    kv: str | None = None,
) -> GenerationResult:
    """Generate from ``model`` (a compressed folder, an original model folder, or a loaded CompressedModel).

    ``chat``: wrap the prompt in the tokenizer's chat template (a note says so when the model has none).
    ``stream``: called with each finished piece of text (e.g. ``sys.stdout.write``); None prints nothing.
    ``past_key_values``: a factory ``f(model) -> cache`` (a transformers Cache), for compressed KV caches.
    ``kv``: a KV spec (``"snapkv:ratio=0.5+kivi:bits=2"``, see :func:`hiercomp.kv.parse`) to generate through;
    without it a compressed folder's default spec (``kv_spec``, from its plan) is used and a note says so;
    ``"none"`` is the full cache. Ignored when ``past_key_values`` is given.
    ``runtime``: ``"fast"`` (the layers' kernels) or ``"reference"`` (dequantize at every forward: slow).
    """
    if max_new_tokens < 1:
        raise HiercompError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise HiercompError("temperature must be ≥ 0 and top-p in (0, 1]")
    from hiercomp.kv import use as kv_use

    if kv is not None:
        kv_use.resolve(kv)  # a bad spec fails before the model loads
    module, tokenizer, notes, loaded = _load(model, runtime)
    maker = None
    if past_key_values is None:
        spec, note = kv_use.resolve(kv, loaded)
        notes += [note] if note else []
        if spec is not None:
            maker = past_key_values = kv_use.CacheMaker(module, spec)
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        input_ids = encoded["input_ids"]
    else:
        if chat:
            notes.append("the model has no chat template: the prompt goes in as plain text")
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    streamer = _TimedStreamer(tokenizer, stream)
    start = time.perf_counter()
    if past_key_values is None and not _config_processes_logits(module):  # the full cache: hiercomp's own loop
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            new, cache = decode_loop(module, input_ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                     generator=generator, eos_ids=eos_token_ids(module, tokenizer),
                                     on_token=streamer.put)
        streamer.end()
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        extra = {}
        if past_key_values is not None:  # transformers 5.x renamed generate's past_key_values to cache
            from hiercomp.kv.adapter import cache_kwargs

            extra = cache_kwargs(past_key_values(module))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            out = module.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad,
                                  return_dict_in_generate=True, **sampling, **extra)
        new = out.sequences[0, input_ids.shape[1]:]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    stamps = streamer.stamps or [time.perf_counter()]
    kv_fields: dict[str, Any] = {}
    if maker is not None:
        kv_fields = {"kv_spec": maker.spec.text, "kv_bytes": float(maker.last.held_bytes()),
                     "kv_full_bytes": float(kv_use.full_cache_bytes(module, maker.last.get_seq_length()))}
    elif cache is not None and past_key_values is None:
        from hiercomp.kv.evaluate import cache_bytes

        kv_fields = {"kv_bytes": cache_bytes(cache)}
    return GenerationResult(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=input_ids.shape[1],
                            new_tokens=int(new.numel()), prefill_s=stamps[0] - start, decode_s=stamps[-1] - stamps[0],
                            peak_rss_mb=peak_rss_mb(), notes=tuple(notes), **kv_fields)


# Generation-config settings that make transformers' generate change the logits beyond temperature and top-p, and
# their neutral values: a model that sets one generates through transformers, which applies it.
LOGIT_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                   "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                   "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0, "sequence_bias": None,
                   "min_length": 0, "min_new_tokens": None, "exponential_decay_length_penalty": None}


def _config_processes_logits(module: Any) -> bool:
    config = getattr(module, "generation_config", None)
    return config is not None and any(getattr(config, name, neutral) not in (neutral, None)
                                      for name, neutral in LOGIT_SETTINGS.items())


def print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
