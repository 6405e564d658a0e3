"""The "what fits where" table is what `python -m fluxkit.plan.where` computes (generated, never typed): the
full table in docs/memory.md, the short one in the README, and its anchors hold: the HF QLoRA recipe at most
10 GiB on a 12 GB card, the reference's full fine-tune on its 8 x 64 GB cards, every LoRA card size from 8 to
80 GB served by some rung, and a row per FLUX family beside its published numbers."""

import os

import pytest

from conftest import ROOT

from fluxkit.plan.where import ROWS, markdown, markers, rows


@pytest.fixture(scope="module")
def table():
    return rows()


@pytest.mark.parametrize("doc,short", [("README.md", True), (os.path.join("docs", "memory.md"), False)])
def test_the_doc_holds_the_generated_table(doc, short):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    begin, end, found_short = markers(text)
    assert found_short == short, f"{doc} should hold the {'short' if short else 'full'} table"
    generated = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert generated == markdown(short), f"{doc} is stale: run python -m fluxkit.plan.where --write {doc}"


def test_every_row_fits_and_the_anchors_hold(table):
    assert all(r["fits"] for r in table), [r for r in table if not r["fits"]]
    flux1 = [r for r in table if r["model"] == "FLUX.1 [dev]"]
    assert {r["card"] for r in flux1 if r["run"].startswith("LoRA")} == {"8 GB", "12 GB", "16 GB", "24 GB", "48 GB", "80 GB"}
    qlora = next(r for r in flux1 if r["run"].startswith("HF QLoRA"))
    assert qlora["plan"] <= 10 and "--blocks_to_swap" not in " ".join(qlora["flags"])
    reference = next(r for r in flux1 if "reference" in r["run"])
    assert reference["card"] == "64 GB x 8" and reference["flags"] == ["--gradient_checkpointing", "ZeRO-2"]
    eight = next(r for r in flux1 if r["card"] == "8 GB")
    assert any(f.startswith("--blocks_to_swap ") for f in eight["flags"])


def test_each_family_has_rows_beside_its_published_numbers(table):
    by = {(r["model"], r["card"]): r for r in table}
    # klein 4B on 12 GB and 9B on 24 GB in bf16, as SimpleTuner's bf16 numbers (12 / 22 GB); int8 on 8 / 16 GB
    assert "--base_quantization" not in " ".join(by[("FLUX.2 [klein] 4B", "12 GB")]["flags"])
    assert "--base_quantization" not in " ".join(by[("FLUX.2 [klein] 9B", "24 GB")]["flags"])
    assert "--base_quantization int8" in by[("FLUX.2 [klein] 9B", "16 GB")]["flags"]
    # FLUX.2 [dev] on 24 GB: its 24B text encoder encodes on the host, whose RAM holds it (33.3 GiB in bf16: no output
    # head, vision tower or unread layers) ...
    dev24 = next(r for r in table if (r["model"], r["card"], r["run"]) == ("FLUX.2 [dev]", "24 GB", "LoRA rank 16, 1024px, batch 1"))
    assert dev24["host"] > 33 and any("prompts encoded on the host" in f for f in dev24["flags"])
    assert "96 GB+" in dev24["published"]
    # ... or, 4-bit (SimpleTuner's int4 recipe, ~22 GB), on the device beside the VAE: 10.3 GiB packed, and the
    # host holds one tensor at a time while it loads (the 1.3 GiB embedding), not 33.3 GiB
    dev24q = next(r for r in table if r["model"] == "FLUX.2 [dev]" and "4-bit text encoder" in r["run"])
    assert "--text_encoder_quantization nf4" in dev24q["flags"] and dev24q["card"] == "24 GB" and dev24q["plan"] <= 22
    assert not any("prompts encoded on the host" in f for f in dev24q["flags"]) and dev24q["host"] < 4
    assert "int4 text encoder" in dev24q["published"]
    # Kontext trains on pairs: its rows count the reference tokens
    assert all("editing pairs" in " ".join(r["flags"]) for r in table if r["model"].startswith("FLUX.1 Kontext"))
    assert {"FLUX.2 [dev]", "FLUX.1 Kontext [dev]"} <= {r["model"] for r in table if r["card"] == "64 GB x 8"}


def test_the_readme_copy_is_short():
    short = rows(short=True)
    assert len(short) <= 8 < len(ROWS)
    assert {r["model"] for r in short} == {r["model"] for r in rows()}  # every family, a row each at least
