"""The transformers generation engine: chats in, texts out, batched, with shared-prefix KV reuse.

How a call is generated (and why it matches plain batched ``generate`` token for token):

1. Chats are rendered through the tokenizer's chat template and tokenized.
2. Rows that share a system prompt form a group; the group's longest common token prefix (at least
   the rendered system turn) is run through the model once, batch size 1.
3. Rows are cut into chunks of ``batch_size``, short suffixes first (so padding stays small): each
   group fills whole chunks of its own, and the rows left over from all groups are pooled.
4. A chunk of one group keeps its prefix once: the cache holds only each row's own tokens
   (``[pads][suffix][generated]``), and attention (``_shared_prefix_attention``) scores all rows'
   queries against the single prefix copy in one matmul, then against each row's own keys. A mixed
   chunk lays each row out as ``[pads][its group's prefix][pads][suffix]`` and uses the model's own
   attention. Either way positions come from the real tokens' count, exactly as ``generate`` computes
   them for left padding, so every real token sees the same keys at the same positions as in
   ``[pads][prefix][suffix]``; only the order of floating-point sums differs.
5. Keys and values live in buffers allocated once per chunk; a decode step writes in place instead of
   concatenating (which copies the whole cache every step). Only the last position's logits are
   computed in prefill.
6. Decoding runs our own loop: rows that finish (EOS, a stop string, or ``max_new_tokens``) are
   dropped from the batch and the cache, so they stop costing decode steps.
7. On CPU, the model's linear layers run on weights packed once for oneDNN (the kernels that torch's
   inductor uses for frozen CPU models), during the engine's calls only. They took ~3/4 of the
   engine's time on W1; at decode shapes these kernels are 1.4-1.7x faster than the default ones
   (2.6x on SmolLM2's 49k-row vocabulary projection). bfloat16 results are bit-identical; float32
   ones differ in the last bits (sums in another order), like the shared-prefix attention.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from .base import Chat, EngineStats, GenerationSettings, cut_at_stop, stable_hash


@dataclass
class _Prefix:
    length: int
    kv: list | None  # per layer (keys, values) of shape [1, heads, length, dim]; None when empty


@dataclass
class _Row:
    index: int  # position in the caller's list
    ids: list[int]  # full rendered prompt tokens
    seed: int  # sampling seed of this row (unused when greedy)
    prefix: _Prefix | None = None

    @property
    def suffix(self) -> list[int]:
        return self.ids[self.prefix.length:]


# Per layer (keys, values) of shape [kv_heads, length, dim]: the prefix shared by every row of the chunk
# being generated, read by ``_shared_prefix_attention``.
_shared_prefix_kv: ContextVar[list | None] = ContextVar("shared_prefix_kv", default=None)
_SHARED_PREFIX_ATTENTION = "metaspo_shared_prefix"
# The implementations it stands in for (its math is theirs); flash-attention kernels are left alone.
_SHARED_PREFIX_SOURCES = ("sdpa", "eager")
# Its prefill holds all scores at once, where SDPA works in tiles; past 2**22 (16 MB in float32 per layer,
# e.g. 32 rows x 9 heads x 50 queries x 250 keys) the extra memory traffic costs more than it saves.
_SHARED_PREFIX_MAX_SCORES = 2**22


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of each row over [the shared prefix] + [its own tokens], the prefix read once for all rows.

    Copying the prefix into every row (what a batched cache holds) makes each decode step read it once per
    row; here its scores come from one matmul of all rows' queries against it. ``attention_mask`` covers
    the row's own tokens only ([batch, 1, queries, own], True = attend); the prefix is visible to all.
    """
    prefix_keys, prefix_values = _shared_prefix_kv.get()[module.layer_idx]
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads * queries  # query vectors per key head and row (heads grouped as repeat_kv does)
    scaling = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group, dim)
    by_head = q.transpose(0, 1).reshape(kv_heads, batch * group, dim)
    prefix_scores = torch.matmul(by_head, prefix_keys.transpose(1, 2)).view(kv_heads, batch, group, -1).transpose(0, 1)
    own_scores = torch.matmul(q, key.transpose(2, 3))
    mask = attention_mask[:, :, None].expand(-1, -1, heads // kv_heads, -1, -1).reshape(batch, 1, group, -1)
    own_scores = own_scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float() * scaling, dim=-1).to(query.dtype)
    length = prefix_keys.shape[1]
    prefix_probs = probs[..., :length].transpose(0, 1).reshape(kv_heads, batch * group, length)
    out = torch.matmul(prefix_probs, prefix_values).view(kv_heads, batch, group, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., length:], value)
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(_SHARED_PREFIX_ATTENTION, _shared_prefix_attention)


@contextmanager
def _attending_to(model, prefix: _Prefix | None):
    """Within the block, the model's attention reads ``prefix`` as every row's shared prefix (no-op for None)."""
    if prefix is None:
        yield
        return
    previous = model.config._attn_implementation
    token = _shared_prefix_kv.set([(k[0], v[0]) for k, v in prefix.kv])
    model.config._attn_implementation = _SHARED_PREFIX_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _shared_prefix_kv.reset(token)


# Packing copies the weights; a model whose linear layers hold more than this is left as it is.
_PACKED_LINEARS_MAX_BYTES = 4 * 2**30
# Per model, its packed linear weights (shared by every engine on that model; gone with the model).
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_linear_weights(model) -> dict:
    """{Linear module: its weight packed for oneDNN} for a float CPU model, else {} (not on CPU, no oneDNN,
    over ``_PACKED_LINEARS_MAX_BYTES``, or a torch build whose packed kernel is missing or disagrees)."""
    if model in _packed_weights:
        return _packed_weights[model]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear  # subclasses: quantized layers
               and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.bfloat16)]
    packed = {}
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if linears and torch.backends.mkldnn.is_available() and size <= _PACKED_LINEARS_MAX_BYTES:
        try:
            with torch.inference_mode():
                packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight, None) for m in linears}
                probe = linears[0]
                # Its own generator: building an engine must not move the global random state.
                x = torch.randn(3, probe.in_features, dtype=probe.weight.dtype,
                                generator=torch.Generator().manual_seed(0))
                expected = torch.nn.functional.linear(x, probe.weight, probe.bias).float()
                agree = torch.allclose(_packed_linear(x, packed[probe], probe.bias).float(), expected,
                                       rtol=1e-2, atol=1e-3)
        except (AttributeError, RuntimeError):  # an op this torch build lacks or cannot run
            agree = False
        packed = packed if agree else {}
    _packed_weights[model] = packed
    return packed


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def _on_packed_weights(packed: dict):
    """Within the block, each packed Linear module computes with its packed weight (its forward shadowed)."""
    for module, weight in packed.items():
        module.forward = partial(_packed_linear, weight=weight, bias=module.bias)
    try:
        yield
    finally:
        for module in packed:
            vars(module).pop("forward", None)  # the class's forward again


class _BufferLayer(DynamicLayer):
    """One layer's keys and values in buffers allocated once per chunk: a decode step writes its token
    in place, where the default layer concatenates (copying the whole cache at every step)."""

    def __init__(self, keys, values, length: int, capacity: int):
        super().__init__()
        self.buffers = (keys, values)
        self.length = length
        self.capacity = capacity
        if keys is not None:
            self._set_views()

    def lazy_initialization(self, key_states, value_states) -> None:
        shape = (key_states.shape[0], key_states.shape[1], self.capacity, key_states.shape[3])
        self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
        self._set_views()

    def _set_views(self) -> None:
        keys, values = self.buffers
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys[:, :, :self.length], values[:, :, :self.length]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.buffers
        end = self.length + key_states.shape[-2]
        keys[:, :, self.length:end] = key_states
        values[:, :, self.length:end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffers = tuple(buffer[indices] for buffer in self.buffers)
            self._set_views()


def split_on_oom(engine, chunk: list, run: Callable[[list], list], shrink_batch: bool = False) -> list:
    """``run(chunk)``; on CUDA out-of-memory, run the two halves and join their results (with
    ``shrink_batch``, later chunks also get the halved batch size). Rows never depend on their batch-mates
    (per-row generators for sampling), so a split changes nothing but speed."""
    try:
        return run(chunk)
    except torch.cuda.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine.stats.oom_retries += 1
        half = len(chunk) // 2
        if shrink_batch:
            engine.batch_size = max(1, half)
        return (split_on_oom(engine, chunk[:half], run, shrink_batch)
                + split_on_oom(engine, chunk[half:], run, shrink_batch))


class HFEngine:
    """Generation with a loaded transformers causal LM and its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        batch_size: int = 32,
        prefix_reuse: bool = True,
        progress: bool = True,
        suppress_eos: bool = False,
        packed_linears: bool = True,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.prefix_reuse = prefix_reuse and _cache_is_plain(model)
        self._attention_source = model.config._attn_implementation
        self._cache_arg = _cache_argument(model)
        self.progress = progress
        # Benchmarks generate exactly max_new_tokens: EOS logits are masked, as generate's min_new_tokens does.
        self.suppress_eos = suppress_eos
        self.stats = EngineStats()
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        # Step 7 of the module doc; {} where it does not apply (e.g. on a GPU).
        self.packed = packed_linear_weights(model) if packed_linears else {}

    # ---- rendering -------------------------------------------------------------------------
    def render(self, chat: Chat) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already holds the special tokens (BOS etc.); adding them again would differ
        # from what the model was trained on.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- public API ------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None) -> list[str]:
        return [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), settings.stop)
                for ids in self.generate_ids(chats, settings, desc)]

    def generate_ids(self, chats: Sequence[Chat], settings: GenerationSettings,
                     desc: str | None = None) -> list[list[int]]:
        """The generated token ids of each chat (EOS left out; a stop string's tokens kept)."""
        started = time.perf_counter()
        occurrences: dict[str, int] = {}
        rows, groups = [], {}
        for i, chat in enumerate(chats):
            text = self.render(chat)
            k = occurrences.get(text, 0)
            occurrences[text] = k + 1
            row = _Row(i, self.encode(text), stable_hash(settings.seed, text, k))
            rows.append(row)
            system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
            groups.setdefault(system, []).append(row)

        outputs: list[list[int]] = [[] for _ in rows]
        bar = tqdm(total=len(rows), desc=desc or f"generate ({self.name})", unit="chat",
                   disable=not self.progress or None, leave=False)
        with torch.inference_mode(), _on_packed_weights(self.packed):
            for group in groups.values():
                prefix = self._prefill_prefix(group)
                for row in group:
                    row.prefix = prefix
            for chunk in self._chunks(list(groups.values()) if self.prefix_reuse else [rows]):
                for row, ids in split_on_oom(self, chunk, lambda rows: list(self._generate_chunk(rows, settings)),
                                             shrink_batch=True):
                    outputs[row.index] = ids
                bar.update(len(chunk))
        bar.close()
        self.stats.calls += 1
        self.stats.prompts += len(rows)
        self.stats.seconds += time.perf_counter() - started
        return outputs

    # ---- internals -------------------------------------------------------------------------
    def _prefill_prefix(self, group: list[_Row]) -> _Prefix:
        """KV of the group's common token prefix (batch 1); empty when reuse is off."""
        length = common_prefix_len([r.ids for r in group]) if self.prefix_reuse else 0
        # Every row needs at least one token of its own to produce its first logits.
        length = min([length] + [len(r.ids) - 1 for r in group])
        if length <= 0:
            return _Prefix(0, None)
        ids = torch.tensor([group[0].ids[:length]], device=self.model.device)
        cache = DynamicCache(config=self.model.config)
        # logits_to_keep=1: the prefix's logits are never read, and the vocabulary projection is a fifth of the work.
        self.model(input_ids=ids, **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1)
        self.stats.prefill_tokens += length
        return _Prefix(length, [(layer.keys, layer.values) for layer in cache.layers])

    def _chunks(self, groups: list[list[_Row]]) -> list[list[_Row]]:
        """Rows cut into chunks of ``batch_size``, short suffixes first (so padding stays small). Each group
        fills whole chunks of its own, whose prefix attention then reads once for all rows; the rows left
        over from every group are pooled, so a chunk is never smaller than it must be."""
        chunks, rest = [], []
        for group in groups:
            ordered = sorted(group, key=lambda r: len(r.suffix))
            whole = len(ordered) - len(ordered) % self.batch_size
            chunks += [ordered[i:i + self.batch_size] for i in range(0, whole, self.batch_size)]
            rest += ordered[whole:]
        rest.sort(key=lambda r: len(r.suffix))
        return chunks + [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]

    def _shared_prefix(self, chunk: list[_Row], width: int) -> _Prefix | None:
        """The chunk's one prefix when every row has it and attention can read it once for all rows."""
        prefix = chunk[0].prefix
        if prefix.kv is None or any(r.prefix is not prefix for r in chunk):
            return None
        if self._attention_source not in _SHARED_PREFIX_SOURCES:
            return None
        heads = self.model.config.get_text_config().num_attention_heads
        if len(chunk) * heads * width * (prefix.length + width) > _SHARED_PREFIX_MAX_SCORES:
            return None
        return prefix

    def _chunk_cache(self, chunk: list[_Row], width: int, capacity: int, shared: _Prefix | None) -> DynamicCache:
        """A cache of ``capacity`` slots per row. With a ``shared`` prefix it holds only the rows' own tokens;
        otherwise its first ``width`` slots hold each row's group prefix, right-aligned (the slots left of a
        shorter prefix are masked out, but must hold finite numbers)."""
        cache = DynamicCache(config=self.model.config)
        template = None if shared is not None else next((r.prefix.kv for r in chunk if r.prefix.kv), None)
        if template is None:
            cache.layers = [_BufferLayer(None, None, 0, capacity) for _ in cache.layers]
            return cache
        layers = []
        for layer_index, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((len(chunk), k0.shape[1], capacity, k0.shape[3]))
            values = v0.new_zeros((len(chunk), v0.shape[1], capacity, v0.shape[3]))
            for b, row in enumerate(chunk):
                if row.prefix.kv is not None:
                    k, v = row.prefix.kv[layer_index]
                    keys[b, :, width - row.prefix.length:width] = k[0]
                    values[b, :, width - row.prefix.length:width] = v[0]
            layers.append(_BufferLayer(keys, values, width, capacity))
        cache.layers = layers
        return cache

    def _generate_chunk(self, chunk: list[_Row], settings: GenerationSettings):
        """Yields (row, generated ids) for every row of the chunk, in any order."""
        device = self.model.device
        batch = len(chunk)
        suffixes = [r.suffix for r in chunk]
        width = max(len(s) for s in suffixes)
        shared = self._shared_prefix(chunk, width)
        prefix_width = max(r.prefix.length for r in chunk)
        # Slots of the cache: with a shared prefix, only each row's own tokens; else prefix slots first.
        first_slot = 0 if shared is not None else prefix_width
        capacity = first_slot + width + settings.max_new_tokens
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        # Which slots hold real tokens; generated tokens always do, so every step reads a slice of it.
        valid = torch.ones((batch, capacity), dtype=torch.bool)
        for b, (row, suffix) in enumerate(zip(chunk, suffixes, strict=True)):
            input_ids[b, width - len(suffix):] = torch.tensor(suffix)
            valid[b, first_slot:first_slot + width - len(suffix)] = False
            if shared is None:
                valid[b, :prefix_width - row.prefix.length] = False
        input_ids, valid = input_ids.to(device), valid.to(device)
        end = first_slot + width
        # Positions count real tokens only (the prefix's included), as generate does for left padding.
        offset = prefix_width if shared is not None else 0
        positions = (valid[:, :end].cumsum(-1) - 1 + offset).clamp(min=0)[:, first_slot:]
        cache = self._chunk_cache(chunk, prefix_width, capacity, shared)
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)

        generators = None
        if not settings.greedy:
            generators = [torch.Generator().manual_seed(r.seed % (2**63)) for r in chunk]
        active = list(range(batch))  # chunk indices still decoding, aligned with the batch rows
        new_tokens: list[list[int]] = [[] for _ in chunk]
        stop_tail = max((len(s) for s in settings.stop), default=0)

        def attention_mask(queries: int) -> torch.Tensor:
            if shared is None:  # the model builds the mask its attention implementation expects
                return valid[:, :end]
            # Ours: [batch, 1, queries, own slots], query i sitting in slot end - queries + i.
            causal = torch.ones((queries, end), dtype=torch.bool, device=device).tril(diagonal=end - queries)
            return valid[:, None, None, :end] & causal

        with _attending_to(self.model, shared):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask(width), position_ids=positions,
                                **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            for _step in range(settings.max_new_tokens):
                next_tokens = self._pick(logits, settings, [generators[i] for i in active] if generators else None)
                keep = []
                for slot, token in enumerate(next_tokens.tolist()):
                    row = active[slot]
                    if token in self.eos_ids:
                        continue
                    new_tokens[row].append(token)
                    if len(new_tokens[row]) < settings.max_new_tokens and not self._hit_stop(new_tokens[row], settings.stop, stop_tail):
                        keep.append(slot)
                self.stats.generated_tokens += len(active)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    valid, next_tokens, positions = valid[index], next_tokens[index], positions[index]
                    active = [active[s] for s in keep]
                end += 1
                positions = positions[:, -1:] + 1
                logits = self.model(input_ids=next_tokens[:, None], attention_mask=attention_mask(1),
                                    position_ids=positions, **{self._cache_arg: cache}, use_cache=True).logits[:, -1, :]

        for row, tokens in zip(chunk, new_tokens, strict=True):
            yield row, tokens

    def _hit_stop(self, tokens: list[int], stops: tuple[str, ...], tail_chars: int) -> bool:
        if not stops:
            return False
        # Decoding only the last few tokens is enough to see a stop string that just completed.
        tail = self.tokenizer.decode(tokens[-(tail_chars + 4):], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _pick(self, logits: torch.Tensor, settings: GenerationSettings, generators) -> torch.Tensor:
        if self.suppress_eos:
            logits[:, sorted(self.eos_ids)] = float("-inf")
        if settings.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            probs = _top_p_filter(probs, settings.top_p)
        picks = [torch.multinomial(p.cpu(), 1, generator=g) for p, g in zip(probs, generators, strict=True)]
        return torch.cat(picks).to(logits.device)

    # ---- log-likelihood scoring (computed in loglik.py on this engine's prefix machinery) ----------
    def loglikelihood(self, requests: Sequence, desc: str | None = None) -> list[float]:
        """For each (chat, continuation): the summed log-probability of the continuation's tokens after the
        chat rendered with the generation prompt; rows batched, the shared prefix's KV computed once."""
        from .loglik import loglikelihood

        return loglikelihood(self, requests, desc)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


def common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        n = 0
        while n < length and seq[n] == first[n]:
            n += 1
        length = n
    return length


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` where the model has it (transformers 5.x
    deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` on older versions."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_is_plain(model) -> bool:
    """Prefix reuse relies on plain dynamic layers (no sliding window state to carry over)."""
    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
