"""Each editing family through our LoRA trainer under 2-process DeepSpeed on CPU (gloo, bf16):
FLUX.2 [klein] under ZeRO-2 on an NF4 base with pairs from --cond_image_dir, FLUX.1 Kontext under
ZeRO-3 (every parameter sharded) with pairs from a parquet --cond_image_column, FLUX.2 [dev] under
ZeRO-2 on an NF4 base through the LoRA launcher as a user types it (--key=value, pairs from
--cond_image_dir, the launcher's gradient checkpointing).

Each family costs ONE chain of two launches, shared by every test here (module-scoped fixture):
the first run (4 pairs, --repeats 2: 8 samples, 4 steps of one sample per rank, one epoch)
checkpoints every step and is SIGKILLed inside checkpoint 3, after every rank wrote its state and
before the rename that completes it, so `.partial-checkpoint-3` holds the state of an uninterrupted
run after step 3 (each rank's optimizer partition, its fp32 master weights and Adam moments, the
LoRA file); the second run resumes from checkpoint-2, mid-epoch, and writes checkpoint-3 again,
which must equal it bit for bit, rank by rank. Both runs record each rank's micro batches
(tests/faults/sitecustomize.py: FLUXKIT_TEST_RECORD_BATCHES), with the image and text tokens each
transformer forward received: the reference's tokens beside the target's.

The klein data holds a reference image whose header scans but whose pixels do not decode, with
--skip_bad_images and the cache: the process whose fill share holds it records it in the shared
cache folder, and every process must replace that pair by the same sample (fluxkit/data/dataset.py
draws the replacement from (seed, epoch, index)); a rank that did not know would crash on the
missing latent.

Two more launches: the klein full fine-tune under ZeRO-3 (the full trainer's gather of a FLUX.2
transformer into a pipeline folder), and FLUX.2 [dev] LoRA under ZeRO-3, text-to-image.

The other stage of klein and Kontext, klein LoRA under ZeRO-3 and Kontext LoRA under ZeRO-2, runs in
THIS process as a 1-process DeepSpeed run (no launch: the environment `accelerate launch
--num_processes 1` would give its process, derived by accelerate's own launch code, and a gloo group
of one): a real DeepSpeed engine of that stage trains each family's pairs; what needs a second rank
(each rank's partition, replays, the shared skip record) is the chains' part. Tried by hand and not
run here: klein on an unquantized base under ZeRO-2 (this module's chain before it took the NF4 base).
"""

import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, accelerate_launch, free_port, run_entry_inprocess, trainer_args, with_faults
from test_data_train import damaged_png
from test_launchers import LORA as LORA_LAUNCHER, launch_inprocess
from test_reliability import KILL_IN_CHECKPOINT, LORA, listing, log_lines

RECORD = "FLUXKIT_TEST_RECORD_BATCHES"  # tests/faults/sitecustomize.py
SHARD_ALL = os.path.join(ROOT, "tests", "fixtures", "zero3_shard_everything.yaml")
ZERO2 = os.path.join(ROOT, "pretrain_bf16_accelerate_config.yaml")
STEPS, KILLED_IN = 4, 3
BAD = "pair_002.png"  # klein's undecodable reference
DEV_TOKENS = 48  # the tiny FLUX.2 [dev] tokenizer's system message alone takes 33 tokens
# each chain: its model fixture, family, ZeRO stage, base quantization, text tokens, a reference's first position id
CHAINS = {
    "klein-zero2": SimpleNamespace(model="tiny_klein", family="flux2-klein", stage=2, quant="nf4", text=16, ref_t=10),
    "kontext-zero3": SimpleNamespace(model="tiny_flux", family="kontext", stage=3, quant="none", text=16, ref_t=1),
    "dev-zero2": SimpleNamespace(model="tiny_flux2_dev", family="flux2", stage=2, quant="nf4", text=DEV_TOKENS, ref_t=10),
}


def _dev_keys(model, data, tmp):
    """FLUX.2 [dev]'s chain as the LoRA launcher's --key=value keys (its defaults otherwise: ZeRO-2 bf16,
    gradient checkpointing)."""
    keys = dict(model_name=model, instance_dir=data["edit_targets"], cond_image_dir=data["edit_references"],
                instance_prompt="a photo of sks dog", resolution=32, batch_size=1, max_train_steps=STEPS, repeats=2,
                num_processes=2, base_quantization="nf4", max_sequence_length=DEV_TOKENS, learning_rate="1e-3",
                checkpointing_steps=1, resume_from_checkpoint="latest", latent_cache_dir=tmp / "cache",
                validation_prompt="make the circle blue", num_validation_images=1, num_validation_steps=2,
                output_dir=tmp / "out", report_to="none")
    return [f"--{k}={v}" for k, v in keys.items()]


def _launch(name, config, args, env):
    if name == "dev-zero2":  # the launcher's main() here; accelerate and the trainer are real processes
        return launch_inprocess(LORA_LAUNCHER, *args, env=with_faults(env))
    return accelerate_launch([LORA] + args, config=config, timeout=600, env=with_faults(env))


def _family_args(name, model, data, tmp):
    """(accelerate config, trainer flags) of one family's chain (the launcher's keys for dev)."""
    if name == "dev-zero2":
        return None, _dev_keys(model, data, tmp)
    common = dict(steps=STEPS, repeats=2, max_sequence_length=16, learning_rate="1e-3", checkpointing_steps=1,
                  mixed_precision="bf16", resume_from_checkpoint="latest", latent_cache_dir=tmp / "cache",
                  validation_prompt="make the circle blue", num_validation_images=1, num_validation_steps=2)
    if name == "klein-zero2":
        refs = tmp / "references"
        shutil.copytree(data["edit_references"], refs)
        damaged_png(refs / BAD, size=(32, 32))
        # on an NF4 base (FLUX.1's quantized base under DeepSpeed, for klein: no extra launch)
        args = trainer_args(model, data, tmp / "out", cond_image_dir=refs, skip_bad_images=True, base_quantization="nf4",
                            **common)
        args[args.index("--instance_data_dir") + 1] = data["edit_targets"]
        return ZERO2, args
    args = trainer_args(model, data, tmp / "out", model_family="kontext", dataset_name=data["edit_dataset"],
                        caption_column="text", cond_image_column="cond_image", **common)
    i = args.index("--instance_data_dir")
    return SHARD_ALL, args[:i] + args[i + 2:]


def _records(folder):
    return {r: [json.loads(line) for line in open(os.path.join(folder, f"rank-{r}.jsonl"))] for r in (0, 1)}


@pytest.fixture(scope="module", params=list(CHAINS))
def chain(request, sample_data, tmp_path_factory):
    name, spec = request.param, CHAINS[request.param]
    model = request.getfixturevalue(spec.model)
    tmp = tmp_path_factory.mktemp(name)
    config, args = _family_args(name, model, sample_data, tmp)
    out = tmp / "out"
    killed = _launch(name, config, args, {KILL_IN_CHECKPOINT: str(KILLED_IN), RECORD: str(tmp / "ranks-killed")})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert listing(out) == [f".partial-checkpoint-{KILLED_IN}", "checkpoint-1", "checkpoint-2"], killed.stderr[-3000:]
    uninterrupted = tmp / "uninterrupted-3"  # the resumed run replaces the partial folder
    shutil.copytree(out / f".partial-checkpoint-{KILLED_IN}", uninterrupted)
    killed_log = log_lines(out)
    resumed = _launch(name, config, args, {RECORD: str(tmp / "ranks-resumed")})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return SimpleNamespace(name=name, spec=spec, args=args, out=out, tmp=tmp, killed=killed, resumed=resumed,
                           killed_log=killed_log, uninterrupted=uninterrupted, ranks_killed=_records(tmp / "ranks-killed"),
                           ranks_resumed=_records(tmp / "ranks-resumed"), model=model,
                           reference=os.path.join(sample_data["edit_references"], "pair_000.png"))


def _tensors(obj, prefix=""):
    """Every tensor inside a nested dict/list, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def _optimizer_partition(checkpoint, rank):
    """(ZeRO stage, every tensor) of one rank's DeepSpeed optimizer file: its fp32 master partition and Adam moments."""
    path = os.path.join(checkpoint, "pytorch_model", f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return state["zero_stage"], _tensors({k: v for k, v in state.items() if k != "loss_scaler"})


@pytest.mark.multiproc
def test_each_rank_resumes_bit_identical_under_its_zero_stage(chain):
    from safetensors.torch import load_file

    stage = chain.spec.stage
    resumed_3 = chain.out / f"checkpoint-{KILLED_IN}"
    for rank in (0, 1):  # each rank's own partition: written by the killed run's rank, and again after the resume
        (stage_a, before), (stage_b, after) = _optimizer_partition(chain.uninterrupted, rank), _optimizer_partition(resumed_3, rank)
        assert int(stage_a) == int(stage_b) == stage
        assert before.keys() == after.keys() and before, rank
        differ = [k for k in before if not torch.equal(before[k], after[k])]
        assert not differ, f"rank {rank}: {len(differ)} of {len(before)} optimizer tensors differ, e.g. {differ[:3]}"
    lora_before, lora_after = (load_file(os.path.join(c, "pytorch_lora_weights.safetensors")) for c in (chain.uninterrupted, resumed_3))
    assert lora_before.keys() == lora_after.keys() and all(torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    # the log: the killed run logged steps 1-3; the resumed one kept 1-2 (its checkpoint) and logged 3-4,
    # step 3 trained again with the loss the killed run had
    log = log_lines(chain.out)
    assert [r["step"] for r in chain.killed_log] == [1, 2, 3] and [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[:3] == chain.killed_log[:2] + [log[2]] and log[2]["loss"] == chain.killed_log[2]["loss"]
    summary = json.loads((chain.out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS
    settings = json.loads((chain.out / "run_config.json").read_text())["settings"]
    assert settings["base_quantization"] == chain.spec.quant


@pytest.mark.multiproc
def test_each_rank_records_its_own_batches_and_the_resume_replays_them(chain):
    killed, resumed = chain.ranks_killed, chain.ranks_resumed
    for rank in (0, 1):
        assert [b["step"] for b in killed[rank]] == [0, 1, 2] and [b["step"] for b in resumed[rank]] == [2, 3], rank
        assert killed[rank][2]["index"] == resumed[rank][0]["index"], rank  # step 3 again: the same samples per rank
    # 8 samples over 2 ranks, batch 1: the epoch's 4 steps, one sample per rank and step, every sample once
    epoch = [b["index"] for r in (0, 1) for b in killed[r][:2] + resumed[r]]
    assert all(len(i) == 1 for i in epoch)
    if chain.name != "klein-zero2":  # (klein's undecodable pair is replaced: the test below)
        assert sorted(i[0] for i in epoch) == list(range(8))


@pytest.mark.multiproc
def test_every_forward_takes_the_reference_tokens_beside_the_targets(chain):
    """What reached the transformer on each rank: an editing pair's reference tokens after the target's
    (twice a 32 px image's tokens), at their own position on the ids' first axis, and the text tokens."""
    from fluxkit.plan import read_architecture
    from fluxkit.shared.flops import image_tokens

    target = image_tokens(32, 32, read_architecture(chain.model, family=chain.spec.family).vae_scale)
    expected = {"image_tokens": 2 * target, "text_tokens": chain.spec.text, "id_t": [0, chain.spec.ref_t]}
    for records in (chain.ranks_killed, chain.ranks_resumed):
        for rank in (0, 1):
            assert all(b["forwards"] == [expected] for b in records[rank]), (rank, records[rank])


def _shown(chain):
    """Counter of the sample indices the ranks trained in the (one) epoch."""
    return Counter(i for r in (0, 1) for b in chain.ranks_killed[r][:2] + chain.ranks_resumed[r] for i in b["index"])


@pytest.mark.multiproc
@pytest.mark.parametrize("chain", ["klein-zero2"], indirect=True)  # the chain holding the undecodable reference
def test_an_undecodable_reference_is_replaced_alike_on_every_rank(chain, capsys):
    from fluxkit.data.dataset import DreamBoothDataset
    from fluxkit.training.train_args import parse

    args = parse(chain.args, lora=True)
    dataset = DreamBoothDataset(args, seed=0)  # decodes here: finds the damaged reference itself
    bad = [i for i in range(len(dataset)) if dataset.reference_of(i).name.endswith(BAD)]
    assert bad == [2, 6]  # pair_002, shown twice per epoch (--repeats 2)
    expected = Counter(dataset.readable_sample(i, 0)[0] for i in range(len(dataset)))
    assert not set(bad) & set(expected) and sum(expected.values()) == 8
    # what the ranks trained is the replacement map fluxkit/data/dataset.py draws: whichever rank drew the bad pair
    # replaced it with the sample the other rank (or this process) would have chosen
    assert _shown(chain) == expected, (chain.ranks_killed, chain.ranks_resumed)
    named = [line for line in chain.killed.stderr.splitlines() if "skipped undecodable image" in line]
    assert named and all(BAD in line for line in named)
    records = os.listdir(chain.tmp / "cache" / "v1" / "unreadable")
    assert len(records) == 1  # the shared record every process read

    # without --skip_bad_images, the next run stops in one line naming the reference, before any model loads
    again = chain.tmp / "again"
    argv = [a for a in chain.args if a != "--skip_bad_images"]
    argv[argv.index("--output_dir") + 1] = str(again)
    argv[argv.index("--mixed_precision") + 1] = "no"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run's precision may differ
    capsys.readouterr()
    assert run_entry_inprocess(LORA, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and BAD in errors[0] and "earlier run" in errors[0], errors
    assert not again.exists() or not any(again.iterdir())


def _assert_the_lora_changes_the_familys_plain_pipeline(family_name, model, out, reference, text_tokens):
    """The LoRA file in `out`: transformer keys only, and loaded into the family's own diffusers pipeline it
    changes an edit of `reference` (as trained)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from fluxkit import families

    lora = out / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(lora)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    family = families.get(family_name)
    pipe = family.load_pipeline(model, local_files_only=True)  # FLUX.2 [dev]'s: its processor's text half here
    pipe.set_progress_bar_config(disable=True)

    def render():
        call = dict(prompt="make the circle blue", height=32, width=32, num_inference_steps=2, max_sequence_length=text_tokens,
                    output_type="np", generator=torch.Generator().manual_seed(0))
        side = max(32, family.min_reference_side)  # FLUX.2's pipelines take references of 64 px and more
        call.update(family.edit_call(Image.open(reference).resize((side, side)), 32, 32))  # an edit, as trained
        return pipe(**call).images

    before = render()
    pipe.load_lora_weights(str(out), weight_name=lora.name)
    assert np.abs(render() - before).max() > 1e-4


@pytest.mark.multiproc
def test_the_lora_of_the_2_process_run_loads_into_the_familys_plain_pipeline(chain):
    assert (chain.out / "validation" / "validation-final.png").is_file()  # rendered by both ranks in lockstep
    _assert_the_lora_changes_the_familys_plain_pipeline(chain.spec.family, chain.model, chain.out, chain.reference,
                                                        chain.spec.text)


@pytest.mark.multiproc
def test_klein_full_fine_tune_under_zero3_gathers_a_klein_pipeline(tiny_klein, sample_data, tmp_path):
    """The klein full fine-tune on 2 processes with every parameter sharded (one launch, 2 steps): each rank's
    optimizer file is ZeRO-3's, checkpoint-1 and the final folder hold the whole transformer gathered from the
    shards (the base's shapes, moved by training, finite), the text encoder untouched, a Flux2KleinPipeline."""
    import numpy as np
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    out = tmp_path / "full"
    args = trainer_args(tiny_klein, sample_data, out, steps=2, max_sequence_length=16, learning_rate="1e-3",
                        checkpointing_steps=1, mixed_precision="bf16", cond_image_dir=sample_data["edit_references"],
                        latent_cache_dir=tmp_path / "cache")
    args[args.index("--instance_data_dir") + 1] = sample_data["edit_targets"]
    proc = accelerate_launch([os.path.join(ROOT, "train_flux_dreambooth.py")] + args, config=SHARD_ALL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    assert all(int(_optimizer_partition(out / "checkpoint-2", rank)[0]) == 3 for rank in (0, 1))
    base = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    start = dict(base.transformer.named_parameters())
    for folder in (out / "checkpoint-1" / "transformer", out / "transformer"):
        trained = dict(Flux2Transformer2DModel.from_pretrained(str(folder)).named_parameters())
        assert trained.keys() == start.keys() and all(trained[k].shape == start[k].shape for k in start), folder
        assert all(np.isfinite(p.detach().float().numpy()).all() for p in trained.values())
        assert any(not torch.equal(trained[k].float(), start[k].float()) for k in start), folder
    final = Flux2KleinPipeline.from_pretrained(str(out), local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(final.text_encoder.parameters(), base.text_encoder.parameters()))


@pytest.mark.multiproc
@pytest.mark.parametrize("chain", ["dev-zero2"], indirect=True)  # the same keys, ZeRO-2: what ZeRO-3 must match
def test_dev_lora_under_zero3_trains_as_under_zero2(chain):
    """FLUX.2 [dev] LoRA through the launcher with every parameter sharded (tests/fixtures/zero3_shard_everything:
    ZeRO-3, stage3_param_persistence_threshold 0), the dev chain's keys for 2 steps (one launch): each rank's
    optimizer file is ZeRO-3's, each rank trained the chain's samples with their reference tokens, and the two
    steps' losses and the LoRA gathered from the shards equal the ZeRO-2 chain's at step 2, bit for bit (the same
    draws on the same NF4 base; the chain's final LoRA is the one loaded into Flux2Pipeline above)."""
    from safetensors.torch import load_file

    out = chain.tmp / "zero3"
    changed = dict(output_dir=out, max_train_steps=2, checkpointing_steps=2, latent_cache_dir=chain.tmp / "cache-zero3",
                   config_file=SHARD_ALL)  # a cache of its own: the encoders load (whole) and fill it under ZeRO-3
    keys = [k for k in chain.args if k.split("=")[0][2:] not in changed and k != "--resume_from_checkpoint=latest"]
    proc = launch_inprocess(LORA_LAUNCHER, *keys, *(f"--{k}={v}" for k, v in changed.items()),
                            env=with_faults({RECORD: str(chain.tmp / "ranks-zero3")}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    assert listing(out) == ["checkpoint-2"] and (out / "validation" / "validation-final.png").is_file()
    assert all(int(_optimizer_partition(out / "checkpoint-2", rank)[0]) == 3 for rank in (0, 1))
    ranks = _records(chain.tmp / "ranks-zero3")
    for rank in (0, 1):
        assert [b["index"] for b in ranks[rank]] == [b["index"] for b in chain.ranks_killed[rank][:2]], rank
        assert [b["forwards"] for b in ranks[rank]] == [b["forwards"] for b in chain.ranks_killed[rank][:2]], rank
    assert [r["loss"] for r in log_lines(out)] == [r["loss"] for r in chain.killed_log[:2]]
    zero3 = load_file(str(out / "pytorch_lora_weights.safetensors"))
    zero2 = load_file(str(chain.out / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert zero3.keys() == zero2.keys() and all(torch.equal(zero3[k], zero2[k]) for k in zero2)
    assert any(zero3[k].abs().max() > 0 for k in zero3 if "lora_B" in k)  # trained, not the zero init


# ------------------------------------------------------------------ the other stage of each family, in this process
ONE_PROCESS = {"kontext-zero2": ("kontext", ZERO2, 2), "klein-zero3": ("flux2-klein", SHARD_ALL, 3)}


def _launch_environment(config, port):
    """What `accelerate launch --config_file CONFIG --num_processes 1` exports to its one process (accelerate's own
    launch code derives it from the config: ACCELERATE_USE_DEEPSPEED, the stage or the DeepSpeed JSON, precision...),
    and the rank variables torchrun adds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parsed = launch_command_parser().parse_args(["--config_file", config, "--num_processes", "1",
                                                 "--main_process_port", str(port), LORA])
    parsed, defaults, precision_from_config = _validate_launch_command(parsed)
    parsed.deepspeed_fields_from_accelerate_config = ",".join(  # as accelerate's launch_command sets it
        list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else []))
    _, env = prepare_deepspeed_cmd_env(parsed)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def _torch_globals() -> dict:
    """The identity of every public attribute of torch's namespaces a library may patch for good (DeepSpeed does)."""
    import torch.nn.functional as F

    return {(space.__name__, name): id(getattr(space, name)) for space in (torch, F, torch.nn.Module, torch.Tensor)
            for name in dir(space) if not name.startswith("__") and hasattr(space, name)}


@pytest.fixture
def one_process_deepspeed(monkeypatch):
    """run(config, args) -> the DeepSpeed engine the LoRA trainer built: the trainer's main() in this process under
    a 1-process DeepSpeed launch's environment. When it returns, the process group, DeepSpeed's cached world group,
    accelerate's state, transformers' ZeRO-3 registration (which would partition any model loaded next) and
    torch.nn.functional.linear (ZeRO-3's engine swaps in its own for good; torchao's int8 weights fail in it) are
    undone, so what the test loads next, and later in-process runs, see none of it."""
    import accelerate
    import torch.distributed as dist
    import torch.nn.functional as F
    from accelerate.state import AcceleratorState
    from deepspeed.utils import groups
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    engines, prepare, linear = [], accelerate.Accelerator._prepare_deepspeed, F.linear

    def recording(self, *args):
        prepared = prepare(self, *args)
        engines.append(self.deepspeed_engine_wrapped.engine)
        return prepared

    def undo():
        F.linear = linear
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()

    def run(config, args):
        environment, before = _launch_environment(config, free_port()), _torch_globals()
        monkeypatch.setattr(accelerate.Accelerator, "_prepare_deepspeed", recording)
        monkeypatch.setattr(groups, "_WORLD_GROUP", None)  # DeepSpeed's clone of the world group, made per group
        AcceleratorState._reset_state(reset_partial_state=True)
        with monkeypatch.context() as launched:
            for key, value in environment.items():
                launched.setenv(key, value)
            try:
                assert run_entry_inprocess(LORA, args) == 0
            finally:
                undo()
        after = _torch_globals()
        assert not [k for k in before if after.get(k) != before[k]], "the run left torch patched"
        assert len(engines) == 1, engines
        return engines[0]

    yield run
    undo()


@pytest.mark.tiny
@pytest.mark.parametrize("case", list(ONE_PROCESS))
def test_the_other_zero_stage_of_each_family_trains_pairs_and_its_lora_loads(case, one_process_deepspeed, tiny_flux,
                                                                          tiny_klein, sample_data, tmp_path, monkeypatch):
    """Kontext LoRA under ZeRO-2 and klein LoRA under ZeRO-3 (the stages the 2-process chains above do not run), one
    process each, 2 steps of editing pairs, bf16, checkpoint-2, validation: the engine is that stage's (ZeRO-3: every
    transformer parameter partitioned, its whole partition on this one rank), every forward saw the
    reference's tokens, the checkpoint's optimizer file is that stage's and holds every LoRA weight's fp32 master
    (one rank: the whole partition), and the LoRA file loads into the family's plain pipeline and changes it."""
    import diffusers

    family, config, stage = ONE_PROCESS[case]
    model = tiny_flux if family == "kontext" else tiny_klein
    out = tmp_path / "out"
    args = trainer_args(model, sample_data, out, steps=2, max_sequence_length=16, learning_rate="1e-3",
                        checkpointing_steps=2, mixed_precision="bf16", model_family=family,
                        cond_image_dir=sample_data["edit_references"], latent_cache_dir=tmp_path / "cache",
                        validation_prompt="make the circle blue", num_validation_images=1, num_validation_steps=2)
    args[args.index("--instance_data_dir") + 1] = sample_data["edit_targets"]
    transformer = getattr(diffusers, "FluxTransformer2DModel" if family == "kontext" else "Flux2Transformer2DModel")
    tokens, forward = [], transformer.forward

    def recording_forward(self, hidden_states, *rest, **kwargs):
        tokens.append(hidden_states.shape[1])
        return forward(self, hidden_states, *rest, **kwargs)

    monkeypatch.setattr(transformer, "forward", recording_forward)
    engine = one_process_deepspeed(config, args)

    assert engine.zero_optimization_stage() == stage and engine.zero_optimization_partition_gradients()
    params = dict(engine.module.named_parameters())
    lora = {n: p for n, p in params.items() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    if stage == 3:  # every parameter partitioned by ZeRO-3 (its placeholder empty but while gathered), this rank's
        # partition holding all of it (a world of one)
        assert all(hasattr(p, "ds_id") and p.ds_tensor.numel() == p.ds_numel > 0 for p in params.values())
    else:
        assert not any(hasattr(p, "ds_id") for p in params.values())
    assert tokens[:2] == [128, 128], tokens  # the training steps: 64 target + 64 reference tokens
    zero_stage, tensors = _optimizer_partition(out / "checkpoint-2", 0)
    masters = sum(t.numel() for k, t in tensors.items() if k.split("/")[1] in ("single_partition_of_fp32_groups", "fp32_flat_groups"))
    assert int(zero_stage) == stage and masters == sum(p.ds_numel if stage == 3 else p.numel() for p in lora.values())
    assert (out / "validation" / "validation-final.png").is_file()
    _assert_the_lora_changes_the_familys_plain_pipeline(family, model, out, os.path.join(sample_data["edit_references"], "pair_000.png"),
                                                        16)
