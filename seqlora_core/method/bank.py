"""The concept bank: ordered concepts with per-layer factors and sketches, one .safetensors file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..files import atomic_write_bytes
from . import bank_schema as schema
from .selection import check_concept_name, check_trigger
from .stats import Sketch
from .targets import LayerSpec, layer_spec

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks protection records and exact interference
FORMAT_TAG = "seqlora-bank"


class BankError(ValueError):
    """Base class of bank errors; the message names the file or field and the fix."""


class BankFormatError(BankError):
    """The file is not a readable SeqLoRA bank (corrupt, truncated, or another kind of file)."""


class BankVersionError(BankError):
    """The bank was written by a newer or unknown schema version."""


class BankMismatchError(BankError):
    """The bank's layers do not match the model's layers."""


class DuplicateConceptError(BankError):
    """A concept of that name is already in the bank."""


@dataclass
class ConceptLayer:
    """One concept at one layer: dW = B @ A (A: r x n basis, B: m x r), plus its activation sketch."""

    A: torch.Tensor
    B: torch.Tensor
    sketch: Sketch | None = None
    soft: bool = False  # True where the layer was full and orthogonality was a penalty only
    moment: torch.Tensor | None = None  # full n x n second moment (kept by the fusion baseline only)
    protection: dict | None = None  # activation-space protection at training: protected dims, energy, free dims


@dataclass
class Concept:
    """A learned (or imported) concept."""

    name: str
    triggers: list[str]
    rank: int
    method: str
    layers: dict[str, ConceptLayer]
    source: str = "trained"  # or "imported"
    loss_curve: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def delta(self, layer: str) -> torch.Tensor:
        """dW at ``layer`` (m x n, fp32)."""
        cl = self.layers[layer]
        return cl.B.float() @ cl.A.float()


def fingerprint(specs: Iterable[LayerSpec]) -> str:
    """A short hash of the adapted layers' names and shapes."""
    h = hashlib.sha256()
    for s in specs:
        h.update(f"{s.name}:{s.kind}:{s.out_features}:{s.in_features}:{s.kernel[0]}x{s.kernel[1]}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class ConceptBank:
    """Ordered concepts over a fixed set of adapted layers. Treat as immutable: methods return new banks.

    ``architecture`` is a lower-case family name ("sd15", "sd2", "sdxl", "toy", "tiny", ...).
    """

    layers: list[LayerSpec]
    layer_naming: str = "module"  # "diffusers", "ldm" or "module" (names as in the trained module)
    architecture: str = "unknown"
    prior: dict[str, Sketch] = field(default_factory=dict)  # concept 0: the base model's statistics
    concepts: list[Concept] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    # the header digest of the file this bank (or the bank it was made from) was read from: a later write
    # checks that the file is still that one, so a bank only ever replaces an older version of itself
    origin: str | None = field(default=None, compare=False, repr=False)

    # ---- queries -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return fingerprint(self.layers)

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def layer(self, name: str) -> LayerSpec:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(name)

    def concept(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"no concept {name!r} in the bank; it has: {', '.join(self.names()) or 'none'}")

    def index(self, name: str) -> int:
        return self.names().index(self.concept(name).name)

    # ---- new banks -------------------------------------------------------------------------
    def with_concept(self, concept: Concept) -> ConceptBank:
        """A new bank with ``concept`` appended (its name checked by ``selection.check_concept_name``)."""
        try:
            check_concept_name(concept.name, "concept name")
            for t in concept.triggers:
                check_trigger(t, f"trigger of {concept.name!r}")
        except ValueError as e:
            raise BankError(str(e)) from None
        if concept.name in self.names():
            raise DuplicateConceptError(
                f"concept name {concept.name!r} is already in the bank; choose another name, "
                "or remove the old concept from the bank first"
            )
        missing = [s.name for s in self.layers if s.name not in concept.layers]
        if missing:
            raise BankMismatchError(f"concept {concept.name!r} lacks {len(missing)} layers, e.g. {missing[0]!r}")
        return replace(self, concepts=[*self.concepts, concept])

    def with_prior(self, prior: dict[str, Sketch]) -> ConceptBank:
        return replace(self, prior=dict(prior))

    def truncated_before(self, name: str) -> ConceptBank:
        """The bank as it was before ``name`` was learned (drops it and every later concept)."""
        return replace(self, concepts=self.concepts[: self.index(name)])

    def without(self, name: str) -> ConceptBank:
        """A bank without ``name``; later concepts stay (their orthogonality to it still holds)."""
        self.concept(name)
        return replace(self, concepts=[c for c in self.concepts if c.name != name])

    def renamed_layers(self, mapping: dict[str, str], naming: str) -> ConceptBank:
        """The same bank with layer names translated (e.g. diffusers -> LDM) by ``mapping``."""
        unknown = [s.name for s in self.layers if s.name not in mapping]
        if unknown:
            raise BankMismatchError(
                f"no name mapping for {len(unknown)} bank layers, e.g. {unknown[0]!r}; "
                "the bank was trained on another architecture"
            )
        layers = [replace(s, name=mapping[s.name]) for s in self.layers]
        prior = {mapping[k]: v for k, v in self.prior.items()}
        concepts = [replace(c, layers={mapping[k]: v for k, v in c.layers.items()}) for c in self.concepts]
        return replace(self, layers=layers, prior=prior, concepts=concepts, layer_naming=naming)

    # ---- model checks --------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise BankMismatchError naming the layers that the model lacks or shapes differently."""
        problems = []
        for spec in self.layers:
            try:
                module = model.get_submodule(spec.name)
            except AttributeError:
                problems.append(f"{spec.name}: missing")
                continue
            base = getattr(module, "base", module)
            try:
                have = layer_spec(spec.name, base)
            except TypeError as e:
                problems.append(str(e))
                continue
            if have != spec:
                problems.append(
                    f"{spec.name}: bank {spec.out_features}x{spec.in_features}, "
                    f"model {have.out_features}x{have.in_features}"
                )
        if problems:
            raise BankMismatchError(
                f"this bank (fingerprint {self.fingerprint}, {self.architecture}, {self.layer_naming} names) "
                f"does not fit the model: {len(problems)} of {len(self.layers)} layers differ: "
                + "; ".join(problems[:5])
                + ("; ..." if len(problems) > 5 else "")
                + ". Use the base model the bank was trained on, or start a new bank."
            )

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the bank atomically (temp file in the same folder, then rename)."""
        tensors, header = _encode(self)
        data = st_save(tensors, metadata={"format": FORMAT_TAG, "seqlora": json.dumps(header)})
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptBank:
        """Read a bank; clear errors for a missing, corrupt, foreign, hostile or newer-version file.

        Every header value and tensor is checked (types, shapes, dtypes, finite values, limits) before
        anything uses it: a BankFormatError names the file, the concept and the layer."""
        path = _existing_bank_file(path)
        raw = path.read_bytes()
        header, count = _parse_header(path, raw, len(raw), check_version=True)
        try:
            tensors = st_load(raw)
        except SafetensorError as e:
            raise _corrupt(path, e) from e
        try:
            bank = _decode(header, tensors)
        except schema.SchemaError as e:
            raise BankFormatError(
                f"bank file {str(path)!r}: {e}. The file is damaged or was not written by SeqLoRA; "
                "restore it from a copy (a .bak beside it), or train into a new bank"
            ) from e
        bank.origin = _digest(raw[: 8 + int.from_bytes(raw[:8], "little")])
        return bank

    def check(self) -> None:
        """BankFormatError when a factor or sketch of this (in-memory) bank is misshapen or not finite."""
        tensors, header = _encode(self)
        try:
            schema.check_header(header, len(tensors))
            _decode(header, tensors)
        except schema.SchemaError as e:
            raise BankFormatError(f"this bank is damaged: {e}") from e


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def read_bank_header(path: str | os.PathLike, check_version: bool = False) -> dict:
    """A bank file's header (layers, concepts with triggers, rank, method, config, ...) without reading
    its tensors: what a file browser or a UI list needs. BankFormatError for a file that is not a bank
    or whose header breaks the format; with ``check_version``, BankVersionError for a schema this
    SeqLoRA does not read."""
    path = _existing_bank_file(path)
    head = _read_head(path)
    return _parse_header(path, head, path.stat().st_size, check_version)[0]


def header_summary(header: dict) -> dict:
    """What a UI lists of a bank from its header alone: family, naming, layer count, fingerprint, and each
    concept's name, triggers, rank, method, source and steps."""
    concepts = []
    for c in header.get("concepts", []):
        cfg = (c.get("info") or {}).get("config") or {}
        concepts.append(
            {
                "name": c["name"],
                "triggers": list(c.get("triggers", [])),
                "rank": c.get("rank"),
                "method": c.get("method"),
                "source": c.get("source", "trained"),
                "steps": cfg.get("steps"),
            }
        )
    return {
        "architecture": header.get("architecture"),
        "layer_naming": header.get("layer_naming"),
        "layers": len(header.get("layers", [])),
        "fingerprint": header.get("fingerprint"),
        "concepts": concepts,
    }


def header_digest(path: str | os.PathLike) -> str | None:
    """A digest of a file's safetensors header (its tensor table and metadata), or None when there is no
    file: two versions of a bank never share it."""
    path = Path(path)
    try:
        return _digest(_read_head(path))
    except FileNotFoundError:
        return None


def _digest(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


def _read_head(path: Path) -> bytes:
    """The first 8 bytes and the header they announce (when it is of a sane length)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 0 < n <= MAX_HEADER_BYTES:
            head += f.read(n)
    return head


def _existing_bank_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bank file {str(path)!r} does not exist; train a concept to create it")
    return path


def _corrupt(path: Path, why: object) -> BankFormatError:
    return BankFormatError(
        f"bank file {str(path)!r} is corrupt or truncated ({why}); restore it from a copy, "
        "or delete it to start a new bank"
    )


def _safetensors_header(head: bytes, size: int) -> tuple[dict, int]:
    """(``__metadata__``, tensor count) of a safetensors file from its first bytes (``size``: the file's)."""
    if len(head) < 8:
        raise ValueError("too short to be a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size or len(head) < 8 + n:
        raise ValueError("header length out of range")
    table = json.loads(head[8 : 8 + n])
    if not isinstance(table, dict):
        raise ValueError("the header is not a table of tensors")
    meta = table.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the header's metadata is not a table")
    return meta, len(table) - ("__metadata__" in table)


def _parse_header(path: Path, head: bytes, size: int, check_version: bool) -> tuple[dict, int]:
    """(The SeqLoRA header, the file's tensor count), from its first bytes; a clear error for anything else."""
    try:
        meta, count = _safetensors_header(head, size)
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise _corrupt(path, e) from e
    if meta.get("format") != FORMAT_TAG or not isinstance(meta.get("seqlora"), str):
        raise BankFormatError(
            f"{str(path)!r} is a safetensors file but not a SeqLoRA bank (it may be a LoRA: "
            "import it into a bank instead)"
        )
    try:
        header = json.loads(meta["seqlora"])
    except (ValueError, RecursionError) as e:
        raise BankFormatError(f"bank file {str(path)!r}: unreadable header ({e})") from e
    version = header.get("schema_version") if isinstance(header, dict) else None
    if check_version and version not in READABLE_VERSIONS:
        raise BankVersionError(
            f"bank file {str(path)!r} has schema version {version!r}; this SeqLoRA reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Update SeqLoRA to open it."
        )
    try:
        schema.check_header(header, count)
    except schema.SchemaError as e:
        raise BankFormatError(
            f"bank file {str(path)!r}: {e}. The file is damaged or was not written by SeqLoRA; restore it "
            "from a copy (a .bak beside it), or train into a new bank"
        ) from e
    return header, count


def _sketch_tensors(prefix: str, sk: Sketch, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.U"] = sk.U.detach().float().cpu().clone()
    out[f"{prefix}.s"] = sk.s.detach().float().cpu().clone()


def _encode(bank: ConceptBank) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    index = {s.name: i for i, s in enumerate(bank.layers)}
    prior_traces = {}
    for name, sk in bank.prior.items():
        _sketch_tensors(f"prior.{index[name]}", sk, tensors)
        prior_traces[str(index[name])] = sk.trace
    concepts = []
    for ci, c in enumerate(bank.concepts):
        layer_meta = {}
        for name, cl in c.layers.items():
            li = index[name]
            p = f"c{ci}.{li}"
            # clones: concepts may share tensors, and safetensors refuses shared storage
            tensors[f"{p}.A"] = cl.A.detach().float().cpu().clone()
            tensors[f"{p}.B"] = cl.B.detach().float().cpu().clone()
            entry: dict = {"soft": cl.soft}
            if cl.protection is not None:
                entry["protection"] = cl.protection
            if cl.sketch is not None:
                _sketch_tensors(p, cl.sketch, tensors)
                entry["trace"] = cl.sketch.trace
            if cl.moment is not None:
                tensors[f"{p}.S"] = cl.moment.detach().float().cpu().clone()
            layer_meta[str(li)] = entry
        concepts.append(
            {
                "name": c.name,
                "triggers": c.triggers,
                "rank": c.rank,
                "method": c.method,
                "source": c.source,
                "loss_curve": c.loss_curve,
                "timings": c.timings,
                "info": c.info,
                "layers": layer_meta,
            }
        )
    header = {
        "schema_version": SCHEMA_VERSION,
        "layer_naming": bank.layer_naming,
        "architecture": bank.architecture,
        "fingerprint": bank.fingerprint,
        "layers": [[s.name, s.kind, s.out_features, s.in_features, list(s.kernel)] for s in bank.layers],
        "prior_traces": prior_traces,
        "concepts": concepts,
        "meta": bank.meta,
    }
    return tensors, header


def _decode(header: dict, tensors: dict[str, torch.Tensor]) -> ConceptBank:
    """The bank a checked header names, every tensor checked on the way (``bank_schema``)."""
    layers = [LayerSpec(n, k, m, i, tuple(ker)) for n, k, m, i, ker in header["layers"]]
    prior = {}
    for li_s, trace in header.get("prior_traces", {}).items():
        li = int(li_s)
        spec = layers[li]
        u, s = schema.check_sketch(tensors, f"prior.{li}", spec.in_features, f"the prior at layer {spec.name!r}")
        prior[spec.name] = Sketch(u, s, float(trace))
    concepts = []
    for ci, c in enumerate(header["concepts"]):
        cls = {}
        for li_s, entry in c["layers"].items():
            li = int(li_s)
            spec = layers[li]
            p = f"c{ci}.{li}"
            where = f"concept {c['name']!r} at layer {spec.name!r}"
            a, b = schema.check_factors(tensors, p, spec.out_features, spec.in_features, where)
            sketch = None
            if f"{p}.U" in tensors or f"{p}.s" in tensors:
                u, s = schema.check_sketch(tensors, p, spec.in_features, where)
                sketch = Sketch(u, s, float(entry.get("trace", float("nan"))))
            cls[spec.name] = ConceptLayer(
                a,
                b,
                sketch,
                entry.get("soft", False),
                schema.check_moment(tensors, f"{p}.S", spec.in_features, where),
                entry.get("protection"),
            )
        concepts.append(
            Concept(
                c["name"],
                list(c["triggers"]),
                c["rank"],
                c["method"],
                cls,
                c.get("source", "trained"),
                list(c.get("loss_curve", [])),
                dict(c.get("timings", {})),
                dict(c.get("info", {})),
            )
        )
    bank = ConceptBank(
        layers,
        header.get("layer_naming", "module"),
        header.get("architecture", "unknown"),
        prior,
        concepts,
        dict(header.get("meta", {})),
    )
    if header.get("fingerprint") and header["fingerprint"] != bank.fingerprint:
        raise schema.SchemaError("the layer list does not match its recorded fingerprint")
    return bank
