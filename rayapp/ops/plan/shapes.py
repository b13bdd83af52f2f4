"""A model's shape from its HF ``config.json`` alone: built on the meta device (no weights), so
parameter counts are exact for any architecture transformers knows."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayapp import ASSETS

BUNDLED_CONFIGS = str(ASSETS / "model-configs")


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    params: int
    layer_params: int  # the largest decoder layer (an FSDP unit)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    gated_mlp: bool  # SwiGLU-style (gate and up projections) rather than fc1 -> act -> fc2
    source: str  # where the config came from
    # for the backward pass and the optimizer step (ops/plan/memory.py); 0: estimated from the sizes above
    output_params: int = 0  # the output layer (lm_head): its gradient lives through the whole backward pass
    largest_param: int = 0  # the largest single tensor: the for-loop AdamW's temporaries are two of it

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (embeddings, output layer, final norm)."""
        return self.params - self.layers * self.layer_params


def bundled_config(name: str) -> str | None:
    path = os.path.join(BUNDLED_CONFIGS, name.replace("/", "--") + ".json")
    return path if os.path.exists(path) else None


def find_config(name_or_path: str, trust_remote_code: bool = False):
    """(config, where it came from): a local folder or file, rayapp's bundled copy of the paper's
    models' public configs (no hub needed, gated models included), or the hub."""
    from rayapp.ml.models import sharded

    if os.path.exists(name_or_path):
        return sharded.load_config(name_or_path, trust_remote_code), name_or_path
    bundled = bundled_config(name_or_path)
    if bundled is not None:
        return sharded.load_config(bundled), "bundled copy"
    try:
        return sharded.load_config(name_or_path, trust_remote_code), "hub"
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read the config of {name_or_path!r} ({exc.__class__.__name__}); "
                      f"give a local folder, or make the hub reachable") from None


def shape_of(config, name: str, source: str) -> ModelShape:
    """The shape of the model ``config`` describes (built on the meta device)."""
    from rayapp.ml.models import sharded

    return shape_of_model(sharded.empty_causal_lm(config), name, source)


def shape_of_model(model, name: str, source: str) -> ModelShape:
    """The shape of a built model (on the meta device or loaded)."""
    from rayapp.ml.train.fsdp import decoder_layers

    config = model.config
    layers = decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden
    gated = any("gate" in n for n, _ in layers[0].named_parameters())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return ModelShape(
        name=name, model_type=text.model_type, params=sum(p.numel() for p in model.parameters()),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers), layers=len(layers),
        hidden=hidden, intermediate=intermediate, vocab=text.vocab_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        max_positions=getattr(text, "max_position_embeddings", 2048), gated_mlp=gated, source=source,
        output_params=output.weight.numel() if output is not None else 0,
        largest_param=max(p.numel() for p in model.parameters()))


def model_shape(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    config, source = find_config(name_or_path, trust_remote_code)
    return shape_of(config, name_or_path, source)
