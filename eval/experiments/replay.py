"""Training throughput with replay vs recompute, on recordings from a LIVE server (docs/results.md,
experiment ``replay``).

What it measures, on SmolLM2-135M-Instruct (``ALCHEMIST_REPLAY_MODEL=tiny``: the tiny model, a
fast smoke run) on this machine's CPU:
  * samples: real multi-turn chat text (``ctx.workload()``, chat template), prompt-heavy (~400
    prompt tokens, 100 response tokens).
  * recordings (``"recordings_source": "live"``): per dtype one real server (the benchmark config
    with ``sglang.dtype`` set, debug commands on, training off, ``record.plan=graph``: the four
    projections plus ``attn`` and ``lse``, a superset of ``full`` and ``down``) prefills each
    prompt sent as token ids over HTTP; ``debug.recording`` exports them from its store (``lse``
    as fp32 values); the server is stopped before anything is timed. The rows are written into an
    in-process ``ActivationStore`` per plan (_replay_live.py; ``lse`` bit-cast into the pool as
    the server stores it), and the TIMED replay arm builds its samples from that store as the
    online loop does: pin, the online loop's own ``build_sample`` (online/recorded_sample.py: for
    the graph plan it rebuilds the ``PromptGraph`` from the pinned rows, inside the timed step),
    step (the trainer reads each layer's rows from the pinned pages), unpin.
  * arms, one AdamW step each over the batch, interleaved with a rotating order over
    ``repetitions``: ``recompute`` (``train.replay=false``), ``replay`` per plan
    (``train.replay=true``), both trainers from the same train config (the benchmark config's
    ``train`` section: layout, ``compile``, learning rate, LoRA), ``ceiling`` per projection plan
    (_replay_arms.py, Note [Ceiling plan]), and the HF transformers + PEFT step, eager and under
    ``torch.compile`` (_replay_hf.py; logits for the loss rows only). LoRA tensors are restored
    after every timed step so every repetition does the same work.
  * ``ratio`` = median over repetitions of recompute time / replay time (same repetition);
    ``ratio_spread`` = max - min of those; ``forward_share`` = the recompute step's forward time
    (_replay_metrics.py ``forward_seconds``) / its whole step; ``prompt_fraction`` by FLOPs and
    ``prompt_fraction_tokens`` (_replay_metrics.py, Note [FLOPs share]; the replayed rows as the
    trainer plans them, ``replayed_tokens``: P - 1 per graph sample); ``ideal_ratio`` =
    1 / (1 - forward_share * prompt_fraction); ``ceiling_ratio``: the ceiling arm's, or for the
    graph plan its ``ideal_ratio`` (``ceiling_source``), Note [Graph ceiling].
  * ``max_grad_rel_err`` (replay) and ``_recompute``: max over LoRA tensors of
    ||g - g_ref|| / ||g_ref||, g_ref from HF + PEFT in fp32 (also for bf16). The adapter is a fresh
    one (B = 0, as right after a merge publish): the served weights are exactly the weights the
    trainer starts from, so live recordings are exact; A's gradients are then exactly zero on
    both sides and the B tensors carry the comparison (``grad_tensors_compared``).
  * ``stale_grad_cos_by_lag``: k real AdamW steps (recompute, default learning rate) from the
    fresh adapter; at the adapter after k steps, cosine between the exact gradient (recompute)
    and replay's gradient on the recordings of the fresh adapter (lag k), k = 1, 2, 4, 8, by a
    trainer whose ``train.max_version_lag`` is 8: the graph plan's cosines are stale graph replay
    (``stale_graph_samples_by_lag`` counts the samples planned that way); past the bound a stale
    graph recording falls back to recompute (exact, so not measured).
  * ``peak_mem_*_bytes`` (``"logical-cpu"``): max over single-sample steps of the storages
    autograd saved (base and adapter excluded), plus for replay the recordings it holds (for the
    graph plan the rebuilt ``PromptGraph``).
  * ``breakdown_ms_per_token`` per arm (ours; not HF): two more steps of the arm under
    ``torch.profiler``, the faster one's time per token in gather, projections, attention, pointwise, lora and
    autograd_other (_replay_breakdown.py, Note [Step breakdown]); ``replay_overhead_share``:
    gather / the profiled step (for the graph arm gather includes the ``PromptGraph`` rebuild);
    ``breakdown_profiled_step_s``: that step's wall time.
  * ``ALCHEMIST_REPLAY_RECORDINGS=local`` (``"recordings_source": "local"``): the recordings are
    made in this process by the trainer's own forward (_replay_live.py ``local_recordings``), no
    server is started: for measuring the trainer alone. They hold projections only, so the graph
    plan is skipped (logged; ``per_plan.graph`` = ``{"plan", "skipped": reason}``).
Top level: the plan the config records by default (``record.plan``, ``auto`` resolved as the server
does, or the greedy choice under ``record.budget_bytes_per_token`` at the config's own dtype), in fp32; ``per_plan``: ``full``, ``down``
and ``graph`` (each with its ``bytes_per_token``, ``replayed_tokens``, ``graph_samples``); ``bf16``: the same in bfloat16
(skipped with --quick); ``record_auto_overrides``: the fp32 ratios as ``--set record.auto.*_ratio``
keys for ``record.plan: auto`` (core/plan_auto.py). ``ALCHEMIST_BENCH_THREADS`` (default 1) sets torch threads;
``ALCHEMIST_REPLAY_LAYOUT`` passes ``layout=`` to every trainer (default: the trainer's own).
Progress: one line per phase, arm and repetition on stderr with the elapsed time.

Note [Graph ceiling]: the ceiling arm substitutes a plan's projection outputs on every row of the
recompute step, which bounds projection replay only; graph replay runs no forward op at all for
its P - 1 rows (attention and elementwise included), so the substituted step is not its ceiling.
Its ``ceiling_ratio`` is its ``ideal_ratio``: the step with the whole forward of its replayed rows
free, from the measured forward share and the FLOPs fraction; no arm is timed for it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval.experiments import _replay_arms as arms
from eval.experiments import _replay_breakdown as breakdown
from eval.experiments import _replay_hf as hf
from eval.experiments import _replay_live as live
from eval.experiments import _replay_metrics as metrics
from eval.hf_reference import build_hf_peft

NAME = "replay"
QUICK = {"samples": 2, "repetitions": 5, "dtypes": (torch.float32,)}
FULL = {"samples": 2, "repetitions": 7, "dtypes": (torch.float32, torch.bfloat16)}
PLANS = {"full": ("qkv", "o", "gate_up", "down"), "down": ("down",),
         "graph": ("qkv", "o", "gate_up", "down", "attn", "lse")}  # core/plan.py GRAPH_TENSORS
GRAPH = "graph"
LOCAL_NO_GRAPH = ("local recordings are the trainer's projection outputs only (no attention "
                  "output or lse): the graph plan needs a live server")
LAGS = (1, 2, 4, 8)
_DTYPE = {torch.float32: ("float32", 4), torch.bfloat16: ("bfloat16", 2)}


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[replay +{time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def default_tensors(cfg, hf_config: dict[str, Any]) -> tuple[str, ...]:
    """The tensors the config's record plan keeps at the config's own serving dtype (``auto``
    resolved as the server resolves it, record/plan_choice.py)."""
    from alchemist_sgl.core.plan import ModelShape
    from alchemist_sgl.record.plan_choice import plan_for

    name = str(cfg.sglang.get("dtype", "auto"))
    if name == "auto":
        name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    nbytes = 4 if name in ("float32", "float") else 2
    return plan_for(cfg, ModelShape.from_hf_config(hf_config, nbytes)).plan.tensors


def run(ctx: Any) -> dict[str, Any]:
    from alchemist_sgl.config import load_config
    from alchemist_sgl.prepare import resolve_model

    source = os.environ.get("ALCHEMIST_REPLAY_RECORDINGS", "live")
    if source not in ("live", "local"):
        raise ValueError(f"ALCHEMIST_REPLAY_RECORDINGS={source!r}: live | local")
    if ctx.url is not None and source == "live":
        raise ValueError("replay starts its own servers (one per dtype); --url is not supported")
    torch.set_num_threads(int(os.environ.get("ALCHEMIST_BENCH_THREADS", "1")))
    log = Progress()
    p = QUICK if ctx.quick else FULL
    model = os.environ.get("ALCHEMIST_REPLAY_MODEL", "smollm2-135m-instruct")
    config_path = Path("configs/cpu-tiny.yaml") if model == "tiny" else Path(ctx.config_path)
    cfg = load_config(config_path)
    folder = resolve_model(model)
    hf_config = json.loads((Path(folder) / "config.json").read_text())
    texts = live.build_chat_samples(folder, ctx.workload(min_turns=2), p["samples"], ctx.seed)
    log(f"{len(texts)} samples: prompts {[len(a) for a, _ in texts]}, responses {[len(b) for _, b in texts]}")
    default = default_tensors(cfg, hf_config)
    if not default:
        raise RuntimeError(f"{config_path}'s record plan records nothing: nothing to replay")
    plans = dict(PLANS)
    skipped = {}
    if source == "local":
        skipped[GRAPH] = LOCAL_NO_GRAPH
        log(f"per_plan.graph skipped: {LOCAL_NO_GRAPH}")
        del plans[GRAPH]
    label = next((k for k, v in plans.items() if v == default), None)
    if label is None:
        label = "default"
        plans[label] = default
    results: dict[torch.dtype, dict[str, Any]] = {}
    ref = None
    for dtype in p["dtypes"]:  # fp32 first: its HF gradients are the reference for bf16 too
        if source == "local":
            exports, served_plan = live.local_recordings(folder, texts, dtype), {"tensors": PLANS["full"]}
            log(f"{_DTYPE[dtype][0]}: recordings made in-process (no server)")
        else:
            exports, served_plan = _record_live(ctx, config_path, cfg, dtype, texts, log)
        missing = [t for v in plans.values() for t in v if t not in served_plan["tensors"]]
        if missing:
            raise RuntimeError(f"the server recorded {served_plan['tensors']}, not {missing}")
        results[dtype], ref = measure(folder, cfg, hf_config, texts, exports, plans, label, dtype,
                                      p["repetitions"], ctx.seed, ref, log)
        for name, reason in skipped.items():
            results[dtype]["per_plan"][name] = {"plan": list(PLANS[name]), "skipped": reason}
        del exports
        _trim()
    out = dict(results[torch.float32])
    # record.plan auto reads these (core/plan_auto.py): the fp32 ratios measured here, as --set keys.
    out["record_auto_overrides"] = [f"record.auto.{n}_ratio={round(out['per_plan'][n]['ratio'], 2)}"
                                    for n in ("graph", "full", "down")
                                    if isinstance(out["per_plan"].get(n, {}).get("ratio"), float)]
    log(f"record.plan auto on this machine: --set {' --set '.join(out['record_auto_overrides'])}")
    if torch.bfloat16 in results:
        out["bf16"] = results[torch.bfloat16]
    import resource
    out.update({"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "recordings_source": source, "model": model, "config_path": str(config_path),
                "threads": torch.get_num_threads(), "samples_per_step": p["samples"],
                "load_avg_1m": os.getloadavg()[0]})
    return out


def _record_live(ctx, config_path: Path, cfg, dtype: torch.dtype, texts, log):
    """One server for ``dtype``: prefill every prompt (and prompt + response), export, stop."""
    name, nbytes = _DTYPE[dtype]
    overrides = [f"sglang.dtype={name}", "server.enable_debug_commands=true", "train.enabled=false"]
    if getattr(cfg.record, "budget_bytes_per_token", None) is not None:
        overrides.append("record.budget_bytes_per_token=null")
    if getattr(cfg.record, "plan", "full") != GRAPH:  # a superset of full and down
        overrides.append(f"record.plan={GRAPH}")
    log(f"{name}: starting a server ({config_path}, {' '.join(overrides)})")
    with ctx.server(config_path, overrides) as url:
        log(f"{name}: server up at {url}")
        exports, plan = live.live_recordings(url, texts, name, log)
    log(f"{name}: server stopped; recorded {plan['tensors']} ({plan['bytes_per_token']} B/token)")
    return exports, plan


def _trim() -> None:
    """Return freed memory to the OS between arms (glibc keeps large freed blocks otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(folder, cfg, hf_config, texts, exports, plans, label, dtype, repetitions, seed, ref, log):
    """One dtype's fields; ``ref``: the fp32 HF + PEFT gradients (computed here when None, which
    requires fp32), returned for the next dtype."""
    from alchemist_sgl.core.plan import ModelShape, RecordPlan
    from alchemist_sgl.train import ReplayTrainer, Sample, load_fused_weights

    dname, nbytes = _DTYPE[dtype]
    weights = load_fused_weights(folder, dtype=dtype)
    shape = ModelShape.from_hf_config(hf_config, nbytes)
    extra = {"layout": os.environ["ALCHEMIST_REPLAY_LAYOUT"]} if os.environ.get("ALCHEMIST_REPLAY_LAYOUT") else {}

    def make(replay: bool, **changes: Any) -> ReplayTrainer:  # one config object for every arm
        return ReplayTrainer(weights, dataclasses.replace(cfg.train, replay=replay, **changes), seed=seed, **extra)

    recompute = make(False)
    replay = {p: make(True) for p in plans}
    ceiling = {p: make(True) for p in plans if p != GRAPH}  # graph: Note [Graph ceiling] below
    stale = make(True, max_version_lag=max(LAGS))
    every = [recompute, stale, *replay.values(), *ceiling.values()]
    for t in every[1:]:
        t.adapter.load_state_dict(recompute.adapter.state_dict())
    stores = {p: live.fill_store([e["prompt"] for e in exports], shape, v, dtype) for p, v in plans.items()}
    for p, v in ((p, v) for p, v in plans.items() if p in ceiling):
        arms.substitute_all_rows(ceiling[p], {tuple(a): {k: t.to(dtype) for k, t in live.rows_of(e["all"], v).items()}
                                              for (a, _), e in zip(texts, exports)})
    log(f"{dname}: stores filled for plans {list(plans)}; trainers built ({len(every)})")

    def plain() -> tuple[list[Any], Any]:
        return [Sample(a, b) for a, b in texts], lambda: None

    def stored(p: str, trainer: Any, version: int = 0):
        def build() -> tuple[list[Any], Any]:
            store, ns = stores[p]
            with torch.profiler.record_function(breakdown.READOUT_REGION):  # gather: pin, read-out, rebuild
                made = [live.sample_from_store(store, ns, a, b, version, trainer) for a, b in texts]
            return [s for s, _ in made], lambda: [store.unpin(pin) for _, pin in made]
        return build

    peft = build_hf_peft(folder, dtype, recompute.adapter)
    hf.share_base(peft, weights)
    hf_params = hf.lora_params(peft)
    hf_opt = torch.optim.AdamW(hf_params, lr=cfg.train.learning_rate, weight_decay=0.0)
    states = {id(t): arms.snapshot(t) for t in every}
    hf_state = ([p.detach().clone() for p in hf_params], copy.deepcopy(hf_opt.state_dict()))

    def restore() -> None:
        for t in every:
            arms.restore(t, states[id(t)])
        with torch.no_grad():
            for p, s in zip(hf_params, hf_state[0]):
                p.copy_(s)

    if ref is None:
        if dtype != torch.float32:
            raise ValueError("the fp32 reference gradients come from an fp32 run")
        ref = hf.reference_grads(peft, texts)
    err_rec, compared = metrics.max_rel_err(arms.step_grads(recompute, plain), ref)
    errs = {p: metrics.max_rel_err(arms.step_grads(replay[p], stored(p, replay[p])), ref)[0] for p in plans}
    log(f"{dname}: grad rel err recompute {err_rec:.2e}, replay {errs} ({compared} tensors)")
    stale_cos, stale_graphs = _stale_cosines(recompute, stale, plans, plain, stored, log, dname)

    exclude = arms.base_storages(weights, every)
    one = lambda build_all: [arms.one(build_all, i) for i in range(len(texts))]  # noqa: E731
    peak_rec = arms.peak_saved_bytes(recompute, one(plain), exclude)
    peaks = {p: arms.peak_saved_bytes(replay[p], one(stored(p, replay[p])), exclude) for p in plans}
    compiled, compile_s, compile_err = hf.compiled(peft, hf_params, hf_opt, texts, restore)
    log(f"{dname}: HF compile: {f'{compile_s:.1f} s' if compiled is not None else compile_err}")

    runners = {"recompute": lambda: arms.timed_step(recompute, plain),
               "hf": lambda: (hf.step(peft, hf_params, hf_opt, texts), None, None)}
    if compiled is not None:
        runners["hf_compiled"] = lambda: (hf.step(compiled, hf_params, hf_opt, texts), None, None)
    for p in plans:
        runners[f"replay:{p}"] = lambda p=p: arms.timed_step(replay[p], stored(p, replay[p]))
    for p in ceiling:
        runners[f"ceiling:{p}"] = lambda p=p: arms.timed_step(ceiling[p], plain)
    times, shares = _time_arms(runners, restore, repetitions, len(texts), log, dname)
    tokens = sum(len(a) + len(b) for a, b in texts)
    dims = breakdown.MatmulDims.from_spec(weights.spec, cfg.train.lora.rank)
    profiled = {k: _profiled(fn, restore, tokens, dims, log, f"{dname}: {k}")
                for k, fn in runners.items() if not k.startswith("hf")}
    share = statistics.median(shares)
    token_share = sum(len(a) for a, _ in texts) / tokens
    lc = cfg.train.lora
    per_plan = {}
    for p, tensors in plans.items():
        replayed, graphs = arms.planned_counts(replay[p], stored(p, replay[p]))
        fractions = metrics.prompt_fractions(shape, tensors, [(len(a), len(b), n) for (a, b), n in zip(texts, replayed)],
                                             int(hf_config["vocab_size"]), lc.rank, lc.targets)
        per_plan[p] = {"plan": list(tensors), "bytes_per_token": RecordPlan(shape, tensors, 16).bytes_per_token,
                       "replayed_tokens": replayed, "graph_samples": graphs, **metrics.plan_fields(
            tokens=tokens, times={"replay": times[f"replay:{p}"], "recompute": times["recompute"]},
            forward_share=share, fractions=fractions,
            ceiling=(metrics.ceiling_ratios(times["recompute"], times[f"ceiling:{p}"], token_share)
                     if p in ceiling else "ideal"),
            errors=(errs[p], err_rec), peak=(peaks[p], peak_rec), stale=stale_cos[p])}
        if p == GRAPH:  # graph_samples < samples: the rest replayed projections (recorded_sample.py)
            if graphs != len(texts):
                log(f"{dname}: WARNING: graph replay planned for {graphs} of {len(texts)} samples")
            per_plan[p]["stale_graph_samples_by_lag"] = stale_graphs
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {**per_plan[label], "dtype": dname, "per_plan": per_plan,
           "tokens_per_s_hf_reference": tokens / med["hf"],
           "tokens_per_s_hf_reference_compiled": tokens / med["hf_compiled"] if compiled is not None else None,
           "hf_compile_s": compile_s, "hf_compile_error": compile_err,
           "peak_mem_measurement": "logical-cpu", "grad_tensors_compared": compared,
           "tokens_per_step": tokens, "step_s_median": med, "step_s_all": times,
           "breakdown_ms_per_token": {k: v["ms_per_token"] for k, v in profiled.items()},
           "replay_overhead_share": {k: breakdown.replay_overhead_share(v["ms_per_token"])
                                     for k, v in profiled.items()},
           "breakdown_profiled_step_s": {k: v["profiled_step_s"] for k, v in profiled.items()},
           "layout": getattr(recompute, "layout", None), "compile": bool(getattr(cfg.train, "compile", False)),
           "learning_rate": cfg.train.learning_rate, "lora_rank": lc.rank}
    return out, ref


def _time_arms(runners, restore, repetitions: int, samples: int, log, dname: str
               ) -> tuple[dict[str, list[float]], list[float]]:
    """One untimed warm-up per arm, then ``repetitions`` rounds over the arms in a rotating order:
    (step seconds per arm, recompute's forward share per repetition)."""
    for fn in runners.values():
        fn()
        restore()
    log(f"{dname}: warm-up done")
    times: dict[str, list[float]] = {k: [] for k in runners}
    shares: list[float] = []
    order = list(runners)
    for rep in range(repetitions):
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            seconds, start, events = runners[name]()
            times[name].append(seconds)
            if name == "recompute":
                shares.append(metrics.forward_seconds(start, events, samples) / seconds)
            restore()
            _trim()
            log(f"{dname}: rep {rep + 1}/{repetitions} {name:<14} {seconds:.3f} s")
    return times, shares


def _profiled(fn, restore, tokens: int, dims, log, label: str) -> dict[str, Any]:
    """Two more steps of an arm under the profiler, the faster one broken down
    (_replay_breakdown.py, Note [Step breakdown])."""
    out = breakdown.profile_breakdown(fn, tokens, dims, steps=2, after=restore)
    _trim()
    ms = out["ms_per_token"]
    log(f"{label} breakdown ms/token: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return out


def _stale_cosines(recompute, stale, plans, plain, stored, log, dname
                   ) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """Per plan {k: cos(exact gradient at theta_k, replay gradient at theta_k on recordings of
    theta_0)}; theta_k = k real recompute AdamW steps from theta_0; and {k: samples the stale
    trainer planned with graph replay} for the graph plan. Trainers restored after."""
    start = arms.snapshot(recompute)
    thetas = [start[0]]
    for _ in range(max(LAGS)):
        samples, _release = plain()
        recompute.step(samples)
        thetas.append(arms.snapshot(recompute)[0])
    arms.restore(recompute, start)
    out: dict[str, dict[int, float]] = {p: {} for p in plans}
    graphs: dict[str, int] = {}
    fresh_stale = arms.snapshot(stale)
    for k in LAGS:
        arms.restore(recompute, (thetas[k], start[1]))
        exact = arms.step_grads(recompute, plain)
        for p in plans:
            arms.restore(stale, (thetas[k], fresh_stale[1]))
            stale.version = k
            out[p][k] = metrics.cosine(exact, arms.step_grads(stale, stored(p, stale, version=0)))
            if p == GRAPH:
                graphs[str(k)] = arms.planned_counts(stale, stored(p, stale, version=0))[1]
        log(f"{dname}: lag {k}: cos {', '.join(f'{p} {out[p][k]:.6f}' for p in plans)}")
    stale.version = 0
    arms.restore(stale, fresh_stale)
    arms.restore(recompute, start)
    return out, graphs
