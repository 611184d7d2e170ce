"""Train-step benchmark: jaxpeft against transformers + peft, same model, shapes and threads.

  python -m benchmarks.bench_train --model=minilm --shapes=32x128 --out=/tmp/bench.json

For each method (any registered one; default full, lora, bitfit, with the run_glue defaults
for their options) and shape (batch x seq), after compilation: step time, examples/s,
tokens/s, model FLOP/s and that as a fraction of this machine's dense matmul rate (a
model-shaped float32 matmul, measured in the same run), compile time, and peak memory (host
RSS on CPU, device memory on accelerators), with the bytes of trainable parameters,
optimizer state and frozen parameters the step holds. Each measurement runs in its own
process so peak memory is per method. With torch and peft installed, the same step in
PyTorch (AdamW, the same method built from the same options, same shapes, same thread
count) and the ratio.

Model FLOPs: the forward pass is 2 FLOPs per multiply-add of every dense layer plus the
attention products (ModernBERT: its gated feed-forward layer; DeBERTa: also the
content-to-position and position-to-content products and the projections of the relative
embeddings); a method that trains the dense kernels (full) needs 3x that (forward, input
gradients, weight gradients), the others 2x (no frozen weight gradients).
"""

import json
import os
import resource
import subprocess
import sys
import time
import traceback

import numpy as np
from absl import app, flags

from benchmarks import machine
from jaxpeft import cli as _cli  # noqa: F401 - defines --host_malloc, jaxpeft's side here
from jaxpeft import hostmem

flags.DEFINE_string("model", "minilm", "model name or folder")
flags.DEFINE_list("methods", ["full", "lora", "bitfit"], "registered methods to time; "
                  "'name:flag=value:...' sets run_glue options (prompt:prompt_head=virtual), "
                  "jaxpeft's runtime settings (full:fused_qkv=true, onehot_small_tables, "
                  "sorted_word_grads, attention_implementation=cudnn), config values both "
                  "sides take (attention_probs_dropout_prob=0) or XLA options of jaxpeft's "
                  "step (full:xla_cpu_use_onednn=true; '+' for a comma in a value)")
flags.DEFINE_list("shapes", ["32x128"], "batch x sequence shapes")
flags.DEFINE_integer("steps", 8, "timed steps (median reported, mean and slow steps beside)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_bool("torch", True, "also time the PyTorch transformers + peft peer")
flags.DEFINE_integer("threads", 0, "torch threads for the peer (0: one per CPU core, as "
                     "XLA uses)")
flags.DEFINE_enum("peer_mask", "ones", ["ones", "none"], "the peer's attention mask: all "
                  "ones (as jaxpeft gets) or none (lets SDPA skip masking)")
flags.DEFINE_bool("random_weights", False, "build the model from its config with random "
                  "weights (no checkpoint needed; e.g. a bert-base config on a GPU box)")
flags.DEFINE_string("config_json", "", "with --random_weights: a config.json to build from")
flags.DEFINE_string("peak_shape", "4096x384x1536", "MxKxN of the reference matmul (the "
                    "default is model-shaped for MiniLM; use a large one on GPUs)")
flags.DEFINE_string("train_step_xla_options", "", "as run_glue's flag: XLA options "
                    "(name=value, several joined by ';') for the train step's program, or "
                    "'auto': chosen per --methods entry by timing the candidates as a run "
                    "does (the times are printed)")
flags.DEFINE_bool("in_process", False, "run every measurement in this process, one after "
                  "another, rather than each in its own: no process start, CUDA set-up and "
                  "imports per measurement (about half of a 10-minute GPU job), but no peak "
                  "memory per measurement, and on CPU both libraries' thread pools stay up "
                  "(for GPUs)")
flags.DEFINE_bool("interleave", False, "time jaxpeft's --methods entries of a shape in this "
                  "process, one step of each in turn per round: the A/B form, for variants "
                  "whose difference is smaller than the machine's drift between processes "
                  "(peak memory then reads n/a)")
flags.DEFINE_string("out", "", "write all results as JSON here")
flags.DEFINE_enum("peer_malloc", "system", list(hostmem.POLICIES), "the peer's host malloc "
                  "policy (--host_malloc is jaxpeft's and the reference matmul's; system is "
                  "what a transformers + peft script gets). With --in_process both sides run "
                  "under --host_malloc")
flags.DEFINE_string("_worker", "", "internal: run one measurement ('jax:lora:32x128')")


def model_flops(cfg, batch, seq, kernel_grads):
    """Analytic model FLOPs of one training step (see the module docstring)."""
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = batch * seq
    ffn = 3 * d * ff if cfg["model_type"] == "modernbert" else 2 * d * ff  # GeGLU: Wi is 2ff
    dense = 2 * tokens * layers * (4 * d * d + ffn)
    attention = 2 * 2 * batch * layers * seq * seq * d
    forward = dense + attention
    if cfg.get("relative_attention"):  # DeBERTa: c2p and p2c, and projecting the table
        kinds, span = len(cfg["pos_att_type"]), 2 * cfg["position_buckets"]
        forward += kinds * 2 * layers * (batch * seq * span * d + span * d * d)
    return forward * (3 if kernel_grads else 2)


def fastest_call_s(fn, *args, calls: int = 50) -> float:
    """Seconds of the fastest of `calls` calls of jitted `fn` after a first (compiling) one:
    a peak rate, and far steadier than the median on a shared machine (medians of 20 calls
    of the reference matmul ranged 273-495 GFLOP/s within one hour here)."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def peak_matmul_flops(dtype="float32", shape="4096x384x1536"):
    """FLOP/s of a jitted (M x K) @ (K x N) matmul, fastest of 50 calls: this machine's
    reference matmul rate."""
    import jax
    import jax.numpy as jnp

    m, k, n = map(int, shape.split("x"))
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    return 2 * m * k * n / fastest_call_s(jax.jit(lambda a, b: a @ b), a, b)


def _peak_memory_bytes(device=None):
    if device is not None and device.platform != "cpu":
        stats = device.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def each_measurement(f):
    """`(method, batch, seq)` for every --shapes entry and, within it, every --methods one."""
    for shape in f.shapes:
        batch, seq = map(int, shape.split("x"))
        for method in f.methods:
            yield method, batch, seq


def _random_batch(batch, seq, vocab, seed=0):
    rs = np.random.default_rng(seed)
    return {"input_ids": rs.integers(1000, min(vocab, 20000), (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32),
            "labels": rs.integers(0, 2, batch).astype(np.int32),
            "weights": np.ones(batch, np.float32)}


def _load(f, dtype=None):
    """`(model, params, config)` of --model (or --config_json with --random_weights),
    computing in `dtype` (default --dtype)."""
    import jaxpeft
    from jaxpeft.models.checkpoint import resolve_model_dir

    dtype = dtype or f.dtype
    if f.random_weights:
        import jax
        import jax.numpy as jnp
        from jaxpeft.models import EncoderConfig, Runtime
        from jaxpeft.models.registry import build_model

        cfg_d = json.load(open(f.config_json or resolve_model_dir(f.model) / "config.json"))
        cfg = EncoderConfig.from_hf_dict(cfg_d, num_labels=2)
        model = build_model(cfg, Runtime(dtype=dtype))
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return model, params, cfg
    pre = jaxpeft.load_pretrained(f.model, num_labels=2, dtype=dtype, tokenizer=False)
    return pre.model, pre.params, pre.config


# --methods parts that set how jaxpeft computes the step (`jaxpeft.models.Runtime`'s
# candidates: `full:fused_qkv=true`), and config values both sides take (`full:
# attention_probs_dropout_prob=0`, which lets attention run fused in training; by the names
# of BERT's config, which the families whose configs rename them do not read).
RUNTIME_SETTINGS = ("fused_qkv", "onehot_small_tables", "sorted_word_grads",
                    "attention_implementation")
CONFIG_SETTINGS = ("attention_probs_dropout_prob", "hidden_dropout_prob")
# ... and XLA options of jaxpeft's step program alone (`full:xla_cpu_use_onednn=true`).
XLA_PREFIX = "xla_"


def split_spec(spec: str) -> tuple[str, dict, dict]:
    """`(method spec, runtime settings, config values)` of a --methods entry: a method name,
    then optional `:name=value` parts, each a run_glue flag of the method, a
    `RUNTIME_SETTINGS` name or a `CONFIG_SETTINGS` one (XLA options are left out:
    `spec_xla_options`)."""
    name, *options = spec.split(":")
    kept, runtime, config = [name], {}, {}
    for option in options:
        key, value = option.split("=", 1)
        if key in RUNTIME_SETTINGS:
            runtime[key] = {"true": True, "false": False}.get(value.lower(), value)
        elif key in CONFIG_SETTINGS:
            config[key] = float(value)
        elif not key.startswith(XLA_PREFIX):
            kept.append(option)
    return ":".join(kept), runtime, config


def spec_xla_options(spec: str) -> dict:
    """The XLA compiler options of a --methods entry (its `xla_...=value` parts), for
    jaxpeft's train step only: `full:xla_cpu_experimental_ynn_fusion_type=
    LIBRARY_FUSION_TYPE_DOT+LIBRARY_FUSION_TYPE_REDUCE` ('+' stands for the comma that
    --methods itself splits on)."""
    from jaxpeft.config import parse_xla_options

    return parse_xla_options(";".join(o.replace("+", ",") for o in spec.split(":")[1:]
                                      if o.startswith(XLA_PREFIX)))


def peer_spec(spec: str) -> str:
    """The --methods entry as the peer runs it: without jaxpeft's runtime settings (the
    peer's figure for `full:fused_qkv=true` is the one for `full`)."""
    method, _, config = split_spec(spec)
    return ":".join([method, *(f"{k}={v:g}" for k, v in config.items())])


def _peft(spec: str):
    """The `Peft` of a --methods entry (its runtime settings and config values aside)."""
    from jaxpeft.config import RunConfig, parse_value
    from jaxpeft.peft import peft_from_run

    name, *options = split_spec(spec)[0].split(":")
    settings = dict(o.split("=", 1) for o in options)
    return peft_from_run(RunConfig(method=name, **{k: parse_value(k, v)
                                                   for k, v in settings.items()}))


def _train_setup(f, method: str):
    """`(model, params, mask, tx, cfg, peft)` of a --methods entry: the model with the
    method's leaves, its trainable mask and the benchmarks' AdamW."""
    import dataclasses

    import jax

    from jaxpeft.optim import OptimConfig, make_optimizer

    model, params, cfg = _load(f)
    _, runtime, config = split_spec(method)
    if runtime or config:
        cfg = dataclasses.replace(cfg, **config)
        model = model.clone(config=cfg, runtime=dataclasses.replace(model.runtime, **runtime))
    peft = _peft(method)
    model, params = peft.init(model, params, jax.random.key(0))
    mask = peft.mask(params)
    tx = peft.wrap_optimizer(make_optimizer(OptimConfig(learning_rate=1e-4,
                                                        total_steps=10_000), mask), 10_000)
    return model, params, mask, tx, cfg, peft


def start_variant(step, state, frozen, data, rng) -> dict:
    """Runs a new step function twice (compilation, then a warm step); the record that
    `interleave` times. Compile seconds include the first step's run."""
    t0 = time.perf_counter()
    state, m = step(state, data, rng, frozen)
    losses = [float(m["loss"])]
    compile_s = time.perf_counter() - t0
    state, m = step(state, data, rng, frozen)
    losses.append(float(m["loss"]))
    return {"step": step, "state": state, "frozen": frozen, "times": [], "losses": losses,
            "compile_s": compile_s}


# A step this many times its median counts as slow: steps that re-touch memory the VM handed
# back to its host take 1.4-2x the median; ordinary spread stays under 1.1x.
SLOW_STEP = 1.25


def step_stats(times) -> dict:
    """Median step seconds (the comparisons' figure), the mean (what a long run averages)
    and how many steps took over `SLOW_STEP` times the median (why some do: `interleave`)."""
    median = float(np.median(times))
    return {"step_s": median, "mean_step_s": float(np.mean(times)),
            "slow_steps": int(sum(t > SLOW_STEP * median for t in times))}


def interleave(runs: dict, data, rng, rounds: int) -> dict:
    """Steps every variant of `runs` (name -> `start_variant` record) once per round, so a
    change in machine load hits them alike; per variant `step_stats` of its rounds (median,
    mean, slow rounds), compile seconds and every loss.

    On a VM with free page reporting (the CI-class machine), a step that re-touches memory
    XLA freed a second or two before waits for the host to hand it back and takes 1.4-2x its
    usual time, unevenly between variants (docs/performance.md: the malloc settings that
    keep freed memory in the process remove such steps)."""
    import jax

    for _ in range(rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], data, rng, r["frozen"])
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)
            r["losses"].append(float(m["loss"]))
    return {v: {**step_stats(r["times"]), "compile_s": r["compile_s"], "losses": r["losses"]}
            for v, r in runs.items()}


def jax_variant(f, method, batch, seq) -> tuple[dict, dict]:
    """`(start_variant record, facts)` of the jaxpeft train step for one --methods entry and
    shape: compiled and warm, ready for `interleave`; facts: counts, bytes, options."""
    import jax

    from flax import traverse_util

    from jaxpeft import tuning
    from jaxpeft.config import parse_xla_options
    from jaxpeft.train import check_compiler_options, create_train_state, make_train_step

    model, params, mask, tx, cfg, peft = _train_setup(f, method)
    counts = peft.count(params)
    kernel_grads = any(m for p, m in traverse_util.flatten_dict(mask).items()
                       if p[-1] == "kernel" and p[0] != "classifier")
    state, frozen = create_train_state(params, mask, tx)
    del params
    data = jax.device_put(_random_batch(batch, seq, cfg.vocab_size))
    own = spec_xla_options(method)
    build = lambda o: make_train_step(model, tx, {**o, **own}, penalty=peft.penalty)  # noqa: E731
    tuned = None
    if f.train_step_xla_options == tuning.AUTO:
        # As a run with --train_step_xla_options=auto chooses, measured afresh (no cache).
        options, tuned = tuning.choose(build, check_compiler_options, state, data,
                                       jax.random.key(0), frozen)
    else:
        options = parse_xla_options(f.train_step_xla_options)
    step = build(options)
    options = {**options, **own}
    run = start_variant(step, state, frozen, data, jax.random.key(0))
    nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
    # The model's own sequence: a soft prompt adds its virtual tokens to every row.
    facts = {"impl": "jaxpeft", "method": method, "batch": batch, "seq": seq,
             "model_seq": seq + peft.virtual_tokens, "trainable": counts.trainable,
             "kernel_grads": kernel_grads, "trainable_bytes": nbytes(state.trainable),
             "opt_state_bytes": nbytes(state.opt_state), "frozen_bytes": nbytes(frozen),
             "device": jax.devices()[0].device_kind, "threads": os.cpu_count(),
             "compiler_options": options or {}, "auto_measured": tuned}
    return {**run, "data": data}, facts


def jax_interleaved(f, methods, batch, seq) -> list:
    """Times the jaxpeft steps of several --methods entries in this process, one step of
    each in turn per round (`interleave`), so that the machine's drift between them cannot
    pass for a difference; returns a result dict per entry (peak memory: n/a)."""
    import jax

    built = {m: jax_variant(f, m, batch, seq) for m in methods}
    runs = {m: run for m, (run, _) in built.items()}
    timed = interleave(runs, next(iter(runs.values()))["data"], jax.random.key(0), f.steps)
    return [{**facts, **{k: timed[m][k] for k in ("step_s", "mean_step_s", "slow_steps",
                                                  "compile_s")}, "peak_memory_bytes": None}
            for m, (_, facts) in built.items()]


def jax_worker(f, method, batch, seq):
    """Times the jaxpeft train step for one method and shape; returns a dict."""
    import jax

    (result,) = jax_interleaved(f, [method], batch, seq)
    return {**result, "peak_memory_bytes": _peak_memory_bytes(jax.devices()[0])}


def peer_available(f) -> bool:
    """Whether the PyTorch peer runs: --torch, and torch and peft importable."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return f.torch


def torch_peer_model(f, method: str):
    """The transformers + peft model of a --methods entry, from the same weights or config
    as jaxpeft's side, SDPA attention (eager where the family has no SDPA); NotImplementedError
    where peft has no such method."""
    import torch
    import transformers

    from benchmarks.torch_model import torch_model_for
    from jaxpeft.models.checkpoint import resolve_model_dir

    torch.manual_seed(0)
    values = split_spec(method)[2]
    # SDPA where transformers has it for the family (DeBERTa has only its eager attention).
    for attention in ("sdpa", "eager"):
        try:
            if f.random_weights:
                cfg = transformers.AutoConfig.from_pretrained(
                    os.path.dirname(os.path.abspath(f.config_json)) if f.config_json
                    else resolve_model_dir(f.model), num_labels=2, **values)
                model = transformers.AutoModelForSequenceClassification.from_config(
                    cfg, attn_implementation=attention)
            else:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(
                    resolve_model_dir(f.model), num_labels=2, attn_implementation=attention,
                    **values)
            break
        except ValueError:
            if attention == "eager":
                raise
    return torch_model_for(model, _peft(method))


def torch_worker(f, method, batch, seq):
    """Times the transformers + peft train step for one method and shape."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # Threads and attention kernel set explicitly, so the peer is never handicapped by a
    # default (XLA uses every core; SDPA is transformers' fused attention).
    torch.set_num_threads(f.threads or os.cpu_count())
    try:
        model = torch_peer_model(f, method)
    except NotImplementedError as e:
        return {"impl": "torch+peft", "method": method, "skipped": str(e)}
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = _random_batch(batch, seq, model.config.vocab_size)
    types = () if model.config.model_type in ("distilbert", "modernbert") else (
        "token_type_ids",)  # families without token types take none
    keys = ("input_ids",) + types + (("attention_mask",) if f.peer_mask == "ones" else ())
    inputs = {k: torch.tensor(v, dtype=torch.long, device=dev) for k, v in b.items()
              if k in keys}
    labels = torch.tensor(b["labels"], dtype=torch.long, device=dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=f.dtype == "bfloat16")

    def one():
        with autocast:
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    one()
    one()
    times = []
    for _ in range(f.steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": "torch+peft", "method": method, "batch": batch, "seq": seq,
            **step_stats(times), "compile_s": 0.0,
            "trainable": sum(p.numel() for p in params), "peak_memory_bytes": int(peak),
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "attention": model.config._attn_implementation}


def apply_side_malloc(f, impl: str) -> str:
    """Applies the host malloc policy of one side ('jax': --host_malloc, else --peer_malloc)
    in this worker process; returns `hostmem.describe()`."""
    return hostmem.set_policy(f.host_malloc if impl == "jax" else f.peer_malloc)


def _measure(f, spec: str) -> dict:
    """Runs the measurement `spec` names ('jax:lora:32x128', 'torch:prompt:k=v:8x64') here."""
    impl, rest = spec.split(":", 1)
    method, shape = rest.rsplit(":", 1)
    batch, seq = map(int, shape.split("x"))
    if f._worker:  # a fresh process: its side's policy, before anything allocates
        apply_side_malloc(f, impl)
    result = (jax_worker if impl == "jax" else torch_worker)(f, method, batch, seq)
    return {**result, "malloc": hostmem.describe()}


def _run_worker(spec):
    """Runs one measurement in a fresh process (so peak memory is its own), or here with
    --in_process; None, with the worker's error printed, where it fails, so one broken
    method cannot cost the others' figures (GPU time is often short)."""
    f = flags.FLAGS
    if f.in_process:
        try:
            result = _measure(f, spec)
        except Exception:  # noqa: BLE001 - reported, and the other measurements go on
            print(f"worker {spec} failed:\n{traceback.format_exc()[-3000:]}", flush=True)
            return None
        # A process's peak covers every measurement before this one.
        return {**result, "peak_memory_bytes": None}
    args = [a for a in sys.argv[1:] if not a.startswith("--_worker")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", *args,
                           f"--_worker={spec}"], capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"worker {spec} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main(_):
    f = flags.FLAGS
    if f._worker:
        print("RESULT " + json.dumps(_measure(f, f._worker)))
        return
    # Each worker applies its side's policy; the reference matmul runs here under jaxpeft's
    # (docs/performance.md: malloc).
    malloc = hostmem.set_policy(f.host_malloc)
    import jax

    from jaxpeft.models.checkpoint import resolve_model_dir

    from jaxpeft.models import EncoderConfig

    cfg = EncoderConfig.from_hf_dict(json.load(open(
        f.config_json or resolve_model_dir(f.model) / "config.json")), num_labels=2).to_dict()
    peak = peak_matmul_flops("bfloat16" if f.dtype == "bfloat16" else "float32", f.peak_shape)
    have_torch = peer_available(f)
    print(machine.line())
    # With --random_weights the model is built from --config_json (else --model's config).
    model = f"{f.config_json or f.model} (random weights)" if f.random_weights else f.model
    print(f"model {model}, dtype {f.dtype}, device {jax.devices()[0].device_kind} x "
          f"{jax.device_count()}, model-shaped matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"malloc {malloc} (jaxpeft's side; the peer's: its speed line)")
    header = (f"{'shape':>8} {'method':>7} {'impl':>10} {'step ms':>9} {'ex/s':>8} "
              f"{'tok/s':>9} {'GFLOP/s':>8} {'% peak':>7} {'compile s':>9} {'peak MiB':>9} "
              f"{'mean ms':>8} {'slow':>5}")
    print(header)
    results, failed = [], []
    for shape in f.shapes:
        batch, seq = map(int, shape.split("x"))
        by_method = {}
        peers = {}  # one peer measurement serves the variants that differ in jaxpeft only
        together = {}
        if f.interleave:
            try:
                together = dict(zip(f.methods, jax_interleaved(f, f.methods, batch, seq)))
            except Exception:  # noqa: BLE001 - reported; the peer's figures still come
                print(f"interleaved {shape} failed:\n{traceback.format_exc()[-3000:]}",
                      flush=True)
        for method in f.methods:
            spec, theirs = f"jax:{method}:{shape}", f"torch:{peer_spec(method)}:{shape}"
            mine = together.get(method) if f.interleave else _run_worker(spec)
            if mine is None:
                failed.append(spec)
                continue
            rows = [mine]
            if have_torch:
                if theirs not in peers:
                    peers[theirs] = _run_worker(theirs)
                peer = peers[theirs]
                if peer is None:
                    failed.append(theirs)
                elif "skipped" in peer:
                    print(f"{shape:>8} {method:>7} {'torch+peft':>10} skipped: {peer['skipped']}")
                else:
                    rows.append({**peer, "method": method})
            for r in rows:
                flops = model_flops(cfg, batch, rows[0]["model_seq"], rows[0]["kernel_grads"])
                r.update(examples_per_s=batch / r["step_s"], tokens_per_s=batch * seq / r["step_s"],
                         model_flops_per_s=flops / r["step_s"],
                         fraction_of_matmul_peak=flops / r["step_s"] / peak,
                         matmul_peak_flops_per_s=peak)
                print(f"{shape:>8} {method:>7} {r['impl']:>10} {r['step_s'] * 1e3:9.1f} "
                      f"{r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} "
                      f"{r['model_flops_per_s'] / 1e9:8.1f} "
                      f"{100 * r['fraction_of_matmul_peak']:6.1f}% {r['compile_s']:9.1f} "
                      f"{_mib(r['peak_memory_bytes']):>9} {r['mean_step_s'] * 1e3:8.1f} "
                      f"{r['slow_steps']:>2}/{f.steps}")
                results.append(r)
            j = rows[0]
            print(f"{'':>8} {method:>7} {'jaxpeft':>10} holds trainable "
                  f"{j['trainable_bytes'] / 2**20:.1f} MiB, optimizer state "
                  f"{j['opt_state_bytes'] / 2**20:.1f} MiB, frozen {j['frozen_bytes'] / 2**20:.1f} "
                  "MiB (frozen: once, outside the donated state); XLA options "
                  f"{j['compiler_options'] or 'default'}")
            if j.get("auto_measured"):
                print(f"{'':>8} {method:>7} {'jaxpeft':>10} auto measured: " + ", ".join(
                    f"{c['options'] or 'default'} {c['step_ms']:.1f} ms"
                    for c in j["auto_measured"]))
            by_method[method] = rows
        jax_step = {m: rows[0]["step_s"] for m, rows in by_method.items()}
        for m, rows in by_method.items():
            if len(rows) > 1:
                print(f"{shape} {m}: jaxpeft / torch+peft speed = "
                      f"{rows[1]['step_s'] / rows[0]['step_s']:.2f}x (peer: "
                      f"{rows[1]['threads']} threads, {rows[1]['attention']} attention, "
                      f"mask {f.peer_mask}, malloc {rows[1].get('malloc', '?')})")
        if "full" in jax_step:
            for m in jax_step:
                if m != "full":
                    print(f"{shape} jaxpeft {m} step / full step = "
                          f"{jax_step[m] / jax_step['full']:.3f}")
    if f.out:
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        with open(f.out, "w") as fh:
            json.dump({"model": f.model, "dtype": f.dtype, "machine": machine.describe(),
                       "matmul_peak_flops_per_s": peak,
                       "malloc": malloc, "results": results, "failed": failed}, fh, indent=2)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (errors above)")


if __name__ == "__main__":
    app.run(main)
