"""FLUX.2 [dev]'s prompt processor where transformers' PixtralProcessor cannot be built.

FLUX.2 [dev]'s `tokenizer` folder holds a PixtralProcessor: a tokenizer, a chat template and an
image processor. transformers 5.x builds that class only where torchvision imports, yet
Flux2Pipeline's prompt path uses text alone: it renders (system message, user text) through the
processor's chat template and tokenizes the result (`apply_chat_template(..., tokenize=True)`).

`PixtralTextProcessor` is that text half: a transformers ProcessorMixin with the tokenizer only,
loaded as PixtralProcessor loads its own (TokenizersBackend over tokenizer.json) with the chat
template the processor would read. Rendering and tokenizing run transformers' own processor code,
so the token ids equal PixtralProcessor's for text. A conversation with an image is refused with
one line that names torchvision. Saving writes a folder PixtralProcessor loads again (the
processor and image-processor configs it was loaded with, kept as they were).

`load_prompt_processor` (the family's tokenizer loader) takes transformers' PixtralProcessor
where torchvision is installed, and this class elsewhere.
"""

from __future__ import annotations

import json
import os

from transformers import ProcessorMixin

PROCESSOR_CONFIG = "processor_config.json"  # transformers' PROCESSOR_NAME
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"  # the image half's config; kept for the real processor
TOKENIZER_ARGUMENTS = ("padding", "truncation", "max_length")  # apply_chat_template's tokenizer settings


def torchvision_available() -> bool:
    """Whether transformers can build its Pixtral image processor (it asks for torchvision)."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


class PixtralTextProcessor(ProcessorMixin):
    """PixtralProcessor's text path: the chat template and the tokenizer, no image processor."""

    def __init__(self, tokenizer=None, chat_template=None, image_token="[IMG]", **config):
        super().__init__(tokenizer, chat_template=chat_template)
        self.image_token = image_token
        self.saved_configs: dict[str, dict] = {}  # file name -> the JSON it was loaded from (written back on save)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str = "", **kwargs):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        hub = {k: kwargs[k] for k in ("revision", "local_files_only", "cache_dir", "token") if k in kwargs}
        # PixtralProcessor loads its tokenizer this way (not through AutoTokenizer), and its chat template by
        # the processor's rules (chat_template.jinja, else the legacy chat_template.json)
        tokenizer = TokenizersBackend.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **hub)
        processor_dict = ProcessorMixin.get_processor_dict(pretrained_model_name_or_path, subfolder=subfolder, **hub)[0]
        template = processor_dict.get("chat_template") or tokenizer.chat_template
        processor = cls(tokenizer, chat_template=template, image_token=processor_dict.get("image_token", "[IMG]"))
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        for name in (PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG):
            if os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    processor.saved_configs[name] = json.load(f)
        return processor

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # Flux2Pipeline passes the tokenizer's padding/truncation/max_length beside the template's arguments;
        # transformers forwards them all the same, with a warning on every call: forward them without it
        moved = {k: kwargs.pop(k) for k in TOKENIZER_ARGUMENTS if k in kwargs}
        if moved:
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), **moved}
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None or videos is not None or audio is not None:
            raise ValueError("FLUX.2 [dev]'s processor reads images (prompt upsampling with a reference image) only "
                             "with transformers' PixtralProcessor, which needs torchvision: install torchvision, or "
                             "drop the image from the prompt")
        return super().__call__(text=text, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        if isinstance(self.chat_template, str):
            with open(os.path.join(save_directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        for name, config in self.saved_configs.items():
            with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
        return [save_directory]


def load_prompt_processor(pretrained_model_name_or_path, subfolder: str = "", **kwargs):
    """FLUX.2 [dev]'s tokenizer folder: transformers' PixtralProcessor where torchvision imports, else
    PixtralTextProcessor (the same token ids for text prompts)."""
    if torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    return PixtralTextProcessor.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


class PromptProcessor:
    """The family's loader for the `tokenizer` component (fluxkit.families.flux2's components)."""

    from_pretrained = staticmethod(load_prompt_processor)
