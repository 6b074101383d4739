"""An lm-evaluation-harness model backed by pocketquant (float, GGUF, Meta or packed models alike).

    pip install "pocketquant[lm-eval]"
    python -m pocketquant.eval.lm_eval_adapter --model pocketquant --model_args model=smollm2-135m \\
        --tasks hellaswag ...

or from Python: `import pocketquant.eval.lm_eval_adapter` (registers "pocketquant"), then
`lm_eval.simple_evaluate(model="pocketquant", model_args="model=out.safetensors", ...)`.
Datasets come from the harness's own cache: nothing here downloads."""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.eval.perplexity import score_text
from pocketquant.eval.tasks import continuation_logprob
from pocketquant.runtime.generate import stream_tokens


@register_model("pocketquant")
class PocketQuantLM(LM):
    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", max_length: int = 2048, **_):
        super().__init__()
        loaded = load_model(model, dtype)
        if loaded.tokenizer is None:
            raise PocketQuantError(f"{model} has no tokenizer")
        self.model, self.tok, self.max_length = loaded.model, loaded.tokenizer, int(max_length)
        # the token every rolling score starts from, as the harness's HF model does
        self.prefix = self.tok.bos_id if self.tok.bos_id is not None else min(self.tok.stop_ids, default=0)

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok.encode(context) if context else [self.prefix]
            cont = self.tok.encode(continuation, add_bos=False)
            keep = self.max_length - len(cont)  # left-truncate the context to fit
            out.append(continuation_logprob(self.model, ctx[-keep:] if keep > 0 else ctx[-1:], cont))
        return out

    def loglikelihood_rolling(self, requests):
        out = []
        for req in requests:
            tokens = [self.prefix] + self.tok.encode(req.args[0], add_bos=False)
            out.append(-score_text([self.model], tokens, context=self.max_length)[0].nll)
        return out

    def generate_until(self, requests):
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tok.encode(context)
            max_new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - len(prompt))
            ids, text = [], ""
            for token in stream_tokens(self.model, prompt[-self.max_length + 1:], max(max_new, 1),
                                       stop_ids=self.tok.stop_ids):
                if token in self.tok.stop_ids:
                    break
                ids.append(token)
                text = self.tok.decode(ids)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
