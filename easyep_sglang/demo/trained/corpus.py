"""The three training domains, generated locally and deterministically: math, code, prose.

- math: two-operand arithmetic on 0..99, written with two digits: `Q: 37+48=? A: 85` and
  `Q: 61-07=? A: 54` (never negative).
  A fixed, seeded set of problems is held out for evaluation; training never draws them.
- code: the sources of the running interpreter's top-level standard-library modules (`<stdlib>/*.py`),
  in sorted file order. Every HELD_OUT_EVERY-th file is held out.
- prose: the docstrings of those same modules (module, class and function docstrings, via `ast`) plus
  the interpreter's `LICENSE.txt`, split between training and held-out by the same files.

Everything ships with Python itself, so a CI machine has the same text as a developer's. Text is
mapped onto the character tokenizer's vocabulary: tabs become four spaces, other characters outside
printable ASCII are dropped.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from easyep_sglang.demo.tiny_models import CHARACTERS

DOMAINS = ("math", "code", "prose")
OPERAND_MAX = 99
OPERATORS = ("+", "-")
HELD_OUT_EVERY = 10  # file i is held out when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
MIN_DOCSTRING_CHARS = 80  # shorter docstrings ("Return self.") carry little prose
MATH_EVAL_SEED, MATH_CALIB_SEED = 1234, 4321
MATH_EVAL_ROWS, EVAL_PASSAGES, PASSAGE_CHARS = 200, 50, 256
_VOCABULARY = frozenset(CHARACTERS)


@dataclass(frozen=True)
class MathProblem:
    left: int
    operator: str
    right: int

    @property
    def prompt(self) -> str:
        return f"Q: {self.left:02d}{self.operator}{self.right:02d}=? A:"  # fixed digit positions help a small model

    @property
    def answer(self) -> str:
        return str(self.left + self.right if self.operator == "+" else self.left - self.right)

    @property
    def line(self) -> str:
        return f"{self.prompt} {self.answer}"


def to_vocabulary(text: str) -> str:
    text = text.replace("\t", "    ").replace("\r\n", "\n")
    return "".join(c for c in text if c in _VOCABULARY)


def draw_math_problem(rng: random.Random) -> MathProblem:
    operator = rng.choice(OPERATORS)
    left, right = rng.randint(0, OPERAND_MAX), rng.randint(0, OPERAND_MAX)
    if operator == "-" and right > left:
        left, right = right, left
    return MathProblem(left, operator, right)


def _distinct_problems(seed: int, count: int, excluded: frozenset[MathProblem]) -> tuple[MathProblem, ...]:
    rng = random.Random(seed)
    problems: dict[MathProblem, None] = {}  # insertion-ordered set
    while len(problems) < count:
        problem = draw_math_problem(rng)
        if problem not in excluded:
            problems[problem] = None
    return tuple(problems)


@lru_cache(maxsize=None)
def math_eval_problems(count: int = MATH_EVAL_ROWS) -> tuple[MathProblem, ...]:
    return _distinct_problems(MATH_EVAL_SEED, count, frozenset())


def math_calib_problems(count: int = 25) -> tuple[MathProblem, ...]:
    return _distinct_problems(MATH_CALIB_SEED, count, frozenset(math_eval_problems()))


def math_training_lines(seed: int):
    """Endless `Q: a+b=? A: c` lines, never one of math_eval_problems()."""
    held_out = frozenset(math_eval_problems())
    rng = random.Random(seed)
    while True:
        problem = draw_math_problem(rng)
        if problem not in held_out:
            yield problem.line


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_module_files() -> list[Path]:
    files = sorted(p for p in stdlib_dir().glob("*.py") if not p.name.startswith("_sysconfigdata"))
    if not files:
        raise FileNotFoundError(f"no *.py in {stdlib_dir()}; the code and prose domains need the Python stdlib sources")
    return files


def _split_files(held_out: bool) -> list[Path]:
    return [p for i, p in enumerate(stdlib_module_files()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a stdlib file written for another Python version
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    texts = (ast.get_docstring(n, clean=True) for n in nodes)
    return [t for t in texts if t and len(t) >= MIN_DOCSTRING_CHARS]


@lru_cache(maxsize=None)
def domain_text(domain: str, held_out: bool) -> str:
    """All code or prose text of one split, as one string in the tokenizer's vocabulary."""
    files = _split_files(held_out)
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if domain == "code":
        return to_vocabulary("\n\n".join(sources))
    if domain == "prose":
        texts = [doc for source in sources for doc in _docstrings(source)]
        license_path = stdlib_dir() / "LICENSE.txt"
        if not held_out and license_path.is_file():
            texts.append(license_path.read_text(encoding="utf-8", errors="replace"))
        return to_vocabulary("\n\n".join(texts))
    raise ValueError(f"unknown text domain {domain!r}; supported: code, prose")


def passages(domain: str, held_out: bool, count: int, chars: int) -> list[str]:
    """`count` evenly spaced passages of `chars` characters from one split, each starting a line."""
    text = domain_text(domain, held_out)
    if len(text) < count * chars:
        raise ValueError(f"{domain} text has {len(text)} chars < {count}x{chars}; ask for fewer or shorter passages")
    stride = len(text) // count
    result = []
    for i in range(count):
        start = text.find("\n", i * stride) + 1 if i else 0  # a line start
        while text[start] == "\n":  # not a blank line
            start += 1
        result.append(text[start : start + chars])
    return result
