"""What AdamW's step allocates on one FSDP2 rank, per implementation (fused, foreach, for-loop):
resident memory before ``optimizer.step()`` against its peak during the step, on the CPU, beside
`rayapp plan`'s figure (ops/plan/memory.py: adamw_step_temporaries). Used by tests/test_plan_memory.py
and ``python -m benchmarks memory`` through ``rayapp.testing.gloo.run_gloo`` (no Ray needed)."""

from __future__ import annotations

IMPL_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def _rss_bytes() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_freed_memory_at_once() -> None:
    """glibc keeps freed heap memory mapped (and raises its mmap threshold after each large free),
    so a freed temporary would stay resident and be reused unseen. A fixed 64 KiB threshold puts
    every tensor in its own mapping, returned to the system when freed."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def adamw_step_growth(rank: int, world: int, model_config: dict, impls: list[str], tokens: int) -> dict:
    """Build ``model_config`` (an HF config dict) in fp32, shard it with FSDP2 as training does (its
    parameters become DTensors), then for each of ``impls``: from the same initial weights, two
    steps of AdamW (the first allocates its state); the second step's growth of resident memory
    above what was resident before it is what the step allocated for itself."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayapp.ml.train.fsdp import shard_fsdp2
    from rayapp.testing.fsdp_probes import peak_rss_bytes

    _release_freed_memory_at_once()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**model_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()  # no dropout: every implementation sees the same gradients (they still flow)
    shard_fsdp2(model, bf16=False, cpu_offload=False)
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().to_local().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.vocab_size, (1, tokens), generator=gen)
    out = {"rank": rank, "local_params": sum(p.to_local().numel() for p in params),
           "largest_local": max(p.to_local().numel() for p in params), "impls": {},
           "build_s": time.perf_counter() - t0}
    for impl in impls:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.to_local().copy_(p0)
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **IMPL_KWARGS[impl])
        t0 = time.perf_counter()
        for step in range(2):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            if step == 1:
                before = _rss_bytes()
                _reset_peak()
            optimizer.step()
            if step == 1:
                growth = peak_rss_bytes() - before
            optimizer.zero_grad(set_to_none=True)
        out["impls"][impl] = {"step_growth_bytes": growth, "seconds": time.perf_counter() - t0,
                              "weights": [p.detach().to_local().clone().numpy() for p in params[:4]]}
        del optimizer
    return out
