"""pocketquant: make small Llama-family models small and fast on a CPU, and prove they stay accurate.

    import pocketquant as pq

    model = pq.load("smollm2-135m")                       # a name, HF or Meta directory, .gguf, packed file
    small = pq.quantize(model, "hadamard", out="q.safetensors")   # a method, a recipe file or a list of steps
    print(pq.generate(small, "The capital of France is", max_tokens=8))
    for r in pq.stream_generate(small, [{"role": "user", "content": "Hi!"}], max_tokens=32):
        print(r.text, end="")                               # the last item: r.finish_reason, r.generation_tps
    print(pq.evaluate("smollm2-135m", "q.safetensors", limit=4096).models[1].metrics["kl_mean"])

Everything heavy is imported when first used, so `import pocketquant` is cheap."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "quantize", "evaluate", "generate", "stream_generate"]


def load(source, dtype: str = "float32", runtime: str = "fast", verify: bool = True):
    """The model `source` names (a known name such as smollm2-135m, a Hugging Face or Meta directory, a .gguf
    file or a packed .safetensors file) with its tokenizer: a LoadedModel (.model, .tokenizer). Packed files
    run on the native kernels unless runtime="reference"; their tensors are checked against their checksums
    first unless verify=False."""
    from pocketquant.runtime import load as load_runtime

    return load_runtime(str(source), dtype, runtime, verify)


def quantize(model_or_source, recipe="hadamard", out=None, progress: bool = True):
    """Quantize a float model (a LoadedModel from `load`, or a source `load` takes) by `recipe`: a method
    name (rtn, gptq, signround, hadamard, spinquant), a recipe .json file, a packed file whose recipe to replay, or a
    list of step configs (pocketquant.quant.recipe). Writes the packed file `out` when given; returns the
    quantized LoadedModel, ready to run on the native kernels. A LoadedModel passed in is changed in place."""
    from pathlib import Path

    from pocketquant.checkpoints import LoadedModel
    from pocketquant.quant import recipe as recipes
    from pocketquant.runtime import kernels
    from pocketquant.runtime.engine import use_fast_kernels

    recipe_file = None
    if isinstance(recipe, (list, tuple)):
        steps = recipes.check(recipe)
    elif isinstance(recipe, str) and recipe in recipes.METHODS:
        steps = recipes.from_options(recipe)
    else:
        recipe_file = Path(recipe)
        steps = recipes.read(recipe_file)
    given = isinstance(model_or_source, LoadedModel)
    source = model_or_source.model if given else str(model_or_source)
    result = recipes.quantize(source, steps, out, progress, model_or_source.tokenizer if given else None,
                              inputs=[recipe_file])
    if result is None:  # a torchrun helper process
        return None
    model = use_fast_kernels(result.model) if kernels.available() else result.model
    return LoadedModel(model, result.tokenizer, str(out) if out else model_or_source.source if given else source)


def evaluate(reference, *models, data=None, tasks=None, context=None, limit=None, progress: bool = True,
             reference_cache=None):
    """Perplexity, KL-divergence from `reference`, top-1 agreement and task accuracy of every model, side by
    side (sources as `load` takes them; the shipped evaluation text and tasks by default; tasks=[] skips the
    tasks; `reference_cache`: a directory where the reference's pass is kept and reused). Returns an
    EvalResult: .models[i].metrics["ppl_token"], ["kl_mean"], ... in the order given."""
    from pocketquant.eval.run import evaluate as run

    return run([str(reference), *map(str, models)], data, tasks, context, limit=limit, progress=progress,
               reference_cache=reference_cache)


def generate(model, prompt, max_tokens: int = 256, **sampling) -> str:
    """The text `model` (a LoadedModel) writes after `prompt`: a string, token ids, or a list of chat
    messages ({"role", "content"}), to which the model's chat template is applied. Greedy unless
    temperature (and top_k, top_p, seed) say otherwise."""
    return "".join(r.text for r in stream_generate(model, prompt, max_tokens, **sampling))


def stream_generate(model, prompt, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int | None = None):
    """`generate` a piece at a time: yields a Response per token (.text, .token); the last one also says
    why it ended (.finish_reason "stop" or "length") and carries the counts and speeds (.prompt_tokens,
    .generation_tokens, .time_to_first_token, .prompt_tps, .generation_tps)."""
    from pocketquant.errors import PocketQuantError
    from pocketquant.runtime.generate import Sampling
    from pocketquant.runtime.generate import stream_generate as stream

    tokenizer = model.tokenizer
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise PocketQuantError(f"{model.source} has no tokenizer: give the prompt as token ids")
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.encode_chat(prompt)
    else:
        ids = [int(t) for t in prompt]
    return stream(model.model, tokenizer, ids, max_tokens, Sampling(temperature, top_k, top_p, seed))
