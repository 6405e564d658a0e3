"""How the model's weights are held, for training and inference alike. Imports only fluxkit.shared.

    zero3   DeepSpeed ZeRO-3 partitioned parameters: gathering them to read or save
    lora    LoRA files in diffusers' FLUX format: writing (training) and reading, checking, attaching
            (inference); unwrap_model
    quant   a quantized base transformer (--base_quantization): its flag, checks and loading
"""
