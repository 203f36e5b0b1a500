"""The scheduler: which sequences run in the next step, and what each feeds.

Each step, on rank 0:
1. Sequences that finished or were cancelled leave; their slots and cache are freed.
2. Every running sequence decodes one token, so its cache must hold one more. When
   the paged cache has no block left, the youngest admitted sequence is preempted:
   its blocks are freed and its prompt and generated tokens are recomputed later,
   so an admitted request never fails for lack of KV memory. (A sequence longer
   than the whole cache is refused at submit, so the oldest always fits alone.)
3. The step's token budget (smaller while rows decode, so that a prefill delays
   their next token only a little; for the paged cache it counts the decode rows'
   tokens too) goes to prompts: first to sequences whose prompt
   is partly fed (chunked prefill), then to queued ones, oldest first, while slots
   (``max_batch_size``) and cache room last. A cache that cannot split prompts (the
   row states) takes whole prompts; a prompt longer than the budget then joins alone.
The result is a ``StepPlan`` plus the sequences that sample, in row order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Tuple

from mii_engines.runtime.kv.interface import KVSpace
from mii_engines.runtime.plan import Chunk, StepPlan
from mii_engines.runtime.requests import Phase, Sequence


@dataclass(frozen=True)
class Budgets:
    """Prompt tokens fed per step, in ``KVSpace.prefill_cost`` units."""

    idle: int = 8192  # nothing decodes: as much as the activations allow
    # Rows wait for this step's prefill before their next token. On an H200 (the 1.5B, 32
    # prompts of ~3.85k tokens + 128 new): 2,048 gave 4,420 tok/s, 4,096 4,685, 8,192
    # 4,701; the other streams' inter-token p99 / p50 while a 4k prompt is fed 1.36 /
    # 1.33 / 1.65 (bench/results/h200_1203d_chunk_budget_llama1b.jsonl): fewer steps, so
    # fewer passes over the decoding rows' contexts. With the faster prefill attention of
    # 2026-12-03 e, 4,096 gave 4,757 and 8,192 4,917 (h200_1203e_llama1b.jsonl, call 2);
    # 8,192 is also vLLM's and SGLang's chunk size on large GPUs.
    decoding: int = 8192


@dataclass
class Schedule:
    """One step: the plan for every rank, and what the loop must know about it."""

    plan: StepPlan
    decoding: List[Sequence]  # rows that decode (their inputs: the tokens last sampled)
    rows: List[Sequence]  # every row that samples, in the plan's row order
    left: List[Sequence] = field(default_factory=list)  # cancelled: their end is owed
    preempted: List[Sequence] = field(default_factory=list)


class Scheduler:
    """Admission, chunking and preemption over one ``KVSpace``."""

    def __init__(self, space: KVSpace, max_batch_size: int, budgets: Budgets = Budgets()) -> None:
        self.space = space
        self.max_batch_size = max_batch_size
        self.budgets = budgets
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []  # the rows sampled last step, in row order
        self.prefilling: List[Sequence] = []  # admitted; prompt partly fed
        self.preemptions = 0
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._released: List[int] = []
        self._arrivals = 0
        self._cancelled = False

    # -- queue ---------------------------------------------------------------------------
    def add(self, sequences: List[Sequence]) -> None:
        """Queue new sequences (the caller checked the queue limit)."""
        self.waiting.extend(sequences)

    def note_cancel(self) -> None:
        """A request was cancelled: sweep the queue for it at the next step."""
        self._cancelled = True

    def has_work(self) -> bool:
        """Anything queued, prefilling or running."""
        return bool(self.waiting or self.prefilling or self.running)

    # -- one step ------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Decide the next step (see the module docstring)."""
        left: List[Sequence] = []
        preempted: List[Sequence] = []
        previous = self.running
        for seq in previous + self.prefilling:
            if not seq.active:
                self._leave(seq, left)
        self.prefilling = [seq for seq in self.prefilling if seq.active]
        if self._cancelled:
            self._sweep_queue(left)
        decoding = self._room_to_decode([seq for seq in previous if seq.active], preempted)
        for seq in decoding:
            seq.fed += 1
            seq.launched += 1
        self.running = decoding
        chunks, joining = self._prefill(len(decoding), preempted, left)
        self.running = decoding + joining
        kept = {id(seq) for seq in decoding}
        keep = [i for i, seq in enumerate(previous) if id(seq) in kept]
        plan = StepPlan(keep=None if len(keep) == len(previous) else keep,
                        decode_slots=[seq.slot for seq in decoding], chunks=chunks,
                        tables=self.space.take_table_updates(), release=self._released)
        self._released = []
        return Schedule(plan, decoding, list(self.running), left, preempted)

    def _room_to_decode(self, decoding: List[Sequence],
                        preempted: List[Sequence]) -> List[Sequence]:
        """Reserve one more token for each decoding row, preempting the youngest first."""
        kept: List[Sequence] = []
        pending = list(decoding)
        while pending:
            seq = pending.pop(0)
            while not self.space.reserve(seq.slot, seq.fed + 1):
                victim = max(self.prefilling + pending + kept + [seq], key=lambda s: s.arrival)
                self._preempt(victim, preempted)
                for group in (pending, kept):
                    if victim in group:
                        group.remove(victim)
                if victim is seq:
                    break
            else:
                kept.append(seq)
        return kept

    def _prefill(self, decoding: int, preempted: List[Sequence], left: List[Sequence]):
        """Chunks for this step within the budget, and the rows among them that sample
        (``decoding``: how many rows decode in it)."""
        budget = self.budgets.decoding if decoding else self.budgets.idle
        if decoding and self.space.chunked:
            # One packed forward: the decode rows' tokens count too, so that the step fits
            # a graph bucket of the budget's size. 2,048 prompt tokens beside 32 rows
            # padded to 2,560 (a fifth of the GEMMs of issue 17's long prompts spent on
            # padding). At least half the budget still goes to prompts.
            budget = max(budget - decoding, budget // 2)
        lengths: List[int] = []
        chunks: List[Chunk] = []
        joining: List[Sequence] = []

        def take(seq: Sequence) -> bool:
            """Feed what fits of ``seq``'s remaining prompt; False when nothing does."""
            remaining = seq.remaining_prompt
            if self.space.chunked:
                count = min(remaining, budget - self.space.prefill_cost(lengths))
            elif lengths and self.space.prefill_cost(lengths + [remaining]) > budget:
                return False
            else:  # whole prompts; the first of a step always goes
                count = remaining
            if count <= 0 or not self._reserve_prompt(seq, seq.fed + count, preempted):
                return False
            tokens = seq.inputs[seq.fed:seq.fed + count]
            chunks.append(Chunk(seq.slot, tokens, seq.fed, sample=count == remaining))
            self.space.fed(seq.slot, tokens, seq.fed)
            seq.fed += count
            lengths.append(count)
            if count == remaining:
                seq.phase = Phase.RUNNING
                seq.launched += 1
                joining.append(seq)
            return True

        for seq in list(self.prefilling):
            if seq not in self.prefilling:  # preempted to make room for an older one
                continue
            if not take(seq):
                return chunks, joining
            if seq.phase is Phase.RUNNING:
                self.prefilling.remove(seq)
        while (self.waiting and len(self.running) + len(joining) + len(self.prefilling)
               < self.max_batch_size):
            seq = self.waiting[0]
            if not seq.active:  # finished by its last token while preempted, or cancelled
                self.waiting.popleft()
                if seq.finish is None:
                    left.append(seq)
                continue
            if seq.launched > len(seq.generated):
                # Preempted in this very step while its last token is still on its way
                # to the host (pipelined loop): recomputed now, it would miss that token
                # and sample it twice. It comes back next step, first in line.
                break
            self._open(seq)
            if not take(seq):
                self._close(seq)
                break
            self.waiting.popleft()
            if seq.phase is not Phase.RUNNING:
                seq.phase = Phase.PREFILLING
                self.prefilling.append(seq)
        return chunks, joining

    def _reserve_prompt(self, seq: Sequence, length: int, preempted: List[Sequence]) -> bool:
        """Room for a prompt chunk, preempting younger prefilling sequences if needed
        (never decoding ones: their tokens are worth more than a queued prompt's)."""
        while not self.space.reserve(seq.slot, length):
            younger = [s for s in self.prefilling if s.arrival > seq.arrival]
            if not younger:
                return False
            victim = max(younger, key=lambda s: s.arrival)
            self.prefilling.remove(victim)
            self._preempt(victim, preempted)
        return True

    def _preempt(self, seq: Sequence, preempted: List[Sequence]) -> None:
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._close(seq)
        seq.phase = Phase.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)  # the first to come back
        preempted.append(seq)

    def _sweep_queue(self, left: List[Sequence]) -> None:
        self._cancelled = False
        for seq in [s for s in self.waiting if not s.active]:
            self.waiting.remove(seq)
            if seq.finish is None:
                left.append(seq)

    def _open(self, seq: Sequence) -> None:
        seq.slot = self._free_slots.pop()
        if seq.preemptions:  # recompute what it had generated as well
            seq.inputs = seq.prompt + seq.generated
        self._arrivals += 1
        seq.arrival = self._arrivals
        seq.fed = self.space.open(seq.slot, seq.inputs)

    def _close(self, seq: Sequence) -> None:
        self.space.close(seq.slot)
        self._released.append(seq.slot)
        self._free_slots.append(seq.slot)
        seq.slot = -1
        seq.fed = 0

    def _leave(self, seq: Sequence, left: List[Sequence]) -> None:
        if seq.slot >= 0:
            self._close(seq)
        if seq.finish is None:  # cancelled: its end is still to be reported
            left.append(seq)
        seq.phase = Phase.FINISHED

    def drain(self) -> Tuple[List[Sequence], List[Sequence]]:
        """Remove every sequence (shutdown); returns the unfinished admitted ones (their
        step may have failed) and the unfinished queued ones (never started)."""
        admitted = self.running + self.prefilling
        queued = list(self.waiting)
        for seq in admitted:
            if seq.slot >= 0:
                self._close(seq)
        self.running, self.prefilling = [], []
        self.waiting.clear()
        return ([seq for seq in admitted if seq.finish is None],
                [seq for seq in queued if seq.finish is None])
