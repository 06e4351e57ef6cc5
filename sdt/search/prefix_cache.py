"""Prefix reuse for path search: a path's evaluation resumes from the hidden states of the longest prefix it shares
with a path already evaluated on the same input.

Every child in the CoLa tree edits its parent's path at one position, so the layers before that position run on the
same input in the same order as for a path scored before. `PrefixCache` keeps the hidden state after each prefix of
each scored path (keyed by input and prefix, least recently used dropped first, bounded in bytes) and
`PrefixReusingScorer` resumes the forward from the longest stored prefix with `LanguageModel.layer_path_states`,
which makes the same layer calls as the full forward: the log-likelihoods, hence the rewards and the whole search,
are the same bits as without reuse. Multiple-choice tasks reuse prefixes; short-answer tasks decode token by token
through the whole path and are scored without reuse.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from sdt.common.errors import UserError
from sdt.models.transformer import check_layer_path, positions_from_pad_mask
from sdt.search.tasks import PathScorer, TaskItem

Path = tuple[int, ...]


class PrefixCache:
    """Hidden states (B, T, D) after path prefixes, keyed by (input key, prefix); LRU, at most `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise UserError(f"cola.prefix_cache_mb must be >= 0, got {max_bytes / 2**20:g}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._states: OrderedDict[tuple[Hashable, Path], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def longest_prefix(self, key: Hashable, path: Path) -> tuple[int, Tensor | None]:
        """(k, state after path[:k]) for the longest stored prefix of `path` on input `key`; (0, None) if none."""
        for k in range(len(path), 0, -1):
            state = self._states.get((key, path[:k]))
            if state is not None:
                self._states.move_to_end((key, path[:k]))
                return k, state
        return 0, None

    def put(self, key: Hashable, prefix: Path, state: Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_bytes or (key, prefix) in self._states:
            return
        self._states[(key, prefix)] = state
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0


class PrefixReusingScorer(PathScorer):
    """`PathScorer` whose multiple-choice forwards resume from the longest already computed path prefix.

    `layers_run` / `layers_reused` count layer calls made and saved (one call runs every choice of an item).
    """

    def __init__(self, *args, cache_bytes: int = 512 * 2**20, batch_paths: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache = PrefixCache(cache_bytes)
        self.batch_paths = batch_paths
        self.layers_run = 0
        self.layers_reused = 0

    @staticmethod
    def input_key(item: TaskItem) -> Hashable:
        return (item.prompt, tuple(item.choices or ()))

    @torch.no_grad()
    def prefix_state(self, item: TaskItem, path: Sequence[int]) -> Tensor:
        """The hidden states (C, W, D) of the item's choice batch after running `path`, reusing stored prefixes."""
        ids, mask, _ = self._choice_inputs(item)
        path = tuple(check_layer_path(path, len(self.model.layers)))
        key = self.input_key(item)
        start, state = self.cache.longest_prefix(key, path)
        if state is None:
            state = self.model.dropout(self.model.embed_tokens(ids))  # as in LanguageModel.forward
        self.layers_reused += start
        steps = self.model.layer_path_states(
            state,
            path,
            start,
            positions=positions_from_pad_mask(mask),
            pad_mask=mask,
            routing=self.routing or "topk",  # forward's default without a cache
            diagnostics=False,
        )
        for step, state in enumerate(steps, start=start):
            self.layers_run += 1
            self.cache.put(key, path[: step + 1], state)
        return state

    @torch.no_grad()
    def choice_loglikelihoods(self, item: TaskItem, path: Sequence[int] | None) -> list[float]:
        _, _, conts = self._choice_inputs(item)
        path = range(len(self.model.layers)) if path is None else path
        keep = max(len(c) for c in conts) + 1
        state = self.prefix_state(item, path)
        logits = self.model.lm_head(self.model.norm(state)[:, -keep:])  # as in LanguageModel.forward
        return self._choice_scores(logits, conts)

    @torch.no_grad()
    def loglikelihoods_many(self, item: TaskItem, paths: Sequence[Sequence[int]]) -> list[list[float]]:
        """`choice_loglikelihoods` of many paths on one item, each shared prefix run once.

        The paths form a trie over layer calls; its edges are run in stacked batches of up to `batch_paths` states
        (each state is the item's (C, W, D) choice batch) that call the same layer, the most widely needed layer
        first. Used where a set of paths is known in advance (the router's candidates); the search asks for one
        path at a time. A dense layer computes each row of a stacked batch with the same bits as alone; a routed
        layer's token selection can change the shapes of its matmuls (and the last bits), so routed models run one
        state at a time.
        """
        ids, mask, conts = self._choice_inputs(item)
        keep = max(len(c) for c in conts) + 1
        key = self.input_key(item)
        wanted = {tuple(check_layer_path(p, len(self.model.layers))) for p in paths}
        children: dict[Path, set[int]] = {}
        frontier: dict[Path, Tensor] = {}  # trie nodes whose state is known and which still have children to run
        done: dict[Path, Tensor] = {}  # requested path -> final state
        for path in sorted(wanted):
            start, state = self.cache.longest_prefix(key, path)
            self.layers_reused += start
            if state is None:
                state = self.model.dropout(self.model.embed_tokens(ids))  # as in LanguageModel.forward
            if start == len(path):
                done[path] = state
                continue
            frontier.setdefault(path[:start], state)
            for step in range(start, len(path)):
                children.setdefault(path[:step], set()).add(path[step])
        pending = [(node, layer) for node in sorted(frontier) for layer in sorted(children[node])]
        positions = positions_from_pad_mask(mask)
        stack = 1 if self.model.is_routed else max(1, self.batch_paths)
        while pending:
            counts: dict[int, int] = {}
            for _, layer in pending:
                counts[layer] = counts.get(layer, 0) + 1
            layer = max(counts, key=lambda i: (counts[i], -i))
            group = [edge for edge in pending if edge[1] == layer][:stack]
            pending = [edge for edge in pending if edge not in group]
            n = len(group)
            (out,) = self.model.layer_path_states(
                torch.cat([frontier[node] for node, _ in group]),
                [layer],
                0,
                positions=positions.repeat(n, 1),
                pad_mask=mask.repeat(n, 1),
                routing=self.routing or "topk",
                diagnostics=False,
            )
            self.layers_run += n
            for (node, _), state in zip(group, out.split(ids.size(0)), strict=True):
                child, state = node + (layer,), state.clone()  # its own storage, for the cache's byte count
                self.cache.put(key, child, state)
                if child in wanted:
                    done[child] = state
                if children.get(child):
                    frontier[child] = state
                    pending += [(child, nxt) for nxt in sorted(children[child])]
        out_scores = {}
        for path, state in done.items():
            logits = self.model.lm_head(self.model.norm(state)[:, -keep:])  # as in LanguageModel.forward
            out_scores[path] = self._choice_scores(logits, conts)
        return [out_scores[tuple(p)] for p in paths]

    def correct_many(self, item: TaskItem, paths: Sequence[Sequence[int]]) -> list[bool]:
        """Correctness of each path on one item (multiple choice: batched, each shared prefix run once)."""
        if self.task.kind != "multiple_choice":
            return [self.correct(item, p) for p in paths]
        out = []
        for scores in self.loglikelihoods_many(item, paths):
            out.append(max(range(len(scores)), key=scores.__getitem__) == item.answer)
        return out
