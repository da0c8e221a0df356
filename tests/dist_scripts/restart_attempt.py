"""A torchrun worker for restart tests: forms the process group through init_parallel (gloo),
then in attempt 0 (TORCHELASTIC_RESTART_COUNT) rank DIE_RANK vanishes (os._exit) while its peers
wait, so the agent restarts every rank. In attempt 1 rank LATE_RANK starts its group LATE_S
seconds after the others, as a slow rank on a busy node does. Each rank that forms its group
prints "attempt <a> rank <r> formed its group"."""
import os
import sys
import time

from masa_megatron.config import ParallelConfig
from masa_megatron.parallel import init_parallel

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == int(os.environ.get("LATE_RANK", "1")):
    time.sleep(float(os.environ.get("LATE_S", "5")))
init_parallel(ParallelConfig(), timeout_minutes=1)
import torch  # noqa: E402

torch.distributed.barrier()
print(f"attempt {attempt} rank {rank} formed its group", flush=True)
if attempt == 0:
    if rank == int(os.environ.get("DIE_RANK", "2")):
        os._exit(9)
    time.sleep(120)            # stopped by the agent once the dying rank is seen
torch.distributed.destroy_process_group()
sys.exit(0)
