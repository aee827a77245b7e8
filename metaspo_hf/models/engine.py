"""The transformers generation engine: chats in, texts out, batched, with shared-prefix KV reuse.

How a call is generated (and why it matches plain batched ``generate`` token for token):

1. Chats are rendered through the tokenizer's chat template and tokenized.
2. Rows that share a system prompt form a group; rows of the group that share a longer prefix (one user
   prompt's questions) form a cluster of their own when they fill a chunk (``prefix.prefix_clusters``).
   Each cluster's longest common token prefix (at least the rendered system turn) is run through the
   model once, batch size 1.
3. Rows are cut into chunks of ``batch_size``, short suffixes first (so padding stays small): each
   cluster fills whole chunks of its own, and the rows left over from all clusters are pooled.
4. A chunk of one cluster keeps its prefix once: the cache holds only each row's own tokens
   (``[pads][suffix][generated]``), and attention (``prefix.py``) scores all rows'
   queries against the single prefix copy in one matmul, then against each row's own keys (in bfloat16
   and float16 a decode step reads the whole own-token buffer, the unwritten slots masked: a strided
   view would be copied). A prefill too long for one score matrix (long distinct requests, such as the
   optimizer's) attends over copies of the prefix through SDPA instead; its decode steps still read the
   one copy. A mixed
   chunk lays each row out as ``[pads][its cluster's prefix][pads][suffix]`` and uses the model's own
   attention. Either way positions come from the real tokens' count, exactly as ``generate`` computes
   them for left padding, so every real token sees the same keys at the same positions as in
   ``[pads][prefix][suffix]``; only the order of floating-point sums differs.
5. Keys and values live in buffers allocated once per chunk; a decode step writes in place instead of
   concatenating (which copies the whole cache every step). Only the last position's logits are
   computed in prefill.
6. Decoding runs our own loop: rows that finish (EOS, a stop string, or ``max_new_tokens``) are
   dropped from the batch and the cache, so they stop costing decode steps.
7. On CPU, the model's linear layers run on weights packed once for oneDNN, during the engine's calls
   only (``packed.py``; measured speed-ups in docs/benchmarks.md).
8. In bfloat16 on CPU, a shared-prefix chunk's decode steps run their attention on a C++ kernel built once
   per machine (``decode_kernel.py``): one pass over the keys and values instead of torch's small matmuls and
   the copies between them; for Llama-family models the whole step is a plain loop over the layers
   (``decode_step.py``): the query, key and value projections as one matmul (likewise gate and up), the kernel
   also doing the rotary embedding and the cache write, and the residual adds, norms and gated activation as
   one C++ op each, rounded as transformers' modules round (measured in docs/benchmarks.md).
9. On CPU, memory freed between tensors is kept for the next ones (``allocator.py``): a long prefill's large
   activations would otherwise be faulted in page by page at every layer.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import decode_kernel
from .allocator import keep_freed_memory
from .base import Chat, EngineStats, GenerationSettings, cut_at_stop, sample_indices, stable_hash
from .batching import split_on_oom
from .decode_step import FusedDecodeStep
from .loglik import loglikelihood
from .packed import on_packed_weights, packed_linear_weights
from .parallel import SINGLE, Processes
from .prefix import (
    SHARED_PREFIX_SOURCES,
    BufferLayer,
    Prefix,
    Row,
    attending_to,
    common_prefix_len,
    prefix_clusters,
)


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
        attention_kernel: bool = True,
        processes: Processes = SINGLE,
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
        # The run's processes share each call's chunks (parallel.py); one process runs them all.
        self.processes = processes
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        # Step 7 of the module doc; {} where it does not apply (e.g. on a GPU).
        self.packed = packed_linear_weights(model) if packed_linears else {}
        if model.device.type == "cpu":  # step 9
            keep_freed_memory()
        # Shared-prefix decode steps read whole own-token buffers where a strided view of them would be
        # copied at every step (bfloat16 and float16 on CPU: prefix.BufferLayer); float32 reads views in place.
        self.whole_buffers = model.dtype != torch.float32
        # Step 8 of the module doc; None where it does not apply or cannot be built here.
        self.kernel = (decode_kernel.load() if attention_kernel and self.prefix_reuse
                       and self._attention_source in SHARED_PREFIX_SOURCES and decode_kernel.applies(model)
                       else None)
        self.fused_step = FusedDecodeStep.for_model(model, self.kernel, packed=bool(self.packed))

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
        rows, groups = [], {}
        for i, (chat, k) in enumerate(zip(chats, sample_indices(chats), strict=True)):
            text = self.render(chat)
            row = Row(i, self.encode(text), stable_hash(settings.seed, text, k))
            rows.append(row)
            system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
            groups.setdefault(system, []).append(row)

        if self.prefix_reuse:
            clusters = [cluster for group in groups.values() for cluster in prefix_clusters(group, self.batch_size)]
        else:
            clusters = [rows] if rows else []
        for cluster in clusters:
            prefix = self.plan_prefix(cluster)
            for row in cluster:
                row.prefix = prefix
        self.stats.prefill_tokens += sum(cluster[0].prefix.length for cluster in clusters)

        bar = tqdm(total=len(rows), desc=desc or f"generate ({self.name})", unit="chat",
                   disable=not (self.progress and self.processes.is_main) or None, leave=False)

        def run(chunk: list[Row]) -> list[tuple[int, list[int]]]:
            for row in chunk:
                self.fill_prefix(row.prefix)
            done = split_on_oom(self, chunk, lambda rows: list(self._generate_chunk(rows, settings)), shrink_batch=True)
            bar.update(len(chunk))
            return [(row.index, ids) for row, ids in done]

        def cost(chunk: list[Row]) -> int:  # in tokens: the prompts' own, plus the most it may generate
            return sum(len(r.suffix) for r in chunk) + len(chunk) * settings.max_new_tokens

        outputs: list[list[int]] = [[] for _ in rows]
        with torch.inference_mode(), on_packed_weights(self.packed):
            chunks = self._chunks(clusters)
            for done in self.processes.share_work(chunks, cost, run, self.stats):
                for index, ids in done:
                    outputs[index] = ids
        bar.close()
        self.stats.calls += 1
        self.stats.prompts += len(rows)
        self.stats.seconds += time.perf_counter() - started
        return outputs

    # ---- internals -------------------------------------------------------------------------
    def plan_prefix(self, group: list[Row]) -> Prefix:
        """The rows' common token prefix (KV not computed yet: ``fill_prefix``); empty when reuse is off."""
        length = common_prefix_len([r.ids for r in group]) if self.prefix_reuse else 0
        # Every row needs at least one token of its own to produce its first logits.
        length = max(0, min([length] + [len(r.ids) - 1 for r in group]))
        return Prefix(group[0].ids[:length])

    def fill_prefix(self, prefix: Prefix) -> None:
        """Computes the prefix's KV (batch 1) unless it is empty or done. Its tokens are counted by the
        caller, once per call, however many processes compute it."""
        if prefix.length == 0 or prefix.kv is not None:
            return
        ids = torch.tensor([prefix.tokens], device=self.model.device)
        cache = DynamicCache(config=self.model.config)
        # logits_to_keep=1: the prefix's logits are never read, and the vocabulary projection is a fifth of the work.
        self.model(input_ids=ids, **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1)
        prefix.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def _chunks(self, clusters: list[list[Row]]) -> list[list[Row]]:
        """Rows cut into chunks of ``batch_size``, short suffixes first (so padding stays small). Each cluster
        fills whole chunks of its own, whose prefix attention then reads once for all rows; the rows left
        over from every cluster are pooled, so a chunk is never smaller than it must be."""
        chunks, rest = [], []
        for cluster in clusters:
            ordered = sorted(cluster, key=lambda r: len(r.suffix))
            whole = len(ordered) - len(ordered) % self.batch_size
            chunks += [ordered[i:i + self.batch_size] for i in range(0, whole, self.batch_size)]
            rest += ordered[whole:]
        rest.sort(key=lambda r: len(r.suffix))
        return chunks + [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]

    def _shared_prefix(self, chunk: list[Row]) -> Prefix | None:
        """The chunk's one prefix when every row has it and attention can read it once for all rows."""
        prefix = chunk[0].prefix
        if prefix.kv is None or any(r.prefix is not prefix for r in chunk):
            return None
        if self._attention_source not in SHARED_PREFIX_SOURCES:
            return None
        return prefix

    def _chunk_cache(self, chunk: list[Row], width: int, capacity: int, shared: Prefix | None,
                     whole: bool) -> DynamicCache:
        """A cache of ``capacity`` slots per row. With a ``shared`` prefix it holds only the rows' own tokens;
        otherwise its first ``width`` slots hold each row's group prefix, right-aligned (the slots left of a
        shorter prefix are masked out, but must hold finite numbers)."""
        cache = DynamicCache(config=self.model.config)
        template = None if shared is not None else next((r.prefix.kv for r in chunk if r.prefix.kv), None)
        if template is None:
            cache.layers = [BufferLayer(None, None, 0, capacity, whole=whole) for _ in cache.layers]
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
            layers.append(BufferLayer(keys, values, width, capacity))
        cache.layers = layers
        return cache

    def _generate_chunk(self, chunk: list[Row], settings: GenerationSettings):
        """Yields (row, generated ids) for every row of the chunk, in any order."""
        device = self.model.device
        batch = len(chunk)
        suffixes = [r.suffix for r in chunk]
        width = max(len(s) for s in suffixes)
        shared = self._shared_prefix(chunk)
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
        whole = shared is not None and self.whole_buffers
        cache = self._chunk_cache(chunk, prefix_width, capacity, shared, whole)
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
            # Ours: [batch, 1, queries, own slots], query i sitting in slot end - queries + i; with whole
            # buffers a decode step reads every slot, the unwritten ones masked.
            slots = capacity if whole and queries == 1 else end
            causal = torch.ones((queries, slots), dtype=torch.bool, device=device).tril(diagonal=end - queries)
            return valid[:, None, None, :slots] & causal

        fused = self.fused_step if whole else None
        prefix_kv = shared.shared_kv() if fused is not None else None
        with attending_to(self.model, shared, self.kernel):
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
                if fused is not None:
                    logits = fused(next_tokens, positions, cache, attention_mask(1)[:, 0, 0], prefix_kv)
                else:
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
            # The first of tied maxima, as argmax gives. A step's pick over the vocabulary was a few percent of a
            # bfloat16 step on CPU: the kernel's op where it is loaded, else max (several times faster than argmax).
            if self.kernel is not None:
                return self.kernel.argmax_rows(logits)
            return logits.max(dim=-1).indices
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            probs = _top_p_filter(probs, settings.top_p)
        picks = [torch.multinomial(p.cpu(), 1, generator=g) for p, g in zip(probs, generators, strict=True)]
        return torch.cat(picks).to(logits.device)

    # ---- log-likelihood scoring (computed in loglik.py on this engine's prefix machinery) ----------
    def loglikelihood(self, requests: Sequence, desc: str | None = None) -> list[float]:
        """For each (chat, continuation): the summed log-probability of the continuation's tokens after the
        chat rendered with the generation prompt; rows batched, the shared prefix's KV computed once."""
        return loglikelihood(self, requests, desc)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


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
