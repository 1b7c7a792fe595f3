"""The planner's stack of transformer blocks: every block's forward and backward in training,
as the activation levers lay them out, replayed at a cost that does not grow with the number of
layers. Pure Python: no torch import.

`runs` describes the stack: with `memory.checkpointing` and `memory.checkpoint_every=k`, blocks
0, k, 2k, ... are checkpointed (`checkpointed_blocks`, the rule `fitgpt.model.checkpointing`
applies) and the stack is q = L // k identical periods (one checkpointed block, then k - 1
saving ones) and the rest; without checkpointing, L saving blocks; with k = 1, L checkpointed
ones. A run of n identical items (blocks, or periods) is replayed as its first and last one by
one and the n - 2 in between in one go (`Timeline.repeated`, which nests): the peak of a run of
identical steps is at its first or its last step (see `fitgpt.planner.timeline`). The forward
leaves a record per item (`Saved`, `Kept`, `Group`) that the backward walks back.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

from fitgpt.planner import blocks
from fitgpt.planner.blocks import Blocks, Host
from fitgpt.planner.timeline import merge, split


def checkpointed_blocks(n_layer: int, every: int) -> list[bool]:
    """Which blocks `memory.checkpoint_every=every` checkpoints: blocks 0, every, 2 x every, ...
    (fitgpt.model.checkpointing.checkpointed, the rule the model applies)."""
    return [i % every == 0 for i in range(n_layer)]


def runs(n_layer: int, checkpointing: bool, every: int = 1) -> list[tuple]:
    """The stack as runs of identical items: [(item, how many in a row)], an item being a block
    (True: checkpointed, False: saving) or a period, itself a list of runs."""
    if not checkpointing:
        return [(False, n_layer)]
    if every == 1:
        return [(True, n_layer)]
    q, rem = divmod(n_layer, every)
    out: list[tuple] = [([(True, 1), (False, every - 1)], q)] if q else []
    if rem:
        out.append(([(True, 1)] + ([(False, rem - 1)] if rem > 1 else []), 1))
    return out


@dataclass
class Saved:
    """A block that saved its activations (by name) for backward."""

    sv: dict


@dataclass
class Kept:
    """A checkpointed block: only its input was kept."""

    x: tuple


@dataclass
class Group:
    """Records in forward order, standing for `k` identical repetitions of them."""

    items: list = field(default_factory=list)
    k: int = 1


class Stack(Blocks):
    """The blocks of a training step (and of an evaluation) on a timeline."""

    def forward_train(self, x, plan: list[tuple]) -> tuple[list, list, tuple]:
        """Every block's forward in training, as `runs` laid out the stack: (records for
        `backward_train`, the autocast weight copies cached by the checkpointed blocks, the
        output)."""
        records, cache = [], []
        for item, n in plan:
            recs, ca, x = self._replay(x, item, n)
            records += recs
            cache += ca
        return records, cache, x

    def _replay(self, x, item, n: int) -> tuple[list, list, tuple]:
        """n identical items in a row: one by one, or the first and the last one by one and the
        n - 2 in between in one go (the inputs of all but the first of those are outputs of the
        one before, inside the repetition)."""
        if n <= blocks.EXPLICIT_LAYERS:
            recs, cache = [], []
            for _ in range(n):
                rec, ca, x = self._item(x, item)
                recs.append(rec)
                cache += ca
            return recs, cache, x
        first, c1, x1 = self._item(x, item)
        with self.tl.repeated(n - 2):
            mid, cm, out = self._item(x1, item)
        out, rest = split(out, n - 2)
        self._adopt(mid, rest)
        last, c3, x = self._item(out, item)
        return [first, Group([mid], n - 2), last], c1 + cm + c3, x

    def _item(self, x, item) -> tuple:
        """One block (True: checkpointed, False: saving) or one period (a list of runs)."""
        if isinstance(item, list):
            recs, cache, x = self.forward_train(x, item)
            return Group(recs), cache, x
        if item:
            _, ws, out = self.forward(False, x)
            return Kept(x), ws, out
        sv, _, out = self.forward(True, x, offload=self.offload)
        if self.offload:  # the block has returned: its input is no longer referenced
            self._offloading = True
            sv["x_in"] = self.done(True, x, 4 * self.N * self.s.n_embd)
            self._offloading = False
        return Saved(sv), [], out

    def _adopt(self, rec, rest) -> None:
        """The inputs of the other repetitions of rec (the outputs `rest` of the ones before)
        join its first block's input, or follow it to host memory."""
        while isinstance(rec, Group):
            rec = rec.items[0]
        if isinstance(rec, Kept):
            rec.x = merge(rec.x, rest)
        elif isinstance(rec.sv["x_in"], Host):
            self._offloading = True
            self.done(True, rest, rec.sv["x_in"].nbytes)
            self._offloading = False
        else:
            rec.sv["x_in"] = merge(rec.sv["x_in"], rest)

    def backward_train(self, records: list, g_res, grads: list, exist: bool):
        """Backward through every block, last first; a checkpointed block's forward is replayed
        with saving first, from its kept input (it never offloads). Returns the input's
        gradient."""
        for rec in reversed(records):
            g_res = self._backward_record(rec, g_res, grads, exist)
        return g_res

    def _backward_record(self, rec, g_res, grads: list, exist: bool):
        if isinstance(rec, Group):
            with self.tl.repeated(rec.k) if rec.k > 1 else nullcontext():
                g = self.backward_train(rec.items, g_res, grads, exist)
            if rec.k > 1:
                g, rest = split(g, rec.k)
                self.tl.free(rest)
            return g
        sv = rec.sv if isinstance(rec, Saved) else None
        if sv is None:
            sv, _, out = self.forward(True, rec.x)
            self.tl.free(out)
        return self.backward(sv, g_res, grads, exist)

    def forward_no_grad(self, x) -> tuple[list, tuple]:
        """Every block's forward saving nothing, each block's input freed after the block
        (evaluation): (the autocast weight copies cached, the output)."""
        cache = []
        L = self.s.n_layer
        for k in ([1] * L if L <= blocks.EXPLICIT_LAYERS else [1, L - 2, 1]):
            if k == 1:
                _, ws, out = self.forward(False, x)
                rest = None
            else:
                with self.tl.repeated(k):
                    _, ws, out = self.forward(False, x)
                out, rest = split(out, k)
            cache += ws
            self.tl.free(x, *([rest] if rest else []))
            x = out
        return cache, x
