"""stages.train, counting per micro-step the operations that make the host wait for the GPU. Prints one
line ``SYNCS {json}``: for each micro-step, which operations (in order).

    python -m tools.benchmarks.host_syncs --config configs/train/tiny_adaptive.yaml [key=value ...]

On CUDA: ``torch.cuda.set_sync_debug_mode("warn")``, CUDA's own account (every synchronizing call warns;
the warnings are collected per micro-step). On the CPU, where every tensor is a host tensor, a
TorchFunctionMode (``SyncCounter``) counts ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
``bool(t)``, ``int(t)``, ``float(t)``, ``torch.equal``, ``.nonzero()`` on a tensor that would live on the
device in a GPU run, telling them apart by where they come from (a propagated "host" tag): the data
loader's batch is host memory; what is computed from host tensors alone stays host; ``.cpu()`` makes
host; ``.to(<torch.device>)`` (how the code moves a tensor to its compute device) and factories given a
``torch.device`` make device tensors, and so do the models' parameters. Counting pauses while the
loader yields a batch. A micro-step's syncs include those the training loop makes after it (the
finite-loss check, and at an optimizer step the statistics and logging). Used by tests/test_train.py
and by ``make gpu-check`` (its ``host_syncs`` line)."""

import json
import sys
import warnings
import weakref

import torch
from torch.overrides import TorchFunctionMode

from pipeline.train import trainer as trainer_module

SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "equal", "nonzero"}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}  # id -> weakref (tensors compare elementwise: no set)
        self.on = False
        self.current: list[str] | None = None

    def tag(self, obj) -> None:
        if isinstance(obj, torch.Tensor):
            self.host[id(obj)] = weakref.ref(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                self.tag(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.tag(v)

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def _tensors(self, args, kwargs):
        out = []
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out += [x for x in a if isinstance(x, torch.Tensor)]
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        ins = self._tensors(args, kwargs)
        on_device = [t for t in ins if not self.is_host(t)]
        if self.on and self.current is not None and name in SYNCS and on_device:
            self.current.append(name)
        if (
            self.on
            and self.current is not None
            and name == "to"
            and on_device
            and "cpu" in [a for a in args[1:] if isinstance(a, str)]
        ):
            self.current.append("to(cpu)")
        out = func(*args, **kwargs)
        if not self.on:
            return out
        to_device = any(isinstance(a, torch.device) for a in list(args[1:]) + list(kwargs.values()))
        if name == "cpu" or (
            name == "to" and not to_device and "cpu" in [a for a in args[1:] if isinstance(a, str)]
        ):
            self.tag(out)
        elif name in ("to", "cuda") and to_device:
            pass  # a move to the compute device
        elif ins and not on_device:
            self.tag(out)
        elif not ins and not to_device:
            self.tag(out)  # a factory on the host
        return out


class CudaSyncCounter:
    """CUDA's sync debug mode: each synchronizing call warns; ``current`` collects them."""

    def __init__(self):
        self.on = False
        self.current: list[str] | None = None
        self._seen = 0

    def tag(self, obj) -> None:
        pass

    def __enter__(self):
        self._cw = warnings.catch_warnings(record=True)
        self._records = self._cw.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        self.flush()
        torch.cuda.set_sync_debug_mode(0)
        self._cw.__exit__(*exc)

    def flush(self) -> None:
        """Assign the warnings since the last flush to the current micro-step (or drop them)."""
        new = self._records[self._seen :]
        self._seen = len(self._records)
        if self.on and self.current is not None:
            self.current += [
                f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"
                for w in new
                if "synchronizing CUDA operation" in str(w.message)
            ]


def install(counter, per_step: list) -> None:
    setup = trainer_module.Trainer.setup
    flush = getattr(counter, "flush", lambda: None)

    def setup_counting(self):
        setup(self)
        step = self.workload.step
        batches = self.workload.batches

        def counted_step(models, batch, micro_step):
            flush()  # the previous micro-step's tail (loss check, optimizer step, logging)
            counter.current = []
            per_step.append({"micro_step": micro_step, "ops": counter.current})
            return step(models, batch, micro_step)

        def quiet_batches(start):
            it = batches(start)
            while True:
                flush()
                counter.on = False
                try:
                    b = next(it)
                finally:
                    flush()  # the loader's own (pinned copies): not the training step's
                    counter.on = True
                counter.tag(b)
                yield b

        self.workload.step = counted_step
        self.workload.batches = quiet_batches

    trainer_module.Trainer.setup = setup_counting


def main(argv: list[str]) -> int:
    from stages import train

    counter = CudaSyncCounter() if torch.cuda.is_available() else SyncCounter()
    per_step: list = []
    install(counter, per_step)
    with counter:
        rc = train.cli_main(argv)
    print("SYNCS " + json.dumps(per_step))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
