"""Runs the example notebooks top to bottom in a fresh `python3` kernel (nbclient).

examples/quickstart.ipynb is what a new user runs first, examples/train_moe.ipynb the
training example (moe.torch), examples/finetune_mixlora.ipynb the fine-tuning one (MixLoRA:
the MLPs of a frozen transformers decoder upcycled into moe.torch.SparseMoE(lora_rank=...),
against PEFT LoRA), so CI executes all three: any cell error fails the test, their plots must
render, and the training runs must have lowered the loss (and train_moe's balanced the load).
Needs nbclient, nbformat, ipykernel and matplotlib (skipped, saying which, without them);
train_moe.ipynb needs torch too, finetune_mixlora.ipynb torch, transformers and peft.
"""
import ast
import pathlib
import re

import pytest

import moe

nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat")
nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient")
pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel")
pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
TRAIN_NOTEBOOK = EXAMPLES / "train_moe.ipynb"
FINETUNE_NOTEBOOK = EXAMPLES / "finetune_mixlora.ipynb"


def tagged(nb, tag):
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def run_notebook(path, workdir, drop_tag=None):
    """The notebook at `path` after a run in `workdir`, without the cells tagged drop_tag."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    if drop_tag is not None:
        drop = tagged(nb, drop_tag)
        nb.cells = [c for c in nb.cells if c not in drop]
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"a cell of {path.name} failed:\n{exc}", pytrace=False)
    return nb


def stdout_lines(cell):
    return [line for out in cell.outputs if out.get("name") == "stdout"
            for line in out["text"].splitlines()]


def has_png(cell):
    return any("image/png" in out.get("data", {}) for out in cell.outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The quickstart after a run (once for the module), and whether it had moe.from_hf."""
    # The checkpoint cells need moe.from_hf; without it, run the rest and then skip.
    has_from_hf = hasattr(moe, "from_hf")
    nb = run_notebook(NOTEBOOK, tmp_path_factory.mktemp("notebook"),
                      drop_tag=None if has_from_hf else "from_hf")
    return nb, has_from_hf


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_moe.ipynb after a run (once for the module)."""
    pytest.importorskip("torch", reason="the training notebook needs torch")
    return run_notebook(TRAIN_NOTEBOOK, tmp_path_factory.mktemp("train_notebook"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """finetune_mixlora.ipynb after a run (once for the module)."""
    for name in ("torch", "transformers", "peft"):
        pytest.importorskip(name, reason=f"the fine-tuning notebook needs {name}")
    return run_notebook(FINETUNE_NOTEBOOK, tmp_path_factory.mktemp("finetune_notebook"))


def test_quickstart_notebook_runs(executed):
    nb, has_from_hf = executed
    (table,) = tagged(nb, "stats-table")
    html = [o["data"]["text/html"] for o in table.outputs if "text/html" in o.get("data", {})]
    assert html and "<table" in html[0], "display(RoutingStats) rendered no HTML table"
    (plot,) = tagged(nb, "stats-plot")
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), \
        "RoutingStats.plot() drew no figure"
    if not has_from_hf:
        pytest.skip("moe.from_hf does not exist yet: the notebook ran without its checkpoint "
                    "cells (tagged from_hf), which need it")


def test_first_gates_look_like_routing(executed):
    """The first printed gates must not be near one-hot: seeding the data and the layer
    alike once made router row e equal to x[e] / 8, so token e picked expert e with a gate
    of 0.997, which looks broken to a reader."""
    nb, _ = executed
    lines = [line for cell in nb.cells if cell.cell_type == "code"
             for out in cell.outputs if out.get("name") == "stdout"
             for line in out["text"].splitlines() if line.startswith("their gate weights:")]
    assert len(lines) == 1, lines
    gates = ast.literal_eval(lines[0].split(":", 1)[1].strip())
    assert max(gates[0]) < 0.99, lines[0]


def test_training_notebook_lowers_the_loss(trained):
    """The notebook asserts it too (last < 0.7 * first); this reads what it printed."""
    (check,) = tagged(trained, "loss-check")
    (line,) = [x for x in stdout_lines(check) if x.startswith("loss, mean of the first 20")]
    first, last = (float(v) for v in re.findall(r"\d+\.\d+", line))
    assert last < 0.7 * first, line
    for tag in ("loss-plot", "load-plot"):
        (cell,) = tagged(trained, tag)
        assert has_png(cell), f"the cell tagged {tag} drew no figure"


def test_training_notebook_shows_the_balancing_loss_at_work(trained):
    """With aux_coef=0.01 the load's coefficient of variation over the experts (the mean
    of the last 50 steps, per block) must be lower than without the loss: the effect the
    notebook's load-table cell claims."""
    (table,) = tagged(trained, "load-table")
    rows = {}
    for line in stdout_lines(table):
        if line.startswith("aux_coef="):
            name, *numbers = line.split()
            rows[name] = [float(v) for v in numbers]
    assert set(rows) == {"aux_coef=0.01", "aux_coef=0"}, rows
    cv_on, cv_off = rows["aux_coef=0.01"][:2], rows["aux_coef=0"][:2]
    assert sum(cv_on) < sum(cv_off), rows


def test_finetune_notebook_lowers_the_loss(finetuned):
    """The notebook asserts it too (last < 0.7 * first); this reads what it printed."""
    (check,) = tagged(finetuned, "loss-check")
    (line,) = [x for x in stdout_lines(check) if x.startswith("MixLoRA loss, mean of the first")]
    first, last = (float(v) for v in re.findall(r"\d+\.\d+", line))
    assert last < 0.7 * first, line
    for tag in ("loss-plot", "load-plot", "language-plot"):
        (cell,) = tagged(finetuned, tag)
        assert has_png(cell), f"the cell tagged {tag} drew no figure"


def test_finetune_notebook_starts_as_the_base(finetuned):
    """Upcycled, with every lora_b at zero, the MixLoRA model's logits are the base's: the
    check the notebook prints before training (and asserts)."""
    lines = [x for cell in finetuned.cells if cell.cell_type == "code"
             for x in stdout_lines(cell) if x.startswith("before training, |MixLoRA model - base|")]
    assert len(lines) == 1, lines
    assert float(lines[0].split("=")[1].split()[0]) < 1e-4, lines[0]


def test_finetune_notebook_compares_at_one_budget(finetuned):
    """The PEFT baseline's trainable-parameter count is within 5% of the MixLoRA model's
    (routers included): the comparison the notebook makes."""
    (cell,) = tagged(finetuned, "param-count")
    counts = {}
    for line in stdout_lines(cell):
        m = re.match(r"(MixLoRA|PEFT LoRA) .*?:\s+(\d+) trainable parameters", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
    assert set(counts) == {"MixLoRA", "PEFT LoRA"}, stdout_lines(cell)
    assert abs(counts["PEFT LoRA"] - counts["MixLoRA"]) <= 0.05 * counts["MixLoRA"], counts
