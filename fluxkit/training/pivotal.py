"""Pivotal tuning: new tokens in CLIP's (and T5's) vocabulary, trained beside the transformer's LoRA.

The flags and their meaning follow diffusers' advanced FLUX LoRA script
(examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py):

    --train_text_encoder_ti            train new token embeddings (textual inversion) with the LoRA
    --enable_t5_ti                     also in T5's vocabulary (default: CLIP's only)
    --token_abstraction TOK[,TOK2]     the identifiers in the prompts that the new tokens replace
    --num_new_tokens_per_abstraction   new tokens per identifier (default 2: TOK -> <s0><s1>)
    --initializer_concept WORDS        start the new rows from these words' rows (default: random
                                       rows scaled by the table's std); then the number of tokens
                                       is the number these words take (the larger of CLIP's and T5's)
    --train_text_encoder_ti_frac F     the first int(F x epochs) epochs train the embeddings (0.5)
    --train_text_encoder_frac F        the same for --train_text_encoder's CLIP LoRA (1.0)
    --train_transformer_frac F         the same for the transformer's LoRA (1.0; 0 = textual inversion only)

How it is built here. The new rows are not rows of the encoders' tables: each encoder's input
embedding is wrapped (`SplicedEmbedding`) so the new token ids read their rows from one small
module of trained parameters (`NewTokenRows`, clip_l (n, 768) and t5 (n, 4096)); every other id
reads the untouched base table. The base tables are never trainable and never in the optimizer,
so each of their rows stays bit-identical, under any optimizer, weight decay or DeepSpeed stage.
`NewTokenRows` is a submodule of the transformer: DeepSpeed gets one model per run (accelerate),
so the rows train, shard (ZeRO-3) and checkpoint with the transformer's engine. Every checkpoint
also holds them as token_embeddings.safetensors (fp32, exact), which a resume outside DeepSpeed reads.

A fraction gates its parameter group by epoch: once the epoch reaches int(frac x epochs) the
group's learning rate is held at 0 (AdamW and Prodigy then leave those weights exactly as they
are), as the advanced script does. Unlike it, the new rows are not rescaled towards the table's
std after each step (it cannot be done exactly on DeepSpeed's fp32 master copies).

Text embeddings of a prompt that holds a new token depend on rows that train, so they never come
from the persistent cache: they are encoded live every step (one prompt at a time, as the cache
encodes). With CLIP-only TI, T5's sequence of such a prompt is still cached (T5 does not know the
new tokens); prompts without new tokens and all latents are cached as usual. The cache is filled
before the tokens exist, so every cached entry stays the base encoders' encoding of its key.

Outputs: OUTPUT_DIR/OUTPUT_NAME_emb.safetensors (clip_l, t5; OUTPUT_NAME = the folder's name)
that `FluxPipeline.load_textual_inversion(file["clip_l"], token=[...], text_encoder=...,
tokenizer=...)` takes; its metadata names the tokens and the identifiers they replace, which
the model card shows and the LoRA inference script reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass

import torch

from ..shared.errors import UserError
from .card_code import card_code

logger = logging.getLogger("fluxkit.training.pivotal")
ENCODERS = ("clip_l", "t5")  # the emb file's keys, as the advanced script names them
METADATA_TOKENS = "fluxkit_tokens"  # {identifier: [new tokens]} in the emb file's header
CHECKPOINT_FILE = "token_embeddings.safetensors"  # in checkpoint-STEP: fp32, named apart from the output folder


def add_flags(parser) -> None:
    g = parser.add_argument_group("pivotal tuning (diffusers' advanced FLUX LoRA script)")
    g.add_argument("--train_text_encoder_ti", action="store_true",
                   help="pivotal tuning: train new token embeddings (textual inversion) beside the transformer's LoRA")
    g.add_argument("--enable_t5_ti", action="store_true", help="also insert and train the new tokens in T5 (default: CLIP only)")
    g.add_argument("--token_abstraction", default="TOK",
                   help="identifier(s) in the instance prompt, captions and validation prompt that the new tokens replace; "
                        "several: 'TOK,TOK2'")
    g.add_argument("--num_new_tokens_per_abstraction", type=int, default=None,
                   help="new tokens per identifier (default 2: TOK -> <s0><s1>); ignored with --initializer_concept")
    g.add_argument("--initializer_concept", default=None,
                   help="start the new tokens from these words' embeddings (default: random); the number of new tokens "
                        "is then the number of tokens these words take")
    g.add_argument("--train_text_encoder_ti_frac", type=float, default=0.5,
                   help="fraction of the epochs during which the new token embeddings train")
    g.add_argument("--train_text_encoder_frac", type=float, default=1.0,
                   help="fraction of the epochs during which --train_text_encoder's CLIP LoRA trains")
    g.add_argument("--train_transformer_frac", type=float, default=1.0,
                   help="fraction of the epochs during which the transformer's LoRA trains (0: textual inversion only)")


def enabled(args) -> bool:
    return args.train_text_encoder_ti  # a LoRA trainer's flag (False in the full fine-tune's config)


def validate(args) -> None:
    """The advanced script's rules, each one error line (exit 2) or one warning."""
    if not args.lora:
        return
    for flag in ("train_text_encoder_ti_frac", "train_text_encoder_frac", "train_transformer_frac"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be between 0 and 1 (a fraction of the epochs)")
    if args.train_text_encoder and args.train_text_encoder_ti:
        raise UserError("give only one of --train_text_encoder (CLIP LoRA) and --train_text_encoder_ti (pivotal tuning)")
    if args.train_transformer_frac < 1 and not args.train_text_encoder_ti:
        raise UserError(f"--train_transformer_frac {args.train_transformer_frac} needs --train_text_encoder_ti "
                        "(something else must train); drop it or add --train_text_encoder_ti")
    if args.train_transformer_frac < 1 and args.train_text_encoder_ti_frac < 1:
        raise UserError("--train_transformer_frac and --train_text_encoder_ti_frac are both below 1; at most one of "
                        "them may stop early (set the other to 1)")
    if args.num_new_tokens_per_abstraction is not None and args.num_new_tokens_per_abstraction < 1:
        raise UserError(f"--num_new_tokens_per_abstraction {args.num_new_tokens_per_abstraction} must be at least 1")
    if not args.train_text_encoder_ti:
        if args.enable_t5_ti:
            logger.warning("--enable_t5_ti does nothing without --train_text_encoder_ti")
        return
    if not abstractions(args.token_abstraction):
        raise UserError(f"--token_abstraction {args.token_abstraction!r} names no identifier; give e.g. TOK or 'TOK,TOK2'")
    if args.offload_encoders:
        raise UserError("--offload_encoders cannot go with --train_text_encoder_ti: CLIP (and T5) run forward and "
                        "backward every step while the new tokens train; drop one of them")
    if args.initializer_concept and args.num_new_tokens_per_abstraction:
        logger.warning("--num_new_tokens_per_abstraction is ignored: --initializer_concept sets the number of new tokens")


def abstractions(spec: str) -> list[str]:
    return [s.strip() for s in re.split(r",\s*", spec or "") if s.strip()]


# ------------------------------------------------------------------------------ tokens and prompts

@dataclass
class Tokens:
    """The new tokens: {identifier: its tokens}, e.g. {"TOK": ["<s0>", "<s1>"]}."""
    by_abstraction: dict[str, list[str]]

    @property
    def new(self) -> list[str]:
        return [t for toks in self.by_abstraction.values() for t in toks]

    def rewrite(self, text):
        """The text with each identifier replaced by its tokens (a plain substring replace, as upstream)."""
        if not text:
            return text
        for ident, toks in self.by_abstraction.items():
            text = text.replace(ident, "".join(toks))
        return text

    def holds_new(self, prompt: str) -> bool:
        return any(t in prompt for t in self.new)


def count_per_abstraction(args, tokenizer, tokenizer_2) -> int:
    if not args.initializer_concept:
        return args.num_new_tokens_per_abstraction or 2
    counts = [len(tokenizer.encode(args.initializer_concept, add_special_tokens=False))]
    if args.enable_t5_ti:
        counts.append(len(tokenizer_2.encode(args.initializer_concept, add_special_tokens=False)))
    if not max(counts):
        raise UserError(f"--initializer_concept {args.initializer_concept!r} makes no tokens; give one or more words")
    return max(counts)


def make_tokens(args, tokenizer, tokenizer_2) -> Tokens:
    """<s0><s1>... numbered across identifiers in order, as the advanced script numbers them."""
    n = count_per_abstraction(args, tokenizer, tokenizer_2)
    names = abstractions(args.token_abstraction)
    return Tokens({ident: [f"<s{i * n + j}>" for j in range(n)] for i, ident in enumerate(names)})


def prepare_prompts(args, model_dir: str):
    """(the run's config with the new tokens in --instance_prompt, --class_prompt and
    --validation_prompt, the Tokens) after deciding the tokens (reading the tokenizers); captions
    follow in rewrite_captions. Without TI: (args unchanged, None)."""
    if not enabled(args):
        return args, None
    from transformers import AutoTokenizer

    from .. import families

    family = families.of_args(args, model_dir)
    if tuple(family.text_encoders) != ("text_encoder", "text_encoder_2"):
        raise UserError(f"--train_text_encoder_ti inserts tokens into CLIP and T5 (FLUX.1, Kontext); a {family.name} "
                        "model encodes prompts with other text encoders; drop the flag for this model")
    tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer", local_files_only=True)
    tok2 = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", local_files_only=True) if args.enable_t5_ti else None
    tokens = make_tokens(args, tok, tok2)
    taken = [t for t in tokens.new if t in tok.get_vocab() or (tok2 is not None and t in tok2.get_vocab())]
    if taken:
        raise UserError(f"the base model's tokenizer already has token {taken[0]!r}; pivotal tuning needs new tokens")
    rewritten = tokens.rewrite(args.instance_prompt)
    if rewritten == args.instance_prompt:
        logger.warning("--instance_prompt %r holds no --token_abstraction %r: the new tokens train only through captions "
                       "that hold it", args.instance_prompt, args.token_abstraction)
    args = dataclasses.replace(args, instance_prompt=rewritten, class_prompt=tokens.rewrite(args.class_prompt),
                               validation_prompt=tokens.rewrite(args.validation_prompt))
    return args, tokens


def rewrite_captions(tokens: Tokens | None, scan) -> None:
    if tokens is None:
        return
    for sample in scan.samples:
        sample.caption = tokens.rewrite(sample.caption)


# ------------------------------------------------------------------------------ the trained rows

class NewTokenRows(torch.nn.Module):
    """The new tokens' embedding rows, one parameter per encoder (clip_l, t5): what trains.

    Read through calls of this module (not the parameters themselves), so that under ZeRO-3
    DeepSpeed's hooks gather the rows for the lookup and reduce their gradients after it."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in rows.items():
            self.register_parameter(name, torch.nn.Parameter(value.detach().float().clone()))

    @property
    def names(self) -> list[str]:
        return [n for n in ENCODERS if hasattr(self, n)]

    def forward(self, name: str | None, index: torch.Tensor | None = None) -> torch.Tensor:
        if name is None:  # every row, times zero: each process's graph then reaches every row (DDP/ZeRO)
            return sum(getattr(self, n).sum() for n in self.names) * 0.0
        return torch.nn.functional.embedding(index, getattr(self, name))


class SplicedEmbedding(torch.nn.Module):
    """An encoder's input embedding whose ids first..first+count-1 read `rows` (kept by reference,
    not as a submodule: it belongs to the transformer) and whose other ids read the frozen base table."""

    def __init__(self, base: torch.nn.Embedding, first: int, count: int, rows: NewTokenRows, name: str):
        super().__init__()
        self.base, self.first, self.count, self.name = base, first, count, name
        self._rows = [rows]

    @property
    def weight(self) -> torch.Tensor:  # callers that ask for the table's width or dtype
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.first) & (ids < self.first + self.count)
        out = self.base(ids.masked_fill(is_new, 0))
        new = self._rows[0](self.name, (ids - self.first).clamp(0, self.count - 1))
        return torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)


def _encoders(models, t5: bool):
    """(name, tokenizer, text encoder) of each encoder that gets the new tokens."""
    found = [("clip_l", models.tokenizer, models.text_encoder)]
    if t5:
        found.append(("t5", models.tokenizer_2, models.text_encoder_2))
    return found


def initial_rows(args, tokenizer, table: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Rows for `count` new tokens: the initializer concept's rows (cycled), or random rows with the
    table's std, as the advanced script starts them."""
    table = table.detach().float().cpu()
    if args.initializer_concept:
        ids = tokenizer.encode(args.initializer_concept, add_special_tokens=False)
        return torch.stack([table[ids[k % len(ids)]] for k in range(count)])
    return torch.randn(count, table.shape[1], generator=generator) * table.std()


class FractionGate:
    """--train_text_encoder_ti_frac / --train_text_encoder_frac / --train_transformer_frac: a part
    trains while epoch < int(frac x epochs) (whole epochs, as upstream), then its optimizer group's
    learning rate is held at 0, which leaves its weights exactly as they are."""

    def __init__(self, fractions: dict[str, float], groups: list[str], epochs: int):
        self.groups = {name: i for i, name in enumerate(groups)}  # optimizer group index of each part
        self.bounds = {part: int(frac * epochs) for part, frac in fractions.items() if part in self.groups}
        self.training = {part: True for part in self.groups}
        for part, frac in fractions.items():
            if 0 < frac and self.bounds.get(part) == 0:
                logger.warning("the %s fraction %s of %d epoch(s) is 0 whole epochs: it does not train (the "
                               "fraction counts whole epochs, as in diffusers' advanced script)", part, frac, epochs)

    def begin_epoch(self, epoch: int) -> None:
        for part, bound in self.bounds.items():
            if self.training[part] and epoch >= bound > 0:  # a bound of 0 was warned about at the start
                logger.info("the %s stop training at epoch %d (its fraction is over)", part, epoch)
            self.training[part] = epoch < bound

    def hold_stopped(self, optimizer) -> None:
        """Learning rate 0 for the parts whose fraction is over (the schedule sets it again each step)."""
        for part, index in self.groups.items():
            if not self.training[part]:
                optimizer.param_groups[index]["lr"] = 0.0


def fraction_gate(args, trainables, epochs: int) -> FractionGate | None:
    """The run's gate, or None when every part trains all along. Groups as build_optimizer makes them."""
    if not args.lora:
        return None
    text = args.train_text_encoder_ti_frac if enabled(args) else args.train_text_encoder_frac
    fractions = {"transformer": args.train_transformer_frac, "text encoder": text}
    groups = [part for part, params in (("transformer", trainables.transformer_params),
                                         ("text encoder", trainables.text_encoder_params)) if params]
    if all(fractions[g] >= 1 for g in groups):
        return None
    return FractionGate(fractions, groups, epochs)


class Pivot:
    """A run's pivotal tuning: the new tokens on the encoders and their trained rows."""

    def __init__(self, args, tokens: Tokens, rows: NewTokenRows, t5: bool):
        self.args, self.tokens, self.rows, self.t5 = args, tokens, rows, t5
        self.gate: FractionGate | None = None

    @property
    def rows_train(self) -> bool:
        return self.gate is None or self.gate.training.get("text encoder", True)

    def touch(self) -> torch.Tensor:
        return self.rows(None)

    def text_embeddings(self, prompts: list[str], cache, encode, models, device):
        """(T5 sequence, CLIP pooled) of a batch: prompts with new tokens encoded live (one at a time,
        with gradients while the rows train), the others from the cache (or encode, uncached)."""
        seqs, pooled = [], []
        for prompt in prompts:
            if not self.tokens.holds_new(prompt):
                seq, pool = cache.text_embeddings([prompt], encode)
            else:
                seq, pool = self._encode_live(prompt, models, device, None if self.t5 else _t5_sequence(prompt, cache, encode))
            seqs.append(seq.to(device))
            pooled.append(pool.to(device))
        return torch.cat(seqs), torch.cat(pooled)

    def _encode_live(self, prompt: str, m, device, seq=None):
        """The family's encoding of one prompt with the live (spliced) encoders; seq given: CLIP only."""
        with torch.set_grad_enabled(self.rows_train and torch.is_grad_enabled()):
            if seq is None:
                return m.family.encode_prompts(m, [prompt], self.args, device)
            return seq, m.family.trained_pooled(m, m.text_encoder, [prompt], device)

    # -------------------------------------------------------------- the file

    def emb_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{clip_l, t5}: detached CPU copies of the rows (gather them first under ZeRO-3)."""
        return {n: getattr(self.rows, n).detach().to(dtype or torch.float32).cpu().clone().contiguous()
                for n in self.rows.names}

    def save(self, path: str, dtype: torch.dtype | None = None) -> str:
        from safetensors.torch import save

        from ..shared.fsio import atomic_write_bytes

        meta = {"format": "pt", METADATA_TOKENS: json.dumps(self.tokens.by_abstraction)}
        return atomic_write_bytes(path, save(self.emb_tensors(dtype), metadata=meta))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {folder!r} holds no {CHECKPOINT_FILE} (the new tokens' embeddings): it was not "
                            "written by a --train_text_encoder_ti run; resume with the flags of the run that wrote it")
        saved = load_file(path)
        with torch.no_grad():
            for name in self.rows.names:
                param = getattr(self.rows, name)
                if name not in saved or saved[name].shape != param.shape:
                    raise UserError(f"{path!r} does not hold {name} rows of shape {tuple(param.shape)}; resume with "
                                    "the same --token_abstraction / --num_new_tokens_per_abstraction / --enable_t5_ti")
                param.copy_(saved[name].to(param.dtype))


def _t5_sequence(prompt: str, cache, encode) -> torch.Tensor:
    """T5's sequence of a prompt whose new tokens T5 does not know (CLIP-only TI): the cached entry
    (the fill encoded it before the tokens existed), else encoded now and not stored, since its
    CLIP half would be made with the new tokens."""
    from ..cache.keys import text_key

    key = text_key(prompt, cache.max_sequence_length)
    if cache.enabled and key in cache.text:
        return cache.text.get(key)[0].unsqueeze(0)
    with torch.no_grad():
        return encode([prompt])[0]


def emb_path(folder: str, output_dir: str) -> str:
    """FOLDER/OUTPUT_NAME_emb.safetensors, OUTPUT_NAME being --output_dir's last part (as upstream)."""
    return os.path.join(folder, f"{os.path.basename(os.path.abspath(output_dir))}_emb.safetensors")


# ------------------------------------------------------------------------------ wiring a run

def attach(args, tokens: Tokens | None, models, trainables) -> Pivot | None:
    """Add the new tokens to the tokenizers, splice their rows into the encoders' input embeddings,
    hang the rows on the transformer (so DeepSpeed's engine holds them) and make them trainable.
    With --train_transformer_frac 0 the transformer's LoRA stays as initialised (not trainable)."""
    if tokens is None:
        return None
    generator = torch.Generator().manual_seed(args.seed or 0)
    rows, splices = {}, []
    for name, tokenizer, encoder in _encoders(models, args.enable_t5_ti):
        base = encoder.get_input_embeddings()
        rows[name] = initial_rows(args, tokenizer, base.weight, len(tokens.new), generator)
        first = len(tokenizer)
        tokenizer.add_tokens(tokens.new)  # as load_textual_inversion adds them at inference
        ids = tokenizer.convert_tokens_to_ids(tokens.new)
        if ids != list(range(first, first + len(ids))):
            raise UserError(f"the new tokens got ids {ids} in the {name} tokenizer instead of consecutive new ids")
        splices.append((encoder, base, first, name))
    module = NewTokenRows(rows)  # moves with the transformer (DeepSpeed moves and casts it under ZeRO-3)
    for encoder, base, first, name in splices:
        encoder.set_input_embeddings(SplicedEmbedding(base, first, len(tokens.new), module, name))
    models.transformer.add_module("pivotal_tokens", module)
    if args.train_transformer_frac == 0:  # textual inversion only: the LoRA is no trainable parameter
        for p in trainables.transformer_params:
            p.requires_grad_(False)
        trainables.transformer_params = []
    trainables.text_encoder_params = list(module.parameters())
    logger.info("pivotal tuning in %s: %s", "CLIP and T5" if args.enable_t5_ti else "CLIP",
                ", ".join(f"{k} -> {''.join(v)}" for k, v in tokens.by_abstraction.items()))
    return Pivot(args, tokens, module, args.enable_t5_ti)


def register_state_hooks(accelerator, pivot: Pivot | None) -> None:
    """Checkpoints hold the rows: under DeepSpeed in the engine's own state (they are the
    transformer's parameters); always also as CHECKPOINT/token_embeddings.safetensors in fp32 (the
    emb file's format), which a resume outside DeepSpeed reads back exactly. Every rank calls the
    hooks (ZeRO-3 gathers)."""
    if pivot is None:
        return
    from ..shared.device import is_deepspeed
    from ..weights.zero3 import gathered_parameters

    def save_hook(models, weights, output_dir):
        with gathered_parameters(list(pivot.rows.parameters())):
            if accelerator.is_main_process:
                pivot.save(os.path.join(output_dir, CHECKPOINT_FILE), torch.float32)

    def load_hook(models, input_dir):
        if not is_deepspeed(accelerator):  # the engine restores its own parameters, each rank its shard
            pivot.load(input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_final(pivot: Pivot | None, output_dir: str, main: bool, dtype: torch.dtype) -> None:
    """OUTPUT_DIR/OUTPUT_NAME_emb.safetensors; every rank calls it (ZeRO-3 gathers), the main one writes."""
    if pivot is None:
        return
    from ..weights.zero3 import gathered_parameters

    with gathered_parameters(list(pivot.rows.parameters())):
        if main:
            path = pivot.save(emb_path(output_dir, output_dir), dtype)
            logger.info("new token embeddings: %s", path)


def writes_lora(args) -> bool:
    """Whether the run leaves a LoRA file: not when only the embeddings train (as upstream)."""
    return not (enabled(args) and args.train_transformer_frac == 0)


def model_card_usage(args, pivot: Pivot, family) -> list[str]:
    """The model card's lines on which tokens to use and how to load them."""
    emb = os.path.basename(emb_path(".", args.output_dir))
    lines = ["## Trigger words", "",
             "Pivotal tuning trained new tokens; write them where the identifier would go:", ""]
    lines += [f"- `{ident}` -> `{''.join(toks)}`" for ident, toks in pivot.tokens.by_abstraction.items()]
    lines += ["", f"The new tokens' embeddings are in `{emb}` (`clip_l`" + (", `t5`" if pivot.t5 else "") + ").", ""]
    load = ["pipe.load_lora_weights('.', weight_name='pytorch_lora_weights.safetensors')"] if writes_lora(args) else []
    tokens = pivot.tokens.new
    load += [f"emb = load_file({emb!r})",
             f"pipe.load_textual_inversion(emb['clip_l'], token={tokens!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)"]
    if pivot.t5:
        load.append(f"pipe.load_textual_inversion(emb['t5'], token={tokens!r}, text_encoder=pipe.text_encoder_2, "
                    "tokenizer=pipe.tokenizer_2)")
    lines += card_code(args, family, args.validation_prompt or args.instance_prompt,
                       imports=["from safetensors.torch import load_file"], after_load=load)
    lines += ["", "fluxkit's infer_flux_text2img_lora_bf16.py loads the embeddings file beside the LoRA by itself and "
              "also accepts the identifiers in prompts."]
    return lines


# ------------------------------------------------------------------------------ inference

def inference_files(lora_weights: str | None, embeddings: str | None) -> tuple[str | None, str | None]:
    """(LoRA weights to attach or None, embeddings file or None). The embeddings default to the one
    OUTPUT_NAME_emb.safetensors (or a checkpoint's token_embeddings.safetensors) beside the LoRA; a
    folder holding only that (a --train_transformer_frac 0 run) gives no LoRA. --lora_weights still
    goes through fluxkit.weights.lora's checks."""
    if embeddings is not None:
        if not os.path.isfile(embeddings):
            raise UserError(f"--embeddings {embeddings!r} is not a file; pass the trainer's OUTPUT_NAME_emb.safetensors")
        read_embeddings(embeddings)  # refused now, before any model loads
    if not lora_weights or not os.path.exists(lora_weights):
        return lora_weights, embeddings
    folder = lora_weights if os.path.isdir(lora_weights) else os.path.dirname(os.path.abspath(lora_weights))
    # a checkpoint-STEP folder holds its rows as CHECKPOINT_FILE (same format)
    found = sorted(n for n in os.listdir(folder) if n.endswith("_emb.safetensors") or n == CHECKPOINT_FILE)
    if embeddings is None and len(found) > 1:
        raise UserError(f"{folder!r} holds several embeddings files ({', '.join(found)}); pass one with --embeddings")
    if embeddings is None and found:
        embeddings = os.path.join(folder, found[0])
    if os.path.isdir(lora_weights) and found:
        others = [n for n in os.listdir(folder) if n.endswith(".safetensors") and n not in found]
        if not others:  # textual inversion only
            return None, embeddings
    return lora_weights, embeddings


def read_embeddings(path: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(tensors, {identifier: tokens}) of an embeddings file. A file without our metadata (e.g. from
    diffusers' advanced script) holds <s0>..<sN-1> in order, as that script names them."""
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        raise UserError(f"--embeddings {path!r} is not a .safetensors file (pickles are refused: loading them can run code)")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own types for any malformed file
        raise UserError(f"--embeddings {path!r} is not a valid safetensors file ({str(err).splitlines()[0][:200]})") from None
    if "clip_l" not in tensors or tensors["clip_l"].dim() != 2:
        raise UserError(f"--embeddings {path!r} holds no clip_l tensor (rows, width); it is not a pivotal tuning "
                        f"embeddings file (keys: {', '.join(sorted(tensors)) or 'none'})")
    n = tensors["clip_l"].shape[0]
    by_abstraction = json.loads(meta[METADATA_TOKENS]) if METADATA_TOKENS in meta else {}
    if sum(len(v) for v in by_abstraction.values()) != n:
        by_abstraction = {"": [f"<s{i}>" for i in range(n)]}
    return tensors, by_abstraction


def rewrite_inference_prompts(prompts: list[str], path: str) -> list[str]:
    """The prompts with each trained identifier (e.g. TOK) replaced by its tokens, as in training."""
    _, by_abstraction = read_embeddings(path)
    tokens = Tokens({k: v for k, v in by_abstraction.items() if k})
    return [tokens.rewrite(p) for p in prompts]


def load_embeddings(pipe, path: str) -> list[str]:
    """Register the file's tokens on CLIP (clip_l) and, when it holds t5, on T5, with diffusers'
    load_textual_inversion; returns the tokens."""
    tensors, by_abstraction = read_embeddings(path)
    tokens = [t for toks in by_abstraction.values() for t in toks]
    pairs = [("clip_l", pipe.text_encoder, pipe.tokenizer)] + ([("t5", pipe.text_encoder_2, pipe.tokenizer_2)]
                                                              if "t5" in tensors else [])
    for name, encoder, tokenizer in pairs:
        width = encoder.get_input_embeddings().weight.shape[1]
        if tensors[name].shape != (len(tokens), width):
            raise UserError(f"--embeddings {path!r}: {name} is {tuple(tensors[name].shape)} but this model's "
                            f"{name} rows are {width} wide; use embeddings trained on this base model")
        pipe.load_textual_inversion(tensors[name], token=tokens, text_encoder=encoder, tokenizer=tokenizer)
    return tokens


def planned_tokens(args) -> int:
    """New tokens the memory plan counts (before the tokenizer is read: an --initializer_concept's
    count is taken as its words')."""
    if not enabled(args):
        return 0
    per = len(args.initializer_concept.split()) if args.initializer_concept else (args.num_new_tokens_per_abstraction or 2)
    return len(abstractions(args.token_abstraction)) * max(1, per)


def settings(args) -> str:
    """What a checkpoint records of pivotal tuning: resuming with other tokens would continue another run."""
    if not enabled(args):
        return "off"
    per = f"from {args.initializer_concept!r}" if args.initializer_concept else f"x{args.num_new_tokens_per_abstraction or 2}"
    return f"{','.join(abstractions(args.token_abstraction))} {per}" + (" in CLIP+T5" if args.enable_t5_ti else " in CLIP")
