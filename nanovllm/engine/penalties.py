"""Per-sequence token statistics the penalties need, kept on the device between steps: how often each token was
generated (presence/frequency) and which tokens the prompt holds (repetition, with the generated ones)."""
import torch

from nanovllm.engine.step_inputs import Row
from nanovllm.layers.sampler import count_tokens_, token_counts


def is_penalized(row: Row) -> bool:
    sp = row.state.sampling_params
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


class PenaltyTables:
    """One row per penalized sequence in [slots, V] tables; slot 0 stays zero for rows without penalties.
    The tables grow by doubling, so a batch of new sequences costs one copy, not one each."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []

    def drop(self, seq_id: int):
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            self.free.append(slot)

    def tables(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """[B, V] counts and prompt masks for a step's rows (new sequences get their slot here) and each row's
        slot (0 for rows without penalties)."""
        slots = []
        for row in rows:
            if not is_penalized(row):
                slots.append(0)
            elif row.seq_id in self.slot_of:
                slots.append(self.slot_of[row.seq_id])
            else:
                slots.append(self._add(row))
        index = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.counts[index], self.prompt[index], slots

    def count(self, sampled: torch.Tensor, rows: list[Row], slots: list[int]):
        """Add a step's sampled ids to the counts of the rows that sampled and have penalties."""
        picked = [i for i, (row, slot) in enumerate(zip(rows, slots)) if slot and row.samples]
        if picked:
            at = torch.tensor(picked, dtype=torch.int64).to(self.device, non_blocking=True)
            slot_ids = torch.tensor([slots[i] for i in picked], dtype=torch.int64).to(self.device, non_blocking=True)
            count_tokens_(self.counts, sampled[at], slot_ids)

    def _add(self, row: Row) -> int:
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.slot_of[row.seq_id] = slot
        state = row.state
        prompt, generated = state.token_ids[:state.num_prompt_tokens], state.token_ids[state.num_prompt_tokens:]
        self.counts[slot] = token_counts([generated], self.vocab_size, self.device)[0]
        self.prompt[slot] = token_counts([prompt], self.vocab_size, self.device)[0] > 0
        return slot

    def _grow(self):
        old = self.counts.size(0)
        new = max(2 * old, 8)  # slot 0 is the zero row
        self.counts = torch.cat([self.counts, self.counts.new_zeros(new - old, self.vocab_size)])
        self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(new - old, self.vocab_size)])
        self.free.extend(range(new - 1, max(old, 1) - 1, -1))
