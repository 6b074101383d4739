"""Golden values: a seeded tiny model quantized by RTN (the packed file's tensors, by hash) and its greedy
continuation on both runtimes, against values recorded in tests/golden/tiny.json. Unlike the tests that
compare paths with each other, this catches a numerics change that moves every path together. After a
deliberate change, rerun with POCKETQUANT_UPDATE_GOLDEN=1 to record the new values (and say why in the commit).

RTN's rounding is element by element, so the file's bytes do not depend on the CPU; the continuation is
chosen with wide margins between the first and second token, so float rounding differences between CPUs
cannot flip it (the test checks the margins too)."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from pocketquant.checkpoints.packed import save_packed
from pocketquant.config import ModelConfig
from pocketquant.model import Transformer
from pocketquant.quant.rtn import RTNConfig
from pocketquant.quant.rtn import apply as rtn
from pocketquant.runtime import load
from pocketquant.runtime.generate import stream_tokens

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
CONFIG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=512, max_seq_len=256)
PROMPT = [1, 17, 42, 99, 300, 7]
MIN_MARGIN = 0.1  # logits: first minus second choice at every greedy step
SCALE = {"embed_tokens": 3.0, "lm_head": 12.0}  # a wide spread of logits: clear greedy choices


def tiny_float_model() -> Transformer:
    g = torch.Generator().manual_seed(1234)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else torch.randn(p.shape, generator=g) * SCALE.get(name.split(".")[0], 0.6) / p.shape[-1] ** 0.5)
    return model


def greedy(model) -> tuple[list[int], float]:
    tokens = list(stream_tokens(model, PROMPT, 12))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + tokens[:-1]]))[0, len(PROMPT) - 1:]
    top2 = logits.topk(2, -1).values
    return tokens, float((top2[:, 0] - top2[:, 1]).min())


def test_golden_rtn_file_and_continuation(tmp_path):
    config = RTNConfig()
    path = tmp_path / "tiny.safetensors"
    save_packed(path, rtn(tiny_float_model(), config), config.scheme, [config.to_dict()])
    hashes = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
              for k, v in sorted(load_file(path).items())}
    found = {"tensors": hashes}
    for runtime in ("reference", "fast"):
        tokens, margin = greedy(load(path, runtime=runtime).model)
        assert margin > MIN_MARGIN, f"{runtime}: a greedy step is too close to call ({margin:.4f}): choose another prompt"
        found[f"greedy_{runtime}"] = tokens
    if os.environ.get("POCKETQUANT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in golden["tensors"] if golden["tensors"][k] != found["tensors"].get(k))
    assert golden["tensors"].keys() == found["tensors"].keys() and not changed, f"tensors changed: {changed}"
    for runtime in ("reference", "fast"):
        assert found[f"greedy_{runtime}"] == golden[f"greedy_{runtime}"], runtime
