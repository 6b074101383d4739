"""`evaluate`: score several models on exactly the same tokens and questions; the first is the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketquant.errors import PocketQuantError

SHIPPED_TASK = "basic-mc"
DEFAULT_CONTEXT = 1024  # tokens per scoring window, or the shortest context of the models if less


@dataclass
class ModelScores:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvalResult:
    settings: dict
    models: list[ModelScores]

    def to_dict(self) -> dict:
        return {"settings": self.settings,
                "models": [{"name": m.name, **m.metrics, "tasks": m.tasks} for m in self.models]}


def load_text(data: str | Path | None) -> tuple[str, str]:
    """(text, description): the shipped evaluation text, a wikitext-2-raw directory or file, a plain text
    file, or JSONL with a "text" field per line."""
    import json

    from pocketquant.data import read_text, shipped_text

    if data is None:
        return shipped_text("evaluation"), "shipped evaluation text (Python 3.11 Tutorial)"
    path = Path(data)
    if path.is_dir():
        raw = path / "wiki.test.raw"
        if not raw.exists():
            raise PocketQuantError(f"{path}: a directory must be wikitext-2-raw (with wiki.test.raw)")
        return read_text(raw), f"{raw} (wikitext-2-raw test split)"
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PocketQuantError(f"{path}:{n}: expected a JSON object with a \"text\" field") from e
                if not isinstance(text, str):
                    raise PocketQuantError(f"{path}:{n}: \"text\" must be a string, got {text!r:.60}")
                texts.append(text)
        return "\n\n".join(texts), str(path)
    return read_text(path), str(path)


def task_files(tasks: list[str] | None) -> dict[str, Path]:
    from importlib import resources

    shipped = Path(str(resources.files("pocketquant").joinpath("texts", f"{SHIPPED_TASK}.jsonl")))
    if tasks is None:
        return {SHIPPED_TASK: shipped}
    return {Path(t).stem if t != SHIPPED_TASK else t: shipped if t == SHIPPED_TASK else Path(t) for t in tasks}


def evaluate(sources: list[str], data: str | None = None, tasks: list[str] | None = None, context: int | None = None,
             stride: int | None = None, limit: int | None = None, fake_quant: str | None = None,
             dtype: str = "float32", progress: bool = True, runtime: str = "fast",
             reference_cache: str | Path | None = None, llama_cpp: list[str] | None = None) -> EvalResult:
    """Load every model, score them on the same text and tasks; tasks=[] skips the tasks. Packed files run
    on the native kernels by default (the reference's integers, bit for bit); runtime="reference" scores
    the scheme's definition itself. With `reference_cache` (a directory), the first model's pass is read from
    a cache file there when one matches, or written there (see eval/reference.py: KL is then over its top k).
    `llama_cpp`: llama.cpp file types (Q4_K_M, ...) of the reference, made and run by llama.cpp, scored too."""
    from pocketquant.checkpoints import check_length
    from pocketquant.eval.perplexity import score_text
    from pocketquant.eval.tasks import load_mc, score_mc
    from pocketquant.progress import bar as progress_bar
    from pocketquant.runtime import load

    if not sources:
        raise PocketQuantError("name at least one model")
    if (context is not None and context < 2) or (stride is not None and stride < 1):
        raise PocketQuantError(f"need context >= 2 and stride >= 1, got {context} and {stride}")
    if limit is not None and limit < 1:
        raise PocketQuantError(f"--limit must be >= 1 token, got {limit}")
    if llama_cpp:
        from pocketquant.eval import llama_cpp as peer

        llama_cpp = peer.check_types(llama_cpp)  # a bad type name is refused before any work
    text, text_name = load_text(data)
    mc = {name: load_mc(path) for name, path in task_files(tasks).items()}
    names, models, tokenizer = [], [], None
    for src in sources:
        loaded = load(src, dtype, runtime)
        tokenizer = tokenizer or loaded.tokenizer
        _check_same_vocab(models, loaded, src)
        if context is not None:
            check_length(loaded.model.config, context, f"{src}: a scoring window (--context)")
        names.append(str(src))
        models.append(loaded.model)
    if fake_quant:
        models.append(_fake_quantized(sources[0], fake_quant, dtype))
        names.append(f"{sources[0]} (fake-quant {fake_quant})")
    if tokenizer is None:
        raise PocketQuantError("none of the models has a tokenizer to turn the text into tokens")
    context = context or min(DEFAULT_CONTEXT, *(m.config.max_seq_len for m in models))
    sizes = {name: Path(src).stat().st_size for name, src in zip(names, sources) if Path(src).is_file()}
    scratch = None
    if llama_cpp:
        import tempfile

        import torch

        if not isinstance(models[0].layers[0].self_attn.q_proj, torch.nn.Linear):
            raise PocketQuantError(f"--llama-cpp quantizes the reference: {sources[0]} must be a float model")
        scratch = tempfile.TemporaryDirectory(prefix="pocketquant-llama-cpp-")
        for name, model, size in peer.peers(models[0], llama_cpp, Path(scratch.name), context,
                                            torch.get_num_threads(), note=_note if progress else lambda m: None):
            names.append(name)
            models.append(model)
            sizes[name] = size
    if stride is not None and stride > context:
        raise PocketQuantError(f"need 0 < stride <= context, got {stride} and {context}")
    tokens = tokenizer.encode(text)
    if limit:
        tokens = tokens[:limit + 1]
    if len(tokens) < 2:
        raise PocketQuantError(f"{text_name}: the text has {len(tokens)} token(s); scoring needs at least 2")
    words = len(tokenizer.decode(tokens[1:]).split())
    bar = progress_bar if progress else None
    t0 = time.perf_counter()
    reference = None
    if reference_cache is not None:
        from pocketquant.eval.reference import reference_for

        reference = reference_for(reference_cache, models[0], tokens, {
            "context": context, "stride": stride or context, "dtype": dtype, "runtime": runtime}, task_files(tasks))
    scores = score_text(models, tokens, context, stride, bar, reference)
    out = []
    for i, (name, model, s) in enumerate(zip(names, models, scores)):
        m = ModelScores(name, {"ppl_token": s.perplexity(), "ppl_word": s.word_perplexity(words),
                               "nll_per_token": s.nll / s.tokens, **s.kl_stats()})
        if name in sizes:
            m.metrics["file_bytes"] = sizes[name]
            m.metrics["bits_per_weight"] = 8 * sizes[name] / _weights(models[0])
        if i == 0 and reference is not None and reference.cached:
            m.tasks = reference.tasks
        else:
            m.tasks = {task: score_mc(model, tokenizer, items, bar) for task, items in mc.items()}
        out.append(m)
    if reference is not None and not reference.cached:
        reference.tasks = out[0].tasks
        reference.save()
    if scratch is not None:
        scratch.cleanup()
    settings = {"text": text_name, "tokens_scored": scores[0].tokens, "words": words, "context": context,
                "stride": stride or context, "limit": limit, "dtype": dtype, "runtime": runtime, "reference": names[0],
                "tasks": {k: len(v) for k, v in mc.items()}, "seconds": round(time.perf_counter() - t0, 1)}
    if reference is not None:
        settings["reference_cache"] = {"file": str(reference.path), "read": reference.cached, "kl_top_k": reference.k}
    return EvalResult(settings, out)


def _weights(model) -> int:
    """Weights of the reference: its embedding, its linears and norms (an untied output layer counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _note(message: str):
    from pocketquant.progress import note

    note(message)


def _check_same_vocab(models, loaded, src):
    if models and loaded.model.config.vocab_size != models[0].config.vocab_size:
        raise PocketQuantError(f"{src}: vocabulary of {loaded.model.config.vocab_size} tokens differs from the "
                               f"reference's {models[0].config.vocab_size}; models must share a tokenizer")


def _fake_quantized(source: str, scheme: str, dtype: str):
    """The reference model with its modules fake-quantized by `scheme` (weights stay float)."""
    from pocketquant.checkpoints import load_model
    from pocketquant.quant import qat
    from pocketquant.scheme import get_scheme

    return qat.prepare(load_model(source, dtype).model, get_scheme(scheme))
