"""wrpo.py with a full disk injected into one rank's sharded checkpoint write (tests/test_no_lost_work.py):
ENOSPC_RANK is the rank whose disk fills, ENOSPC_IN the folder it fills in. The bytes run out a little way
into a file, as on a real disk: inside torch.save's own writer, which reports only a wrong file position."""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import checkpoint  # noqa: E402
import lifecycle  # noqa: E402
import wrpo  # noqa: E402


class FullDisk:
    """A file that takes 200 bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.room = f, 200

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["ENOSPC_RANK"]:
        real_init = checkpoint._ErrorKeepingWriter.__init__

        def init(self, f, fs):
            real_init(self, FullDisk(f) if os.environ["ENOSPC_IN"] in f.name else f, fs)

        checkpoint._ErrorKeepingWriter.__init__ = init
    lifecycle.cli(wrpo.main)
