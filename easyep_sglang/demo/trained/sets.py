"""Write the demo model's per-domain calibration and held-out evaluation sets as JSON lines.

    python -m easyep_sglang.demo.trained.sets --out easyep_sglang/data/demo_sets

Formats are described in `easyep_sglang.demo.trained`'s docstring. Calibration rows come from the
training splits (math: problems that are not in the eval set); evaluation rows from the held-out splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from easyep_sglang.demo.trained import corpus

CALIB_ROWS = 25
CALIB_PROMPT_CHARS, CALIB_RESPONSE_CHARS = 192, 64


def calibration_rows(domain: str) -> list[dict]:
    if domain == "math":
        return [{"prompt": p.prompt, "response": f" {p.answer}"} for p in corpus.math_calib_problems(CALIB_ROWS)]
    texts = corpus.passages(domain, False, CALIB_ROWS, CALIB_PROMPT_CHARS + CALIB_RESPONSE_CHARS)
    return [{"prompt": t[:CALIB_PROMPT_CHARS], "response": t[CALIB_PROMPT_CHARS:]} for t in texts]


def eval_rows(domain: str) -> list[dict]:
    if domain == "math":
        return [{"problem": p.prompt, "answer": p.answer} for p in corpus.math_eval_problems(corpus.MATH_EVAL_ROWS)]
    return [{"text": t} for t in corpus.passages(domain, True, corpus.EVAL_PASSAGES, corpus.PASSAGE_CHARS)]


def write_sets(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for domain in corpus.DOMAINS:
        for kind, rows in (("calib", calibration_rows(domain)), ("eval", eval_rows(domain))):
            path = out_dir / f"{domain}_{kind}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.demo.trained.sets", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for {math,code,prose}_{calib,eval}.jsonl")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a directory; choose another --out")
    paths = write_sets(args.out)
    print(f"easyep: wrote {len(paths)} demo sets in {args.out}")


if __name__ == "__main__":
    main()
