"""The shared prefix of a group of rows: its KV computed once, read by every row through an attention
that scores all rows' queries against one copy; and the KV buffers a chunk's rows decode into.

Used by the generation engine (engine.py) and by log-likelihood scoring (loglik.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward


@dataclass
class Prefix:
    """A group's common leading tokens. Their KV is computed once, when a chunk first needs it
    (``HFEngine.fill_prefix``): with several processes, only by those that run a chunk of the group."""

    tokens: list[int]
    kv: list | None = None  # per layer (keys, values) of shape [1, heads, length, dim]; None until computed

    @property
    def length(self) -> int:
        return len(self.tokens)

    def shared_kv(self) -> list:
        """Per layer (keys, values) of shape [kv_heads, length, dim]: what every row of a chunk reads."""
        return [(keys[0], values[0]) for keys, values in self.kv]


@dataclass
class Row:
    index: int  # position in the caller's list
    ids: list[int]  # full rendered prompt tokens
    seed: int  # sampling seed of this row (unused when greedy)
    prefix: Prefix | None = None

    @property
    def suffix(self) -> list[int]:
        return self.ids[self.prefix.length:]


# Per layer (keys, values) of shape [kv_heads, length, dim]: the prefix shared by every row of the chunk
# being generated, read by ``_shared_prefix_attention``; and the decode kernel it may use (decode_kernel.py).
_shared_prefix_kv: ContextVar[list | None] = ContextVar("shared_prefix_kv", default=None)
_decode_kernel: ContextVar[object | None] = ContextVar("decode_kernel", default=None)
_SHARED_PREFIX_ATTENTION = "metaspo_shared_prefix"
# The implementations it stands in for (its math is theirs); flash-attention kernels are left alone.
SHARED_PREFIX_SOURCES = ("sdpa", "eager")
# Its own prefill holds all scores at once, where SDPA works in tiles; past 2**22 (16 MB in float32 per layer,
# e.g. 32 rows x 9 heads x 50 queries x 250 keys) that memory traffic costs more than copying the prefix in
# front of every row for SDPA, so a longer prefill does that (its decode steps still read the one copy).
SHARED_PREFIX_MAX_SCORES = 2**22
# A cluster's prefix must be this many tokens longer than its group's: a few words that many questions begin
# with would otherwise cut whole chunks of one user prompt into smaller, mixed ones to save a token or two.
CLUSTER_MIN_GAIN = 8


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of each row over [the shared prefix] + [its own tokens], the prefix read once for all rows.

    Copying the prefix into every row (what a batched cache holds) makes each decode step read it once per
    row; here its scores come from one matmul of all rows' queries against it. ``attention_mask`` covers
    the row's own tokens only ([batch, 1, queries, own slots], True = attend); the prefix is visible to all.
    A one-token decode step runs on the C++ kernel where the engine gave one (bfloat16 on CPU).
    """
    prefix_keys, prefix_values = _shared_prefix_kv.get()[module.layer_idx]
    kernel = _decode_kernel.get()
    if kernel is not None and query.shape[2] == 1:
        batch, heads, _, dim = query.shape
        out = kernel.decode_attention(query.reshape(batch, heads, dim), prefix_keys, prefix_values, key, value,
                                      attention_mask[:, 0, 0], dim ** -0.5 if scaling is None else scaling)
        return out.view(batch, 1, heads, dim), None
    # A whole-buffer layer hands over all its slots; the mask's width says how many are read (see BufferLayer).
    key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    batch, heads, queries, dim = query.shape
    length = prefix_keys.shape[1]
    if queries > 1 and batch * heads * queries * (length + key.shape[2]) > SHARED_PREFIX_MAX_SCORES:
        return _attention_on_copies(module, query, key, value, attention_mask, prefix_keys, prefix_values, scaling)
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
    prefix_probs = probs[..., :length].transpose(0, 1).reshape(kv_heads, batch * group, length)
    out = torch.matmul(prefix_probs, prefix_values).view(kv_heads, batch, group, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., length:], value)
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous(), None


def _attention_on_copies(module, query, key, value, attention_mask, prefix_keys, prefix_values, scaling):
    """A long prefill: every row gets its own copy of the prefix in front of its tokens, and SDPA (which
    works in tiles) attends over both, as if the rows' cache held the prefix."""
    batch, _, queries, _ = query.shape
    keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
    visible = attention_mask.new_ones((batch, 1, queries, prefix_keys.shape[1]))
    mask = torch.cat([visible, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, keys, values, mask, scaling=scaling)


AttentionInterface.register(_SHARED_PREFIX_ATTENTION, _shared_prefix_attention)


@contextmanager
def attending_to(model, prefix: Prefix | None, decode_kernel=None):
    """Within the block, the model's attention reads ``prefix`` as every row's shared prefix (no-op for None),
    its decode steps on ``decode_kernel`` where given."""
    if prefix is None:
        yield
        return
    previous = model.config._attn_implementation
    token = _shared_prefix_kv.set(prefix.shared_kv())
    kernel_token = _decode_kernel.set(decode_kernel)
    model.config._attn_implementation = _SHARED_PREFIX_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _decode_kernel.reset(kernel_token)
        _shared_prefix_kv.reset(token)


def prefix_clusters(rows: list[Row], min_rows: int) -> list[list[Row]]:
    """One group's rows cut into clusters that each share a prefix at least ``CLUSTER_MIN_GAIN`` tokens longer
    than the group's, such as the questions of one user prompt among several under one system prompt; the
    rows in no cluster stay together on the group's prefix. Only sets of ``min_rows`` rows (a chunk) become
    clusters: a prefix of its own pays when whole chunks read it as one copy, where a mixed chunk copies each
    row's prefix in front of it. Clusters are cut again the same way; each keeps the caller's order."""
    if len(rows) < 2:
        return [rows] if rows else []
    ordered = sorted(rows, key=lambda r: r.ids)
    found = _clusters(ordered, common_prefix_len([ordered[0].ids, ordered[-1].ids]), min_rows)
    if not found:
        return [rows]
    position = {id(row): i for i, row in enumerate(rows)}
    return [sorted(cluster, key=lambda r: position[id(r)]) for cluster in _with_the_rest(found, rows)]


def _clusters(ordered: list[Row], base: int, min_rows: int) -> list[list[Row]]:
    """The clusters among rows sorted by tokens that share more than ``base`` tokens with each other; rows of
    none are left out. Sorted, a set of rows with a longer common prefix sits side by side, and the common
    prefix of a sorted range is that of its first and last rows."""
    if len(ordered) < max(min_rows, 2):  # one row shares nothing
        return []
    shared = common_prefix_len([ordered[0].ids, ordered[-1].ids])
    if shared - base >= CLUSTER_MIN_GAIN:
        inner = [c for run in _runs(ordered, shared) for c in _clusters(run, shared, min_rows)]
        return _with_the_rest(inner, ordered)
    return [c for run in _runs(ordered, shared) for c in _clusters(run, base, min_rows)]


def _with_the_rest(clusters: list[list[Row]], rows: list[Row]) -> list[list[Row]]:
    """``clusters``, then the rows of ``rows`` in none of them as one more (if any)."""
    taken = {id(row) for cluster in clusters for row in cluster}
    rest = [row for row in rows if id(row) not in taken]
    return clusters + ([rest] if rest else [])


def _runs(ordered: list[Row], shared: int) -> list[list[Row]]:
    """Sorted rows cut where neighbours share only the ``shared`` tokens that all of them share."""
    runs, start = [], 0
    for i in range(1, len(ordered)):
        if common_prefix_len([ordered[i - 1].ids, ordered[i].ids]) == shared:
            runs.append(ordered[start:i])
            start = i
    return runs + [ordered[start:]]


def common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        n = 0
        while n < length and seq[n] == first[n]:
            n += 1
        length = n
    return length


class BufferLayer(DynamicLayer):
    """One layer's keys and values in buffers allocated once per chunk: a decode step writes its token
    in place, where the default layer concatenates (copying the whole cache at every step).

    ``whole=True`` (for ``_shared_prefix_attention`` only): ``update`` returns the whole buffers, zeroed
    when allocated, and the attention mask covers every slot, the unwritten ones masked. On CPU a bfloat16
    matmul copies a strided view (the first ``length`` slots) in every layer at every step; a float32 one
    reads it in place, and there the extra slots only cost (figures: docs/benchmarks.md, W3).
    """

    def __init__(self, keys, values, length: int, capacity: int, whole: bool = False):
        super().__init__()
        self.buffers = (keys, values)
        self.length = length
        self.capacity = capacity
        self.whole = whole
        if keys is not None:
            self._set_views()

    def lazy_initialization(self, key_states, value_states) -> None:
        shape = (key_states.shape[0], key_states.shape[1], self.capacity, key_states.shape[3])
        # Masked slots get probability 0, and 0 times leftover memory can be NaN: whole buffers start at 0.
        allocate = torch.zeros if self.whole else torch.empty
        self.buffers = tuple(allocate(shape, dtype=states.dtype, device=states.device)
                             for states in (key_states, value_states))
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
        return self.buffers if self.whole else (self.keys, self.values)

    def advance(self, tokens: int) -> None:
        """Counts ``tokens`` written into the buffers in place by someone else (the fused decode step)."""
        self.length += tokens
        self._set_views()

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffers = tuple(buffer[indices] for buffer in self.buffers)
            self._set_views()
