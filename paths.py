"""The rules for the paths a user names, shared by the trainers and eval/ (no torch here: eval.judge and eval.plot run
without it): no output may destroy or feed on an input, and a UTF-8 byte-order mark is no part of a file's text."""

import stat
from contextlib import suppress
from pathlib import Path

BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors write first: accepted, and dropped


def path_clash(outputs, inputs):
    """Why writing `outputs` (files or folders) could destroy or feed on `inputs`, or None; checked before any work.
    Links are followed; paths not there (yet) compare by their resolved names, and one that names no file (a NUL byte
    in it) clashes with nothing: its own checks refuse it."""
    def resolved(paths):
        for p in map(Path, filter(None, paths)):
            with suppress(OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
                yield p, p.resolve()

    for out, o in resolved(outputs):
        for given, i in resolved(inputs):
            if o == i or o.exists() and i.exists() and o.samefile(i):  # (hard links too)
                return f"{out} is also an input ({given}); give the output another path"
            if o in i.parents:
                return f"{out} holds the input {given}; give the output a path outside it"
            if i in o.parents:
                return f"{out} lies inside the input folder {given}; give the output a path outside it"
    return None


def kind(mode):
    """What a file of st_mode `mode` is, in words ("a FIFO", ...), for a path that is not the file or folder wanted."""
    return "a file" if stat.S_ISREG(mode) else "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) \
        else "a socket" if stat.S_ISSOCK(mode) else "a device"
