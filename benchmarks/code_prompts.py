"""168 HumanEval-sized code tasks as chat prompts (HumanEval has 164, the count the README's job uses): a Python
signature and docstring to complete, ~150 tokens each.

No dataset ships with this repository, so the tasks are generated: 21 task families, each instantiated with eight
parameter values. The doctest examples are computed by a reference implementation, so they are correct.
"""
from dataclasses import dataclass
from typing import Any, Callable

INSTRUCTION = "Complete this Python function. Reply with the finished function only."


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # function name, may use {p}
    signature: str  # parameters and return annotation, without the name
    doc: str  # what to do, may use {p}
    solve: Callable[[int], Callable[..., Any]]  # p -> reference implementation
    examples: tuple[tuple, ...]  # argument tuples for the doctest lines
    params: tuple[int, ...]


def _primes_from(n, p):
    out, k = [], n + 1
    while len(out) < p:
        if k > 1 and all(k % d for d in range(2, int(k ** 0.5) + 1)):
            out.append(k)
        k += 1
    return out[-1]


def _base(n, b):
    digits = ""
    while True:
        n, r = divmod(n, b)
        digits = str(r) + digits
        if n == 0:
            return digits


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _caesar(text, k):
    def shift(c):
        if c.isalpha():
            base = ord("a") if c.islower() else ord("A")
            return chr(base + (ord(c) - base + k) % 26)
        return c
    return "".join(map(shift, text))


def _longest_run(nums, p):
    best = run = 0
    for x in nums:
        run = run + 1 if x % p == 0 else 0
        best = max(best, run)
    return best


FAMILIES = (
    Family("count_multiples_of_{p}", "(numbers: list[int]) -> int",
           "Return how many of the given integers are divisible by {p}. Zero counts as divisible; negative numbers "
           "count like their absolute value. An empty list gives 0.",
           lambda p: lambda ns: sum(1 for n in ns if n % p == 0), (([1, 2, 3, 4, 5, 6, 12, 0],), ([-7, 14, 9],)),
           (2, 3, 4, 5, 6, 7, 9, 11)),
    Family("rotate_left_by_{p}", "(items: list) -> list",
           "Return a new list with the items rotated {p} places to the left; the items that fall off the front are "
           "appended at the end in order. Lists shorter than the shift rotate by the shift modulo their length.",
           lambda p: lambda xs: xs[p % len(xs):] + xs[:p % len(xs)] if xs else [], (([1, 2, 3, 4, 5, 6, 7],), (["a", "b"],)),
           (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("sum_of_{p}_largest", "(numbers: list[int]) -> int",
           "Return the sum of the {p} largest values in the list, counting repeated values separately. If the list "
           "has fewer than {p} values, return the sum of all of them. The input list must not be modified.",
           lambda p: lambda ns: sum(sorted(ns, reverse=True)[:p]), (([5, 1, 9, 3, 9, 2],), ([4, -1],)),
           (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("wrap_text_{p}", "(text: str) -> list[str]",
           "Split the text into lines of at most {p} characters, breaking only at spaces and joining the words of a "
           "line with single spaces. A word longer than {p} characters gets a line of its own. No empty lines.",
           lambda p: lambda t: _wrap(t, p), (("the quick brown fox jumps over",), ("a bb ccc",)),
           (8, 10, 12, 14, 16, 18, 20, 24)),
    Family("caesar_shift_{p}", "(text: str) -> str",
           "Shift every ASCII letter {p} places forward in the alphabet, wrapping from z to a and keeping its case. "
           "Digits, spaces and punctuation stay as they are. The result has the same length as the input.",
           lambda p: lambda t: _caesar(t, p), (("Hello, World!",), ("xyz ABC 123",)),
           (1, 3, 5, 7, 11, 13, 17, 25)),
    Family("prime_number_{p}_after", "(n: int) -> int",
           "Return the {p}-th prime number that is strictly greater than n. Numbers below 2 are never prime, and n "
           "may be negative. Use trial division; the answer must be exact for every n up to one million.",
           lambda p: lambda n: _primes_from(n, p), ((10,), (-5,)),
           (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("moving_average_{p}", "(values: list[float]) -> list[float]",
           "Return the averages of every window of {p} consecutive values, in order, rounded to two decimals. A list "
           "shorter than {p} values has no full window and gives an empty list. Do not use any imports.",
           lambda p: lambda vs: [round(sum(vs[i:i + p]) / p, 2) for i in range(len(vs) - p + 1)],
           (([1.0, 2.0, 4.0, 8.0, 16.0],), ([2.5],)), (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("digit_power_sum_{p}", "(n: int) -> int",
           "Return the sum of the decimal digits of n, each raised to the power {p}. The sign of n is ignored and "
           "zero has the single digit 0. Work with integers only, never with floating point numbers.",
           lambda p: lambda n: sum(int(d) ** p for d in str(abs(n))), ((1234,), (-907,)),
           (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("words_longer_than_{p}", "(sentence: str) -> list[str]",
           "Return the words of the sentence that have more than {p} letters, in their original order and without "
           "duplicates (keep the first occurrence). Words are separated by spaces; ignore surrounding punctuation.",
           lambda p: lambda s: list(dict.fromkeys(w.strip(".,!?") for w in s.split() if len(w.strip(".,!?")) > p)),
           (("Functional programming makes programs easier to reason about.",), ("tiny words only",)),
           (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("to_base_{p}", "(n: int) -> str",
           "Return the representation of the non-negative integer n in base {p} as a string of digits, most "
           "significant digit first, without a prefix or leading zeros. Zero is written as a single 0.",
           lambda p: lambda n: _base(n, p), ((100,), (0,)),
           (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("pairs_with_difference_{p}", "(numbers: list[int]) -> int",
           "Count the unordered pairs of positions i < j whose values differ by exactly {p} in either direction. "
           "Equal values at different positions are different pairs. Aim for better than quadratic time.",
           lambda p: lambda ns: sum(1 for i in range(len(ns)) for j in range(i + 1, len(ns)) if abs(ns[i] - ns[j]) == p),
           (([1, 5, 3, 4, 2, 7],), ([10, 10],)), (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("every_{p}th_item", "(items: list) -> list",
           "Return every {p}-th item of the list, starting with the first one (index 0), then index {p}, and so "
           "on. The result keeps the original order. Do not use slicing with a step; write the loop yourself.",
           lambda p: lambda xs: xs[::p], ((list(range(10)),), (["x", "y"],)), (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("round_all_to_{p}_places", "(values: list[float]) -> list[float]",
           "Round every value to {p} decimal places with Python's round, keep the order, and drop the values that "
           "round to exactly zero. Return a new list; the input list must stay unchanged after the call.",
           lambda p: lambda vs: [round(v, p) for v in vs if round(v, p) != 0],
           (([3.14159265, 0.0000001, -1.41421356],), ([],)), (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("diagonal_sum_offset_{p}", "(matrix: list[list[int]]) -> int",
           "Return the sum of the entries matrix[i][i + {p}] of the square matrix, for every row i where that "
           "column exists. A matrix with {p} or fewer columns has no such entry and gives 0.",
           lambda p: lambda m: sum(m[i][i + p] for i in range(len(m)) if i + p < len(m)),
           (([[1, 2, 3], [4, 5, 6], [7, 8, 9]],), ([[1]],)), (0, 1, 2, 3, 4, 5, 6, 7)),
    Family("most_common_{p}_gram", "(text: str) -> str",
           "Return the substring of length {p} that occurs most often in the text (occurrences may overlap). Break "
           "ties by the earliest first occurrence. Text shorter than {p} characters gives an empty string.",
           lambda p: lambda t: max((t[i:i + p] for i in range(len(t) - p + 1)),
                                   key=lambda g: (t.count(g), -t.find(g)), default=""),
           (("abracadabra abracadabra",), ("ab",)), (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("fizz_every_{p}", "(n: int) -> list[str]",
           "Return the strings for the numbers 1 to n: 'Fizz' for multiples of {p}, 'Buzz' for numbers that end in "
           "the digit {p} but are not multiples, and the number itself as a string otherwise.",
           lambda p: lambda n: ["Fizz" if i % p == 0 else "Buzz" if str(i).endswith(str(p)) else str(i)
                                for i in range(1, n + 1)], ((8,), (1,)), (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("brackets_within_depth_{p}", "(text: str) -> bool",
           "Return True if the round brackets in the text are balanced and never nested deeper than {p} levels, "
           "else False. Characters other than '(' and ')' are ignored. The empty string is balanced.",
           lambda p: lambda t: (lambda ds: min(ds, default=0) >= 0 and max(ds, default=0) <= p and
                                (ds[-1] if ds else 0) == 0)(
               [sum(1 if c == "(" else -1 for c in t[:i + 1] if c in "()") for i in range(len(t))]),
           (("(a(b)c)(d)",), ("((()))",)), (1, 2, 3, 4, 5, 6, 7, 8)),
    Family("longest_run_of_multiples_of_{p}", "(numbers: list[int]) -> int",
           "Return the length of the longest run of consecutive list entries that are all multiples of {p}. "
           "Zero is a multiple of every number. A list without any multiple of {p} gives 0.",
           lambda p: lambda ns: _longest_run(ns, p), (([2, 4, 6, 7, 8, 10, 12],), ([1, 3],)),
           (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("pad_to_multiple_of_{p}", "(text: str, fill: str = '.') -> str",
           "Append copies of the one-character fill string to the text until its length is a multiple of {p}. "
           "Text whose length already is a multiple comes back unchanged. Raise ValueError for a longer fill.",
           lambda p: lambda t, f=".": t + f * (-len(t) % p), (("hello",), ("abcdefgh", "*")),
           (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("group_by_remainder_{p}", "(numbers: list[int]) -> dict[int, list[int]]",
           "Group the numbers by their remainder modulo {p}, as a dict from remainder to the numbers with that "
           "remainder in their original order. Only remainders that occur are keys, in increasing order.",
           lambda p: lambda ns: {r: [n for n in ns if n % p == r] for r in sorted({n % p for n in ns})},
           (([3, 8, 1, 12, 7],), ([],)), (2, 3, 4, 5, 6, 7, 8, 9)),
    Family("compress_runs_longer_than_{p}", "(text: str) -> str",
           "Replace every run of more than {p} equal characters by one copy of the character followed by the run "
           "length in decimal. Shorter runs stay as they are. An empty text gives an empty string.",
           lambda p: lambda t: _compress(t, p), (("aaaaabbbcdddddddd",), ("xyz",)), (1, 2, 3, 4, 5, 6, 7, 8)),
)


def _compress(text, p):
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] == text[i]:
            j += 1
        out.append(text[i] + str(j - i) if j - i > p else text[i:j])
        i = j
    return "".join(out)


def task_source(family: Family, p: int) -> str:
    name = family.name.format(p=p)
    solve = family.solve(p)
    lines = [f"def {name}{family.signature}:", f'    """{family.doc.format(p=p)}', ""]
    for args in family.examples:
        lines.append(f">>> {name}({', '.join(map(repr, args))})".replace(">>>", "    >>>", 1))
        lines.append(f"    {solve(*args)!r}")
    lines.append('    """')
    return "\n".join(lines)


TASKS = [(f, p) for i in range(8) for f in FAMILIES for p in f.params[i:i + 1]]  # families interleaved
NUM_TASKS = len(TASKS)


def code_task_messages(num_prompts: int = 164) -> list[list[dict[str, str]]]:
    """Chat messages (one user turn each) for the first num_prompts tasks."""
    if not 1 <= num_prompts <= NUM_TASKS:
        raise ValueError(f"num_prompts must be in 1..{NUM_TASKS}, got {num_prompts}")
    return [[{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{task_source(f, p)}\n```"}]
            for f, p in TASKS[:num_prompts]]
