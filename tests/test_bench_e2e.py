"""benchmarks/bench_e2e.py --tiny on one architecture: the patched model and transformers'
expert paths agree (its checks stop the run otherwise) and three table rows come out."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_e2e as be  # noqa: E402


def test_tiny_run(tmp_path):
    before = torch.get_num_threads(), be.moe.get_num_threads()
    out = tmp_path / "e2e.md"
    try:
        rows = be.main(["--tiny", "--archs", "qwen3_moe", "--out", str(out)])
    finally:
        torch.set_num_threads(before[0])
        be.moe.set_num_threads(before[1])
    assert len(rows) == 3
    for row, task in zip(rows, ("prefill 64 ms", "decode 32 tok/s", "train step 64 ms")):
        assert row.startswith(f"| qwen3_moe | {task} |") and row.count("|") == 10, row
        assert row.rstrip(" |").endswith("x"), row
    text = out.read_text()
    assert "greedy tokens identical" in text and "patched logits" in text


def test_tiny_bf16_run():
    before = torch.get_num_threads(), be.moe.get_num_threads()
    try:
        rows = be.main(["--tiny", "--archs", "mixtral", "--dtype", "bfloat16"])
    finally:
        torch.set_num_threads(before[0])
        be.moe.set_num_threads(before[1])
    assert len(rows) == 3 and all(r.count("|") == 10 for r in rows), rows


def test_without_moe_replaces_every_block():
    model = be.build("deepseek_v3", tiny=True)
    free = be.without_moe(model)
    assert sum(isinstance(m, be.FreeMoE) for m in free.modules()) == \
        model.config.num_hidden_layers
    assert not any(isinstance(m, be.FreeMoE) for m in model.modules())
