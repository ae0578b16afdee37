"""Hostile and broken files: the bank and LoRA loaders give a clear error or a valid bank, never a crash,
a hang or a memory blow-up (property tests over mutated headers, tensors, truncations and huge counts)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from seqlora_core.apps.heatmap import heatmap_image
from seqlora_core.interop.bank_lora import export_concept, import_lora
from seqlora_core.interop.lora_read import read_lora_file
from seqlora_core.method.bank import (
    FORMAT_TAG,
    BankError,
    BankFormatError,
    ConceptBank,
    read_bank_header,
)
from seqlora_core.method.bank_schema import MAX_CONCEPTS
from seqlora_core.method.report import build_report, report_text
from tests._banks import synthetic_bank

FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    synthetic_bank().save(path)
    return path


def _parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["seqlora"])
    return header, load_file(path)


def _write(path: Path, header: object, tensors: dict[str, torch.Tensor]) -> None:
    path.write_bytes(st_save(tensors, metadata={"format": FORMAT_TAG, "seqlora": json.dumps(header)}))


def _must_be_clear_or_valid(path: Path) -> str:
    """Load ``path``: a BankError naming the file, or a bank that passes its own check and reports."""
    try:
        read_bank_header(path, check_version=True)
    except BankError as e:
        assert path.name in str(e), str(e)
    try:
        bank = ConceptBank.load(path)
    except BankError as e:
        assert path.name in str(e), str(e)
        return "refused"
    bank.check()
    rep = build_report(bank)
    report_text(rep)
    heatmap_image(rep)
    return "loaded"


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
    st.sampled_from(["\x1b[31mred", "a" * 5000, "0", "-1", "1e400", "linear", "conv2d"]),
)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_headers_are_refused_or_valid(bank_file: Path, tmp_path: Path, data) -> None:
    header, tensors = _parts(bank_file)
    paths = _paths(header)
    target = data.draw(st.sampled_from(paths[1:]))
    op = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
    parent = header
    for k in target[:-1]:
        parent = parent[k]
    last = target[-1]
    if op == "replace" or (op == "duplicate" and not isinstance(parent, list)):
        parent[last] = data.draw(JSON_VALUES)
    elif op == "delete":
        del parent[last]
    else:
        parent.insert(last, parent[last])
    path = tmp_path / "mutated.safetensors"
    _write(path, header, tensors)
    _must_be_clear_or_valid(path)


TENSOR_OPS = ("nan", "inf", "int", "bool", "half", "drop_row", "transpose", "extra_dim", "empty", "delete", "huge")


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_tensors_are_refused_or_valid(bank_file: Path, tmp_path: Path, data) -> None:
    header, tensors = _parts(bank_file)
    key = data.draw(st.sampled_from(sorted(tensors)))
    op = data.draw(st.sampled_from(TENSOR_OPS))
    t = tensors[key]
    if op == "nan":
        t = t.clone().flatten()
        t[data.draw(st.integers(0, t.numel() - 1))] = float("nan")
        t = t.view(tensors[key].shape)
    elif op == "inf":
        t = t.clone() * float("inf")
    elif op == "int":
        t = t.to(torch.int32)
    elif op == "bool":
        t = t > 0
    elif op == "half":
        t = t.half()
    elif op == "drop_row":
        t = t[:-1].contiguous() if t.shape[0] > 1 else t[:0].contiguous()
    elif op == "transpose":
        t = t.T.contiguous() if t.dim() == 2 else t[None]
    elif op == "extra_dim":
        t = t[None].contiguous()
    elif op == "empty":
        t = torch.zeros(0, *t.shape[1:])
    elif op == "huge":
        t = t.clone() * 1e38
    if op == "delete":
        del tensors[key]
    else:
        tensors[key] = t
    path = tmp_path / "mutated.safetensors"
    _write(path, header, tensors)
    outcome = _must_be_clear_or_valid(path)
    if op in ("nan", "inf", "int", "bool", "delete", "extra_dim", "empty"):
        assert outcome == "refused", (key, op)


@pytest.mark.slow
@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9), flips=st.lists(st.integers(0, 10**9), max_size=6))
def test_truncated_and_bit_flipped_files_are_refused_or_valid(bank_file: Path, tmp_path: Path, cut, flips) -> None:
    raw = bytearray(bank_file.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for f in flips:  # flip bytes of the header, where a flip changes structure rather than one value
        raw[f % header_end] ^= 0x5A
    path = tmp_path / "broken.safetensors"
    path.write_bytes(bytes(raw[: cut % (len(raw) + 1)]))
    _must_be_clear_or_valid(path)


@pytest.mark.slow
def test_a_header_of_200k_empty_concepts_is_refused_quickly_and_in_little_memory(bank_file, tmp_path) -> None:
    """The attack from the report: a 16 MB header with 200,000 concepts used to load and then make the
    report build an N x N table until the kernel killed it."""
    header, tensors = _parts(bank_file)
    header["concepts"] = [
        {"name": f"c{i}", "triggers": [], "rank": 1, "method": "seqlora", "layers": {}} for i in range(200_000)
    ]
    path = tmp_path / "many.safetensors"
    _write(path, header, tensors)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        for read in (lambda: read_bank_header(path), lambda: ConceptBank.load(path)):
            with pytest.raises(BankFormatError, match=f"at most {MAX_CONCEPTS}"):
                read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


@pytest.mark.parametrize("count", [40, MAX_CONCEPTS + 1])
def test_more_concepts_than_the_file_holds_tensors_for_are_refused(bank_file, tmp_path, count) -> None:
    header, tensors = _parts(bank_file)
    first = header["concepts"][0]
    header["concepts"] = [{**first, "name": f"c{i}"} for i in range(count)]
    path = tmp_path / "lying.safetensors"
    _write(path, header, tensors)
    with pytest.raises(BankFormatError, match="tensors|at most"):
        ConceptBank.load(path)


def test_nan_in_a_concept_is_refused_with_its_name_and_layer(bank_file, tmp_path) -> None:
    header, tensors = _parts(bank_file)
    tensors["c1.2.B"] = tensors["c1.2.B"].clone()
    tensors["c1.2.B"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    _write(path, header, tensors)
    layer = header["layers"][2][0]
    with pytest.raises(BankFormatError) as err:
        ConceptBank.load(path)
    assert "'c1'" in str(err.value) and layer in str(err.value) and "NaN" in str(err.value)
    assert "nan.safetensors" in str(err.value)


def test_control_characters_in_names_are_refused(bank_file, tmp_path) -> None:
    header, tensors = _parts(bank_file)
    header["concepts"][0]["name"] = "\x1b]0;owned\x07dog"
    path = tmp_path / "escape.safetensors"
    _write(path, header, tensors)
    with pytest.raises(BankFormatError, match="control characters"):
        ConceptBank.load(path)


# ----------------------------------------------------------------------------------------------- LoRA files


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> tuple[ConceptBank, Path]:
    bank = synthetic_bank()
    path = tmp_path_factory.mktemp("lora") / "good_lora.safetensors"
    export_concept(bank, "c0", path, "kohya", "fp32")
    return bank, path


LORA_OPS = ("nan", "inf", "int", "rank0", "vector_alpha", "nan_alpha", "drop_row", "extra_dim", "delete", "3d")


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_lora_files_import_or_give_a_clear_error(lora_file, tmp_path: Path, data) -> None:
    bank, good = lora_file
    tensors = load_file(good)
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    key = data.draw(st.sampled_from(sorted(tensors)))
    op = data.draw(st.sampled_from(LORA_OPS))
    t = tensors[key]
    if op == "nan":
        t = t.clone()
        t.view(-1)[0] = float("nan")
    elif op == "inf":
        t = t.clone() * float("inf")
    elif op == "int":
        t = t.to(torch.int64)
    elif op == "rank0":
        t = torch.zeros(0, *t.shape[1:]) if t.dim() else t
    elif op == "vector_alpha":
        t = torch.ones(3) * 2
    elif op == "nan_alpha":
        t = torch.tensor(float("nan"))
    elif op == "drop_row":
        t = t[:-1].contiguous() if t.dim() and t.shape[0] > 1 else t
    elif op == "extra_dim":
        t = t[None].contiguous()
    elif op == "3d":
        t = t.reshape(1, *t.shape).expand(2, *t.shape).contiguous() if t.dim() else t
    if op == "delete":
        del tensors[key]
    else:
        tensors[key] = t
    if data.draw(st.booleans()):
        meta[data.draw(st.sampled_from(["lora_adapter_metadata", "ss_tag_frequency", "modelspec.trigger_phrase"]))] = (
            data.draw(st.sampled_from(["{", "[1,2]", '{"a": {"b": "x"}}', "\x1b[2J", "null", '{"lora_alpha": "x"}']))
        )
    path = tmp_path / "mutated_lora.safetensors"
    path.write_bytes(st_save(tensors, metadata=meta))
    try:
        factors, _, _ = read_lora_file(path, "diffusers")
    except ValueError as e:
        assert path.name in str(e), str(e)
        return
    for down, up in factors.values():
        assert bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())
    try:
        new = import_lora(bank, path, "imported")
    except (ValueError, BankError) as e:
        assert path.name in str(e) or "imported" in str(e), str(e)
        return
    new.check()


@pytest.mark.parametrize(
    "op,message",
    [
        ("nan", "NaN or infinite weights"),
        ("rank0", "rank 0"),
        ("vector_alpha", "alpha holds 3 values"),
        ("nan_alpha", "alpha is nan"),
        ("int", "dtype torch.int64"),
    ],
)
def test_bad_lora_parts_name_the_file_and_module(lora_file, tmp_path, op, message) -> None:
    bank, good = lora_file
    tensors = load_file(good)
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    alpha = down.replace("lora_down.weight", "alpha")
    if op == "nan":
        tensors[down] = tensors[down].clone()
        tensors[down][0, 0] = float("nan")
    elif op == "rank0":
        tensors[down] = torch.zeros(0, tensors[down].shape[1])
    elif op == "vector_alpha":
        tensors[alpha] = torch.ones(3)
    elif op == "nan_alpha":
        tensors[alpha] = torch.tensor(float("nan"))
    elif op == "int":
        tensors[down] = tensors[down].to(torch.int64)
    path = tmp_path / "bad_lora.safetensors"
    path.write_bytes(st_save(tensors))
    with pytest.raises(ValueError) as err:
        import_lora(bank, path, "theirs")
    assert message in str(err.value) and "bad_lora.safetensors" in str(err.value) and "module" in str(err.value)
