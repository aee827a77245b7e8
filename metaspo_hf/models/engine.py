"""The transformers generation engine: chats in, texts out, batched, with shared-prefix KV reuse.

How a call is generated (and why it matches plain batched ``generate`` token for token):

1. Chats are rendered through the tokenizer's chat template and tokenized.
2. Rows that share a system prompt form a group; the group's longest common token prefix (at least
   the rendered system turn) is run through the model once, batch size 1.
3. Rows of all groups are sorted by length and cut into chunks of ``batch_size`` (so padding stays
   small and decode steps are shared by as many rows as possible, whatever their system prompt).
   Each row is laid out as ``[pads][its group's prefix][pads][its own suffix]``; the chunk's cache
   holds each row's group prefix (an expanded view when the chunk has one group, no copy).
   Positions come from the attention mask's cumulative sum, exactly as ``generate`` computes them
   for left padding, so every real token sees the same keys at the same positions as in
   ``[pads][prefix][suffix]``.
4. Decoding runs our own loop: rows that finish (EOS, a stop string, or ``max_new_tokens``) are
   dropped from the batch and the cache, so they stop costing decode steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
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
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.prefix_reuse = prefix_reuse and _cache_is_plain(model)
        self.progress = progress
        self.stats = EngineStats()
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)

    # ---- rendering -------------------------------------------------------------------------
    def render(self, chat: Chat) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already holds the special tokens (BOS etc.); adding them again would differ
        # from what the model was trained on.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- public API ------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None) -> list[str]:
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

        outputs: list[str] = [""] * len(rows)
        bar = tqdm(total=len(rows), desc=desc or f"generate ({self.name})", unit="chat",
                   disable=not self.progress or None, leave=False)
        with torch.inference_mode():
            for group in groups.values():
                prefix = self._prefill_prefix(group)
                for row in group:
                    row.prefix = prefix
            pending = sorted(rows, key=lambda r: len(r.suffix))
            while pending:
                chunk, pending = pending[:self.batch_size], pending[self.batch_size:]
                for row, text in self._generate_chunk_or_split(chunk, settings):
                    outputs[row.index] = text
                bar.update(len(chunk))
        bar.close()
        self.stats.calls += 1
        self.stats.prompts += len(rows)
        self.stats.seconds += time.perf_counter() - started
        return outputs

    # ---- internals -------------------------------------------------------------------------
    def _prefill_prefix(self, group: list[_Row]) -> _Prefix:
        """KV of the group's common token prefix (batch 1); empty when reuse is off."""
        length = _common_prefix_len([r.ids for r in group]) if self.prefix_reuse else 0
        # Every row needs at least one token of its own to produce its first logits.
        length = min([length] + [len(r.ids) - 1 for r in group])
        if length <= 0:
            return _Prefix(0, None)
        ids = torch.tensor([group[0].ids[:length]], device=self.model.device)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        self.stats.prefill_tokens += length
        return _Prefix(length, [(layer.keys, layer.values) for layer in cache.layers])

    def _chunk_cache(self, chunk: list[_Row], width: int) -> DynamicCache:
        """A cache whose row b holds row b's group prefix, right-aligned in ``width`` slots."""
        cache = DynamicCache(config=self.model.config)
        prefixes = list({id(r.prefix): r.prefix for r in chunk if r.prefix.kv is not None}.values())
        if not prefixes:
            return cache
        batch = len(chunk)
        if len(prefixes) == 1 and all(r.prefix is prefixes[0] for r in chunk) and prefixes[0].length == width:
            # One shared prefix: expand() is a view, so the rows share one copy until the first append.
            layers = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefixes[0].kv]
        else:
            layers = self._gathered_prefixes(chunk, width)
        for layer, (keys, values) in zip(cache.layers, layers):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return cache

    def _gathered_prefixes(self, chunk: list[_Row], width: int) -> list:
        """Per layer, a [batch, heads, width, dim] copy holding each row's prefix after left zero-padding
        (the padding is masked out); rows without a prefix get padding only."""
        template = next(r.prefix.kv for r in chunk if r.prefix.kv is not None)
        layers = []
        for layer_index, (k0, _) in enumerate(template):
            empty = k0.new_zeros((1, k0.shape[1], width, k0.shape[3]))
            keys, values = [], []
            for row in chunk:
                if row.prefix.kv is None:
                    keys.append(empty)
                    values.append(empty)
                    continue
                k, v = row.prefix.kv[layer_index]
                pad = (0, 0, width - row.prefix.length, 0)
                keys.append(torch.nn.functional.pad(k, pad))
                values.append(torch.nn.functional.pad(v, pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        return layers

    def _generate_chunk_or_split(self, chunk: list[_Row], settings: GenerationSettings):
        """On CUDA out-of-memory, halve the batch (for this and later chunks) and retry the halves.

        Sampling draws from per-row generators, so splitting a batch never changes what a row gets.
        """
        try:
            return list(self._generate_chunk(chunk, settings))
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.stats.oom_retries += 1
            self.batch_size = max(1, len(chunk) // 2)
            half = len(chunk) // 2
            return (self._generate_chunk_or_split(chunk[:half], settings)
                    + self._generate_chunk_or_split(chunk[half:], settings))

    def _generate_chunk(self, chunk: list[_Row], settings: GenerationSettings):
        """Yields (row, text) for every row of the chunk, in any order."""
        device = self.model.device
        batch = len(chunk)
        prefix_width = max(r.prefix.length for r in chunk)
        suffixes = [r.suffix for r in chunk]
        width = max(len(s) for s in suffixes)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, prefix_width + width), dtype=torch.long)
        for b, (row, suffix) in enumerate(zip(chunk, suffixes)):
            mask[b, prefix_width - row.prefix.length:prefix_width] = 1
            input_ids[b, width - len(suffix):] = torch.tensor(suffix)
            mask[b, prefix_width + width - len(suffix):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_width:]
        cache = self._chunk_cache(chunk, prefix_width)
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)

        generators = None
        if not settings.greedy:
            generators = [torch.Generator().manual_seed(r.seed % (2**63)) for r in chunk]
        active = list(range(batch))  # chunk indices still decoding, aligned with the batch rows
        new_tokens: list[list[int]] = [[] for _ in chunk]
        stop_tail = max((len(s) for s in settings.stop), default=0)

        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits[:, -1, :]
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
                mask, next_tokens, positions = mask[index], next_tokens[index], positions[index]
                active = [active[s] for s in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]

        for row, tokens in zip(chunk, new_tokens):
            yield row, cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)

    def _hit_stop(self, tokens: list[int], stops: tuple[str, ...], tail_chars: int) -> bool:
        if not stops:
            return False
        # Decoding only the last few tokens is enough to see a stop string that just completed.
        tail = self.tokenizer.decode(tokens[-(tail_chars + 4):], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @staticmethod
    def _pick(logits: torch.Tensor, settings: GenerationSettings, generators) -> torch.Tensor:
        if settings.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            probs = _top_p_filter(probs, settings.top_p)
        picks = [torch.multinomial(p.cpu(), 1, generator=g) for p, g in zip(probs, generators)]
        return torch.cat(picks).to(logits.device)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


def _common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        n = 0
        while n < length and seq[n] == first[n]:
            n += 1
        length = n
    return length


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
