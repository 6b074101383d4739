"""`bench`: size, peak memory, time to first token, prefill and decode speed of a packed model side by
side with its float model (PyTorch eager, fp32 and bf16) and llama.cpp on a GGUF export of the same
weights. Each configuration runs in its own process, so its peak RSS is its own; medians of repeats."""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.files import atomic_write


@dataclass(frozen=True)
class Config:
    label: str
    kind: str  # "pocketquant" (packed, fast kernels), "reference" (packed, reference runtime), "torch", "llama.cpp"
    source: str
    dtype: str = "float32"


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    prompt_tokens: int = 512
    decode_tokens: int = 128
    repeats: int = 3


def prompt_ids(vocab: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()


def _torch_runner(cfg: Config, s: Settings):
    from pocketquant.runtime import load
    from pocketquant.runtime.engine import kernel_paths
    from pocketquant.runtime.generate import stream_generate

    # the float columns are plain PyTorch (the reference runtime: no native kernel anywhere)
    model = load(cfg.source, cfg.dtype, "fast" if cfg.kind == "pocketquant" else "reference").model
    prompt = prompt_ids(model.config.vocab_size, s.prompt_tokens)

    def once():
        caches = model.new_caches(1, s.prompt_tokens + s.decode_tokens + 1)
        for last in stream_generate(model, None, prompt, s.decode_tokens + 1, stop=False, caches=caches):
            pass  # the first token ends the prefill; decode_tokens one-token steps follow
        return last.time_to_first_token, last.generation_tps

    return once, _weight_bytes(cfg, model), {} if cfg.kind == "torch" else kernel_paths(model)


def llama_last_logits(llm):
    """The logits of the last evaluated token (llama-cpp-python fills `scores` only in some modes)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _llama_runner(cfg: Config, s: Settings):
    import numpy as np
    from llama_cpp import Llama

    n_ctx = s.prompt_tokens + s.decode_tokens + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of logits
    llm = Llama(model_path=cfg.source, n_ctx=n_ctx, n_batch=n_ctx,
                n_threads=s.threads, n_threads_batch=s.threads, verbose=False)
    prompt = prompt_ids(llm.n_vocab(), s.prompt_tokens)

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llama_last_logits(llm)))
        t1 = time.perf_counter()
        for _ in range(s.decode_tokens):
            llm.eval([token])
            token = int(np.argmax(llama_last_logits(llm)))
        t2 = time.perf_counter()
        return t1 - t0, s.decode_tokens / (t2 - t1)
    return once, Path(cfg.source).stat().st_size, {}


def _weight_bytes(cfg: Config, model) -> int:
    """The file a configuration reads: the packed file itself, or the float weights as safetensors of
    that dtype would hold them (tied tables once)."""
    if cfg.kind in ("pocketquant", "reference"):
        from pocketquant.files import disk_bytes

        return disk_bytes(Path(cfg.source))
    from pocketquant.checkpoints.packed import packed_tensors

    return sum(t.numel() * t.element_size() for t in packed_tensors(model).values())


def measure(cfg: Config, s: Settings) -> dict:
    """Run one configuration in this process; returns every figure by name."""
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    # paths: module family -> the kernel path it runs (packed models)
    once, size, paths = (_llama_runner if cfg.kind == "llama.cpp" else _torch_runner)(cfg, s)
    load_s = time.perf_counter() - t0
    once()  # warm-up
    runs = [once() for _ in range(s.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    return {"label": cfg.label, "kind": cfg.kind, "source": cfg.source, "dtype": cfg.dtype,
            "file_bytes": size, "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
            "ttft_ms": 1000 * ttft, "prefill_tok_s": s.prompt_tokens / ttft,
            "decode_tok_s": statistics.median(r[1] for r in runs), "kernel_paths": paths}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss does not
    (a spawned child would inherit its parent's peak), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(cfg, s, queue):
    try:
        queue.put(measure(cfg, s))
    except Exception as e:  # reported to the parent, which raises it with the configuration's name
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_isolated(cfg: Config, s: Settings) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, s, queue), daemon=True)
    proc.start()
    try:
        result = queue.get()
        proc.join()
    finally:  # interrupted (Ctrl-C): the measurement goes with us
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in result:
        raise PocketQuantError(f"{cfg.label}: {result['error']}")
    return result


def memory_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Read bandwidth in GB/s: the median time to sum a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        float(x.sum())
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def _config(path: Path, allow_meta: bool):
    """The ModelConfig of a packed file (or, for a column beside it, of a Meta prequantized directory)."""
    from pocketquant.checkpoints.meta import config_from_params, is_meta_dir
    from pocketquant.checkpoints.packed import read_header
    from pocketquant.files import read_json

    if allow_meta and is_meta_dir(path):
        return config_from_params(read_json(path / "params.json"), path)
    if not path.is_file():
        raise PocketQuantError(f"no such packed file{' or Meta directory' if allow_meta else ''}: {path}")
    return read_header(path).config


def decode_bytes_per_token(packed: str) -> int:
    """Bytes a decode step must read: every weight except the embedding table (one row of it), unless
    the output layer shares that table."""
    from safetensors import safe_open

    total = 0
    with safe_open(packed, framework="pt") as f:
        shared = not any(k.startswith("lm_head.") for k in f.keys())
        for name in f.keys():
            if shared or not name.startswith("embed_tokens."):
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
    return total


def bench(packed: str, float_source: str | None, llama_cpp: bool = False, reference: bool = False,
          settings: Settings = Settings(), progress=print, also: tuple[str, ...] = ()) -> dict:
    """Benchmark the packed model against its float source and peers; ratios are against the first.
    `also`: more packed files (e.g. the same weights with an int8 KV cache), each its own column."""
    from pocketquant.checkpoints import check_length, check_source
    from pocketquant.runtime import kernels

    if float_source is not None:  # refused now, not after the first column's measurement
        check_source(float_source)
    for path in (packed, *also):
        length = settings.prompt_tokens + settings.decode_tokens + 1
        config = _config(Path(path), allow_meta=path != packed)
        check_length(config, length, f"{path}: a prompt and its decoded tokens")
    configs = [Config("pocketquant int4-eo8", "pocketquant", packed)]
    configs += [Config(f"pocketquant {Path(p).stem}", "pocketquant", p) for p in also]
    if float_source:
        configs += [Config("float32 eager", "torch", float_source, "float32"),
                    Config("bfloat16 eager", "torch", float_source, "bfloat16")]
    if reference:
        configs.append(Config("reference runtime", "reference", packed))
    if llama_cpp:
        configs.append(Config("llama.cpp Q4_0/Q8_0", "llama.cpp", _gguf_export(packed)))
    bw = memory_bandwidth(settings.threads)
    results = []
    for cfg in configs:
        progress(f"measuring {cfg.label} ...")
        results.append(measure_isolated(cfg, settings))
    per_token = decode_bytes_per_token(packed)
    roofline = bw * 1e9 / per_token
    return {"settings": asdict(settings), "kernels": kernels.path(), "bandwidth_gb_s": bw,
            "decode_bytes_per_token": per_token, "decode_roofline_tok_s": roofline,
            "decode_of_roofline": results[0]["decode_tok_s"] / roofline, "configs": results}


def _gguf_export(packed: str) -> str:
    from pocketquant.checkpoints import load_model
    from pocketquant.export.gguf import export_gguf

    out = Path(packed).with_suffix(".Q4_0.gguf")
    if not out.exists() or out.stat().st_mtime < Path(packed).stat().st_mtime:
        loaded = load_model(packed)
        export_gguf(loaded.model, loaded.tokenizer, out)
    return str(out)


ROWS = [("file_bytes", "weights file (MB)", lambda v: f"{v / 1e6:.1f}"),
        ("peak_rss_mb", "peak RSS (MB)", lambda v: f"{v:.0f}"),
        ("ttft_ms", "time to first token (ms)", lambda v: f"{v:.0f}"),
        ("prefill_tok_s", "prefill (tok/s)", lambda v: f"{v:.1f}"),
        ("decode_tok_s", "decode (tok/s)", lambda v: f"{v:.1f}")]


def table(result: dict) -> str:
    from pocketquant.tables import format_table

    cfgs = result["configs"]
    head = ["metric"] + [c["label"] for c in cfgs]
    body = []
    for key, label, fmt in ROWS:
        first = cfgs[0][key]
        body.append([label] + [fmt(c[key]) + ("" if i == 0 else f" ({c[key] / first:.2f}x)")
                               for i, c in enumerate(cfgs)])
    s = result["settings"]
    lines = [f"{s['threads']} threads, prompt {s['prompt_tokens']} tokens, decode {s['decode_tokens']} tokens, "
             f"median of {s['repeats']}; kernels: {result['kernels']}; (ratios: column / first column)", ""]
    lines += format_table(head, body)
    lines += ["", f"memory bandwidth {result['bandwidth_gb_s']:.1f} GB/s; decode reads "
              f"{result['decode_bytes_per_token'] / 1e6:.1f} MB/token -> roofline "
              f"{result['decode_roofline_tok_s']:.1f} tok/s; pocketquant decode is "
              f"{result['decode_of_roofline']:.0%} of it"]
    from pocketquant.runtime.engine import paths_lines

    lines += ["", f"{cfgs[0]['label']} runs:"] + paths_lines(cfgs[0].get("kernel_paths", {}))
    return "\n".join(lines)


def write_json(result: dict, path: str):
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))


def plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = result["configs"]
    labels = [c["label"] for c in cfgs]
    fig, axes = plt.subplots(1, len(ROWS), figsize=(4 * len(ROWS), 4))
    for ax, (key, title, _) in zip(axes, ROWS):
        ax.bar(range(len(cfgs)), [c[key] / (1e6 if key == "file_bytes" else 1) for c in cfgs])
        ax.set_title(title)
        ax.set_xticks(range(len(cfgs)), labels, rotation=25, ha="right", fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
