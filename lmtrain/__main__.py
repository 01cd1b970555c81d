"""`python -m lmtrain` (what torchrun's `-m lmtrain` runs). The guard matters: worker processes started
by `trainer.nproc_per_node` import this module again and must not run the command a second time."""

import os

from lmtrain.cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: a failing rank's traceback reaches its report
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()
