"""What one rank of a gloo group sees when rayapp builds and shards a model: used by the tests and
by ``python -m benchmarks memory`` through ``rayapp.testing.gloo.run_gloo`` (no Ray needed)."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM). Not ``ru_maxrss``: that survives exec,
    so a process spawned from a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def shard_on_meta(rank: int, world: int, config_file: str, lora: dict | None = None) -> dict:
    """Build the model of ``config_file`` on the meta device and shard it as training does; report
    this rank's parameter bytes (nothing is allocated: the shards stay on meta). ``lora`` (a
    finetune.lora dict): with adapters on a frozen bf16 base, sharded under bf16 mixed precision,
    as a LoRA run on GPUs does."""
    import torch

    from rayapp.ml.models import sharded
    from rayapp.ml.train.fsdp import shard_fsdp2

    config = sharded.load_config(config_file)
    model = sharded.empty_causal_lm(config)
    if lora is not None:
        from rayapp.ml.train import lora as lora_mod

        model = lora_mod.attach(model, lora, config_file, torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_fsdp2(model, bf16=lora is not None, cpu_offload=False)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    trainable_local = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    on_meta = all(p.to_local().device.type == "meta" for p in model.parameters())
    return {"rank": rank, "total_bytes": total, "local_bytes": local, "trainable_local_bytes": trainable_local,
            "all_on_meta": on_meta, "peak_rss_bytes": peak_rss_bytes()}


def sharded_load(rank: int, world: int, folder: str, full_tensors: bool = True) -> dict:
    """Load ``folder`` the way training does with FSDP2 (meta build, shard, read own rows)."""
    import torch

    from rayapp.ml.models import sharded
    from rayapp.ml.train.fsdp import shard_fsdp2

    model = sharded.empty_causal_lm(sharded.load_config(folder))
    buffers = sharded.real_buffers(model)
    shard_fsdp2(model, bf16=False, cpu_offload=False)
    model.to_empty(device="cpu")
    read = sharded.load_local_shards(model, folder, torch.float32, buffers)
    out = {"rank": rank, "bytes_read": read, "peak_rss_bytes": peak_rss_bytes(),
           "local_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters())}
    if full_tensors:  # collective: every rank takes part
        out["state"] = {k: v.full_tensor().numpy() if hasattr(v, "full_tensor") else v.numpy()
                        for k, v in model.state_dict().items()}
    return out


def full_load_then_shard(rank: int, world: int, folder: str) -> dict:
    """The path training took before sharded loading: every rank loads the whole model in fp32 with
    ``from_pretrained``, then shards it (the benchmark's baseline)."""
    import torch

    from rayapp.ml.models.loading import load_causal_lm
    from rayapp.ml.train.fsdp import shard_fsdp2

    model = load_causal_lm(folder, dtype=torch.float32)
    shard_fsdp2(model, bf16=False, cpu_offload=False)
    return {"rank": rank, "peak_rss_bytes": peak_rss_bytes(),
            "local_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters())}


def train_steps(rank: int, world: int, folder: str, rows_file: str, work_dir: str, sharded_init: bool,
                packing: bool = True, merge: int = 1) -> dict:
    """A few optimizer steps of the training recipe on ``world`` gloo ranks, from a sharded load
    (``sharded_init``) or from the former full load on every rank, with packed or padded
    micro-batches, ``merge`` of them a forward; returns the full weights."""
    import pyarrow.parquet as pq
    import torch

    from rayapp.config import TrainConfig
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv, shard_fsdp2

    tc = TrainConfig(epochs=1, per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                     warmup_ratio=0.0, num_workers=world, eval_rows=0, log_every_steps=1000, packing=packing,
                     micro_batches_per_forward=merge)
    cfg = WorkerConfig(stage="probe", train=tc, init_model=folder, tokenizer=folder,
                       total_rows=pq.read_metadata(rows_file).num_rows, train_files=(rows_file,), work_dir=work_dir,
                       staging_dir=None, export_every_epoch=False, eval_file=None)
    recipe = FineTuneRecipe(cfg, WorkerEnv(rank=rank, world=world, local_rank=rank, distributed=True))
    if not sharded_init:
        def full_load_on_every_rank():
            from rayapp.ml.models.loading import load_causal_lm

            model = load_causal_lm(folder, dtype=torch.float32)
            recipe.model = model
            recipe.train_model = shard_fsdp2(model, recipe.bf16, False)
            return model
        recipe._sharded_model = full_load_on_every_rank
    recipe.setup_model()
    recipe.setup_data()
    recipe.setup_optimizer()
    recipe.train()
    state = {k: v.full_tensor().numpy() for k, v in recipe.model.state_dict().items() if hasattr(v, "full_tensor")}
    return {"rank": rank, "steps": recipe.progress.global_step, "state": state, "deferred_sync": recipe.defer_sync,
            "packing": recipe.packing, "merge": recipe.merge}


def train_steps_each(rank: int, world: int, runs: list[tuple]) -> list[dict]:
    """``train_steps`` for each argument tuple of ``runs``, in one process group."""
    return [train_steps(rank, world, *run) for run in runs]


def training_step_memory(rank: int, world: int, folder: str, rows_file: str, work_dir: str,
                         lora: dict | None, micro_batch: int) -> dict:
    """Peak resident memory of one rank of the training recipe at each phase (the sharded model,
    the optimizer, two optimizer steps on one micro-batch: AdamW allocates its state at the first),
    full fine-tuning or, with ``lora`` (a finetune.lora dict), adapters on the frozen base."""
    import pyarrow.parquet as pq

    from rayapp.config import LoraConfig, TrainConfig
    from rayapp.ml.train.collate import collate
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv

    tc = TrainConfig(epochs=1, per_device_batch_size=micro_batch, learning_rate=1e-4, warmup_ratio=0.0,
                     num_workers=world, eval_rows=0, log_every_steps=1000)
    cfg = WorkerConfig(stage="probe", train=tc, init_model=folder, tokenizer=folder,
                       total_rows=pq.read_metadata(rows_file).num_rows, train_files=(rows_file,), work_dir=work_dir,
                       staging_dir=None, export_every_epoch=False, eval_file=None,
                       lora=LoraConfig(**lora) if lora else None)
    recipe = FineTuneRecipe(cfg, WorkerEnv(rank=rank, world=world, local_rank=rank, distributed=True))
    peaks = {"start": peak_rss_bytes()}
    recipe.setup_model()
    peaks["model"] = peak_rss_bytes()
    recipe.setup_data()
    recipe.setup_optimizer()
    batch = collate(recipe.rows.batch(list(range(micro_batch))), recipe.pad_id, "cpu")
    for _ in range(2):
        loss, _ = recipe.train_step([batch], [1.0])
    peaks["two steps"] = peak_rss_bytes()
    local = sum(p.to_local().numel() * p.element_size() for p in recipe.model.parameters())
    return {"rank": rank, "peaks": peaks, "params": recipe.n_params, "trainable_params": recipe.n_trainable,
            "local_param_bytes": local, "loss": loss, "sharded": recipe.sharded}


def lora_adapters_at_start(rank: int, world: int, folder: str, lora: dict) -> dict:
    """The adapters of the training recipe right after ``setup_model`` (full tensors, by name): on a
    gloo group of ``world`` ranks (FSDP2-sharded when world > 1), or in this process for world 1."""
    from rayapp.config import LoraConfig, TrainConfig
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv

    tc = TrainConfig(num_workers=world, fsdp=world > 1)
    cfg = WorkerConfig(stage="probe", train=tc, init_model=folder, tokenizer=folder, total_rows=1,
                       train_files=("unused.parquet",), work_dir=folder, staging_dir=None, export_every_epoch=False,
                       eval_file=None, lora=LoraConfig(**lora))
    recipe = FineTuneRecipe(cfg, WorkerEnv(rank=rank, world=world, local_rank=rank, distributed=world > 1))
    recipe.setup_model()
    return {n.split("base_model.model.")[-1]: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy()
            for n, p in recipe.model.named_parameters() if p.requires_grad}


def collectives_per_step(rank: int, world: int, runs: list[tuple]) -> list[dict]:
    """``_collectives_per_step`` for each (config, keep_gathered, micro_batches, defer_sync[,
    per_forward]) of ``runs``, in one process group (one spawn of the ranks for all)."""
    return [_collectives_per_step(rank, *run) for run in runs]


def _collectives_per_step(rank: int, config: dict, keep_gathered: bool, micro_batches: int,
                          defer_sync: bool = False, per_forward: int = 1) -> dict:
    """FSDP2's all-gathers and reduce-scatters in one optimizer step of ``micro_batches`` (counted
    at FSDP2's own collective calls), with the weights kept gathered through the step or
    re-gathered as FSDP2 does by default, and gradients reduced once a step (``defer_sync``) or
    after every micro-batch, or ``per_forward`` micro-batches packed into each forward (the fused
    loss, each token weighted by its micro-batch, as micro_batches_per_forward does); and the
    weights after the step, which must not depend on any of these."""
    import torch
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayapp.ml.train.fsdp import optimizer_step, shard_fsdp2

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()  # no dropout
    shard_fsdp2(model, bf16=False, cpu_offload=False, keep_gathered=keep_gathered)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = _random_micro_batches(rank, config["vocab_size"], micro_batches)
    weights = [1 / micro_batches] * micro_batches
    if per_forward > 1:
        from rayapp.ml.train import loss
        from rayapp.ml.train.packing import pack_batch

        loss.install(model)
        merged = []
        for lo in range(0, micro_batches, per_forward):
            group = batches[lo:lo + per_forward]
            seqs = [row.tolist() for batch in group for row in batch["input_ids"]]
            per_label = [w for batch in group for w in loss.token_weights(batch["labels"].tolist(), 1 / micro_batches)]
            # a packed row per row: the same positions and mask as the padded micro-batches
            merged.append(pack_batch(seqs, seqs, [[i] for i in range(len(seqs))], 0, per_label))
        batches, weights = merged, [1.0] * len(merged)
    kw = dict(max_grad_norm=1.0, keep_gathered=keep_gathered, defer_sync=defer_sync)
    optimizer_step(model, optimizer, scheduler, batches, weights, **kw)  # FSDP2's lazy set-up
    calls = {"all_gathers": 0, "reduce_scatters": 0}
    real = {"all_gathers": collectives.DefaultAllGather.__call__,
            "reduce_scatters": collectives.DefaultReduceScatter.__call__}

    def counted(kind):
        def call(self, *args, **kwargs):
            calls[kind] += 1
            return real[kind](self, *args, **kwargs)
        return call

    collectives.DefaultAllGather.__call__ = counted("all_gathers")
    collectives.DefaultReduceScatter.__call__ = counted("reduce_scatters")
    try:
        optimizer_step(model, optimizer, scheduler, batches, weights, **kw)
    finally:
        collectives.DefaultAllGather.__call__ = real["all_gathers"]
        collectives.DefaultReduceScatter.__call__ = real["reduce_scatters"]
    state = {k: v.full_tensor().numpy() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")}
    return {**calls, "state": state}


def ddp_allreduces_per_step(rank: int, world: int, config: dict, micro_batches: int) -> dict:
    """DDP's gradient all-reduces in one optimizer step of ``micro_batches`` (counted by a
    communication hook, DDP's own extension point, that then all-reduces as DDP does), and the
    weights after the step."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayapp.ml.train.fsdp import optimizer_step

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval())
    calls = [0]

    def counted(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(dist.group.WORLD, counted)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = _random_micro_batches(rank, config["vocab_size"], micro_batches)
    optimizer_step(model, optimizer, scheduler, batches, [1 / micro_batches] * micro_batches, max_grad_norm=1e9)
    state = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    return {"allreduces": calls[0], "state": state}


def _random_micro_batches(rank: int, vocab_size: int, micro_batches: int) -> list[dict]:
    """Micro-batches of 2 random 16-token rows, every token labelled; each rank draws its own."""
    import torch

    generator = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(micro_batches):
        ids = torch.randint(3, vocab_size, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    return batches
