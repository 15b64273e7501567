"""`deepseemoe` under torchrun, for the tests: "{rank}" in an argument becomes this process's rank
(ranks started with different arguments), and FAIL_RANK=r makes rank r's disk full when it
writes its first shard (a fault no real disk gives on demand)."""

import errno
import os
import sys

if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    sys.argv = [sys.argv[0], *(a.replace("{rank}", rank) for a in sys.argv[1:])]
    if os.environ.get("FAIL_RANK") == rank:
        from deepseemoe.runs import routing

        def full(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder / "routing"))

        routing.ShardWriter.flush = full
    from deepseemoe.cli import run

    run()
