"""wrpo.py with a full disk injected into one rank's sharded checkpoint write (tests/test_no_lost_work.py):
ENOSPC_RANK is the rank whose writes fail, ENOSPC_IN the folder name they fail in."""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpoint  # noqa: E402
import training  # noqa: E402
import wrpo  # noqa: E402

if os.environ["RANK"] == os.environ["ENOSPC_RANK"]:
    real_write = checkpoint._Crc32Writer.write

    def write(self, b):
        if os.environ["ENOSPC_IN"] in self.f.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        return real_write(self, b)

    checkpoint._Crc32Writer.write = write

training.cli(wrpo.main)
