"""kvpress 0.5.5 presses under the same protocol as benchmarks/kv.py; runs in kvpress's own venv.

    /work/venvs/kvpress/bin/python benchmarks/peer_kvpress.py JOB.pt OUT.json

JOB.pt (written by benchmarks/kv.py) holds the model folder, the continuation sequences and prefix length, the
passkey cases (token ids) and the (press, ratio) list. Protocol, identical to hiercomp.kv.evaluate:
* continuation: prefill the prefix under the press (kvpress's own hooks compress it), then feed the continuation one
  token at a time with explicit logical position ids (as kvpress's pipeline does), compare each next-token
  distribution with the uncompressed model's on the whole sequence (KL, perplexity, top-1);
* passkey: prefill the context under the press, feed the question token by token (so PyramidKV's unequal layers
  work under sdpa), greedy-decode 8 tokens.
Bytes held are counted from the cache's tensors as kvpress leaves them: AdaKV only masks, so it holds everything.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def make_press(name: str, ratio: float):
    import kvpress as kp

    if name == "streaming":
        return kp.StreamingLLMPress(compression_ratio=ratio)
    if name == "snapkv":
        return kp.SnapKVPress(compression_ratio=ratio)
    if name == "knorm":
        return kp.KnormPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kp.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "tova":
        return kp.TOVAPress(compression_ratio=ratio)
    if name == "pyramidkv":
        return kp.PyramidKVPress(compression_ratio=ratio)
    if name == "adakv":
        return kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio))
    raise ValueError(name)


def cache_bytes_16bit(cache) -> int:
    """Elements held × 2 bytes (the 16-bit equivalent, as for every row of the benchmark)."""
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)


def prefill(model, ids, press):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else _null():
        model.model(input_ids=ids, past_key_values=cache)
    return cache


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step(model, token, cache, position):
    return model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[position]])).logits[0, -1]


def continuation(model, press, sequences, prefix_len):
    kl = nll = 0.0
    agree = count = 0
    held = 0
    for seq in sequences:
        seq = seq.unsqueeze(0)
        with torch.no_grad():
            ref = model(seq).logits[0, prefix_len:-1].float().log_softmax(-1)
            cache = prefill(model, seq[:, :prefix_len], press)
            held += cache_bytes_16bit(cache)
            got = torch.stack([step(model, seq[:, t:t + 1], cache, t).float().log_softmax(-1)
                               for t in range(prefix_len, seq.shape[1] - 1)])
        target = seq[0, prefix_len + 1:]
        kl += F.kl_div(got, ref, log_target=True, reduction="sum").double().item()
        nll -= got.gather(1, target[:, None]).double().sum().item()
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        count += target.numel()
    return {"kl": kl / count, "perplexity": math.exp(nll / count), "top1": agree / count,
            "bytes": held / len(sequences)}


def passkey(model, press, cases, eos_id):
    answers = []
    for context, question in cases:
        with torch.no_grad():
            cache = prefill(model, context, press)
            pos = context.shape[1]
            for t in range(question.shape[1]):
                logits = step(model, question[:, t:t + 1], cache, pos + t)
            pos += question.shape[1]
            out = []
            for i in range(8):
                nxt = logits.argmax()
                out.append(int(nxt))
                if int(nxt) == eos_id:
                    break
                logits = step(model, nxt.view(1, 1), cache, pos + i)
        answers.append(out)
    return answers


def main() -> None:
    job = torch.load(sys.argv[1])
    torch.set_num_threads(job.get("threads", 1))
    import kvpress
    from transformers import AutoModelForCausalLM

    results = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5", "rows": []}
    import transformers
    results["transformers"] = transformers.__version__
    for model_dir, sequences, prefix_len, cases, configs in job["tasks"]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        for name, ratio in configs:
            row = {"model": model_dir, "press": name, "ratio": ratio, "task": "passkey" if cases else "quality"}
            start = time.perf_counter()
            try:
                press = make_press(name, ratio)
                if sequences is not None:
                    row.update(continuation(model, press, sequences, prefix_len))
                if cases:
                    row["passkey"] = passkey(model, press, cases, model.config.eos_token_id)
            except Exception as err:  # a failing press is a result, reported as such
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            row["seconds"] = time.perf_counter() - start
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "passkey"}), flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
