"""The offload/reload section of ``eval/gpu_check.py`` (torch only): saved-tensor-sized buffers of
a layer stack kept resident vs offloaded layer by layer to a reused pinned host pool on a side
stream and reloaded last layer first with one layer prefetched; ``torch.cuda.max_memory_allocated``
peaks of both arms (a logical byte count on CPU) and the copy bandwidth each way."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Stand-in sizes: per token a Llama layer with LoRA saves about 6 hidden-wide rows (norm inputs,
# q/k/v, attention output) and 3 intermediate-wide ones (gate, up, down input) for backward.
SAVED_ROWS = ((0, 6), (4, 3))  # (index of the width in SHAPES, rows per token)


def _nbytes(ts: list) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _count(live: list, n: int) -> None:  # the logical count: [bytes resident now, peak]
    live[0] += n
    live[1] = max(live[1], live[0])


def _layers(shapes: list, dtype: torch.dtype, device: str, live: list, n: int):
    gen = torch.Generator(device=device).manual_seed(7)  # both arms make the same data
    for _ in range(n):
        bufs = [torch.empty(s, dtype=dtype, device=device).normal_(generator=gen) for s in shapes]
        _count(live, _nbytes(bufs))
        yield bufs
        del bufs


def _consume(bufs: list, live: list) -> torch.Tensor:  # the backward's read of a layer, then its release
    _count(live, -_nbytes(bufs))
    return sum(b.sum(dtype=torch.float32) for b in bufs)


def _arm_resident(shapes: list, n: int, dtype: torch.dtype, device: str, live: list) -> torch.Tensor:
    stack = list(_layers(shapes, dtype, device, live, n))
    return sum(_consume(stack.pop(), live) for _ in range(n))


def _arm_offload(shapes: list, n: int, dtype: torch.dtype, device: str, host: list, live: list) -> torch.Tensor:
    """Forward: each layer is copied to the host pool on a side stream once made (layer 0 first),
    one copy left in flight; backward: last layer first, the next prefetched on the side stream
    while the current one is read. On CPU the copies are plain synchronous memcpy."""
    cuda = device.startswith("cuda")
    side = torch.cuda.Stream() if cuda else None
    in_flight: list = []  # (event, bytes) of offloads not known complete
    for i, bufs in enumerate(_layers(shapes, dtype, device, live, n)):
        if cuda:
            made = torch.cuda.Event()
            made.record()
            side.wait_event(made)
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for h, b in zip(host[i], bufs):
                h.copy_(b, non_blocking=cuda)
                if cuda:
                    b.record_stream(side)  # freed once the copy is done
            in_flight.append((torch.cuda.Event() if cuda else None, _nbytes(bufs)))
            if cuda:
                in_flight[-1][0].record(side)
        del bufs
        while len(in_flight) > (1 if cuda and i < n - 1 else 0):  # before the next layer is made
            ev, nb = in_flight.pop(0)
            if ev is not None:
                ev.synchronize()
            _count(live, -nb)

    def reload(i: int) -> tuple:
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            dev = [torch.empty(h.shape, dtype=h.dtype, device=device).copy_(h, non_blocking=cuda) for h in host[i]]
            ev = torch.cuda.Event() if cuda else None
            if ev is not None:
                ev.record(side)
        _count(live, _nbytes(dev))
        return dev, ev

    acc, nxt, released = torch.zeros((), device=device), reload(n - 1), None
    for i in reversed(range(n)):
        dev, ev = nxt
        if cuda:
            torch.cuda.current_stream().wait_event(ev)
        if i > 0:
            if released is not None:
                released.synchronize()  # the layer read before this one is free again
            nxt = reload(i - 1)  # prefetch one layer ahead
        acc = acc + _consume(dev, live)
        if cuda:
            for d in dev:
                d.record_stream(torch.cuda.current_stream())
            released = torch.cuda.Event()
            released.record()
        del dev
    return acc


def _copy_gb_s(host: list, device: str, reps: int) -> tuple[float, float]:
    """(device->host, host->device) GB/s of the whole stack on a side stream, median of ``reps``."""
    flat, side = [h for layer in host for h in layer], torch.cuda.Stream() if device.startswith("cuda") else None
    dev = [torch.empty_like(h, device=device) for h in flat]
    rates: dict[str, list[float]] = {"d2h": [], "h2d": []}
    for _ in range(reps):
        for kind, pairs in (("d2h", list(zip(flat, dev))), ("h2d", list(zip(dev, flat)))):
            _sync(device)
            t0 = time.perf_counter()
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=side is not None)
            _sync(device)
            rates[kind].append(_nbytes(flat) / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates["d2h"]), statistics.median(rates["h2d"])


def offload_check(device: str, shape: str, dims: tuple, layers: int, tokens: int, dtype: torch.dtype,
                  reps: int = 3) -> dict:
    """Peaks resident vs offloaded (each arm twice, alternated; the second run kept) and copy GB/s."""
    cuda = device.startswith("cuda")
    shapes = [(tokens, dims[w]) for w, k in SAVED_ROWS for _ in range(k)]
    host = [[torch.empty(s, dtype=dtype, pin_memory=cuda) for s in shapes] for _ in range(layers)]
    out: dict = {}
    for arm in ("no_offload", "offload") * 2:
        live = [0, 0]  # bytes resident now, peak
        _sync(device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start, t0 = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
        acc = (_arm_resident(shapes, layers, dtype, device, live) if arm == "no_offload"
               else _arm_offload(shapes, layers, dtype, device, host, live))
        _sync(device)
        out[f"step_s_{arm}"], out[f"checksum_{arm}"] = time.perf_counter() - t0, float(acc)
        out[f"logical_peak_bytes_{arm}"] = live[1]
        out[f"peak_bytes_{arm}"] = torch.cuda.max_memory_allocated() - start if cuda else live[1]
    d2h, h2d = _copy_gb_s(host, device, reps)
    layer_bytes = _nbytes(host[0])
    return {"section": "offload", "measurement": "cuda" if cuda else "logical-cpu", "is_gpu_number": cuda,
            "shape": shape, "layers": layers, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
            "layer_bytes": layer_bytes, "host_pool_bytes": layer_bytes * layers,
            "reduction": 1.0 - out["peak_bytes_offload"] / out["peak_bytes_no_offload"],
            "checksums_equal": out.pop("checksum_offload") == out.pop("checksum_no_offload"),
            "time_ratio": out["step_s_offload"] / out["step_s_no_offload"], "d2h_gb_s": d2h, "h2d_gb_s": h2d,
            **out}


