"""ExpertMask: the JSON expert mask (format 1), its validation against a model, and import of the
reference implementation's dense 0/1 matrix.

Format 1:
    {"format": "easyep-mask", "version": 1,
     "model": {"architecture": ..., "num_layers": ..., "n_experts": ..., "fingerprint": ...},
     "keep": {"<layer_id>": [kept original expert ids], ...},
     "method": "...", "provenance": {...}}
Only "keep" is required. A MoE layer absent from "keep" keeps all its experts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from easyep_sglang.core.fileio import atomic_write_text
from easyep_sglang.core.routing import top_k_always_reachable, worst_reachable_groups
from easyep_sglang.core.spec import MoESpec

FORMAT_NAME = "easyep-mask"
FORMAT_VERSION = 1


class MaskError(ValueError):
    """A mask that cannot be served; the message names the layer and the fix."""


@dataclass(frozen=True)
class ExpertMask:
    keep: dict[int, tuple[int, ...]]  # layer_id -> kept original expert ids, as written
    model: dict | None = None
    method: str | None = None
    provenance: dict = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def for_spec(cls, spec: MoESpec, keep: dict[int, list[int]], method: str, provenance: dict | None = None):
        keep = {int(l): tuple(sorted(int(e) for e in ids)) for l, ids in keep.items()}
        return cls(keep, spec.identity(), method, provenance or {})

    @classmethod
    def from_dict(cls, data: object, source: str = "mask") -> ExpertMask:
        if not isinstance(data, dict):
            raise MaskError(f"{source}: expected a JSON object with a 'keep' field")
        if "format" in data and data["format"] != FORMAT_NAME:
            raise MaskError(f"{source}: format {data['format']!r} is not {FORMAT_NAME!r}")
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise MaskError(f"{source}: version {data['version']!r} is not supported; this tool reads version {FORMAT_VERSION}")
        raw_keep = data.get("keep")
        if not isinstance(raw_keep, dict):
            raise MaskError(f"{source}: 'keep' must map layer ids to lists of expert ids, e.g. {{\"3\": [0, 5, 7]}}")
        keep = {}
        for key, ids in raw_keep.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise MaskError(f"{source}: layer key {key!r} is not an integer layer id") from None
            if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                raise MaskError(f"{source}: layer {layer}: keep must be a list of integer expert ids")
            keep[layer] = tuple(ids)
        model = data.get("model")
        if model is not None and not isinstance(model, dict):
            raise MaskError(f"{source}: 'model' must be an object")
        return cls(keep, model, data.get("method"), data.get("provenance") or {})

    @classmethod
    def load(cls, path: str | Path) -> ExpertMask:
        path = Path(path)
        if not path.is_file():
            raise MaskError(f"mask file {path} not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MaskError(f"{path} is not valid JSON ({err}); write a mask with 'keep' or use easyep_sglang.select") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_reference_matrix(cls, matrix: list[list[float]], spec: MoESpec, source: str = "matrix") -> ExpertMask:
        """The reference code's dense [num_moe_layers][n_experts] 0/1 matrix; row 0 is the first MoE layer."""
        if not isinstance(matrix, list) or len(matrix) != len(spec.moe_layers):
            got = len(matrix) if isinstance(matrix, list) else type(matrix).__name__
            raise MaskError(f"{source}: expected {len(spec.moe_layers)} rows (one per MoE layer), got {got}")
        keep = {}
        for row_idx, (layer, row) in enumerate(zip(spec.moe_layers, matrix)):
            if not isinstance(row, list) or len(row) != spec.n_experts:
                raise MaskError(f"{source}: row {row_idx} (layer {layer}) must have {spec.n_experts} entries")
            if any(v not in (0, 1) for v in row):
                raise MaskError(f"{source}: row {row_idx} (layer {layer}) holds values other than 0 and 1")
            keep[layer] = [e for e, v in enumerate(row) if v == 1]
        return cls.for_spec(spec, keep, method="imported-reference", provenance={"imported_from": source})

    # ---- validation ---------------------------------------------------------------------------
    def resolve(self, spec: MoESpec) -> dict[int, tuple[int, ...]]:
        """Validate against `spec`; return the kept ids of every layer the mask restricts (sorted)."""
        self._check_model(spec)
        resolved = {}
        for layer, ids in sorted(self.keep.items()):
            if layer not in spec.prunable_layers:
                raise MaskError(
                    f"layer {layer} is not a MoE layer of {spec.architecture} (MoE layers: "
                    f"{_ranges(spec.prunable_layers)}); remove it from the mask"
                )
            bad = [e for e in ids if not 0 <= e < spec.n_experts]
            if bad:
                raise MaskError(f"layer {layer}: expert ids {bad} out of range 0..{spec.n_experts - 1}; fix the mask")
            if len(set(ids)) != len(ids):
                dup = sorted({e for e in ids if ids.count(e) > 1})
                raise MaskError(f"layer {layer}: duplicate expert ids {dup}; list each kept expert once")
            if len(ids) < spec.top_k:
                raise MaskError(f"layer {layer} keeps {len(ids)} experts < top_k={spec.top_k}; keep more experts")
            check_group_reachability(spec, layer, ids)
            if len(ids) < spec.n_experts:
                resolved[layer] = tuple(sorted(ids))
        return resolved

    def _check_model(self, spec: MoESpec) -> None:
        if not self.model:
            return
        for key in ("architecture", "num_layers", "n_experts", "fingerprint"):
            want, got = self.model.get(key), getattr(spec, key)
            if want is not None and want != got:
                raise MaskError(
                    f"mask was made for another model ({key} {want!r}, this model has {got!r}); "
                    f"select a mask for this model"
                )

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        if self.model:
            out["model"] = self.model
        out["method"] = self.method
        out["provenance"] = self.provenance
        out["keep"] = {str(l): list(ids) for l, ids in sorted(self.keep.items())}
        return out

    def save(self, path: str | Path) -> None:
        data = self.to_dict()
        body = json.dumps({k: v for k, v in data.items() if k != "keep"}, indent=2)[:-2]
        rows = ",\n".join(f'    "{l}": {json.dumps(ids)}' for l, ids in data["keep"].items())
        atomic_write_text(path, body + ',\n  "keep": {\n' + rows + "\n  }\n}\n")

    def digest(self) -> str:
        blob = json.dumps({str(l): list(ids) for l, ids in sorted(self.keep.items())}, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self, spec: MoESpec) -> str:
        resolved = self.resolve(spec)
        kept = sum(len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers)
        return (
            f"mask on {len(resolved)} of {len(spec.moe_layers)} MoE layers, "
            f"{kept}/{len(spec.moe_layers) * spec.n_experts} experts kept"
        )


def check_group_reachability(spec: MoESpec, layer: int, ids: tuple[int, ...]) -> None:
    """Refuse a mask where some choice of `topk_group` groups the router can still make offers fewer
    than top_k kept experts (core.routing)."""
    if top_k_always_reachable(spec, ids):
        return
    worst, reachable_kept = worst_reachable_groups(spec, ids)
    raise MaskError(
        f"layer {layer}: the router may choose groups {worst} (topk_group={spec.topk_group}) "
        f"holding only {reachable_kept} kept experts < top_k={spec.top_k}; keep more experts in those groups"
    )


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + (None,):
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from easyep_sglang.core.spec import spec_from_model_path

    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.mask", description="Check or import expert masks.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a mask against a model; exit 2 with the reason if it cannot be served")
    check.add_argument("mask")
    check.add_argument("--model-path", required=True)
    imp = sub.add_parser("import-reference", help="convert the reference code's dense [moe_layers][experts] 0/1 matrix")
    imp.add_argument("matrix", help="JSON file holding the matrix")
    imp.add_argument("--model-path", required=True)
    imp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        spec = spec_from_model_path(args.model_path)
        if args.command == "check":
            print(ExpertMask.load(args.mask).summary(spec))
            return
        try:
            matrix = json.loads(Path(args.matrix).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MaskError(f"cannot read {args.matrix}: {err}") from None
        mask = ExpertMask.from_reference_matrix(matrix, spec, source=args.matrix)
        mask.summary(spec)
        mask.save(args.out)
        print(f"wrote {args.out}: {mask.summary(spec)}")
    except (MaskError, ValueError, FileNotFoundError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
