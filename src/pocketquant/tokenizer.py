"""Tokenizers behind one interface: HF `tokenizer.json`, Llama 3 `tokenizer.model` (tiktoken), and the
BPE tokenizer embedded in a GGUF file; chat templates rendered with Jinja as Hugging Face does."""

from __future__ import annotations

import functools
import re
import resource
import sys
import time
from pathlib import Path

from pocketquant.errors import PocketQuantError
from pocketquant.files import read_json

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# End-of-turn markers of the chat formats we know; generation stops at any of them.
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class Tokenizer:
    """Text <-> token ids, plus the model's special tokens and chat template."""

    def __init__(self, backend, special: dict[str, int], bos_token: str | None, eos_token: str | None,
                 add_bos: bool, chat_template: str | None):
        self.backend = backend  # object with encode(text) -> list[int] and decode(ids) -> str
        self.special = special
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = special.get(bos_token) if bos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template or _default_template(special)
        stops = [special[t] for t in (eos_token, *STOP_TOKENS) if t in special]
        self.stop_ids = frozenset(stops)
        self.pre = None  # llama.cpp's name for the pre-tokenizer, when known (GGUF export writes it)
        self.id_limit: int | None = None  # ids at or past it have no embedding row (set by check_fits)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids. BOS as the model expects,
        unless `add_bos` says otherwise."""
        ids = self.backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.id_limit is not None and ids and max(ids) >= self.id_limit:
            raise PocketQuantError(f"the text holds a token (id {max(ids):,}) the model has no embedding for")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def check_fits(self, vocab_size: int, source: str):
        """Refuse a tokenizer whose vocabulary has ids the model has no embedding row for. Added tokens beyond it (a
        pad token some uploads add without growing the embedding) are only a warning, and text that would
        encode to one of them is refused by `encode`."""
        largest = self.backend.max_id(added=False)
        if largest >= vocab_size:
            raise PocketQuantError(f"{source}: the tokenizer has token ids up to {largest:,}, but the model's "
                                   f"vocabulary has {vocab_size:,} entries")
        beyond = max(self.backend.max_id(added=True), *self.special.values(), -1)
        if beyond >= vocab_size:
            import warnings

            warnings.warn(f"{source}: the tokenizer's added tokens go up to id {beyond:,}, past the model's "
                          f"{vocab_size:,} entries; text holding them is refused", stacklevel=2)
        self.id_limit = vocab_size

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role", "content"}, ...]) as the prompt text the model was trained on."""
        if self.chat_template is None:
            raise PocketQuantError("this model has no chat template; use a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PocketQuantError(f"a chat message needs 'role' and 'content', got {m!r}")
        return _render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants one.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)

    def to_spec(self) -> dict:
        """Everything needed to rebuild this tokenizer, as JSON-able data (stored in packed files)."""
        return {**self.backend.to_spec(), "special": self.special, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "add_bos": self.add_bos, "chat_template": self.chat_template,
                "pre": self.pre}

    @classmethod
    def from_spec(cls, d: dict) -> "Tokenizer":
        kinds = {"hf": _HFBackend, "tiktoken-llama3": _TiktokenBackend}
        if d.get("kind") not in kinds:
            raise PocketQuantError(f"unknown tokenizer kind {d.get('kind')!r}")
        tok = cls(kinds[d["kind"]].from_spec(d), d["special"], d["bos_token"], d["eos_token"], d["add_bos"],
                  d["chat_template"])
        tok.pre = d.get("pre")
        return tok


def _default_template(special: dict[str, int]) -> str | None:
    if "<|start_header_id|>" in special:
        return LLAMA3_TEMPLATE
    if "<|im_start|>" in special:
        return CHATML_TEMPLATE
    return None


# A chat template is code from the model's files: its rendering is sandboxed and bounded.
RENDER_SECONDS = 2.0
RENDER_CHARS = 1 << 24
RENDER_MEMORY = 256 << 20  # bytes the peak memory may grow by while one template renders
_TEMPLATE_FILE = "<chat template>"


def _render(template: str, **context) -> str:
    """Render a chat template in Jinja's sandbox, within RENDER_SECONDS, RENDER_CHARS and RENDER_MEMORY."""
    compiled = _compile_template(template)
    deadline, memory = time.monotonic() + RENDER_SECONDS, _memory() + RENDER_MEMORY
    next_look = [0.0]  # when to look at the memory again: every half millisecond is enough to catch
    # an operation that allocates much, since that takes longer

    def check(frame, event, arg):  # traces the lines of the template's own code only
        now = time.monotonic()
        if now > deadline:
            raise PocketQuantError(f"chat template: rendering took longer than {RENDER_SECONDS:g} s; refusing it")
        if now > next_look[0]:
            next_look[0] = now + 0.0005
            if _memory() > memory:
                raise PocketQuantError(f"chat template: rendering took more than {RENDER_MEMORY >> 20} MB; "
                                       "refusing it")
        return check

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: check if frame.f_code.co_filename == _TEMPLATE_FILE else None)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > RENDER_CHARS:
                raise PocketQuantError(f"chat template: the text grew past {RENDER_CHARS:,} characters; refusing it")
            pieces.append(piece)
        return "".join(pieces)
    except PocketQuantError:
        raise
    except Exception as e:  # the template's own code failed (a TemplateError, or a TypeError on odd input)
        raise PocketQuantError(f"chat template failed to render: {type(e).__name__}: {e}") from e
    finally:
        sys.settrace(previous)


def _memory() -> int:
    """This process's resident memory in bytes (where /proc is missing: its peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_PAGE = resource.getpagesize()


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    try:
        return _template_environment().from_string(template)
    except Exception as e:  # a TemplateSyntaxError, or a template too deeply nested to compile
        raise PocketQuantError(f"chat template cannot be compiled: {type(e).__name__}: {e}") from e


def _bounded_filter(name: str, fn):
    """`fn`, refusing arguments that would make its result huge (center(10**9), replace by a long text, ...)."""

    @functools.wraps(fn)
    def bounded(*args, **kwargs):
        values = [*args, *kwargs.values()]
        widths = [abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
        texts = [len(v) for v in values if isinstance(v, str)]
        digits = [int(d) for v in values if isinstance(v, str) for d in re.findall(r"\d{1,12}", v)]
        if max(widths + digits, default=0) > RENDER_CHARS or (name == "replace" and len(texts) >= 3
                                                              and texts[0] * max(1, texts[2]) > RENDER_CHARS):
            raise PocketQuantError(f"chat template: the filter {name} would make too large a text")
        return fn(*args, **kwargs)
    return bounded


def _check_size(operator: str, left, right):
    """Refuse a sequence * n, a sequence + a sequence or an int ** int whose result would be huge, before
    it is computed (one such operation cannot be interrupted)."""
    sequence = (str, list, tuple)
    ints = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
    seqs = [v for v in (left, right) if isinstance(v, sequence)]
    huge = ((operator == "*" and len(seqs) == 1 and len(ints) == 1 and len(seqs[0]) * abs(ints[0]) > RENDER_CHARS)
            or (operator == "+" and len(seqs) == 2 and len(left) + len(right) > RENDER_CHARS)
            or (operator == "**" and len(ints) == 2 and abs(right) > 64 and abs(left) > 1)
            or (operator == "%" and isinstance(left, str)  # "%1000000000s" % x
                and max(map(int, re.findall(r"\d{1,12}", left)), default=0) > RENDER_CHARS))
    if huge:
        raise PocketQuantError(f"chat template: {left!r:.20} {operator} {right!r:.20} is too large")


@functools.lru_cache(maxsize=1)
def _template_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            # "x" * 10**10 or 10**10**10 would allocate or compute for ever inside one operation
            _check_size(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def _compile(self, source, filename):
            return compile(source, _TEMPLATE_FILE, "exec")

    def raise_exception(message):
        raise PocketQuantError(f"chat template: {message}")

    env = Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    for name in ("center", "indent", "wordwrap", "truncate", "replace", "format"):  # can make one huge string
        env.filters[name] = _bounded_filter(name, env.filters[name])
    return env


class _HFBackend:
    def __init__(self, tok):
        self.tok = tok

    def to_spec(self):
        return {"kind": "hf", "tokenizer_json": self.tok.to_str()}

    @classmethod
    def from_spec(cls, d):
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_str(d["tokenizer_json"]))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def max_id(self, added: bool) -> int:
        return max(self.tok.get_vocab(with_added_tokens=added).values(), default=-1)


class _TiktokenBackend:
    def __init__(self, ranks_text: str):
        self.ranks_text = ranks_text
        self.enc, self.special = _llama3_encoding(ranks_text)

    def to_spec(self):
        return {"kind": "tiktoken-llama3", "ranks": self.ranks_text}

    @classmethod
    def from_spec(cls, d):
        return cls(d["ranks"])

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode(ids)

    def max_id(self, added: bool) -> int:
        return self.enc.max_token_value if added else min(self.special.values()) - 1  # special ids come last


def from_hf_dir(path: Path) -> Tokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template)."""
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise PocketQuantError(f"{path / 'tokenizer.json'}: cannot be read: {e}") from e
    cfg_path = path / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise PocketQuantError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    bos, eos = _token_str(cfg.get("bos_token"), cfg_path), _token_str(cfg.get("eos_token"), cfg_path)
    # The tokenizer's own post-processor tells whether the model expects BOS.
    add_bos = bool(bos) and tok.encode("", add_special_tokens=True).ids[:1] == [special.get(bos)]
    if isinstance(cfg.get("add_bos_token"), bool):  # said outright (as transformers' Llama tokenizers read it)
        add_bos = bool(bos) and cfg["add_bos_token"]
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").exists():  # where newer transformers save it
        from pocketquant.data import read_text

        template = read_text(path / "chat_template.jinja")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, (str, type(None))):
        raise PocketQuantError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    return Tokenizer(_HFBackend(tok), special, bos, eos, add_bos, template)


def _token_str(tok, where: Path) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, {"content": string} or null."""
    tok = tok.get("content") if isinstance(tok, dict) else tok
    if not isinstance(tok, (str, type(None))):
        raise PocketQuantError(f"{where}: a special token must be a string, got {tok!r:.60}")
    return tok


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]


def _llama3_encoding(ranks_text: str):
    import base64

    import tiktoken

    ranks = {}
    for line in ranks_text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return enc, special


def from_llama3_model(path: Path) -> Tokenizer:
    """Llama 3's `tokenizer.model` (base64 tiktoken ranks) with Llama 3's 256 special tokens."""
    import binascii

    try:
        backend = _TiktokenBackend(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, binascii.Error) as e:
        raise PocketQuantError(f"{path}: not a Llama 3 tiktoken tokenizer.model "
                               f"(a SentencePiece model from Llama 2 is not supported): {e}") from e
    return Tokenizer(backend, dict(backend.special), "<|begin_of_text|>", "<|end_of_text|>", True, LLAMA3_TEMPLATE)


def from_gguf(reader, path: Path) -> Tokenizer:
    """The BPE ("gpt2") tokenizer stored in the metadata of a GGUF file (`reader`: a gguf.GGUFReader)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    def field(reader, key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise PocketQuantError(f"{path}: GGUF tokenizer type {kind!r} is not supported; expected BPE ('gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges") or []]
    tok = HFTok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                           fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(field(reader, "tokenizer.ggml.pre", "gpt2"), pre_tokenizers, Regex)
    tok.decoder = decoders.ByteLevel()
    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole in the text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}

    def token_at(key):
        i = field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    special.update({t: tokens.index(t) for t in (bos, eos) if t})
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    out = Tokenizer(_HFBackend(tok), special, bos, eos, add_bos, field(reader, "tokenizer.chat_template"))
    out.pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    return out


def _gguf_pre_tokenizer(pre: str, pre_tokenizers, Regex):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN if pre == "llama-bpe" else GPT2_PATTERN),
                                 behavior="isolated")
    steps = [split, byte_level]
    if pre == "smollm":  # SmolLM's tokenizer puts every digit in its own pre-token first
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)
