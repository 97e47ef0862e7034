"""vLLM CPU worker classes for the parallel engine tests (test_parallel.py, ``worker_cls=``).

- :class:`RankOneWithoutPlugin`: rank 1 runs vLLM's own punica wrapper, as a worker whose Python lacks
  the plugin would; the other ranks are untouched.
- :class:`PipelineStageWorker`: works around vLLM 0.32's CPU build, whose later pipeline stages fail
  at their first step (``assert self.intermediate_tensors is not None`` in
  ``sync_and_gather_intermediate_tensors``, with or without LoRA or this plugin): the buffer that
  receives the previous stage's activations is only made by a warm-up run, which the CPU worker skips
  in eager mode, and vLLM's CPU build turns eager mode on whenever LoRA is enabled. This makes the
  buffer as that warm-up would (docs/vllm.md, "Several workers").
"""

from vllm.distributed.parallel_state import get_pp_group
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.worker.cpu_worker import CPUWorker

VLLM_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


class RankOneWithoutPlugin(CPUWorker):
    def __init__(self, *args, **kwargs):
        rank = kwargs.get("rank", args[2] if len(args) > 2 else None)
        if rank == 1:  # undo what register() did to the platform in this process
            CpuPlatform.get_punica_wrapper = classmethod(lambda cls: VLLM_CPU_WRAPPER)
        super().__init__(*args, **kwargs)


class PipelineStageWorker(CPUWorker):
    def execute_model(self, *args, **kwargs):
        runner = self.model_runner
        if runner.intermediate_tensors is None and not get_pp_group().is_first_rank:
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
            )
        return super().execute_model(*args, **kwargs)
