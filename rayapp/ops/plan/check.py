"""`rayapp plan`: for each stage of a config, the model it loads, the per-GPU memory it will need,
the memory of the GPU it is placed on, and a verdict, with a suggestion where it does not fit.

``rayapp run`` (and so ``jobs/run_pipeline.py``) runs the same check before starting anything, so a
job that cannot fit fails in seconds rather than an hour in, when its model is first loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayapp.config import RunConfig, TrainConfig
from rayapp.core import placement
from rayapp.ml.models import registry, tiny
from rayapp.ml.models.losses import bounded_loss_supported
from rayapp.ml.train.packing import PACKABLE_MODEL_TYPES
from rayapp.ops.plan import memory
from rayapp.ops.plan.accelerators import GIB, gpu_bytes
from rayapp.ops.plan.shapes import ModelShape, find_config, shape_of

FITS, TOO_BIG, UNKNOWN, CPU = "fits", "does not fit", "unknown GPU", "CPU"


@dataclass
class StagePlan:
    stage: str
    model: str
    shape: ModelShape | None
    placement: str  # e.g. "8 x A100 (39.4 GiB)"
    need: int = 0  # bytes per GPU
    have: int | None = None
    parts: dict[str, int] = field(default_factory=dict)
    verdict: str = CPU
    detail: str = ""  # what the need is made of, in words
    advice: str = ""
    micro_batches_per_forward: int | None = None  # training: the merged forwards chosen (TrainConfig's auto)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "model": self.model, "params": self.shape.params if self.shape else None,
                "placement": self.placement, "need_gib": round(self.need / GIB, 2),
                "have_gib": round(self.have / GIB, 2) if self.have else None, "verdict": self.verdict,
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()}, "advice": self.advice,
                **({"micro_batches_per_forward": self.micro_batches_per_forward}
                   if self.micro_batches_per_forward else {})}


def _gpu(cfg: RunConfig, where) -> tuple[int | None, str]:
    """The GPU memory a stage runs with, from its placement (``core.placement.Placement``, the
    object its Ray call is made from): its accelerator_type's, else its node-type label's
    (cluster.gpu_memory_gib_by_resource), else cluster.gpu_memory_gib."""
    accelerator_type = where.accelerator_type
    labelled = [r for r in where.labels if r in cfg.cluster.gpu_memory_gib_by_resource]
    if not accelerator_type and labelled:
        return int(cfg.cluster.gpu_memory_gib_by_resource[labelled[0]] * GIB), f"GPU of {labelled[0]}"
    if accelerator_type:
        have = gpu_bytes(accelerator_type)
        if have is None and cfg.cluster.gpu_memory_gib:
            have = int(cfg.cluster.gpu_memory_gib * GIB)
        return have, accelerator_type
    if cfg.cluster.gpu_memory_gib:
        return int(cfg.cluster.gpu_memory_gib * GIB), "GPU"
    return None, "GPU"


def _model_config(cfg: RunConfig, role: str):
    """(the role's model config, where it came from): the tiny model's, or read by find_config."""
    spec = getattr(cfg.models, role)
    if spec.name_or_path == registry.TINY:
        return tiny.llama_config(spec.tiny, spec.tiny.vocab_size, registry.tiny_max_positions(cfg)), "tiny config"
    return find_config(spec.name_or_path, spec.trust_remote_code)


def role_shape(cfg: RunConfig, role: str) -> ModelShape:
    name = getattr(cfg.models, role).name_or_path
    config, source = _model_config(cfg, role)
    return shape_of(config, "tiny" if name == registry.TINY else name, source)


def lora_adapter_params(cfg: RunConfig, lora) -> int:
    """The target's adapter parameters under ``lora``: PEFT wraps the model built on the meta device."""
    from rayapp.ml.models import sharded
    from rayapp.ml.train import lora as lora_mod

    lora_mod.require_peft()
    config, _ = _model_config(cfg, "target")
    model = lora_mod.attach(sharded.empty_causal_lm(config), lora, cfg.models.target.name_or_path)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _verdict(plan: StagePlan) -> StagePlan:
    if plan.have is None:
        plan.verdict = UNKNOWN
        plan.advice = "name the GPU (accelerator_type) or set cluster.gpu_memory_gib to check it"
    else:
        plan.verdict = FITS if plan.need <= plan.have else TOO_BIG
    return plan


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# micro_batches_per_forward: auto merges only while the plan leaves this share of the GPU free. The
# plan came within ~4-8 % of the measured peak on the one GPU run (results/gpu-h100.json: 50.2 GiB
# planned, 51.7 measured; 27.7 and 25.6 with activation checkpointing), and running out of memory an
# hour into a 13B run costs more than the gathers that merging saves.
AUTO_MERGE_HEADROOM = 0.10


def merges(tc: TrainConfig, model_type: str | None) -> bool:
    """Whether the worker can merge this model's micro-batches into one forward: packed rows and a
    model type the fused loss takes (ml/train/worker.py, ``_micro_batches_per_forward``)."""
    return tc.packing and model_type in PACKABLE_MODEL_TYPES and bounded_loss_supported(model_type)


def plan_training(cfg: RunConfig, stage: str, tc: TrainConfig, shape: ModelShape) -> StagePlan:
    """A training worker's per-GPU memory, and the micro-batches each forward takes: with
    ``micro_batches_per_forward: auto``, the most (a divisor of gradient_accumulation_steps) whose
    memory leaves AUTO_MERGE_HEADROOM of the GPU free; 1 on CPU workers or an unknown GPU."""
    world = max(tc.num_workers, 1)
    merge_setting = tc.micro_batches_per_forward
    if not tc.use_gpu:
        return StagePlan(stage, shape.name, shape, f"{world} CPU worker(s)",
                         micro_batches_per_forward=1 if merge_setting == "auto" else merge_setting)
    have, gpu = _gpu(cfg, placement.training(stage, tc) or placement.Placement(  # local mode: the driver
        stage, "driver", dict(tc.resources_per_worker), 1, accelerator_type=tc.accelerator_type))
    sharded = tc.fsdp and world > 1
    bf16 = tc.mixed_precision in ("bf16", "auto")
    tokens = tc.per_device_batch_size * cfg.data.max_length
    accum = tc.gradient_accumulation_steps
    can_merge = merges(tc, shape.model_type)
    fused = tc.fused_loss and bounded_loss_supported(shape.model_type)

    lora = getattr(tc, "lora", None)
    adapters = lora_adapter_params(cfg, lora) if lora else None

    def need(w: int, ckpt: bool, sync: str, merge: int = 1) -> dict[str, int]:
        sh = tc.fsdp and w > 1
        # an unknown GPU (have None) is planned as too small to keep the unsharded gradients
        defer = -(-accum // merge) > 1 and memory.defer_gradient_sync(sync, adapters or shape.params, have or 0, sh)
        keep = not tc.cpu_offload and memory.keep_weights_gathered(shape.params, have or 0, sh, bf16)
        return memory.training_memory(shape, world=w, sharded=sh, micro_batch_tokens=tokens * merge, bf16=bf16,
                                      activation_checkpointing=ckpt, defer_gradient_sync=defer, lora_params=adapters,
                                      keep_gathered=keep, fused_loss=fused or merge > 1)

    if not can_merge:
        merge = 1
    elif merge_setting != "auto":
        merge = min(merge_setting, accum)
    else:  # the most micro-batches a forward that fit, in equal forwards
        fitting = [m for m in range(accum, 0, -1) if accum % m == 0 and have is not None
                   and memory.total(need(world, tc.activation_checkpointing, tc.gradient_sync, m))
                   <= (1 - AUTO_MERGE_HEADROOM) * have]
        merge = fitting[0] if fitting else 1
    parts = need(world, tc.activation_checkpointing, tc.gradient_sync, merge)
    way = f"{world}-way FSDP" if sharded else ("DDP" if world > 1 else "one GPU")
    what = (f"LoRA r={lora.r}: {adapters:,} adapter parameters train in fp32 on a frozen "
            f"{'bf16' if bf16 else 'fp32'} base" if lora else "weights, gradients and AdamW state in fp32")
    what += " (fused AdamW step)"
    rows = tc.per_device_batch_size * merge
    forwards = -(-accum // merge)
    plan = StagePlan(stage, shape.name, shape, f"{world} x {gpu}" + (f" ({_gib(have)})" if have else ""),
                     need=memory.total(parts), have=have, parts=parts, micro_batches_per_forward=merge,
                     detail=f"{way}: {what}, plus activations"
                            f"{' (checkpointed)' if tc.activation_checkpointing else ''} of "
                            f"{rows} x {cfg.data.max_length} tokens"
                            + ((f" (all {merge} micro-batches of a step packed into one forward, fused loss)"
                                if forwards == 1 else f" ({merge} micro-batches packed into each of {forwards} "
                                                      "forwards a step, fused loss)") if merge > 1 else "")
                            + f"{', FSDP2 gradient buffers' if sharded else ''} and "
                            f"~{memory.FRAGMENTATION:.0%} allocator fragmentation")
    _verdict(plan)
    if plan.verdict == TOO_BIG:
        ideas = []
        for w in (2, 4, 8, 16, 32, 64):
            if w > world and memory.total(need(w, tc.activation_checkpointing, "micro_batch")) <= have:
                ideas.append(f"{w}+ GPUs (num_workers: {w})")
                break
        if not tc.activation_checkpointing and memory.total(need(world, True, tc.gradient_sync)) <= have:
            ideas.append("activation_checkpointing: true")
        if tc.gradient_sync != "micro_batch" and memory.total(need(world, tc.activation_checkpointing, "micro_batch")) <= have:
            ideas.append("gradient_sync: micro_batch")
        if merge > 1 and memory.total(need(world, tc.activation_checkpointing, tc.gradient_sync)) <= have:
            ideas.append("micro_batches_per_forward: 1")
        if tc.per_device_batch_size > 1:
            ideas.append("a smaller per_device_batch_size (raise gradient_accumulation_steps to keep the batch)")
        if "lora" in type(tc).model_fields and not lora:  # a config that can train adapters instead
            ideas.append("LoRA adapters rather than full fine-tuning (finetune.lora: {r: 16}; the paper fine-tuned "
                         "every weight)")
        ideas.append("a GPU with more memory (accelerator_type: A100 for the gpu-8x node type, A100-80G, H100)")
        plan.advice = ", or ".join(ideas)
    return plan


def planned_training(cfg: RunConfig, stage: str, tc: TrainConfig, role: str) -> TrainConfig:
    """``tc`` as its workers run it: ``micro_batches_per_forward: auto`` resolved by the plan."""
    if tc.micro_batches_per_forward != "auto":
        return tc
    merge = 1
    if tc.use_gpu:
        try:
            merge = plan_training(cfg, stage, tc, role_shape(cfg, role)).micro_batches_per_forward or 1
        except Exception as exc:  # noqa: BLE001  (nothing to plan from, e.g. --skip-plan's case): a forward each
            from rayapp.core.log import get_logger

            get_logger(f"rayapp.{stage}").warning("cannot plan micro_batches_per_forward (%s: %s); one forward per "
                                                  "micro-batch", type(exc).__name__, exc)
    return tc.model_copy(update={"micro_batches_per_forward": merge})


def _score_dtype_bytes(sc, gpu: bool) -> int:
    d = sc.dtype
    return 4 if d == "float32" or (d == "auto" and not gpu) else 2


def plan_scoring(cfg: RunConfig, stage: str, sc, where, shape: ModelShape) -> StagePlan:
    """A scoring actor pool's per-GPU memory: ``sc`` its config section (ScoreConfig), ``where`` its
    placement."""
    res = sc.resources
    if not res.num_gpus:
        return StagePlan(stage, shape.name, shape, f"{res.max_actors} CPU actor(s)")
    have, gpu = _gpu(cfg, where)
    b = _score_dtype_bytes(sc, True)
    resident = sc.cached_models or memory.cached_models(shape, have, b)
    tokens = sc.batch_tokens
    auto = tokens is None
    if auto:
        free = (have or 0) - memory.CUDA_CONTEXT - resident * shape.params * b
        tokens = memory.auto_batch_tokens(shape, max(free, 0), b, cfg.data.max_length) if have else 8192
    bounded = bounded_loss_supported(shape.model_type)
    parts = memory.scoring_memory(shape, dtype_bytes=b, batch_tokens=tokens, max_length=cfg.data.max_length,
                                  resident_models=resident, bounded_logits=bounded)
    plan = StagePlan(stage, shape.name, shape, f"{res.max_actors} x {gpu}" + (f" ({_gib(have)})" if have else ""),
                     need=memory.total(parts), have=have, parts=parts,
                     detail=f"{resident} cached checkpoint(s) in {'bf16' if b == 2 else 'fp32'}, batches of "
                            f"{tokens:,} tokens{' (auto)' if auto else ''}, "
                            + ("logits at labelled positions only" if bounded else
                               f"full logits ({shape.model_type}: batch tokens x {shape.vocab:,} vocabulary)"))
    _verdict(plan)
    if plan.verdict == TOO_BIG:
        plan.advice = ("leave score.batch_tokens unset (sized from free memory), set score.cached_models: 1, "
                       "or place scoring on a larger GPU (score.resources.accelerator_type)")
    return plan


def plan_generation(cfg: RunConfig, stage: str, gen, where, shape: ModelShape) -> StagePlan:
    """Generators' per-GPU memory (vLLM engines, or hf on GPUs): ``gen`` their GenerationConfig,
    ``where`` their placement."""
    if gen.backend != "vllm" and not gen.resources.num_gpus:
        return StagePlan(stage, shape.name, shape, "CPU (hf generate)")
    have, gpu = _gpu(cfg, where)
    tp = gen.tensor_parallel_size if gen.backend == "vllm" else 1
    max_len = min(shape.max_positions, cfg.data.max_length + gen.max_new_tokens)
    parts = memory.vllm_memory(shape, tensor_parallel=tp, max_model_len=max_len, batch_size=gen.batch_size,
                               gpu_total=have or 0, utilization=gen.gpu_memory_utilization)
    usable = int(have * gen.gpu_memory_utilization) if have else None
    plan = StagePlan(stage, shape.name, shape, f"{gen.resources.max_actors} engine(s) x {tp} x {gpu}"
                     + (f" ({_gib(have)}, {gen.gpu_memory_utilization:.0%} for vLLM)" if have else ""),
                     need=memory.total(parts), have=usable, parts=parts,
                     detail=f"vLLM, tensor parallel {tp}: bf16 weights, activations, KV cache for one "
                            f"{max_len}-token sequence")
    _verdict(plan)
    if usable is not None and plan.verdict == FITS:
        kv_tokens = (usable - memory.total(parts) + parts["KV cache (one full-length sequence)"]) \
            // memory.kv_bytes_per_token(shape, tp)
        plan.detail += f"; room for ~{kv_tokens:,} KV tokens ({kv_tokens // max_len} full-length sequences)"
    if plan.verdict == TOO_BIG:
        plan.advice = ("raise evaluate.generation.tensor_parallel_size (a power of two, GPUs on one node), "
                       "or use a larger GPU (evaluate.generation.resources.accelerator_type)")
    return plan


def plan_config(cfg: RunConfig, stage_types) -> list[StagePlan]:
    """Every model-loading stage's plan, in pipeline order (``Stage.memory_plans``; prepare and
    select load no model of the config's). ``stage_types``: the pipeline's (``pipeline.STAGE_TYPES``)."""
    return [p for stage_type in stage_types for p in stage_type.memory_plans(cfg)]


def check_fits(cfg: RunConfig, stage_types) -> None:
    """What `rayapp plan` checks, before a run starts: a stage that cannot fit its GPUs stops the
    run now, not when its model is first loaded (CPU-only configs have nothing to check)."""
    from rayapp.core.errors import RayappError
    from rayapp.core.log import get_logger

    if not any(stage_type.uses_gpus(cfg) for stage_type in stage_types):
        return
    try:
        plans = plan_config(cfg, stage_types)
    except OSError as exc:
        get_logger("rayapp.run").warning("cannot plan memory (%s); starting without the check", exc)
        return
    if infeasible(plans):
        raise RayappError("a stage will not fit its GPUs (`rayapp plan` shows it; --skip-plan starts anyway):\n"
                          + format_plans(plans))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plans(plans: list[StagePlan], verbose: bool = False) -> str:
    rows = [("stage", "model", "params", "on", "need / GPU", "has", "verdict")]
    for p in plans:
        rows.append((p.stage, p.model, _count(p.shape.params) if p.shape else "-", p.placement,
                     _gib(p.need) if p.need else "-", _gib(p.have) if p.have else "-", p.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for p in plans:
        if p.verdict == TOO_BIG:
            lines.append(f"{p.stage}: {p.model} needs ~{_gib(p.need)} per GPU ({p.detail}); "
                         f"{p.placement.split(' (')[0].split(' x ')[-1]} has {_gib(p.have)}: use {p.advice}")
        elif p.verdict == UNKNOWN:
            lines.append(f"{p.stage}: {p.model} needs ~{_gib(p.need)} per GPU ({p.detail}); {p.advice}")
        elif verbose and p.parts:
            lines.append(f"{p.stage}: {p.detail}")
        if verbose and p.parts:
            lines += [f"    {k:<44} {_gib(v):>10}" for k, v in p.parts.items()]
    return "\n".join(lines)


def infeasible(plans: list[StagePlan]) -> list[StagePlan]:
    return [p for p in plans if p.verdict == TOO_BIG]
