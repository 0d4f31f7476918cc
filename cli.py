"""How a script meets its user: one-line errors, flags that check their values, outputs written whole, signals.

    from cli import FlagParser, SIZE, run
    p = FlagParser(description=__doc__)
    p.add_argument("--steps", type=SIZE)         # "error: argument --steps: 0 is below 1 (see --help)", exit code 2
    if __name__ == "__main__": run(main)                                         # LoadError -> "error: ..." (exit 1)

Nothing here is about the paper; every script shares it, so that a user's mistake, a full disk or a Ctrl-C ends as
one line, never a traceback or a half-written file.
"""
import argparse
import errno
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from model import LoadError


def run(main, errors=(LoadError,)):
    """Run a script's main(). A user-facing failure ends as one "error: ..." line (exit code 1), not a traceback;
    Ctrl-C or SIGTERM outside a training loop (which stops at the end of its step: stop_at_step_end) as one line
    too, exit code 130 or 143, and so does a disk that fills up. Outputs are written whole (write_text,
    replace_atomically), so nothing half-written stays and the previous checkpoint survives."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main()
        if dist.is_initialized():   # under torchrun, once every rank is done: leave without the interpreter's teardown,
            dist.barrier()          # in which gloo's threads sometimes abort a finished rank under load ("terminate
            sys.stdout.flush()      # called without an active exception"); every output is written and closed
            sys.stderr.flush()
            os._exit(0)
    except errors as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SystemExit(f"error: the disk is full ({e.filename or 'writing an output'}); files written before are "
                         "whole, a checkpoint is the previous one")
    except KeyboardInterrupt as e:
        code = 128 + (e.args[0] if e.args else signal.SIGINT)   # 130 for Ctrl-C, 143 for SIGTERM
        print(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}): stopped at once; outputs and checkpoints are "
              "written whole, so none is left half-written", file=sys.stderr)
        raise SystemExit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C (exit code 143)."""
    raise KeyboardInterrupt(signum)


_requested = []   # the signals that asked a training loop to stop, inside stop_at_step_end()


@contextmanager
def stop_at_step_end():
    """Inside, Ctrl-C or SIGTERM (a scheduler's pre-emption) does not stop the program: stop_requested() says it came,
    and the training loop checkpoints at the end of its step and exits 128 + the signal's number. A second signal
    stops at once (the last checkpoint on disk is whole). Only the main thread can take signals."""
    def request(signum, frame):
        _requested.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    _requested.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested() -> int:
    """The signal that asked the training loop to stop (0: none)."""
    return _requested[0] if _requested else 0


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are one line: "error: argument --batch-size: 0 is below 1 (see --help)", exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def number(kind=int, minimum=None, maximum=None, above=None):
    """An argparse type: an int or a finite float, at least `minimum`, greater than `above`, at most `maximum`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        for failed, why in ((not math.isfinite(value), "is not a finite number"),
                            (minimum is not None and value < minimum, f"is below {minimum}"),
                            (above is not None and value <= above, f"must be greater than {above}"),
                            (maximum is not None and value > maximum, f"is above {maximum}")):
            if failed:
                raise argparse.ArgumentTypeError(f"{text} {why}")
        return value
    return parse


COUNT, SIZE, RATE = number(int, 0), number(int, 1), number(float, above=0)   # limits/steps; sizes; learning rates
NONNEGATIVE, PROBABILITY, TWO_OR_MORE = number(float, 0), number(float, 0, 1), number(int, 2)


def replace_atomically(path: str, write):
    """write(f) to a temporary file opened for binary writing, then rename it to `path`: the file is whole or not
    there, and a crash, a second Ctrl-C or a full disk mid-write leaves the previous version (a checkpoint, a result)
    as it was. A full disk raises OSError naming `path` (torch.save to a file object reports it as one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str):
    """Write a text file whole or not at all (replace_atomically)."""
    replace_atomically(path, lambda f: f.write(text.encode()))


def device(text: str) -> str:
    """An argparse type: a device this torch has ("cuda" on a CPU-only build is a one-line error, not a traceback)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ..)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda are supported")
    count = torch.cuda.device_count()
    if dev.type == "cuda" and (dev.index or 0) >= count:
        seen = f"{count} CUDA device{'s' if count > 1 else ''}" if count else "no CUDA device"
        raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) sees {seen}")
    return text


def output_dir(path: str, flag: str = "--out") -> str:
    """Make the directory that will hold `path` (an output named by `flag`) before any work, or say why it cannot be."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise LoadError(f"{flag} {path}: cannot make its directory ({e.strerror})")
    return path


