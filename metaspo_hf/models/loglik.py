"""Log-likelihood of continuations after chats, on the generation engine's shared-prefix machinery.

A request is ``(chat, continuation)``. The chat is rendered with the generation prompt and tokenized
exactly as for generation; the continuation is tokenized on its own (as the model would emit it) and
appended. The result is the sum over the continuation's tokens of log p(token | everything before it),
in float32 from the model's logits: the same number as ``log_softmax(model(full_ids).logits)``
summed over the continuation's positions, up to the order of floating-point sums.

How a call is computed (``HFEngine.loglikelihood``):

1. Requests are grouped by rendered context: each distinct context is one *row* holding its distinct
   continuations (typically the options of one question). Repeated requests are computed once.
2. Rows sharing a system prompt form a group, and rows of one user prompt clusters within it, as in
   generation (``prefix.prefix_clusters``); each cluster's common token prefix is run through the model
   once (``HFEngine.plan_prefix``, ``fill_prefix``), stopping at least one token before the end of every
   context (the last context token's logits predict each continuation's first token).
3. A row is packed as ``[pads][its own context tokens][its continuations' tokens]``, the continuations
   laid out as a token trie (a prefix they share, such as ``<answer>``, is computed once): each token
   attends to the prefix, the row's context and its ancestors in the trie only (a tree mask), and its
   position is the context's length plus its depth. One forward pass scores every option of a question
   while computing the question's tokens once, not once per option.
4. A chunk holds rows of one cluster, as many as fit ``batch_size`` and a bound on the attention scores
   held at once; attention reads the prefix once for all rows (``prefix.py``), and
   the vocabulary projection runs on the last positions only (where the continuations are).
5. Without prefix reuse (the engine's ``prefix_reuse`` off, a cache with sliding-window layers, a group
   with no common prefix) or with another attention implementation than sdpa/eager (e.g. flash
   attention, which takes no tree mask), each (context, continuation) is one left-padded sequence through
   the model's own attention instead: the same numbers, more tokens computed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .base import LoglikRequest
from .batching import split_on_oom
from .packed import on_packed_weights
from .prefix import SHARED_PREFIX_SOURCES, Prefix, Row, attending_to, prefix_clusters

# Attention scores one packed chunk may hold at once (rows x heads x queries x keys): 64 MB per layer in
# float32. Scores of one whole row are always allowed, however long it is.
_MAX_SCORES = 2**24


@dataclass
class _Context:
    """One distinct rendered context and the distinct continuations asked after it."""

    row: Row  # ids: the rendered context's tokens
    continuations: list[list[int]] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)  # continuation text -> its index
    results: list[float] = field(default_factory=list)
    # The continuations as a token trie: (token, parent node or -1 for the context's end) per node, in
    # creation order (a parent always comes before its children); and each continuation's nodes.
    nodes: list[tuple[int, int]] = field(default_factory=list)
    paths: list[list[int]] = field(default_factory=list)
    _children: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, text: str, ids: list[int]) -> int:
        """The index of continuation ``text`` (tokens ``ids``), added to the trie if new."""
        k = self.texts.get(text)
        if k is not None:
            return k
        k = self.texts[text] = len(self.continuations)
        self.continuations.append(ids)
        self.results.append(0.0)
        path, parent = [], -1
        for token in ids:
            node = self._children.get((parent, token))
            if node is None:
                node = self._children[(parent, token)] = len(self.nodes)
                self.nodes.append((token, parent))
            path.append(node)
            parent = node
        self.paths.append(path)
        return k

    @property
    def own(self) -> list[int]:
        return self.row.suffix

    @property
    def packed_length(self) -> int:
        return len(self.own) + len(self.nodes)


def loglikelihood(engine, requests: Sequence[LoglikRequest], desc: str | None = None) -> list[float]:
    """``engine.loglikelihood``: see the module doc."""
    started = time.perf_counter()
    contexts: dict[str, _Context] = {}
    groups: dict[str | None, list[_Context]] = {}
    where: list[tuple[_Context, int]] = []
    for chat, continuation in requests:
        text = engine.render(chat)
        context = contexts.get(text)
        if context is None:
            context = contexts[text] = _Context(Row(len(contexts), engine.encode(text), 0))
            system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
            groups.setdefault(system, []).append(context)
        k = context.texts.get(continuation)
        if k is None:
            k = context.add(continuation, engine.encode(continuation) if continuation else [])
        where.append((context, k))

    packed = engine.prefix_reuse and engine._attention_source in SHARED_PREFIX_SOURCES
    # Work units, as one process runs them: (prefix, contexts) for packed chunks on a shared prefix,
    # (None, [(context, continuation index), ...]) for plain batches.
    units: list[tuple[Prefix | None, list]] = []
    rows = list(contexts.values())
    for group in groups.values():
        clusters = ([[rows[row.index] for row in cluster]
                     for cluster in prefix_clusters([c.row for c in group], engine.batch_size)] if packed else [group])
        for cluster in clusters:
            prefix = engine.plan_prefix([c.row for c in cluster]) if packed else Prefix([])
            for context in cluster:
                context.row.prefix = prefix
            engine.stats.prefill_tokens += prefix.length
            if prefix.length:
                units += [(prefix, chunk) for chunk in _packed_chunks(engine, cluster, prefix)]
            else:
                items = sorted(((c, k) for c in cluster for k, ids in enumerate(c.continuations) if ids),
                               key=lambda item: len(item[0].row.ids) + len(item[0].continuations[item[1]]))
                units += [(None, items[start:start + engine.batch_size])
                          for start in range(0, len(items), engine.batch_size)]

    bar = tqdm(total=len(units), desc=desc or f"loglik ({engine.name})", unit="batch",
               disable=not (engine.progress and engine.processes.is_main) or None, leave=False)

    def run(unit: tuple[Prefix | None, list]) -> list[tuple[int, int, float]]:
        prefix, chunk = unit
        if prefix is not None:
            engine.fill_prefix(prefix)
            split_on_oom(engine, chunk, lambda rows: _score_packed(engine, rows, prefix) or [])
            scored = [(c, k) for c in chunk for k in range(len(c.continuations))]
        else:
            split_on_oom(engine, chunk, lambda items: _score_plain(engine, items) or [])
            scored = chunk
        bar.update(1)
        return [(c.row.index, k, c.results[k]) for c, k in scored]

    def cost(unit: tuple[Prefix | None, list]) -> int:  # in tokens
        prefix, chunk = unit
        if prefix is not None:
            return sum(c.packed_length for c in chunk)
        return sum(len(c.row.ids) + len(c.continuations[k]) for c, k in chunk)

    with torch.inference_mode(), on_packed_weights(engine.packed):
        for done in engine.processes.share_work(units, cost, run, engine.stats):
            for index, k, value in done:
                rows[index].results[k] = value
    bar.close()
    engine.stats.calls += 1
    engine.stats.scored_continuations += sum(len(c.continuations) for c in contexts.values())
    engine.stats.seconds += time.perf_counter() - started
    return [context.results[k] for context, k in where]


def _packed_chunks(engine, group: list[_Context], prefix: Prefix) -> list[list[_Context]]:
    """Rows by packed length (short first, so padding stays small), cut at ``batch_size`` rows or when the
    attention scores of the chunk would pass ``_MAX_SCORES``."""
    heads = engine.model.config.get_text_config().num_attention_heads
    chunks: list[list[_Context]] = []
    for context in sorted(group, key=lambda c: c.packed_length):
        width = context.packed_length  # the longest row so far: rows are sorted
        if chunks and len(chunks[-1]) < engine.batch_size and \
                (len(chunks[-1]) + 1) * heads * width * (prefix.length + width) <= _MAX_SCORES:
            chunks[-1].append(context)
        else:
            chunks.append([context])
    return chunks


def _score_packed(engine, chunk: list[_Context], prefix: Prefix) -> None:
    """One forward pass for the chunk's rows, each packed with all its continuations on top of ``prefix``."""
    batch = len(chunk)
    lengths = [c.packed_length for c in chunk]
    width = max(lengths)
    # Logits are kept for the last ``tail`` slots: every row's trie and its last context token.
    tail = max(1 + len(c.nodes) for c in chunk)
    ids = torch.full((batch, width), engine.pad_id, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    # [row, query slot, key slot], True = attend; the prefix is visible to every slot.
    mask = torch.zeros((batch, width, width), dtype=torch.bool)
    rows, slots, targets, owners = [], [], [], []  # one entry per scored token
    for b, context in enumerate(chunk):
        start = width - lengths[b]
        own = context.own
        end = start + len(own)
        ids[b, start:end] = torch.tensor(own)
        positions[b, start:end] = torch.arange(prefix.length, prefix.length + len(own))
        mask[b, start:end, start:end] = torch.ones((len(own), len(own)), dtype=torch.bool).tril()
        depth = []
        for node, (token, parent) in enumerate(context.nodes):
            slot = end + node
            ids[b, slot] = token
            depth.append(1 if parent < 0 else depth[parent] + 1)
            positions[b, slot] = prefix.length + len(own) + depth[node] - 1
            # A node sees the context, its ancestors (its parent's view) and itself.
            mask[b, slot] = mask[b, end - 1] if parent < 0 else mask[b, end + parent]
            mask[b, slot, slot] = True
        for k, path in enumerate(context.paths):
            if not path:
                continue
            # Each token is predicted by the logits of the slot before it: the last context token first.
            rows += [b] * len(path)
            slots += [end - 1] + [end + node for node in path[:-1]]
            targets += context.continuations[k]
            owners += [(context, k)] * len(path)
    device = engine.model.device
    with attending_to(engine.model, prefix):
        logits = engine.model(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                              position_ids=positions.to(device), use_cache=False, logits_to_keep=tail).logits
    engine.stats.prefill_tokens += sum(lengths)  # counted once the pass succeeded (not again on an OOM retry)
    _collect(logits, rows, [s - (width - tail) for s in slots], targets, owners)


def _score_plain(engine, items: list[tuple[_Context, int]]) -> None:
    """Each (context, continuation) as one left-padded full sequence through the model's own attention."""
    sequences = [context.row.ids + context.continuations[k] for context, k in items]
    width = max(map(len, sequences))
    tail = 1 + max(len(context.continuations[k]) for context, k in items)
    ids = torch.full((len(items), width), engine.pad_id, dtype=torch.long)
    valid = torch.zeros((len(items), width), dtype=torch.bool)
    rows, slots, targets, owners = [], [], [], []
    for b, (sequence, (context, k)) in enumerate(zip(sequences, items, strict=True)):
        ids[b, width - len(sequence):] = torch.tensor(sequence)
        valid[b, width - len(sequence):] = True
        n = len(context.continuations[k])
        rows += [b] * n
        slots += list(range(width - n - 1, width - 1))
        targets += context.continuations[k]
        owners += [(context, k)] * n
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    device = engine.model.device
    logits = engine.model(input_ids=ids.to(device), attention_mask=valid.long().to(device),
                          position_ids=positions.to(device), use_cache=False, logits_to_keep=tail).logits
    engine.stats.prefill_tokens += sum(map(len, sequences))
    _collect(logits, rows, [s - (width - tail) for s in slots], targets, owners)


def _collect(logits: torch.Tensor, rows: list[int], columns: list[int], targets: list[int], owners: list) -> None:
    """Adds each scored token's log-probability to its (context, continuation)'s result."""
    if not rows:
        return
    device = logits.device
    picked = logits[torch.tensor(rows, device=device), torch.tensor(columns, device=device)].float()
    logprobs = picked.log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    for (context, k), value in zip(owners, logprobs.tolist(), strict=True):
        context.results[k] += value
