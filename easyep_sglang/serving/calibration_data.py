"""Calibration samples from the user's rows: which fields hold the prompt, the chat messages and the response,
their token ids as SGLang makes them, and samples fitted to the context the server can prefill.

Fields, unless named with --prompt-field / --messages-field / --response-field:
  prompt    the first of PROMPT_FIELDS the data has; a file that mixes layouts (some rows 'text', others
            'prompt') uses, in each row, the first of them that row sets
  messages  'messages', chat turns [{"role", "content"}] rendered by the model's chat template; a row that
            sets it uses it instead of its prompt (not when --prompt-field names the prompt)
  response  the first of RESPONSE_FIELDS, read with --use-responses
The paper's own layout, {"input": prompt, "output": the model's response}, needs only --use-responses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from easyep_sglang.core.datasets_io import DataError, Rows, load_rows

PROMPT_FIELDS = ("text", "prompt", "input", "problem", "question", "instruction")
MESSAGES_FIELDS = ("messages",)
RESPONSE_FIELDS = ("response", "output", "completion")
CONTEXT_KEYS = ("max_sequence_length", "seq_length", "max_seq_len", "model_max_length", "max_position_embeddings")
PROGRESS_FROM = 1000  # records: fewer tokenize at once, more show a progress bar
LONGER_CONTEXT = "serve a longer context (SGLang's --context-length; on a CPU also --max-total-tokens)"


@dataclass(frozen=True)
class Sample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...] = ()

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]


@dataclass(frozen=True)
class Fields:
    """Field names the user gave; None: found among the candidates."""
    prompt: str | None = None
    messages: str | None = None
    response: str | None = None


def read_prompts(path: str | Path, split: str | None = None, fields: Fields = Fields(),
                 use_responses: bool = False) -> list[dict]:
    """Records {"text": prompt} or {"messages": turns}, with "response" where the data has one."""
    rows = load_rows(path, split)
    explicit_prompt = fields.prompt is not None
    messages = rows.pick("messages", MESSAGES_FIELDS, fields.messages, "--messages-field",
                         required=fields.messages is not None) if fields.messages or not explicit_prompt else None
    if explicit_prompt:
        prompts = [rows.pick("prompt", PROMPT_FIELDS, fields.prompt, "--prompt-field")]
    else:
        prompts = [name for name in PROMPT_FIELDS if name in rows.columns]
    if not prompts and messages is None:
        raise rows.no_field("prompt", PROMPT_FIELDS + MESSAGES_FIELDS,
                            "--prompt-field FIELD (chat turns: --messages-field)")
    response = rows.pick("response", RESPONSE_FIELDS, fields.response, "--response-field", required=use_responses,
                         fix="--response-field FIELD, or drop --use-responses to let the model answer")
    return [_record(rows, n, row, prompts, messages, response, use_responses) for n, row in enumerate(rows.rows, 1)]


def _record(rows: Rows, n: int, row: dict, prompts: list[str], messages: str | None, response: str | None,
            use_responses: bool) -> dict:
    where = f"{rows.source} row {n}"
    if messages is not None and row.get(messages) is not None:
        turns = row[messages]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and {"role", "content"} <= t.keys() for t in turns):
            raise DataError(f"{where}: {messages!r} is not a list of {{role, content}} turns; fix the row or name "
                            "another field with --messages-field")
        # Columnar formats give every turn every key seen in the file; the chat template must not see the Nones.
        record = {"messages": [{k: v for k, v in turn.items() if v is not None} for turn in turns]}
    else:
        field = next((name for name in prompts if row.get(name) is not None), None)
        if field is None or not isinstance(row[field], str):
            consulted = prompts + ([messages] if messages else [])
            held = (f"{', '.join(map(repr, consulted))} {'is' if len(consulted) == 1 else 'are'} empty" if field is None
                    else f"{field!r} holds {type(row[field]).__name__}, not text")
            raise DataError(f"{where} has no prompt: its {held}; fill it, or name the prompt field with --prompt-field")
        record = {"text": row[field]}
    if response is not None and row.get(response) is not None:
        record["response"] = row[response]
    if use_responses and not isinstance(record.get("response"), str):
        raise DataError(f"{where} has no {response!r} text; fill it, or drop --use-responses to let the model answer")
    return record


def tokenize(records: list[dict], tokenizer, use_responses: bool) -> list[Sample]:
    """Prompt ids as SGLang makes them (BOS included; chat messages through the chat template)."""
    samples = []
    for n, record in enumerate(tqdm(records, desc="tokenize", unit="sample", disable=len(records) < PROGRESS_FROM), 1):
        if "messages" in record:
            prompt = tokenizer.apply_chat_template(record["messages"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
        else:
            prompt = tokenizer(record.get("text", record.get("prompt")))["input_ids"]
        if use_responses and not isinstance(record.get("response"), str):
            raise ValueError(f"prompt {n} has no 'response' string; drop --use-responses to let the model answer")
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] if use_responses else ()
        samples.append(Sample(tuple(prompt), tuple(response)))
    return samples


def fit_to_context(samples: list[Sample], limit: int, where: str, truncate: bool, room: int = 0) -> list[Sample]:
    """Samples of at most `limit` tokens, each prompt leaving `room` tokens (the answer's --max-new-tokens).

    A prompt that does not fit is refused. A response that does not fit is refused, or with `truncate`
    cut to the first tokens that fit, and the cut samples and tokens are counted on stderr.
    """
    for n, sample in enumerate(samples, 1):
        if len(sample.prompt_ids) + room > limit:
            needs = f" + --max-new-tokens {room}" if room else ""
            raise DataError(f"prompt {n} has {len(sample.prompt_ids)}{needs} tokens, more than the {limit} of {where}; "
                            f"shorten or drop it{', lower --max-new-tokens' if room else ''}, or {LONGER_CONTEXT}")
    long = [n for n, sample in enumerate(samples) if len(sample.token_ids) > limit]
    if not long:
        return samples
    if not truncate:
        longest = max(len(samples[n].token_ids) for n in long)
        raise DataError(f"{len(long)} of {len(samples)} prompt+response samples are longer than the {limit} tokens of "
                        f"{where} (the longest: {longest}); pass --truncate-responses to cut their responses to fit, "
                        f"or {LONGER_CONTEXT}")
    fitted, dropped = list(samples), 0
    for n in long:
        keep = limit - len(samples[n].prompt_ids)
        dropped += len(samples[n].response_ids) - keep
        fitted[n] = Sample(samples[n].prompt_ids, samples[n].response_ids[:keep])
    print(f"easyep: truncated the responses of {len(long)} of {len(samples)} samples to fit the {limit} tokens of "
          f"{where}: {dropped} response tokens dropped", file=sys.stderr)
    return fitted


def model_context_bound(model_path: str | Path, sglang_args: list[str]) -> int | None:
    """An upper bound of the tokens a server of this model can take: --context-length if given, else the
    config's context length times its RoPE scaling factor (SGLang may serve less; the server is asked later)."""
    for n, arg in enumerate(sglang_args):
        if arg.startswith("--context-length"):
            value = arg.partition("=")[2] or (sglang_args[n + 1] if n + 1 < len(sglang_args) else "")
            return int(value) if value.isdigit() else None
    config = json.loads((Path(model_path) / "config.json").read_text())
    length = next((config[key] for key in CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    factor = scaling.get("factor", 1) if isinstance(scaling, dict) else 1
    if "original_max_position_embeddings" in scaling or scaling.get("rope_type") == "llama3":
        factor = 1  # the configured length already includes the scaling (SGLang's rule)
    return None if length is None else int(length * max(1, factor))
