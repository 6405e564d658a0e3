"""The README's and docs/memory.md's "what fits where" table is what `python -m fluxkit.plan.where` computes (generated,
never typed), and its anchors hold: the HF QLoRA recipe at most 10 GiB on a 12 GB card, the reference's
full fine-tune on its 8 x 64 GB cards, every LoRA card size from 8 to 80 GB served by some rung."""

import os

import pytest

from conftest import ROOT

from fluxkit.plan import read_architecture
from fluxkit.plan.where import WHERE_BEGIN, WHERE_END, markdown, rows


@pytest.mark.parametrize("doc", ["README.md", os.path.join("docs", "memory.md")])
def test_the_doc_holds_the_generated_table(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    generated = text.split(WHERE_BEGIN, 1)[1].split(WHERE_END, 1)[0].strip()
    assert generated == markdown(read_architecture("black-forest-labs/FLUX.1-dev")), \
        f"{doc} is stale: run python -m fluxkit.plan.where --write {doc}"


def test_every_row_fits_and_the_anchors_hold():
    table = rows(read_architecture("black-forest-labs/FLUX.1-dev"))
    assert all(r["fits"] for r in table), [r for r in table if not r["fits"]]
    assert {r["card"] for r in table if r["run"].startswith("LoRA")} == {"8 GB", "12 GB", "16 GB", "24 GB", "48 GB", "80 GB"}
    qlora = next(r for r in table if r["run"].startswith("HF QLoRA"))
    assert qlora["plan"] <= 10 and "--blocks_to_swap" not in " ".join(qlora["flags"])
    reference = next(r for r in table if "reference" in r["run"])
    assert reference["card"] == "64 GB x 8" and reference["flags"] == ["--gradient_checkpointing", "ZeRO-2"]
    eight = next(r for r in table if r["card"] == "8 GB")
    assert any(f.startswith("--blocks_to_swap ") for f in eight["flags"])
