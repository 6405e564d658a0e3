"""--offload_encoders: the frozen encoders visit the device only while encoding, and nothing else changes.

On this CPU-only host the device *is* host memory, so where a parameter lies proves nothing: a
resident and an offloaded encoder both report "cpu". What the test can observe on the real code
path is the order of events on each encoder: its moves (`.to(...)` with a device) and its
encodes (forward passes). Offloaded, every encode sits between a move in and a move out, and at
every optimizer-step boundary an encoder's latest event is a move out; resident, an encoder is
moved once (to the device, at setup) and never again. The loss sequence must not change at all.
"""

import json
import os

import pytest
import torch

from conftest import ROOT, run_entry_inprocess as train_inprocess
from conftest import trainer_args as base_args

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")


def _losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "train_log.jsonl"))]


def _watch_encoders(monkeypatch):
    """(events, boundaries): events per encoder class ('to:<device>' or 'encode'), and at every
    optimizer step the latest event of each encoder plus the devices of its parameters."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    import fluxkit.training.train

    events = {cls.__name__: [] for cls in (AutoencoderKL, CLIPTextModel, T5EncoderModel)}
    hooked = set()

    def watch(cls):
        original = cls.to

        def to(self, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)):  # a move, not a dtype cast
                events[cls.__name__].append(f"to:{torch.device(target).type}")
                if id(self) not in hooked:  # the VAE encodes through .encode -> its encoder's forward
                    hooked.add(id(self))
                    encoder = self.encoder if isinstance(self, AutoencoderKL) else self
                    encoder.register_forward_pre_hook(lambda *_: events[cls.__name__].append("encode"))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "to", to)

    for cls in (AutoencoderKL, CLIPTextModel, T5EncoderModel):
        watch(cls)

    boundaries = []
    record_step = fluxkit.training.train.record_step

    def at_step_boundary(run, loss):
        modules = {"AutoencoderKL": run.models.vae, "CLIPTextModel": run.models.text_encoder,
                   "T5EncoderModel": run.models.text_encoder_2}
        boundaries.append({name: ((events[name] or ["none"])[-1], {p.device.type for p in mod.parameters()})
                           for name, mod in modules.items()})
        record_step(run, loss)

    monkeypatch.setattr(fluxkit.training.train, "record_step", at_step_boundary)
    return events, boundaries


def test_offloaded_encoders_visit_only_while_encoding_and_losses_match(tiny_flux, sample_data, tmp_path, monkeypatch):
    # --no_cache: every step encodes its images and prompt, as a run that cannot cache up front
    common = dict(steps=3, no_cache=True)
    events, boundaries = _watch_encoders(monkeypatch)
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "resident", **common)) == 0
    resident = {name: list(seq) for name, seq in events.items()}
    for seq in events.values():
        seq.clear()
    boundaries.clear()
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "offload", offload_encoders=True, **common)) == 0

    assert _losses(tmp_path / "offload") == _losses(tmp_path / "resident") and len(_losses(tmp_path / "resident")) == 3

    for name, seq in resident.items():  # placed on the device once, then it encodes in place
        assert seq[0] == "to:cpu" and seq.count("encode") >= 3 and [e for e in seq if e != "encode"] == ["to:cpu"], (name, seq)
    for name, seq in events.items():
        # offloaded: (move in, encode(s), move out) per visit, one visit per step at least, no encode outside a visit
        assert seq and seq[0].startswith("to:") and seq[-1] == "to:cpu", (name, seq)
        visits, inside = 0, False
        for e in seq:
            if e.startswith("to:"):
                inside = not inside
                visits += inside
            else:
                assert inside, (name, seq)
        assert not inside and visits >= 3, (name, seq)
    assert len(boundaries) == 3
    for at_step in boundaries:  # between steps every encoder has been moved out, and lies in host memory
        for name, (last, devices) in at_step.items():
            assert last == "to:cpu" and devices == {"cpu"}, (name, at_step)


class _Recorder:
    """A module stand-in that records where it is moved (a device object or a string, as given)."""

    def __init__(self, name, moves):
        self.name, self.moves = name, moves

    def to(self, target):
        self.moves.append((self.name, target))
        return self


def test_visit_moves_to_the_device_given_and_back_to_the_host():
    """On this CPU host the visiting device and the host are both "cpu"; a device object of another
    kind shows which way each move goes: in to exactly the device given, out to the host (also when
    encoding fails), the transformer and a training CLIP untouched, and nothing without the flag."""
    from types import SimpleNamespace

    from fluxkit.training.offload import encoders_visiting

    moves = []
    m = SimpleNamespace(**{name: _Recorder(name, moves) for name in ("vae", "text_encoder", "text_encoder_2", "transformer")})
    device = torch.device("cuda", 1)
    args = SimpleNamespace(offload_encoders=True, train_text_encoder=False)
    with encoders_visiting(args, m, device):
        assert sorted(moves) == [("text_encoder", device), ("text_encoder_2", device), ("vae", device)]
        moves.clear()
    assert sorted(name for name, _ in moves) == ["text_encoder", "text_encoder_2", "vae"]
    assert all(torch.device(target) == torch.device("cpu") for _, target in moves), moves

    moves.clear()
    with pytest.raises(RuntimeError):
        with encoders_visiting(SimpleNamespace(offload_encoders=True, train_text_encoder=True), m, device):
            raise RuntimeError("encoding failed")
    assert [name for name, _ in moves] == ["vae", "text_encoder_2"] * 2  # a training CLIP stays with the transformer
    assert [torch.device(t) for _, t in moves[2:]] == [torch.device("cpu")] * 2

    moves.clear()
    with encoders_visiting(SimpleNamespace(offload_encoders=False, train_text_encoder=False), m, device):
        pass
    assert moves == []
