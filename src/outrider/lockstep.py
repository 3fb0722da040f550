"""Lockstep: several rows' drafting runs together, so that their forwards on one shared model meet.

A batch (batch.py) gives every row a drafter of its own. A draft model's rows would each run the
draft once per depth per row; in lockstep each row's unchanged `propose` runs in a worker thread,
and whenever every unfinished row waits in a call to the shared model, those calls run as one
`run_rows` (a chain of depth d costs d calls for all rows together). Heads need none of this: their
classes propose for all rows at once (propose_rows), which costs no thread hand-offs.
The rows' Python runs one at a time under the GIL; each row reads only its own slot and its own
results, and the calls run in slot order, so the order the threads run in changes nothing.

An item handed to `call` is anything with a `slot` (a RowForward for a draft model);
`run_rows(items)` returns one result per item, in order.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from outrider.models.base import RowForward, SlotRow

__all__ = ["Lockstep", "LockstepRow"]


class Lockstep:
    """Runs several rows' calls together (module doc): every `call` waits until each unfinished
    row waits in one too; then all run as one run_rows, in slot order."""

    def __init__(self, run_rows: Callable[[list[Any]], list[Any]]) -> None:
        self.run_rows = run_rows
        self._cond = threading.Condition()
        self._pending: dict[int, Any] = {}  # slot -> its item
        self._results: dict[int, Any] = {}
        self._live = 0
        self._running = False

    def call(self, item: Any) -> Any:
        """The result of one row's item: at once outside `run` (a prefill), else with the others'.
        An error of the joint call is raised in every row that waited in it."""
        if not self._running:
            return self.run_rows([item])[0]
        with self._cond:
            self._pending[item.slot] = item
            self._cond.notify_all()
            while item.slot not in self._results:
                self._cond.wait()
            out = self._results.pop(item.slot)
        if isinstance(out, BaseException):
            raise out
        return out

    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Each call's result; they run in worker threads, their items batched (module doc)."""
        outs: list[Any] = [None] * len(calls)
        errors: list[BaseException] = []

        def work(i: int, call: Callable[[], Any]) -> None:
            try:
                outs[i] = call()
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
            finally:
                with self._cond:
                    self._live -= 1
                    self._cond.notify_all()

        self._live, self._running = len(calls), True
        threads = [threading.Thread(target=work, args=(i, c), daemon=True) for i, c in enumerate(calls)]
        try:
            for t in threads:
                t.start()
            with self._cond:
                while True:
                    self._cond.wait_for(lambda: self._live == 0 or len(self._pending) == self._live)
                    if self._live == 0:
                        break
                    items = [self._pending[s] for s in sorted(self._pending)]
                    self._pending.clear()
                    try:
                        results = self.run_rows(items)
                    except BaseException as e:  # every waiting row gets the error instead
                        results = [e] * len(items)
                    for item, res in zip(items, results):
                        self._results[item.slot] = res
                    self._cond.notify_all()
            for t in threads:
                t.join()
        finally:
            self._running = False
        if errors:
            raise errors[0]
        return outs


class LockstepRow(SlotRow):
    """One slot of a draft model, as the batch-1 CausalModel a row's drafter holds: its forwards go
    through the Lockstep (module doc); the rest acts on its slot at once (SlotRow)."""

    def __init__(self, lockstep: Lockstep, model: Any, slot: int) -> None:
        super().__init__(model, slot)
        self.lockstep = lockstep

    def forward(self, ids: Any, num_logits: int | None = None, attn_mask: Any = None, positions: Any = None) -> Any:
        return self.lockstep.call(RowForward(self.slot, ids, num_logits, attn_mask, positions))
