"""The fast runtime: swap a packed model's reference QuantLinear modules for ones that call the native
kernels, reading the packed weights where they lie (no copies). Each activation is quantized once and
reused by every projection that reads it (q/k/v, gate/up); a one-token decode step runs each decoder
layer as a single native call."""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from pocketquant.files import drop_file_pages
from pocketquant.layers import QuantLinear, set_module, with_lora
from pocketquant.packing import unpack_int4
from pocketquant.runtime import kernels

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class SharedActivations:
    """Quantizes an activation once for the `users` projections that read it (q/k/v: 3, gate/up: 2), then
    forgets it, so no layer keeps its inputs alive. A projection fed another tensor object gets it
    quantized afresh (the model never writes into a projection's input in place, so the object
    identifies the values; holding it keeps its id from being reused meanwhile)."""

    def __init__(self, users: int = 1):
        self.users, self.left, self.source, self.value = users, 0, None, None

    def get(self, x: torch.Tensor):
        if self.source is not x:
            self.source, self.left = x, self.users
            self.value = kernels.quantize_rows(x.reshape(-1, x.shape[-1]).float())
        value = self.value
        self.left -= 1
        if self.left <= 0:
            self.source = self.value = None
        return value


PACK_ROWS = 4096  # rows repacked at a time (a multiple of the panel height)


class FastLinear(nn.Module):
    """Same numbers as `QuantLinear` (integers bit-exact), computed by the native kernels on weights
    repacked into panels (kernels.h); the row-major weights are not kept."""

    def __init__(self, q: QuantLinear, shared: SharedActivations):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.shared = q.in_features, q.out_features, q.spec, shared
        self.bits, self.group, self.lora = q.spec.weight.bits, q.spec.weight.group_for(q.in_features), q.lora
        N, K, panels = q.out_features, q.in_features, kernels.panels(q.out_features)
        pad = panels * kernels.PANEL - N
        if self.bits == 4:  # the layout of kernels.h
            self.packed = torch.empty(panels, K * kernels.PANEL // 2, dtype=torch.uint8)
            self.scales = torch.empty(panels, K // self.group * kernels.PANEL, dtype=torch.int16)  # float16 bits
        else:
            self.packed = torch.empty(panels, K * kernels.PANEL, dtype=torch.int8)
        sums = []
        for r in range(0, N, PACK_ROWS):  # a slice at a time, letting go of its file pages once packed
            w, s, p = q.qweight[r:r + PACK_ROWS], q.scales[r:r + PACK_ROWS], slice(r // kernels.PANEL, None)
            if self.bits == 4 and s.dtype != torch.float16:  # float32 scales (Meta's layout): the kernels' are float16
                s = s.to(torch.float16)
            sums.append(group_sums(w, self.group if self.bits == 4 else K, unpack=self.bits == 4))
            if self.bits == 4:
                kernels.pack_w4(w, s, self.group, (self.packed[p], self.scales[p]))
            else:
                kernels.pack_w8(w, self.packed[p])
            drop_file_pages(w, s)
        sums = torch.cat(sums)
        if self.bits == 4:
            scales = q.scales.to(torch.float16).double()  # as the kernels read them
            rowcorr = (sums.double() * scales).sum(-1).float()  # sum_g scale_g * sum(w in g)
            self.rowcorr = F.pad(rowcorr, (0, pad))
        else:
            self.scales = F.pad(q.scales.float().reshape(-1), (0, pad))
            self.wsum = F.pad(sums[:, 0], (0, pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.shared.get(x)
        threads, N = torch.get_num_threads(), self.out_features
        if self.bits == 4:
            y = kernels.linear_w4(acts, self.packed, self.scales, self.rowcorr, self.group, N, threads)
        else:
            y = kernels.linear_w8(acts, self.packed, self.scales, self.wsum, N, threads)
        y = y.reshape(*x.shape[:-1], N)
        return with_lora(self, x, y if x.dtype == torch.float32 else y.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w{self.bits} g{self.group}, kernels {kernels.path()}"


class PackedEmbedding(nn.Module):
    """The int8 embedding lookup from the output layer's packed table, for models whose embedding and
    output share one table (the same numbers as QuantEmbedding, without a second copy)."""

    def __init__(self, head: FastLinear, out_dtype: torch.dtype):
        super().__init__()
        self.head, self.out_dtype = head, out_dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.head
        return kernels.gather_w8(head.packed, head.scales, tokens, head.out_features).to(self.out_dtype)


def group_sums(qweight: torch.Tensor, group: int, unpack: bool, rows: int = 256) -> torch.Tensor:
    """Integer sum of each group of weights [N, K / group], a block of rows at a time (no full-size
    temporary: the output layer of a Llama 3 model holds 260 M weights)."""
    out = []
    for r in range(0, qweight.shape[0], rows):
        w = unpack_int4(qweight[r:r + rows]) if unpack else qweight[r:r + rows]
        out.append(w.reshape(w.shape[0], -1, group).sum(-1, dtype=torch.int32))
    return torch.cat(out)


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor | None:
    """Causal attention on the native kernel (kernels.attention), a sequence of the batch at a time, where it
    applies: float32 without gradients, head_dim a multiple of 64. None: the caller runs PyTorch's SDPA."""
    if (q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32 or q.shape[-1] % 64
            or torch.is_grad_enabled() and q.requires_grad or min(t.stride(-1) for t in (q, k, v)) != 1):
        return None
    return torch.cat([kernels.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], start) for b in range(q.shape[0])])


def runs_fast(q) -> bool:
    """The kernels cover int8 asymmetric per-token activations with int4 weights (groups of 32k; float32 scales
    are rounded to the kernels' float16, where they fit) or int8 per-channel weights."""
    if not isinstance(q, QuantLinear):
        return False
    a, w = q.spec.act, q.spec.weight
    if a is None or a.symmetric or q.in_features % 32:
        return False
    if w.bits == 8:
        return w.group_size == 0
    if w.scale_dtype == "float32":  # float16 must hold every scale to its normal precision
        size = q.scales.abs()
        f16 = torch.finfo(torch.float16)
        if not bool(size.max() <= f16.max) or bool(((size > 0) & (size < f16.smallest_normal)).any()):
            return False
    return w.group_for(q.in_features) % 32 == 0


class FastDecode:
    """The model's one-token step as one native call through every layer (norms, projections, RoPE,
    the KV cache, attention, SwiGLU), for one sequence or for a batch of sequences each at its own
    position in caches of its own (batched decoding: one pass over the weights for all of them, and each
    sequence's numbers are those it gets alone). Installed as `model.fused_decode` when every block linear
    runs on the int4 kernels; non-float32 inputs or caches take the module path."""

    def __init__(self, model: nn.Module):
        c = self.config = model.config
        self.layers = (kernels.LayerParams * c.n_layers)()
        for p, layer in zip(self.layers, model.layers):
            p.dim, p.n_heads, p.n_kv, p.head_dim, p.ffn = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
            p.eps = layer.input_layernorm.eps
            p.attn_norm = layer.input_layernorm.weight.data_ptr()
            p.ffn_norm = layer.post_attention_layernorm.weight.data_ptr()
            for i, name in enumerate(PROJECTIONS):  # the modules keep these tensors alive
                f = layer.get_submodule(name)
                p.w[i], p.s[i], p.c[i], p.g[i] = (f.packed.data_ptr(), f.scales.data_ptr(),
                                                  f.rowcorr.data_ptr(), f.group)
        m, self.had_down = kernels.hadamard_factor(c.ffn_dim) if c.hadamard_down else (0, None)
        for p in self.layers:  # R4 and R3 of a rotated model, applied inside the native step
            p.had_down_m, p.had_qk = m, int(c.hadamard_qk)
            p.had_down = 0 if self.had_down is None else self.had_down.data_ptr()
        self.inv_freq = model.inv_freq
        self.scratch = torch.empty(0)  # grown to the largest batch and cache seen
        self.params = weakref.WeakKeyDictionary()  # KVCache -> its CacheParams, for as long as it lives

    def _param(self, cache) -> int:
        """The address of `cache`'s CacheParams."""
        p = self.params.get(cache)
        if p is None:
            p = self.params[cache] = kernels.CacheParams()
            p.k, p.v, p.max_t, p.bits = cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[2], cache.bits or 0
            if cache.bits == 8:
                p.k_scale, p.k_zero = cache.k_scale.data_ptr(), cache.k_zero.data_ptr()
                p.v_scale, p.v_zero = cache.v_scale.data_ptr(), cache.v_zero.data_ptr()
        return ctypes.addressof(p)

    def __call__(self, x: torch.Tensor, caches, start_pos):
        """x [B, 1, dim] -> [B, 1, dim]. With an int start_pos, B = 1 and caches[layer] is its cache; with
        positions [B], caches[layer] is a list of B caches of one sequence each. None where it does not apply."""
        if isinstance(start_pos, torch.Tensor):
            rows, pos = caches, start_pos.to(torch.int64).contiguous()
        elif x.shape[0] == 1:
            rows, pos = [[c] for c in caches], torch.tensor([start_pos], dtype=torch.int64)
        else:
            return None
        first = rows[0][0]
        if x.dtype != torch.float32 or (first.bits != 8 and first.k.dtype != torch.float32):
            return None
        B = x.shape[0]
        max_t = max(cache.k.shape[2] for cache in rows[0])
        need = kernels.decode_scratch(self.layers, B, max_t)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need, dtype=torch.float32)
        params = (ctypes.c_void_p * (len(rows) * B))(*[self._param(cache) for layer in rows for cache in layer])
        out = x.reshape(B, -1).clone()
        kernels.decode_layers(self.layers, params, out, pos, max_t, self.inv_freq, self.scratch,
                              torch.get_num_threads())
        return out.view(B, 1, -1)


def decodes_natively(model: nn.Module) -> bool:
    """Whether every block projection is (or would be, for reference modules) int4 on the kernels, with
    no LoRA adapter: then a one-token step runs as one native call."""
    def int4_fast(f):
        bits = f.bits if isinstance(f, FastLinear) else f.spec.weight.bits if runs_fast(f) else None
        return bits == 4 and f.lora is None
    return all(int4_fast(layer.get_submodule(name)) for layer in model.layers for name in PROJECTIONS)


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear the kernels cover (the rest keep the reference forward) and attend with the
    native causal attention (float models too); when every block projection is int4 on the kernels (and
    none has a LoRA adapter), one-token steps run natively through all layers."""
    for layer in model.layers:
        layer.self_attn.native_attention = native_attention
        shared = {"self_attn.q_proj": "in", "self_attn.k_proj": "in", "self_attn.v_proj": "in",
                  "mlp.gate_proj": "post", "mlp.up_proj": "post"}
        caches = {"in": SharedActivations(users=3), "post": SharedActivations(users=2)}
        for name in PROJECTIONS:
            q = layer.get_submodule(name)
            if runs_fast(q):
                set_module(layer, name, FastLinear(q, caches.get(shared.get(name), SharedActivations())))
        kernels.return_freed_memory()  # the repacking's temporaries, a layer at a time
    if decodes_natively(model):
        model.fused_decode = FastDecode(model)
    if runs_fast(model.lm_head):
        shared_table = getattr(model, "shares_embedding_output", False)
        model.lm_head = FastLinear(model.lm_head, SharedActivations())
        if shared_table:
            model.embed_tokens = PackedEmbedding(model.lm_head, model.embed_tokens.out_dtype)
    return model


def kernel_paths(model: nn.Module) -> dict[str, str]:
    """{module family: what runs it} for a model on the fast runtime, or for a packed model's reference
    modules (what the fast runtime would run). A family with any module on a slow fallback says SLOW."""
    from pocketquant.layers import QuantEmbedding, family_of

    path = kernels.path() if kernels.available() else None
    found: dict[str, set[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FastLinear) or (isinstance(m, QuantLinear) and path and runs_fast(m)):
            bits = m.bits if isinstance(m, FastLinear) else m.spec.weight.bits
            desc = f"{path} int8 x int{bits} GEMM"
        elif isinstance(m, QuantLinear):
            desc = "SLOW: reference (a dequantized float copy)" + ("" if path else ", native kernels not built")
        elif isinstance(m, PackedEmbedding) or (isinstance(m, QuantEmbedding) and path and runs_fast(model.lm_head)
                                                and getattr(model, "shares_embedding_output", False)):
            desc = "int8 lookup in the output layer's packed table"
        elif isinstance(m, QuantEmbedding):
            desc = "int8 row lookup"
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            desc = "float (PyTorch)"
        else:
            continue
        found.setdefault(family_of(f"{name}.weight"), set()).add(desc)
    if path and decodes_natively(model):
        found["decode step"] = {f"one native call through every layer ({path})"}
    return {family: "; ".join(sorted(d)) for family, d in found.items()}


def paths_lines(paths: dict[str, str]) -> list[str]:
    """kernel_paths as indented report lines."""
    return [f"  {family:<12} {what}" for family, what in paths.items()]
