"""Per-sequence token statistics kept on the device between steps: how often each token was generated
(presence/frequency) and which tokens the prompt holds (repetition, with the generated ones), for the penalties;
the completion's tokens in order, for bad words. Sampled ids go in while still in flight: nothing waits."""
import numpy as np
import torch

from nanovllm.engine.step_inputs import Row
from nanovllm.layers.sampler import count_tokens_, token_counts


def is_penalized(row: Row) -> bool:
    sp = row.state.sampling_params
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


class SlotTables:
    """Rows of device tables, one per sequence that needs them: a slot is taken when the runner first meets the
    sequence and given back when it forgets it. Subclasses hold the tables and grow them (by doubling, so a batch
    of new sequences costs one copy, not one each)."""

    def __init__(self):
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []

    def drop(self, seq_id: int):
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            self.free.append(slot)

    def _take(self, seq_id: int) -> int:
        if not self.free:
            self._grow()
        slot = self.slot_of[seq_id] = self.free.pop()
        return slot

    def _grow(self):
        raise NotImplementedError


class PenaltyTables(SlotTables):
    """One row per penalized sequence in [slots, V] tables; slot 0 stays zero for rows without penalties."""

    def __init__(self, vocab_size: int, device: torch.device):
        super().__init__()
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)

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
        slot = self._take(row.seq_id)
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


def has_bad_words(row: Row) -> bool:
    return row.state.sampling_params.bad_words_token_ids is not None


class OutputHistory(SlotTables):
    """The completion tokens of each sequence with bad words, one [max_model_len] row a sequence, and the bans
    they imply: a bad word's last token is banned where the completion so far ends with the rest of it (vLLM's
    rule: the completion's tokens, not the prompt's)."""

    def __init__(self, max_len: int, device: torch.device):
        super().__init__()
        self.max_len, self.device = max_len, device
        self.tokens = torch.zeros(0, max_len, dtype=torch.int32, device=device)

    def bans(self, rows: list[Row]) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, list[int]]:
        """(rows, token ids, hit) device tensors, one entry per (row, bad word) the completion is long enough
        for: hit where its tokens end with the word's prefix; and each row's slot (-1: no bad words)."""
        slots, pair_rows, pair_slots, starts, lengths, prefixes, last = [], [], [], [], [], [], []
        for i, row in enumerate(rows):
            if not has_bad_words(row):
                slots.append(-1)
                continue
            slot = self.slot_of.get(row.seq_id)
            slots.append(self._add(row) if slot is None else slot)
            position = row.output_position  # completion tokens before the one sampled now
            for word in row.state.sampling_params.bad_words_token_ids:
                if len(word) - 1 <= position:
                    pair_rows.append(i)
                    pair_slots.append(slots[-1])
                    starts.append(position - len(word) + 1)
                    lengths.append(len(word) - 1)
                    prefixes.append(word[:-1])
                    last.append(word[-1])
        if not pair_rows:
            return None, slots
        width = max(lengths)
        padded = np.full((len(prefixes), max(width, 1)), -1, dtype=np.int64)
        for k, prefix in enumerate(prefixes):
            padded[k, :len(prefix)] = prefix
        host = torch.from_numpy(np.concatenate([np.array([pair_rows, pair_slots, starts, lengths, last]).T, padded],
                                               axis=1))
        table = (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)
        at = torch.arange(padded.shape[1], device=self.device)
        index = (table[:, 2:3] + at).clamp(0, self.max_len - 1)
        seen = self.tokens[table[:, 1:2], index].to(torch.int64)
        hit = ((seen == table[:, 5:]) | (at >= table[:, 3:4])).all(1)
        return (table[:, 0], table[:, 4], hit), slots

    def record(self, sampled: torch.Tensor, rows: list[Row], slots: list[int]):
        """Write a step's sampled ids at their completion positions, for the rows that sampled and have a slot."""
        picked = [i for i, (row, slot) in enumerate(zip(rows, slots)) if slot >= 0 and row.samples
                  and row.output_position < self.max_len]
        if picked:
            where = torch.tensor([[i, slots[i], rows[i].output_position] for i in picked], dtype=torch.int64)
            where = (where.pin_memory() if self.device.type == "cuda" else where).to(self.device, non_blocking=True)
            self.tokens[where[:, 1], where[:, 2]] = sampled[where[:, 0]].to(torch.int32)

    def _add(self, row: Row) -> int:
        slot = self._take(row.seq_id)
        state = row.state  # after preemption the completion so far is in token_ids
        done = state.token_ids[state.num_prompt_tokens:][:self.max_len]
        if done:
            self.tokens[slot, :len(done)] = torch.tensor(done, dtype=torch.int32).to(self.device)
        return slot

    def _grow(self):
        old = self.tokens.size(0)
        new = max(2 * old, 8)
        self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(new - old, self.max_len)])
        self.free.extend(range(new - 1, old - 1, -1))
