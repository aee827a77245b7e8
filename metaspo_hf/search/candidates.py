"""Search nodes (one prompt pair on one task), the log of all nodes, and beams of the best ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean

from ..scoring import WrongExample


@dataclass
class Node:
    """A (system prompt, user prompt) pair for one task, with its training score once scored."""

    id: int
    task: str
    system_prompt: str
    user_prompt: str
    parent_id: int | None
    depth: int
    iteration: int
    # How the node was made: "initial", "user_rewrite", "system_rewrite", "user_ape", "system_ape", ...
    origin: str
    train_score: float | None = None
    wrong: list[WrongExample] = field(default_factory=list)
    # Set when racing stopped scoring the node after this many training questions, because it could
    # no longer be kept or adopted (search/racing.py); its train_score then stays None.
    stopped_after: int | None = None
    # The search's updates (0 = the start) after which the node was among its task's kept prompts.
    kept_in: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "task": self.task,
            "system_prompt": self.system_prompt,
            "user_prompt": self.user_prompt,
            "parent_id": self.parent_id,
            "depth": self.depth,
            "iteration": self.iteration,
            "origin": self.origin,
            "train_score": self.train_score,
            "wrong_indices": [w.index for w in self.wrong],
            "stopped_after": self.stopped_after,
            "kept_in": self.kept_in,
        }


class NodeLog:
    """Every node made during a search, in creation order; ids are positions in this log."""

    def __init__(self):
        self.nodes: list[Node] = []

    def new(
        self,
        task: str,
        system_prompt: str,
        user_prompt: str,
        iteration: int,
        origin: str,
        parent: Node | None = None,
    ) -> Node:
        node = Node(
            id=len(self.nodes),
            task=task,
            system_prompt=system_prompt,
            user_prompt=user_prompt,
            parent_id=parent.id if parent else None,
            depth=parent.depth + 1 if parent else 0,
            iteration=iteration,
            origin=origin,
        )
        self.nodes.append(node)
        return node

    def as_dicts(self) -> list[dict]:
        return [node.to_dict() for node in self.nodes]


def best_first(nodes: list[Node]) -> list[Node]:
    """Highest training score first; ties keep the older node first (sorting is stable)."""
    return sorted(nodes, key=lambda node: -node.train_score)


def mean_score(nodes: list[Node]) -> float:
    return fmean(node.train_score for node in nodes)


@dataclass
class Beam:
    """The ``width`` best nodes seen so far for one task (or one task under one system prompt)."""

    width: int
    nodes: list[Node]

    def __post_init__(self):
        self.nodes = best_first(self.nodes)[: self.width]

    def extend(self, new: list[Node]) -> None:
        self.nodes = best_first(self.nodes + new)[: self.width]

    @property
    def best(self) -> Node:
        return self.nodes[0]


@dataclass
class BilevelState:
    """The incumbent system prompt and, for each task, the beam of user prompts scored under it."""

    system_prompt: str
    beams: dict[str, Beam]  # task name -> beam, in task order

    def nodes(self) -> list[Node]:
        return [node for beam in self.beams.values() for node in beam.nodes]

    @property
    def score(self) -> float:
        """The meta-training score: mean over tasks x kept user prompts."""
        return mean_score(self.nodes())

    def adopt(self, system_prompt: str, nodes: list[Node]) -> None:
        """Switch to ``system_prompt``, whose nodes pair it with the current user prompts."""
        width = next(iter(self.beams.values())).width
        self.system_prompt = system_prompt
        self.beams = {task: Beam(width, [n for n in nodes if n.task == task]) for task in self.beams}

    def user_prompts(self) -> dict[str, list[str]]:
        return {task: [node.user_prompt for node in beam.nodes] for task, beam in self.beams.items()}
